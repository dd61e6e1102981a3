"""``qattn check``: accuracy (and speed) of every preset on an embedded default workload,
or on Q/K/V tensors saved from a user's model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .api import sageattn
from .metrics import THRESHOLDS, accuracy, meets
from .presets import PRESETS
from .reference import exact_attention
from .timing import median_ms

__all__ = ["Workload", "default_workloads", "load_workload", "run_check"]


@dataclass
class Workload:
    """One set of attention inputs, in HND layout."""

    name: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    is_causal: bool = False


def default_workloads(device: torch.device, seed: int = 0) -> list[Workload]:
    """bf16 randn, and randn with the channel bias real models put into K.

    [1, 8, 1024, 128] on the CPU (seconds with the reference), [4, 32, 4096, 128]
    on a GPU (large enough to time).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (4, 32, 4096, 128) if device.type == "cuda" else (1, 8, 1024, 128)

    def randn(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=torch.bfloat16)

    q, k, v = randn(*shape), randn(*shape), randn(*shape)
    k_bias = k + 8 * randn(1, shape[1], 1, shape[3])
    return [
        Workload("randn", q, k, v),
        Workload("randn causal", q, k, v, is_causal=True),
        Workload("K channel bias", q, k_bias, v),
    ]


def load_workload(path: str, device: torch.device) -> Workload:
    """Q/K/V saved with ``torch.save({"q": q, "k": k, "v": v}, path)`` in HND layout
    (optional keys: ``"tensor_layout": "NHD"``, ``"is_causal": True``)."""
    data = torch.load(path, map_location=device, weights_only=True)
    missing = [key for key in ("q", "k", "v") if key not in data]
    if missing:
        raise ValueError(f"--inputs {path}: missing key(s) {missing}; expected a dict with q, k, v")
    q, k, v = data["q"], data["k"], data["v"]
    if data.get("tensor_layout", "HND") == "NHD":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    return Workload(path, q, k, v, bool(data.get("is_causal", False)))


def _time_ms(fn, workload: Workload) -> float:
    repeats = 20 if workload.q.is_cuda else 3
    return median_ms(fn, [(workload.q, workload.k, workload.v)], warmup=2, repeats=repeats)


def run_check(workloads: list[Workload], presets: list[str] | None = None) -> list[dict]:
    """One row per (workload, method): accuracy against fp64 (fp32 on GPU) attention,
    median time, and whether the preset meets its documented thresholds."""
    rows = []
    presets = presets or list(PRESETS)
    for w in workloads:
        nq, nk = w.q.shape[2], w.k.shape[2]
        causal_offset = nk - nq if w.is_causal else None
        exact_dtype = torch.float32 if w.q.is_cuda else torch.float64
        ref, _ = exact_attention(w.q, w.k, w.v, causal_offset=causal_offset, dtype=exact_dtype)
        with torch.inference_mode():
            for name in presets:
                def call(q, k, v, name=name):
                    return sageattn(q, k, v, is_causal=w.is_causal, preset=name)

                out = call(w.q, w.k, w.v)
                metrics = accuracy(out, ref)
                rows.append({
                    "workload": w.name, "shape": list(w.q.shape), "method": name, **metrics,
                    "ms": _time_ms(call, w),
                    "pass": meets(metrics, name) if name in THRESHOLDS else None,
                })
            if nq == nk or not w.is_causal:
                def torch_sdpa(q, k, v):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=w.is_causal,
                                                          enable_gqa=q.shape[1] != k.shape[1])

                out = torch_sdpa(w.q, w.k, w.v)
                rows.append({"workload": w.name, "shape": list(w.q.shape),
                             "method": f"SDPA {str(w.q.dtype)[6:]}",
                             **accuracy(out, ref), "ms": _time_ms(torch_sdpa, w), "pass": None})
    return rows
