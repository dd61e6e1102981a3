"""The ``qattn`` command: ``info``, ``check``, ``bench``."""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
from rich.console import Console
from rich.table import Table

from . import __version__
from .api import default_preset
from .presets import PRESETS

# Piped output (CI logs, files) gets a fixed width so tables are not truncated.
console = Console(width=None if sys.stdout.isatty() else 120)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    return torch.device(name)


def info_dict() -> dict:
    """What runs here: versions, GPU, which presets take the Triton kernels."""
    from .ops import kernel_skip_reason

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = {
        "qattn": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_available": torch.cuda.is_available(),
        "gpu": None,
        "compute_capability": None,
        "default_preset": str(default_preset("cuda" if torch.cuda.is_available() else "cpu")),
        "presets": {},
    }
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name()
        result["compute_capability"] = list(torch.cuda.get_device_capability())
        probe = torch.empty(1, 1, 128, 128, device="cuda", dtype=torch.bfloat16)
        for name, config in PRESETS.items():
            reason = kernel_skip_reason(probe, probe, probe, config)
            result["presets"][name] = "Triton kernel" if reason is None else f"reference ({reason})"
    else:
        for name in PRESETS:
            result["presets"][name] = "reference (CPU)"
    return result


def cmd_info(args) -> int:
    data = info_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    table = Table(title="qattn info", show_header=False)
    for key, value in data.items():
        if key != "presets":
            table.add_row(key, str(value))
    for name, path in data["presets"].items():
        table.add_row(f"preset {name}", path)
    console.print(table)
    return 0


def cmd_check(args) -> int:
    from .check import default_workloads, load_workload, run_check

    device = _device(args.device)
    workloads = [load_workload(args.inputs, device)] if args.inputs else default_workloads(device)
    with console.status("checking presets against exact attention..."):
        rows = run_check(workloads, args.preset)
    if args.json:
        print(json.dumps({"device": str(device), "rows": rows}, indent=2))
    else:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (reference path)"
        shapes = sorted({str(r["shape"]) for r in rows})
        table = Table(title=f"qattn check on {where}, q shape {', '.join(shapes)} (HND)")
        for column in ("workload", "method", "cosine", "rel. L1", "RMSE", "ms", "meets bar"):
            table.add_column(column, no_wrap=True,
                             justify="left" if column in ("workload", "method") else "right")
        for r in rows:
            verdict = {True: "[green]yes[/]", False: "[red]NO[/]", None: "-"}[r["pass"]]
            table.add_row(r["workload"], r["method"], f"{r['cosine']:.6f}", f"{r['rel_l1']:.4f}",
                          f"{r['rmse']:.2e}", f"{r['ms']:.2f}", verdict)
        console.print(table)
        console.print("bars (cosine >=, rel. L1 <=) per preset are in qattn.metrics.THRESHOLDS; "
                      "user inputs (--inputs) are reported, not judged.")
    if args.inputs:
        return 0
    return 0 if all(r["pass"] is not False for r in rows) else 1


def cmd_bench(args) -> int:
    from .benchmark import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qattn", description="Quantized attention for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="GPU, versions, and which kernels run here")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    check = sub.add_parser("check", help="accuracy and speed of each preset vs exact attention")
    check.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    check.add_argument("--inputs", metavar="FILE",
                       help="torch.save'd dict with q, k, v (HND; optional tensor_layout, is_causal)")
    check.add_argument("--preset", action="append", choices=list(PRESETS),
                       help="only these presets (repeatable)")
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(func=cmd_check)

    try:
        from .benchmark import add_arguments
    except ImportError:
        pass
    else:
        bench = sub.add_parser(
            "bench", help="time qattn against torch SDPA backends (suites: grid, decode, varlen)",
            description="Time qattn's whole call against torch SDPA backends on one CUDA GPU "
            "and write JSON, markdown and PNG results. Suites: grid (self-attention over "
            "sequence length and head dim; the default), decode (a few queries after a long "
            "KV cache, GQA), varlen (a packed batch of mixed sequence lengths against SDPA on "
            "nested tensors and on the padded batch).")
        add_arguments(bench)
        bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
