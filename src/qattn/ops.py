"""The ``torch.library`` layer: quantized attention as custom ops, ``qattn::attention``
(dense [B, H, N, D]) and ``qattn::attention_varlen`` (packed sequences).

Being an opaque op with a fake (meta) implementation lets ``torch.compile`` trace
through ``qattn.sageattn`` / ``qattn.sdpa`` without a graph break and lets the
Triton launches be captured in CUDA graphs. Inside, it runs the Triton kernels when
they support the call and the PyTorch reference otherwise. Eager calls of
:func:`attention` run the op's body directly (the dispatcher costs host time that short
sequences feel); under ``torch.compile`` they go through the op.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

from . import reference
from .presets import QuantConfig

__all__ = ["attention", "attention_varlen", "kernel_skip_reason", "device_capability", "log_once"]

logger = logging.getLogger("qattn")
_logged: set[str] = set()


def log_once(message: str) -> None:
    """Log ``message`` on the ``qattn`` logger the first time it is seen."""
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


_capabilities: dict[int, tuple[int, int]] = {}


def device_capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of a CUDA device, cached (it is asked on every call; a plain
    dict rather than lru_cache, which torch.compile warns about)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capabilities:
        _capabilities[index] = torch.cuda.get_device_capability(index)
    return _capabilities[index]


def kernel_skip_reason(q, k, v, config: QuantConfig, attn_mask=None) -> str | None:
    """None when the Triton kernels can run this call, else why not."""
    if q.device.type != "cuda":
        return f"device {q.device.type!r} has no Triton kernels"
    if attn_mask is not None and (
        attn_mask.device != q.device
        or (attn_mask.dtype != torch.bool and not attn_mask.is_floating_point())
    ):
        return f"attn_mask of dtype {attn_mask.dtype} on {attn_mask.device}"
    capability = device_capability(q.device)
    if capability < (8, 0):
        return f"compute capability {capability} < (8, 0)"
    if config.pv_dtype.value == "fp8" and capability < (8, 9):
        return f"FP8 P~V needs compute capability >= (8, 9), this GPU has {capability}"
    try:
        from . import kernels
    except ImportError as err:  # triton missing or too old
        return f"Triton kernels unavailable ({err})"
    return kernels.supports(config, q, k, v)


def _run(q, k, v, attn_mask, config, sm_scale, causal_offset, return_lse, out_nhd):
    """The op's body: the Triton kernels when they support the call, else the reference."""
    batch, heads, nq, _ = q.shape
    reason = kernel_skip_reason(q, k, v, config, attn_mask)
    if reason is None:
        from . import kernels

        if out_nhd:
            out = q.new_empty(batch, nq, heads, v.shape[-1])
            out_hnd = out.transpose(1, 2)
        else:
            out = out_hnd = q.new_empty(batch, heads, nq, v.shape[-1])
        _, lse = kernels.attention_forward(
            q, k, v, config, sm_scale=sm_scale, causal_offset=causal_offset,
            return_lse=return_lse, out=out_hnd, attn_mask=attn_mask, check=False,
        )
        return out, (lse if return_lse else q.new_empty(0, dtype=torch.float32))

    if q.device.type == "cuda":
        log_once(f"qattn: running the PyTorch reference on the GPU (slow): {reason}")
    out, lse = reference.sage_attention(
        q, k, v, config, sm_scale=sm_scale, causal_offset=causal_offset,
        attn_mask=attn_mask, return_lse=True,
    )
    out = out.transpose(1, 2).contiguous() if out_nhd else out
    return out, (lse if return_lse else q.new_empty(0, dtype=torch.float32))


@functools.lru_cache(maxsize=64)
def _config(*fields) -> QuantConfig:
    return QuantConfig(*fields)


def _config_fields(config: QuantConfig) -> tuple:
    """``config`` as the ops' schema takes it (the inverse of :func:`_config`)."""
    return (config.qk_dtype.value, config.granularity.value, config.smooth_k, config.smooth_q,
            config.pv_dtype.value, config.pv_accum.value, config.smooth_v)


