"""``qattn bench``: qattn's whole call against torch SDPA (FLASH and CUDNN backends) and,
when importable, the original ``sageattention``, side by side on one GPU.

Every method is timed on the same rotating input sets (median of CUDA-event timings
after warm-up); qattn's time includes quantizing Q, K and V. TOPS = 4*B*H*Nq*Nk*D /
time, halved for causal. Each qattn configuration's accuracy is measured against fp32
attention on the first batch entry and up to 8 heads.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .api import default_preset, sageattn, sdpa
from .metrics import accuracy
from .timing import median_ms

__all__ = ["add_arguments", "main", "run_grid", "write_results"]

FULL_GRID_N = (1024, 2048, 4096, 8192, 16384, 32768)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seqlens", type=int, nargs="+", default=list(FULL_GRID_N))
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4, help="batch below 16k tokens (1 from 16k)")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--preset", action="append", default=None,
                        help="qattn presets to time (default: the GPU's default preset)")
    parser.add_argument("--key-padding", type=float, default=0.0, metavar="FRACTION",
                        help="mask the last FRACTION of keys with a [B, 1, 1, N] bool mask "
                        "(non-causal; qattn runs through qattn.sdpa)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None, help="folder for JSON/markdown/PNG "
                        "(default bench/results/<gpu>)")
    parser.add_argument("--json", action="store_true", help="print the JSON rows to stdout")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]

    def call(q, k, v, is_causal, mask=None):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)

    return call


def _methods(presets: list[str], masked: bool) -> dict:
    """name -> fn(q, k, v, is_causal, mask)."""
    methods = {}
    for preset in presets:
        if masked:
            methods[f"qattn {preset}"] = lambda q, k, v, is_causal, mask, preset=preset: sdpa(
                q, k, v, attn_mask=mask, is_causal=is_causal, preset=preset)
        else:
            methods[f"qattn {preset}"] = lambda q, k, v, is_causal, mask, preset=preset: sageattn(
                q, k, v, is_causal=is_causal, preset=preset)
    methods["SDPA flash"] = _sdpa_backend("flash")
    methods["SDPA cuDNN"] = _sdpa_backend("cudnn")
    if masked:  # flash takes no mask; the memory-efficient backend does
        methods["SDPA efficient"] = _sdpa_backend("efficient")
    try:
        import sageattention  # the original package, when a user has it
    except ImportError:
        pass
    else:
        methods["sageattention"] = lambda q, k, v, is_causal, mask: sageattention.sageattn(
            q, k, v, tensor_layout="HND", is_causal=is_causal)
    return methods


def _fp32_attention(q, k, v, is_causal, mask=None):
    """fp32 attention without an N^2 buffer (the memory-efficient SDPA backend)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                              is_causal=is_causal)


