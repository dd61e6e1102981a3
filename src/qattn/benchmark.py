"""``qattn bench``: qattn's whole call against torch SDPA backends (and, when importable,
the original ``sageattention``), side by side on one GPU. Three suites (``--suite``):

- ``grid`` (default): self-attention B x H x N x D over N and D, causal or not, optionally
  with a key-padding mask.
- ``decode``: a few new queries (Nq <= 16) after a long KV cache, GQA, causal aligned
  bottom-right: token generation, where reading K and V is the cost, so GB/s of K and V
  is reported beside TOPS.
- ``varlen``: one packed batch of sequences of mixed lengths (``sageattn_varlen``) against
  SDPA on nested jagged tensors, and against the padded dense batch with a key-padding
  mask that one runs without varlen.

Every method is timed on the same rotating input sets (median of CUDA-event timings
after warm-up); qattn's time includes quantizing Q, K and V. TOPS = 4 x heads x D x
(query, key) pairs / time, the pairs halved for causal in grid and varlen, counted
exactly in decode. Ratios are to SDPA cuDNN, or to the fastest SDPA backend that ran
when cuDNN refuses the shape (the row's ``baseline``). qattn's accuracy is measured
against fp32 attention on a slice of the inputs.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from .api import default_preset, sageattn, sageattn_varlen, sdpa
from .metrics import accuracy
from .timing import median_ms

__all__ = ["add_arguments", "main", "resolve_args", "run_decode", "run_grid", "run_varlen",
           "varlen_lengths", "write_results"]

FULL_GRID_N = (1024, 2048, 4096, 8192, 16384, 32768)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Each suite's own options and their defaults. An option another suite owns is refused
# when given, so that a flag never silently does nothing.
SUITE_OPTIONS = {
    "grid": {"seqlens": FULL_GRID_N, "batch": 4, "head_dims": (64, 128), "causal": "both",
             "key_padding": 0.0},
    "decode": {"seqlens": (1024, 4096, 16384, 32768), "batch": 8, "head_dims": (128,),
               "decode_q": (1, 4, 16), "kv_heads": 8},
    "varlen": {"head_dims": (64, 128), "causal": "both", "varlen_total": 49152,
               "varlen_max": 8192},
}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=tuple(SUITE_OPTIONS), default="grid",
                        help="grid: self-attention over N and D (default); decode: Nq <= 16 "
                        "new queries after a KV cache (GQA, causal bottom-right); varlen: a "
                        "packed batch of mixed lengths (sageattn_varlen) against SDPA on "
                        "nested tensors and on the padded batch")
    parser.add_argument("--seqlens", type=int, nargs="+",
                        help="grid: N (default 1024 2048 4096 8192 16384 32768); "
                        "decode: KV length Nk (default 1024 4096 16384 32768)")
    parser.add_argument("--head-dims", type=int, nargs="+",
                        help="default 64 128 (decode: 128); up to 256")
    parser.add_argument("--causal", choices=("both", "yes", "no"),
                        help="grid, varlen (default both); decode is always causal")
    parser.add_argument("--heads", type=int, default=32, help="query heads (default 32)")
    parser.add_argument("--kv-heads", type=_positive,
                        help="decode: K/V heads (default 8: GQA as in Llama)")
    parser.add_argument("--decode-q", type=_positive, nargs="+", metavar="NQ",
                        help="decode: query lengths (default 1 4 16)")
    parser.add_argument("--varlen-total", type=_positive, metavar="TOKENS",
                        help="varlen: tokens in the packed batch (default 49152)")
    parser.add_argument("--varlen-max", type=_positive, metavar="TOKENS",
                        help="varlen: longest sequence (default 8192); the lengths come "
                        "from a fixed seed, so runs compare")
    parser.add_argument("--batch", type=int,
                        help="grid: batch below 16k tokens, 1 from 16k (default 4); "
                        "decode: batch (default 8)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--preset", action="append", default=None,
                        help="qattn presets to time (default: the GPU's default preset)")
    parser.add_argument("--key-padding", type=float, metavar="FRACTION",
                        help="grid: mask the last FRACTION of keys with a [B, 1, 1, N] bool "
                        "mask (non-causal; qattn runs through qattn.sdpa)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None, help="folder for JSON/markdown/PNG "
                        "(default bench/results/<gpu>)")
    parser.add_argument("--json", action="store_true", help="print the JSON rows to stdout")


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` with the suite's defaults filled in.

    Raises ValueError for an option of another suite, and for query heads that the K/V
    heads do not divide.
    """
    own = SUITE_OPTIONS[args.suite]
    values = vars(args).copy()
    for suite, options in SUITE_OPTIONS.items():
        for name in options:
            if name not in own and values[name] is not None:
                raise ValueError(f"--{name.replace('_', '-')} is an option of --suite {suite}, "
                                 f"not of --suite {args.suite}")
    for name, default in own.items():
        if values[name] is None:
            values[name] = list(default) if isinstance(default, tuple) else default
    if args.suite == "decode" and args.heads % values["kv_heads"]:
        raise ValueError(f"--kv-heads {values['kv_heads']} must divide --heads {args.heads}")
    return argparse.Namespace(**values)


