"""Benchmark entry point: the same as ``qattn bench`` (see ``qattn bench --help``).

    PYTHONPATH=src python3 bench/bench_attention.py --seqlens 1024 4096 16384
"""

import sys

from qattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