def run_grid(args, progress=None) -> list[dict]:
    """Time every (head dim, causal, N) case; one row per case and method."""
    device = torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    presets = args.preset or [str(default_preset(device))]
    masked = args.key_padding > 0
    methods = _methods(presets, masked)
    if masked and "sageattention" in methods:
        del methods["sageattention"]  # its sageattn takes no mask
    causal_values = {"both": (False, True), "yes": (True,), "no": (False,)}[
        "no" if masked else args.causal]
    cases = [(d, c, n) for d in args.head_dims for c in causal_values for n in args.seqlens]
    rows = []
    task = progress.add_task("bench", total=len(cases)) if progress else None
    for head_dim, is_causal, n in cases:
        batch = 1 if n >= 16384 else args.batch
        gen = torch.Generator(device=device).manual_seed(n + head_dim)
        sets = [tuple(torch.randn(batch, args.heads, n, head_dim, device=device, dtype=dtype,
                                  generator=gen) for _ in range(3)) for _ in range(2)]
        mask = None
        if masked:  # every sequence of the batch padded by the same fraction
            mask = torch.ones(batch, 1, 1, n, dtype=torch.bool, device=device)
            mask[..., n - int(n * args.key_padding):] = False
        # Work counted as for the unmasked call: the ratios compare equal work.
        flops = 4 * batch * args.heads * n * n * head_dim / (2 if is_causal else 1)
        times = {}
        for name, fn in methods.items():
            try:
                with torch.inference_mode():
                    ms = median_ms(lambda q, k, v: fn(q, k, v, is_causal, mask), sets,
                                   warmup=3, repeats=args.repeats)
                times[name] = ms
            except Exception as err:  # a backend that refuses this shape
                times[name] = None
                print(f"{name} D={head_dim} N={n} causal={is_causal}: {type(err).__name__}: {err}")
        q, k, v = (x[:1, :8] for x in sets[0])
        mask1 = mask[:1] if mask is not None else None
        with torch.inference_mode():
            ref = _fp32_attention(q, k, v, is_causal, mask1)
            acc = {name: accuracy(methods[name](q, k, v, is_causal, mask1), ref)
                   for name in methods if name.startswith("qattn")}
        cudnn = times.get("SDPA cuDNN")
        for name, ms in times.items():
            row = {"method": name, "head_dim": head_dim, "causal": is_causal, "seqlen": n,
                   "key_padding": args.key_padding,
                   "batch": batch, "heads": args.heads, "dtype": args.dtype, "ms": ms,
                   "tops": flops / (ms * 1e-3) / 1e12 if ms else None,
                   "vs_cudnn": cudnn / ms if ms and cudnn else None}
            row.update({f"acc_{key}": value for key, value in acc.get(name, {}).items()})
            rows.append(row)
        del sets
        if progress:
            progress.advance(task)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Rows -> one markdown table per (head dim, causal): TOPS and ratio to cuDNN."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = []
    for head_dim, is_causal in dict.fromkeys((r["head_dim"], r["causal"]) for r in rows):
        sub = [r for r in rows if r["head_dim"] == head_dim and r["causal"] == is_causal]
        lines.append(f"\n### D={head_dim}, {'causal' if is_causal else 'non-causal'} "
                     f"(TOPS, whole call; x = ratio to SDPA cuDNN)\n")
        lines.append("| N | " + " | ".join(methods) + " | qattn cosine / rel. L1 |")
        lines.append("|---" * (len(methods) + 2) + "|")
        for n in dict.fromkeys(r["seqlen"] for r in sub):
            cells, acc = [], ""
            for m in methods:
                r = next((r for r in sub if r["seqlen"] == n and r["method"] == m), None)
                if r is None or r["tops"] is None:
                    cells.append("-")
                    continue
                cells.append(f"{r['tops']:.0f} ({r['vs_cudnn']:.2f}x)" if r["vs_cudnn"] else f"{r['tops']:.0f}")
                if "acc_cosine" in r and not acc:
                    acc = f"{r['acc_cosine']:.5f} / {r['acc_rel_l1']:.4f}"
            lines.append(f"| {n} | " + " | ".join(cells) + f" | {acc} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = list(dict.fromkeys((r["head_dim"], r["causal"]) for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.8), squeeze=False)
    for ax, (head_dim, is_causal) in zip(axes[0], groups):
        sub = [r for r in rows if r["head_dim"] == head_dim and r["causal"] == is_causal]
        for method in dict.fromkeys(r["method"] for r in sub):
            pts = [(r["seqlen"], r["tops"]) for r in sub if r["method"] == method and r["tops"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_title(f"D={head_dim} {'causal' if is_causal else 'non-causal'}")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TOPS (whole call)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(rows: list[dict], out_dir: Path, meta: dict, stem: str = "attention") -> None:
    """``<stem>.json``, ``<stem>.md`` (the tables) and ``<stem>.png`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    header = (f"# qattn bench on {meta['gpu']}\n\nCommand: `{meta['command']}`  \n"
              f"torch {meta['torch']}, triton {meta['triton']}, {meta['date']}\n")
    if meta.get("note"):
        header += f"\n{meta['note']}\n"
    (out_dir / f"{stem}.md").write_text(header + markdown_table(rows))
    plot(rows, out_dir / f"{stem}.png")


def main(args) -> int:
    import triton
    from rich.progress import Progress

    if not torch.cuda.is_available():
        print("qattn bench needs a CUDA GPU (qattn check runs on the CPU).")
        return 2
    gpu = torch.cuda.get_device_name()
    with Progress() as progress:
        rows = run_grid(args, progress)
    meta = {"gpu": gpu, "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": "qattn " + " ".join(getattr(args, "argv", ["bench"]))}
    out_dir = Path(args.out) if args.out else Path("bench/results") / re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-")
    stem = "attention"
    if args.key_padding > 0:
        stem = f"attention_key_padding_{round(args.key_padding * 100)}"
        meta["note"] = (f"Key-padding mask [B, 1, 1, N]: the last {args.key_padding:.0%} of keys "
                        "masked; TOPS count the unmasked work, so ratios compare equal work.")
    write_results(rows, out_dir, meta, stem)
    if args.json:
        print(json.dumps(rows, indent=1))
    print(markdown_table(rows))
    print(f"results in {out_dir}/")
    return 0