def _sdpa_backend(name: str):
    """torch SDPA held to one backend, so that a shape it refuses raises instead of
    running on another backend under this one's name."""
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]

    def call(q, k, v, is_causal, mask=None, enable_gqa=False):
        kwargs = {"enable_gqa": True} if enable_gqa else {}  # torch < 2.5 has no such argument
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                  **kwargs)

    return call


SDPA_NAMES = {"flash": "flash", "cudnn": "cuDNN", "efficient": "efficient"}


def _methods(presets: list[str], masked: bool) -> dict:
    """Grid: name -> fn(q, k, v, is_causal, mask)."""
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


def _decode_methods(presets: list[str]) -> dict:
    """Decode: name -> fn(q, k, v, mask), all causal aligned bottom-right.

    ``mask`` is for SDPA: ``causal_lower_right(Nq, Nk)``, or None for a single query,
    which sees every key. "qattn auto" is what a user gets by default (torch SDPA for
    short queries); "qattn quantized" forces the quantized kernels.
    """
    methods = {"qattn auto": lambda q, k, v, mask: sageattn(
        q, k, v, is_causal=True, decode="auto", preset=presets[0])}
    for preset in presets:
        name = "qattn quantized" if len(presets) == 1 else f"qattn quantized {preset}"
        methods[name] = lambda q, k, v, mask, preset=preset: sageattn(
            q, k, v, is_causal=True, decode="quantized", preset=preset)
    for backend, label in SDPA_NAMES.items():
        methods[f"SDPA {label}"] = lambda q, k, v, mask, call=_sdpa_backend(backend): call(
            q, k, v, False, mask, enable_gqa=True)
    return methods


def _varlen_methods(presets: list[str], cu_seqlens: torch.Tensor, max_seqlen: int) -> dict:
    """Varlen: name -> (input layout: "packed", "nested" or "padded",
    fn(q, k, v, is_causal, mask))."""
    methods = {}
    for preset in presets:
        methods[f"qattn {preset}"] = ("packed", lambda q, k, v, is_causal, mask, preset=preset:
                                      sageattn_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen,
                                                      max_seqlen, is_causal=is_causal,
                                                      preset=preset))
    for backend, label in SDPA_NAMES.items():
        methods[f"SDPA nested {label}"] = ("nested", _sdpa_backend(backend))
    for backend in ("cudnn", "efficient"):  # flash takes no key-padding mask
        methods[f"SDPA padded {SDPA_NAMES[backend]}"] = ("padded", _sdpa_backend(backend))
    return methods


def _fp32_attention(q, k, v, is_causal, mask=None):
    """fp32 attention without an N^2 buffer (the memory-efficient SDPA backend)."""
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                              is_causal=is_causal)