@torch.library.custom_op("qattn::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    qk_dtype: str,
    granularity: str,
    smooth_k: bool,
    smooth_q: bool,
    pv_dtype: str,
    pv_accum: str,
    smooth_v: bool,
    sm_scale: float,
    causal_offset: Optional[int],
    return_lse: bool,
    out_nhd: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    config = _config(qk_dtype, granularity, smooth_k, smooth_q, pv_dtype, pv_accum, smooth_v)
    return _run(q, k, v, attn_mask, config, sm_scale, causal_offset, return_lse, out_nhd)


@_attention_op.register_fake
def _(q, k, v, attn_mask, qk_dtype, granularity, smooth_k, smooth_q, pv_dtype, pv_accum,
      smooth_v, sm_scale, causal_offset, return_lse, out_nhd):
    batch, heads, nq, _ = q.shape
    shape = (batch, nq, heads, v.shape[-1]) if out_nhd else (batch, heads, nq, v.shape[-1])
    lse = q.new_empty((batch, heads, nq) if return_lse else (0,), dtype=torch.float32)
    return q.new_empty(shape), lse


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: QuantConfig,
    *,
    sm_scale: float,
    causal_offset: int | None = None,
    attn_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    out_nhd: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantized attention on HND views q [B,Hq,Nq,D], k [B,Hkv,Nk,D], v [B,Hkv,Nk,Dv].

    Returns O ([B,Nq,Hq,Dv] if ``out_nhd`` else [B,Hq,Nq,Dv], q's dtype) and the
    natural-log LSE [B,Hq,Nq] (fp32) or None. Masking as in
    :func:`qattn.reference.sage_attention`.

    Under ``torch.compile`` this calls the custom op (opaque to the compiler, with its
    fake impl); in eager mode it runs the op's body directly, skipping the dispatcher's
    per-call cost, which matters at short sequence lengths.
    """
    if not torch.compiler.is_compiling():
        out, lse = _run(q, k, v, attn_mask, config, float(sm_scale), causal_offset,
                        return_lse, out_nhd)
        return out, (lse if return_lse else None)
    out, lse = _attention_op(
        q, k, v, attn_mask, *_config_fields(config), float(sm_scale), causal_offset, return_lse,
        out_nhd,
    )
    return out, (lse if return_lse else None)


def _run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, config,
                sm_scale, causal, return_lse):
    """Body of ``qattn::attention_varlen``: the Triton kernels when they support the call
    (no host sync), else the reference sequence by sequence (reads the offsets)."""
    as_4d = [x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)]  # [1, H, total, D] views
    reason = kernel_skip_reason(*as_4d, config)
    if reason is None:
        from . import kernels

        out, lse = kernels.attention_forward_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, config,
            sm_scale=sm_scale, causal=causal, return_lse=return_lse,
        )
    else:
        if q.device.type == "cuda":
            log_once(f"qattn: running the PyTorch reference on the GPU (slow): {reason}")
        out, lse = reference.sage_attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, config, sm_scale=sm_scale, causal=causal,
            return_lse=True,
        )
    return out, (lse if return_lse else q.new_empty(0, dtype=torch.float32))


@torch.library.custom_op("qattn::attention_varlen", mutates_args=())
def _attention_varlen_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    qk_dtype: str,
    granularity: str,
    smooth_k: bool,
    smooth_q: bool,
    pv_dtype: str,
    pv_accum: str,
    smooth_v: bool,
    sm_scale: float,
    causal: bool,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    config = _config(qk_dtype, granularity, smooth_k, smooth_q, pv_dtype, pv_accum, smooth_v)
    return _run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, config,
                       sm_scale, causal, return_lse)


@_attention_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, qk_dtype, granularity,
      smooth_k, smooth_q, pv_dtype, pv_accum, smooth_v, sm_scale, causal, return_lse):
    total_q, heads, _ = q.shape
    lse = q.new_empty((heads, total_q) if return_lse else (0,), dtype=torch.float32)
    return q.new_empty((total_q, heads, v.shape[-1])), lse


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    config: QuantConfig,
    *,
    sm_scale: float,
    causal: bool = False,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantized attention on packed sequences: q [total_q, Hq, D], k [total_k, Hkv, D],
    v [total_k, Hkv, Dv]; sequence b is tokens ``cu_seqlens[b] .. cu_seqlens[b+1]``.

    Returns O [total_q, Hq, Dv] (q's dtype) and the natural-log LSE [Hq, total_q] (fp32)
    or None. Causal is aligned bottom-right per sequence. Eager calls skip the
    dispatcher, as :func:`attention` does.
    """
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k))
    if not torch.compiler.is_compiling():
        out, lse = _run_varlen(*args, config, float(sm_scale), causal, return_lse)
    else:
        out, lse = _attention_varlen_op(
            *args, *_config_fields(config), float(sm_scale), causal, return_lse,
        )
    return out, (lse if return_lse else None)