def _time_methods(timed: dict, repeats: int, label: str, mode=torch.inference_mode) -> dict:
    """name -> median ms of ``fn(*inputs)`` over the method's input sets, for ``timed``
    = name -> (fn, sets), called under ``mode``; None, and one printed line, where the
    method raises (a backend that refuses the shape). torch explains each refusal in
    several UserWarnings per shape: silenced here, the printed line says it once."""
    times = {}
    for name, (fn, sets) in timed.items():
        try:
            with mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                times[name] = median_ms(fn, sets, warmup=3, repeats=repeats)
        except Exception as err:
            times[name] = None
            print(f"{name} {label}: {type(err).__name__}: {err}")
    return times


def _accuracy(outputs: dict, times: dict, ref: torch.Tensor) -> dict:
    """name -> accuracy of ``outputs[name]()`` against ``ref``, for the qattn methods
    that ran (one that raised while timed has no output to judge)."""
    with torch.inference_mode():
        return {name: accuracy(out(), ref) for name, out in outputs.items()
                if name.startswith("qattn") and times[name] is not None}


def _baseline(times: dict, preferred: str) -> str | None:
    """``preferred`` when it ran, else the fastest SDPA method that ran, else None."""
    if times.get(preferred) is not None:
        return preferred
    ran = {name: ms for name, ms in times.items() if name.startswith("SDPA") and ms is not None}
    return min(ran, key=ran.get) if ran else None


def _rows(case: dict, times: dict, acc: dict, flops: float, preferred: str = "SDPA cuDNN",
          kv_bytes: int | None = None) -> list[dict]:
    """One row per method: the case's fields, ms, TOPS, GB/s of K and V when
    ``kv_bytes`` is given, the ratio to the baseline (``vs_cudnn``, named in
    ``baseline``) and, for qattn, the accuracy."""
    baseline = _baseline(times, preferred)
    base_ms = times[baseline] if baseline else None
    rows = []
    for name, ms in times.items():
        row = {"method": name, **case, "ms": ms,
               "tops": flops / (ms * 1e-3) / 1e12 if ms else None}
        if kv_bytes is not None:
            row["gbps"] = kv_bytes / (ms * 1e-3) / 1e9 if ms else None
        row.update(vs_cudnn=base_ms / ms if ms and base_ms else None, baseline=baseline)
        row.update({f"acc_{key}": value for key, value in acc.get(name, {}).items()})
        rows.append(row)
    return rows


def _causal_values(choice: str) -> tuple[bool, ...]:
    return {"both": (False, True), "yes": (True,), "no": (False,)}[choice]


def _cases(progress, cases: list, description: str):
    """``cases``, advancing a rich progress bar when one is given."""
    return progress.track(cases, description=description) if progress else cases


def run_grid(args, progress=None) -> list[dict]:
    """Time every (head dim, causal, N) case; one row per case and method.
    ``args`` as returned by :func:`resolve_args`."""
    device = torch.device("cuda")
    presets = args.preset or [str(default_preset(device))]
    masked = args.key_padding > 0
    methods = _methods(presets, masked)
    if masked and "sageattention" in methods:
        del methods["sageattention"]  # its sageattn takes no mask
    causal_values = _causal_values("no" if masked else args.causal)
    cases = [(d, c, n) for d in args.head_dims for c in causal_values for n in args.seqlens]
    rows = []
    for head_dim, is_causal, n in _cases(progress, cases, "grid"):
        rows += _grid_case(args, methods, head_dim, is_causal, n)
    return rows


def _grid_case(args, methods: dict, head_dim: int, is_causal: bool, n: int) -> list[dict]:
    """One grid case (its inputs are freed on return)."""
    device = torch.device("cuda")
    batch = 1 if n >= 16384 else args.batch
    gen = torch.Generator(device=device).manual_seed(n + head_dim)
    sets = [tuple(torch.randn(batch, args.heads, n, head_dim, device=device,
                              dtype=DTYPES[args.dtype], generator=gen) for _ in range(3))
            for _ in range(2)]
    mask = None
    if args.key_padding > 0:  # every sequence of the batch padded by the same fraction
        mask = torch.ones(batch, 1, 1, n, dtype=torch.bool, device=device)
        mask[..., n - int(n * args.key_padding):] = False
    # Work counted as for the unmasked call: the ratios compare equal work.
    flops = 4 * batch * args.heads * n * n * head_dim / (2 if is_causal else 1)
    times = _time_methods({name: (partial(fn, is_causal=is_causal, mask=mask), sets)
                           for name, fn in methods.items()},
                          args.repeats, f"D={head_dim} N={n} causal={is_causal}")
    q, k, v = (x[:1, :8] for x in sets[0])
    mask1 = mask[:1] if mask is not None else None
    with torch.inference_mode():
        ref = _fp32_attention(q, k, v, is_causal, mask1)
    acc = _accuracy({name: partial(fn, q, k, v, is_causal=is_causal, mask=mask1)
                     for name, fn in methods.items()}, times, ref)
    case = {"head_dim": head_dim, "causal": is_causal, "seqlen": n,
            "key_padding": args.key_padding, "batch": batch, "heads": args.heads,
            "dtype": args.dtype}
    return _rows(case, times, acc, flops)


def run_decode(args, progress=None) -> list[dict]:
    """Time every (head dim, Nq, Nk) decode case; one row per case and method.
    ``args`` as returned by :func:`resolve_args`."""
    presets = args.preset or [str(default_preset(torch.device("cuda")))]
    methods = _decode_methods(presets)
    cases = [(d, nq, nk) for d in args.head_dims for nq in args.decode_q for nk in args.seqlens]
    rows = []
    for head_dim, nq, nk in _cases(progress, cases, "decode"):
        rows += _decode_case(args, methods, head_dim, nq, nk)
    return rows


def _decode_case(args, methods: dict, head_dim: int, nq: int, nk: int) -> list[dict]:
    """One decode case: B x Hq x Nq queries after B x Hkv x Nk cached keys and values."""
    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device=device).manual_seed(nk + nq + head_dim)
    shapes = ((args.batch, args.heads, nq, head_dim), (args.batch, args.kv_heads, nk, head_dim),
              (args.batch, args.kv_heads, nk, head_dim))
    sets = [tuple(torch.randn(shape, device=device, dtype=dtype, generator=gen)
                  for shape in shapes) for _ in range(2)]
    mask = causal_lower_right(nq, nk) if nq > 1 else None
    times = _time_methods({name: (partial(fn, mask=mask), sets) for name, fn in methods.items()},
                          args.repeats, f"D={head_dim} Nq={nq} Nk={nk}")
    # Accuracy on batch entry 0 and the first K/V heads with their query heads (~8).
    group = args.heads // args.kv_heads
    kv_heads = max(1, 8 // group)
    q = sets[0][0][:1, :kv_heads * group]
    k, v = (x[:1, :kv_heads] for x in sets[0][1:])
    visible = torch.ones(nq, nk, dtype=torch.bool, device=device).tril(nk - nq)
    with torch.inference_mode():
        ref = _fp32_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                              False, visible)
    acc = _accuracy({name: partial(fn, q, k, v, mask=mask) for name, fn in methods.items()},
                    times, ref)
    # (query, key) pairs under the bottom-right mask: query i sees Nk - Nq + 1 + i keys.
    pairs = nq * nk - nq * (nq - 1) // 2
    flops = 4 * args.batch * args.heads * pairs * head_dim
    kv_bytes = 2 * args.batch * args.kv_heads * nk * head_dim * dtype.itemsize
    case = {"head_dim": head_dim, "causal": True, "q_len": nq, "seqlen": nk,
            "batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads,
            "dtype": args.dtype}
    return _rows(case, times, acc, flops, kv_bytes=kv_bytes)


def varlen_lengths(total: int, max_len: int, seed: int = 0) -> list[int]:
    """Sequence lengths summing to ``total``, the longest ``min(max_len, total)``.

    One sequence of the maximal length (it sets the padded batch's length, as one long
    document does in practice), the others log-uniform in 1..max_len: many short ones,
    a few long ones, as in packed serving and training batches; the last one is cut to
    what is left. Shuffled. A fixed ``seed`` gives the same list on every run, so runs
    compare.
    """
    rng = random.Random(seed)
    lengths = [min(max_len, total)]
    left = total - lengths[0]
    while left > 0:
        lengths.append(min(left, int(2 ** rng.uniform(0, math.log2(max_len)))))
        left -= lengths[-1]
    rng.shuffle(lengths)
    return lengths


def run_varlen(args, progress=None) -> list[dict]:
    """Time the packed batch of :func:`varlen_lengths` for every (head dim, causal); one
    row per case and method. ``args`` as returned by :func:`resolve_args`.

    Each sequence has as many queries as keys, so SDPA's causal mask on nested tensors
    (aligned top-left) equals qattn's (aligned bottom-right).
    """
    device = torch.device("cuda")
    presets = args.preset or [str(default_preset(device))]
    lengths = varlen_lengths(args.varlen_total, args.varlen_max)
    seqlens = torch.tensor(lengths, device=device)
    offsets = torch.cat([seqlens.new_zeros(1), seqlens.cumsum(0)])  # int64, for nested tensors
    layout = {"lengths": lengths, "offsets": offsets, "max_len": max(lengths),
              # padded layout: token t of the packed batch goes to [sequence, position]
              "sequence": torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                                  seqlens)}
    layout["position"] = torch.arange(sum(lengths), device=device) - offsets[layout["sequence"]]
    layout["key_padding"] = (torch.arange(layout["max_len"], device=device)
                             < seqlens[:, None])[:, None, None, :]
    methods = _varlen_methods(presets, offsets.int(), layout["max_len"])
    cases = [(d, c) for d in args.head_dims for c in _causal_values(args.causal)]
    rows = []
    for head_dim, is_causal in _cases(progress, cases, "varlen"):
        rows += _varlen_case(args, methods, layout, head_dim, is_causal)
    return rows


def _varlen_case(args, methods: dict, layout: dict, head_dim: int, is_causal: bool) -> list[dict]:
    """One varlen case; the nested views and padded copies are made here, untimed."""
    device = torch.device("cuda")
    lengths, offsets, max_len = layout["lengths"], layout["offsets"], layout["max_len"]
    total, heads = sum(lengths), args.heads
    gen = torch.Generator(device=device).manual_seed(total + head_dim)
    packed = [tuple(torch.randn(total, heads, head_dim, device=device, dtype=DTYPES[args.dtype],
                                generator=gen) for _ in range(3)) for _ in range(2)]

    def nest(x):  # [B, j, H, D] -> [B, H, j, D]; the bounds given so no call syncs for them
        return torch.nested.nested_tensor_from_jagged(
            x, offsets, min_seqlen=min(lengths), max_seqlen=max_len).transpose(1, 2)

    def pad(x):  # [B, max_len, H, D] zero-padded -> [B, H, max_len, D]
        out = x.new_zeros(len(lengths), max_len, heads, head_dim)
        out[layout["sequence"], layout["position"]] = x
        return out.transpose(1, 2)

    sets = {"packed": packed, "nested": [tuple(map(nest, s)) for s in packed],
            "padded": [tuple(map(pad, s)) for s in packed]}
    # With right padding the causal mask alone hides the padded keys from real queries.
    masks = {"packed": None, "nested": None,
             "padded": None if is_causal else layout["key_padding"]}
    # Under no_grad, not inference mode: SDPA on nested tensors raises in inference mode
    # (torch 2.11: "Cannot set version_counter for inference tensor").
    times = _time_methods({name: (partial(fn, is_causal=is_causal, mask=masks[kind]), sets[kind])
                           for name, (kind, fn) in methods.items()},
                          args.repeats, f"D={head_dim} causal={is_causal}", mode=torch.no_grad)
    # Accuracy on the first 3 sequences, which lead the packed batch; each one's fp32
    # reference as a [1, H, n, D] batch (4-D, so the memory-efficient backend takes it).
    spans = list(zip(offsets[:3].tolist(), offsets[1:4].tolist()))
    q, k, v = packed[0]
    with torch.inference_mode():
        ref = torch.cat([_fp32_attention(*(x[s:e].transpose(0, 1)[None] for x in (q, k, v)),
                                         is_causal)[0].transpose(0, 1) for s, e in spans])
    end = spans[-1][1]
    acc = _accuracy({name: lambda fn=fn: fn(q, k, v, is_causal=is_causal, mask=None)[:end]
                     for name, (_, fn) in methods.items()}, times, ref)
    flops = sum(4 * heads * n * n * head_dim for n in lengths) / (2 if is_causal else 1)
    case = {"head_dim": head_dim, "causal": is_causal, "sequences": len(lengths),
            "tokens": total, "max_seqlen": max_len, "heads": heads, "dtype": args.dtype}
    return _rows(case, times, acc, flops, preferred="SDPA nested cuDNN")


def _acc_cell(row: dict | None) -> str:
    if row is None or "acc_cosine" not in row:
        return ""
    return f"{row['acc_cosine']:.5f} / {row['acc_rel_l1']:.4f}"


def _method_table(rows: list[dict], methods: list[str], key: str, key_label: str, title: str,
                  cell: Callable[[dict], str]) -> list[str]:
    """Markdown lines: a row per value of ``key`` with a ``cell`` per method ("-" where
    it did not run), then the accuracy of each qattn method that has one."""
    with_acc = [m for m in methods if any(r["method"] == m and "acc_cosine" in r for r in rows)]
    acc_names = (["qattn cosine / rel. L1"] if len(with_acc) == 1
                 else [f"{m} cosine / rel. L1" for m in with_acc])
    lines = [title, f"| {key_label} | " + " | ".join(methods + acc_names) + " |",
             "|---" * (len(methods) + len(acc_names) + 1) + "|"]
    for value in dict.fromkeys(r[key] for r in rows):
        by_method = {r["method"]: r for r in rows if r[key] == value}
        baseline = next(iter(by_method.values()))["baseline"]
        label = f"{value}" if baseline in (None, "SDPA cuDNN") else f"{value} (x vs {baseline})"
        cells = [cell(by_method[m]) if by_method.get(m, {}).get("ms") else "-" for m in methods]
        accs = [_acc_cell(by_method.get(m)) for m in with_acc]
        lines.append(f"| {label} | " + " | ".join(cells + accs) + " |")
    return lines


def markdown_table(rows: list[dict]) -> str:
    """Grid rows -> one markdown table per (head dim, causal): TOPS and ratio to cuDNN."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = []
    for head_dim, is_causal in dict.fromkeys((r["head_dim"], r["causal"]) for r in rows):
        sub = [r for r in rows if r["head_dim"] == head_dim and r["causal"] == is_causal]
        title = (f"\n### D={head_dim}, {'causal' if is_causal else 'non-causal'} "
                 f"(TOPS, whole call; x = ratio to SDPA cuDNN)\n")
        lines += _method_table(sub, methods, "seqlen", "N", title, lambda r: (
            f"{r['tops']:.0f} ({r['vs_cudnn']:.2f}x)" if r["vs_cudnn"] else f"{r['tops']:.0f}"))
    return "\n".join(lines) + "\n"


def decode_markdown_table(rows: list[dict]) -> str:
    """Decode rows -> one markdown table per (head dim, Nq): per KV length, each
    method's ms and GB/s of K and V, and its ratio to cuDNN."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = []
    for head_dim, nq in dict.fromkeys((r["head_dim"], r["q_len"]) for r in rows):
        sub = [r for r in rows if r["head_dim"] == head_dim and r["q_len"] == nq]
        first = sub[0]
        title = (f"\n### D={head_dim}, Nq={nq}, B={first['batch']}, Hq={first['heads']}, "
                 f"Hkv={first['kv_heads']}, causal (ms and GB/s of K and V, whole call; "
                 f"x = ratio to SDPA cuDNN)\n")
        lines += _method_table(sub, methods, "seqlen", "Nk", title, lambda r: (
            f"{r['ms']:.3f} ms, {r['gbps']:.0f} GB/s"
            + (f" ({r['vs_cudnn']:.2f}x)" if r["vs_cudnn"] else "")))
    return "\n".join(lines) + "\n"


def varlen_markdown_table(rows: list[dict]) -> str:
    """Varlen rows -> one markdown table per (head dim, causal): each method's ms and
    TOPS (useful work), and how many times faster each qattn configuration is."""
    lines = []
    for head_dim, is_causal in dict.fromkeys((r["head_dim"], r["causal"]) for r in rows):
        sub = [r for r in rows if r["head_dim"] == head_dim and r["causal"] == is_causal]
        first = sub[0]
        qattn = [r for r in sub if r["method"].startswith("qattn") and r["ms"]]
        lines += [f"\n### D={head_dim}, {'causal' if is_causal else 'non-causal'}: "
                  f"{first['sequences']} sequences, {first['tokens']} tokens "
                  f"(longest {first['max_seqlen']}), H={first['heads']} "
                  f"(whole call; TOPS count the useful work; speedup = the method's time "
                  f"/ qattn's)\n",
                  "| method | ms | TOPS | " + "".join(f"{q['method']} speedup | " for q in qattn)
                  + "qattn cosine / rel. L1 |",
                  "|---" * (len(qattn) + 4) + "|"]
        for r in sub:
            cells = [r["method"], f"{r['ms']:.3f}", f"{r['tops']:.0f}"] if r["ms"] else [
                r["method"], "-", "-"]
            cells += [f"{r['ms'] / q['ms']:.2f}x" if r["ms"] else "-" for q in qattn]
            lines.append("| " + " | ".join(cells + [_acc_cell(r)]) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None: the PNG is optional."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _line_plot(rows: list[dict], path: Path, group: tuple[str, str],
               title: Callable[..., str], x: str, y: str, xlabel: str, ylabel: str) -> bool:
    """A subplot per value of the ``group`` fields, a line of ``y`` over ``x`` (log 2)
    per method."""
    plt = _pyplot()
    if plt is None:
        return False
    groups = list(dict.fromkeys((r[group[0]], r[group[1]]) for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.8), squeeze=False)
    for ax, values in zip(axes[0], groups):
        sub = [r for r in rows if (r[group[0]], r[group[1]]) == values]
        for method in dict.fromkeys(r["method"] for r in sub):
            pts = [(r[x], r[y]) for r in sub if r["method"] == method and r[y]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_title(title(*values))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot(rows: list[dict], path: Path) -> bool:
    """Grid: TOPS over N, a subplot per (head dim, causal)."""
    return _line_plot(rows, path, ("head_dim", "causal"),
                      lambda d, c: f"D={d} {'causal' if c else 'non-causal'}",
                      "seqlen", "tops", "sequence length", "TOPS (whole call)")


def plot_decode(rows: list[dict], path: Path) -> bool:
    """Decode: GB/s of K and V over the KV length, a subplot per (head dim, Nq)."""
    return _line_plot(rows, path, ("head_dim", "q_len"), lambda d, nq: f"D={d} Nq={nq}",
                      "seqlen", "gbps", "KV length Nk", "K+V GB/s (whole call)")


def plot_varlen(rows: list[dict], path: Path) -> bool:
    """Varlen: a bar of TOPS per method, a subplot per (head dim, causal)."""
    plt = _pyplot()
    if plt is None:
        return False
    groups = list(dict.fromkeys((r["head_dim"], r["causal"]) for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.8), squeeze=False)
    for ax, (head_dim, is_causal) in zip(axes[0], groups):
        sub = [r for r in rows if (r["head_dim"], r["causal"]) == (head_dim, is_causal)]
        ax.barh([r["method"] for r in sub], [r["tops"] or 0 for r in sub])
        ax.invert_yaxis()
        ax.set_title(f"D={head_dim} {'causal' if is_causal else 'non-causal'}")
        ax.set_xlabel("TOPS (useful work, whole call)")
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


class Suite(NamedTuple):
    run: Callable
    markdown: Callable[[list[dict]], str]
    plot: Callable[[list[dict], Path], bool]


SUITES = {"grid": Suite(run_grid, markdown_table, plot),
          "decode": Suite(run_decode, decode_markdown_table, plot_decode),
          "varlen": Suite(run_varlen, varlen_markdown_table, plot_varlen)}


def write_results(rows: list[dict], out_dir: Path, meta: dict, stem: str = "attention",
                  suite: str = "grid") -> None:
    """``<stem>.json``, ``<stem>.md`` (the tables) and ``<stem>.png`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    header = (f"# qattn bench on {meta['gpu']}\n\nCommand: `{meta['command']}`  \n"
              f"torch {meta['torch']}, triton {meta['triton']}, {meta['date']}\n")
    if meta.get("note"):
        header += f"\n{meta['note']}\n"
    (out_dir / f"{stem}.md").write_text(header + SUITES[suite].markdown(rows))
    SUITES[suite].plot(rows, out_dir / f"{stem}.png")


def _stem_and_note(args) -> tuple[str, str | None]:
    """The results' file stem and the note that says what the suite measured."""
    if args.suite == "decode":
        return "decode", (
            "Decode: Nq new queries after Nk cached keys, causal aligned bottom-right; "
            "GQA. qattn auto = `sageattn(..., decode=\"auto\")` (torch SDPA for short "
            "queries); qattn quantized = `decode=\"quantized\"` (the quantized kernels, "
            "quantizing K and V on every call). SDPA gets `enable_gqa=True` and "
            "`causal_lower_right(Nq, Nk)` (no mask when Nq = 1). GB/s = bytes of K and V "
            "read once / time.")
    if args.suite == "varlen":
        lengths = varlen_lengths(args.varlen_total, args.varlen_max)
        return "varlen", (
            f"Varlen: one packed batch, sequence lengths (seed 0) {lengths}; as many "
            "queries as keys per sequence. qattn = `sageattn_varlen`; SDPA nested = "
            "nested jagged tensors [B, H, j, D]; SDPA padded = the dense zero-padded batch "
            "[B, H, max, D] with a [B, 1, 1, max] key-padding mask (causal: is_causal "
            "alone, which with right padding hides the padded keys); nesting and padding "
            "are not timed. TOPS count the useful work, so ratios compare equal work.")
    if args.key_padding > 0:
        return f"attention_key_padding_{round(args.key_padding * 100)}", (
            f"Key-padding mask [B, 1, 1, N]: the last {args.key_padding:.0%} of keys "
            "masked; TOPS count the unmasked work, so ratios compare equal work.")
    return "attention", None


def main(args) -> int:
    from rich.progress import Progress

    try:
        args = resolve_args(args)
    except ValueError as err:
        print(f"qattn bench: {err}")
        return 2
    if not torch.cuda.is_available():
        print(f"qattn bench --suite {args.suite} needs a CUDA GPU (qattn check runs on the CPU).")
        return 2
    import triton

    gpu = torch.cuda.get_device_name()
    with Progress() as progress:
        rows = SUITES[args.suite].run(args, progress)
    meta = {"gpu": gpu, "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "suite": args.suite,
            "command": "qattn " + " ".join(getattr(args, "argv", ["bench"]))}
    out_dir = Path(args.out) if args.out else Path("bench/results") / re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-")
    stem, note = _stem_and_note(args)
    if note:
        meta["note"] = note
    write_results(rows, out_dir, meta, stem, args.suite)
    if args.json:
        print(json.dumps(rows, indent=1))
    print(SUITES[args.suite].markdown(rows))
    print(f"results in {out_dir}/")
    return 0
