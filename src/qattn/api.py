"""Public entry points: :func:`sageattn` (SageAttention's call shape) and :func:`sdpa`
(torch's ``scaled_dot_product_attention`` contract).

Dispatch: CUDA tensors go to the Triton kernels when they support the case; CPU
tensors, and cases the kernels do not cover, run :mod:`qattn.reference` (the same
algorithm in plain PyTorch). :func:`sdpa` instead falls back to torch's own SDPA for
what the quantized path cannot do, and logs why once per reason.
"""

from __future__ import annotations

import math
from enum import Enum
from numbers import Real

import torch
import torch.nn.functional as F

from . import ops
from .presets import QuantConfig, resolve_config

__all__ = [
    "TensorLayout",
    "sageattn",
    "sageattn_varlen",
    "sdpa",
    "default_preset",
    "set_default_preset",
    "DECODE_MAX_Q",
]


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# torch's own function, captured at import: fallbacks call it directly, so assigning
# ``F.scaled_dot_product_attention = qattn.sdpa`` cannot make a fallback recurse.
_torch_sdpa = F.scaled_dot_product_attention
MAX_HEAD_DIM = 256
# Query lengths up to this take torch's SDPA on the GPU (``decode="auto"``): quantizing
# K/V costs a pass over them per call, more than attention itself costs for a few query
# rows (bench/results/<gpu>/decode.md).
DECODE_MAX_Q = 16
_DECODE_CHOICES = ("auto", "quantized", "sdpa")


class TensorLayout(str, Enum):
    """Memory layout of 4-D attention inputs."""

    HND = "HND"  # [batch, heads, tokens, head_dim]
    NHD = "NHD"  # [batch, tokens, heads, head_dim]


_default_override: str | QuantConfig | None = None


def set_default_preset(preset: str | QuantConfig | None) -> None:
    """Choose the preset used when a call names none (``None`` restores the automatic choice)."""
    global _default_override
    if preset is not None:
        resolve_config(preset, "sage2-8b")  # validate now, not at the next call
    _default_override = preset


def default_preset(device: torch.device | str | None = None) -> str | QuantConfig:
    """The preset a call on ``device`` uses when it names none.

    ``sage2-8b`` on the CPU (reference path) and on GPUs with FP8 tensor cores
    (compute capability 8.9 and newer); ``sage1`` on older GPUs.
    """
    if _default_override is not None:
        return _default_override
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and ops.device_capability(device) < (8, 9):
        return "sage1"
    return "sage2-8b"


def _quantized_attention(q, k, v, config, sm_scale, causal_offset, return_lse, nhd, attn_mask=None):
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    return ops.attention(q, k, v, config, sm_scale=sm_scale, causal_offset=causal_offset,
                         attn_mask=attn_mask, return_lse=return_lse, out_nhd=nhd)


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{name}: expected a 4-D tensor ([B, H, N, D] for tensor_layout='HND', "
            f"[B, N, H, D] for 'NHD'), got shape {tuple(x.shape)}"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}: dtype {x.dtype} is not supported; accepted: torch.float16, "
            "torch.bfloat16, torch.float32"
        )


def _check_mask(mask, target: tuple, device) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attn_mask: expected a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"attn_mask: dtype {mask.dtype} is not supported; accepted: torch.bool "
                        "(True = attend) or an additive fp16/bf16/fp32 mask")
    try:
        fits = torch.broadcast_shapes(mask.shape, target) == torch.Size(target)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"attn_mask: shape {tuple(mask.shape)} does not broadcast to "
                         f"[B, Hq, Nq, Nk] = {list(target)}") from None
    if mask.device != device:
        raise ValueError(f"attn_mask: must be on q's device ({device}), got {mask.device}")


def _check_call_options(is_causal, return_lse, sm_scale) -> None:
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal: expected True or False, got {is_causal!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected True or False, got {return_lse!r}")
    if sm_scale is not None and (
        isinstance(sm_scale, bool) or not isinstance(sm_scale, Real) or not math.isfinite(sm_scale)
    ):
        raise TypeError(f"sm_scale: expected a finite number or None, got {sm_scale!r}")


def sageattn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tensor_layout: str = "HND",
    is_causal: bool = False,
    sm_scale: float | None = None,
    return_lse: bool = False,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Quantized attention with the original SageAttention's call shape.

    Args:
        q: queries, [B, Hq, Nq, D] ("HND") or [B, Nq, Hq, D] ("NHD").
        k: keys, [B, Hkv, Nk, D] or [B, Nk, Hkv, D]; Hq must be a multiple of Hkv
            (GQA/MQA: query head h uses K/V head h // (Hq // Hkv)).
        v: values, same shape as k except its head dim Dv may differ from D.
        tensor_layout: "HND" or "NHD" (both via strides; no copies).
        is_causal: causal mask aligned to the bottom-right corner: query i attends to
            key j iff j <= i + (Nk - Nq). With Nq == Nk this is the usual lower
            triangle; with Nq < Nk it is a chunk of new queries appended after a KV
            cache. Query rows with no visible key (Nq > Nk) give zeros.
        sm_scale: score scale; default 1 / sqrt(D).
        return_lse: also return the log-sum-exp of each row (natural log, fp32),
            [B, Hq, Nq] whatever the layout.
        **options: ``preset`` (a name from ``qattn.PRESETS`` or a ``QuantConfig``;
            default: :func:`default_preset`), any ``QuantConfig`` field to override, or
            the original's ``qk_quant_gran`` / ``pv_accum_dtype`` / ``smooth_k`` /
            ``smooth_v``; ``decode``: "auto" (default: on a GPU, query lengths up to
            ``DECODE_MAX_Q`` = 16 run torch's SDPA, unquantized, which is faster there;
            not with ``return_lse``, ``attn_mask`` or Nq > Nk), "quantized" (always the
            quantized path) or "sdpa" (always torch's SDPA); ``attn_mask``: a bool
            (True = attend) or additive float mask broadcastable to [B, Hq, Nq, Nk]
            (in that order whatever the layout), combined with ``is_causal`` when both
            are given; query rows with no kept key give zeros.

    Returns:
        O in the layout and dtype of q ([.., Dv] last), and LSE if ``return_lse``.

    fp16, bf16 and fp32 inputs are accepted (fp32 is quantized like the others).
    Inputs that require grad while grad mode is on are refused: the quantized
    kernels have no backward pass (use :func:`sdpa`, which falls back).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
    try:
        layout = TensorLayout(tensor_layout)
    except ValueError:
        raise ValueError(
            f"tensor_layout: got {tensor_layout!r}; accepted: 'HND', 'NHD'"
        ) from None
    _check_call_options(is_causal, return_lse, sm_scale)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"k, v: dtypes must equal q's ({q.dtype}); got k {k.dtype}, v {v.dtype}"
        )
    if k.device != q.device or v.device != q.device:
        raise ValueError(
            f"k, v: must be on q's device ({q.device}); got k on {k.device}, v on {v.device}"
        )

    if layout is TensorLayout.NHD:
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    else:
        qh, kh, vh = q, k, v
    batch, num_q_heads, _, head_dim = qh.shape
    dims = "[B, N, H, D]" if layout is TensorLayout.NHD else "[B, H, N, D]"
    if kh.shape[0] != batch or vh.shape[0] != batch:
        raise ValueError(f"k, v: batch size must equal q's ({batch}); shapes are {dims} "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if kh.shape[:3] != vh.shape[:3]:
        raise ValueError(f"v: must match k in batch, heads and tokens ({dims}); "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if kh.shape[-1] != head_dim:
        raise ValueError(f"k: head dim must equal q's ({head_dim}); got {kh.shape[-1]} "
                         f"(shapes are {dims})")
    num_kv_heads = kh.shape[1]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"k, v: number of heads ({num_kv_heads}) must divide q's ({num_q_heads}); "
            f"shapes are {dims}, tensor_layout={layout.value!r}"
        )
    if not 1 <= head_dim <= MAX_HEAD_DIM or vh.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"q, k, v: head dims must be in 1..{MAX_HEAD_DIM}; got D={head_dim}, "
                         f"Dv={vh.shape[-1]}")
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise ValueError(
            "q, k, v: inputs require grad, but quantized attention has no backward pass; "
            "call it under torch.no_grad()/inference_mode, detach the inputs, or use "
            "qattn.sdpa, which falls back to torch's SDPA for training"
        )

    decode = options.pop("decode", "auto")
    if decode not in _DECODE_CHOICES:
        raise ValueError(f"decode: got {decode!r}; accepted: {', '.join(map(repr, _DECODE_CHOICES))}")
    nq, nk = qh.shape[2], kh.shape[2]
    attn_mask = options.pop("attn_mask", None)
    if attn_mask is not None:
        _check_mask(attn_mask, (batch, num_q_heads, nq, nk), q.device)
    preset = options.pop("preset", None)
    config = resolve_config(preset, default_preset(q.device), **options)
    if decode == "sdpa" or (decode == "auto" and q.device.type == "cuda" and nq <= DECODE_MAX_Q):
        if return_lse or nq > nk or vh.shape[-1] != head_dim or attn_mask is not None:
            if decode == "sdpa":
                raise ValueError("decode='sdpa': torch's SDPA path cannot return the LSE, give "
                                 "rows with no key (Nq > Nk) zeros, take Dv != D or attn_mask")
        else:
            out = _torch_attention_bottom_right(qh, kh, vh, is_causal, sm_scale)
            return out.transpose(1, 2).contiguous() if layout is TensorLayout.NHD else out
    causal_offset = nk - nq if is_causal else None

    out, lse = _quantized_attention(qh, kh, vh, config, sm_scale, causal_offset, return_lse,
                                    nhd=layout is TensorLayout.NHD, attn_mask=attn_mask)
    return (out, lse) if return_lse else out


def _torch_attention_bottom_right(q, k, v, is_causal, sm_scale):
    """torch's SDPA on HND views with ``sageattn``'s contract (bottom-right causal, GQA)."""
    nq, nk = q.shape[2], k.shape[2]
    kwargs = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    if is_causal and nq > 1:
        if nq == nk:  # the two alignments agree
            return _torch_sdpa(q, k, v, is_causal=True, scale=sm_scale, **kwargs)
        kwargs["attn_mask"] = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
    return _torch_sdpa(q, k, v, scale=sm_scale, **kwargs)


def _check_cu_seqlens(name: str, cu, device) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(cu).__name__}")
    if cu.dim() != 1 or cu.shape[0] < 1 or cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: expected a 1-D int32/int64 tensor [B + 1], got "
                         f"{cu.dtype} of shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name}: must be on q's device ({device}), got {cu.device}")


def _check_offsets_on_host(name: str, cu: torch.Tensor, total: int, max_seqlen: int,
                           max_name: str) -> None:
    """Offsets checked with their values (CPU tensors only: on a GPU reading them would
    synchronize the device)."""
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((lengths < 0).any()):
        raise ValueError(f"{name}: must start at 0, never decrease and end at the number of "
                         f"tokens ({total}); got {cu.tolist()[:8]}{'...' if cu.numel() > 8 else ''}")
    longest = int(lengths.max()) if lengths.numel() else 0
    if longest > max_seqlen:
        raise ValueError(f"{max_name}: {max_seqlen} is less than the longest sequence ({longest})")


def sageattn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    is_causal: bool = False,
    sm_scale: float | None = None,
    return_lse: bool = False,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Quantized attention over a batch of variable-length sequences packed end to end
    (the call shape of flash-attn's ``flash_attn_varlen_func``).

    Args:
        q: [total_q, Hq, D], the sequences' queries one after the other.
        k: [total_k, Hkv, D]; v: [total_k, Hkv, Dv]; Hq a multiple of Hkv (GQA/MQA).
        cu_seqlens_q, cu_seqlens_k: int32 or int64 [B + 1] on q's device: sequence b is
            query tokens ``cu_seqlens_q[b] .. cu_seqlens_q[b+1]`` and key tokens
            ``cu_seqlens_k[b] .. cu_seqlens_k[b+1]``. They must start at 0, never
            decrease and end at total_q / total_k; empty sequences are allowed.
        max_seqlen_q, max_seqlen_k: at least the longest query / key sequence (they size
            the launch grid, so a GPU call needs no device synchronization).
        is_causal: per sequence, aligned bottom-right: query i attends to key j iff
            j <= i + (n_k - n_q) (a new chunk after a KV cache); with equal lengths the
            usual lower triangle. Rows with no visible key give zeros.
        sm_scale: score scale; default 1 / sqrt(D).
        return_lse: also return the natural-log LSE, fp32 [Hq, total_q].
        **options: ``preset`` and ``QuantConfig`` overrides, as :func:`sageattn`.

    Returns:
        O [total_q, Hq, Dv] in q's dtype, and the LSE if ``return_lse``.

    K smoothing (the mean subtracted before quantization) and the FP8 V scales are per
    sequence, so one sequence's values never change another's quantization. On CPU
    tensors the offsets are checked against the tokens (in eager mode); on a GPU they are
    not (that needs a device sync), so offsets that break the contract give undefined
    results there.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{name}: expected a packed 3-D tensor [total_tokens, H, D], got "
                             f"shape {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: dtype {x.dtype} is not supported; accepted: "
                            "torch.float16, torch.bfloat16, torch.float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k, v: dtypes must equal q's ({q.dtype}); got k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"k, v: must be on q's device ({q.device}); got k on {k.device}, "
                         f"v on {v.device}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"v: must match k in tokens and heads; got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k: head dim must equal q's ({q.shape[2]}); got {k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"k, v: number of heads ({k.shape[1]}) must divide q's ({q.shape[1]})")
    if not 1 <= q.shape[2] <= MAX_HEAD_DIM or v.shape[2] > MAX_HEAD_DIM:
        raise ValueError(f"q, k, v: head dims must be in 1..{MAX_HEAD_DIM}; got D={q.shape[2]}, "
                         f"Dv={v.shape[2]}")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q, cu_seqlens_k: must have the same length (B + 1); got "
                         f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError(f"{name}: expected an int >= 0, got {value!r}")
    _check_call_options(is_causal, return_lse, sm_scale)
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_offsets_on_host("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
        _check_offsets_on_host("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise ValueError(
            "q, k, v: inputs require grad, but quantized attention has no backward pass; "
            "call it under torch.no_grad()/inference_mode or detach the inputs"
        )
    preset = options.pop("preset", None)
    config = resolve_config(preset, default_preset(q.device), **options)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = ops.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    config, sm_scale=sm_scale, causal=is_causal,
                                    return_lse=return_lse)
    return (out, lse) if return_lse else out


def sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    preset: str | QuantConfig | None = None,
) -> torch.Tensor:
    """Drop-in replacement for ``torch.nn.functional.scaled_dot_product_attention``.

    Same arguments, shapes and semantics as torch's: query [..., Hq, L, E], key
    [..., Hkv, S, E], value [..., Hkv, S, Ev]; ``is_causal`` is torch's top-left
    aligned mask (query i sees key j iff j <= i). Calls the quantized path with the
    default preset (:func:`set_default_preset`) when it can, and otherwise torch's
    SDPA, logging the reason once: dropout, inputs requiring grad, dtypes other than
    fp16/bf16/fp32, devices other than CPU/CUDA, non-3/4-D or broadcast shapes,
    masks that do not broadcast to [B, H, L, S], and on CUDA what the Triton kernels do not
    run (e.g. Dv != D, INT4 presets: torch's SDPA beats the reference on a GPU). Bool and
    additive masks run quantized
    (on the GPU inside the kernel); a query row whose keys are all masked gives zeros
    (torch's math backend gives NaN there).
    Fallbacks call torch's original function, captured when qattn was imported.

    On a GPU, query lengths up to ``DECODE_MAX_Q`` (16: decode steps) go to torch's SDPA
    unquantized, because there quantizing K/V per call costs more than it saves
    (measured in bench/results/<gpu>/decode.md).

    ``preset`` (keyword-only, beyond torch's contract) picks the preset for this call.
    """
    short_query = (isinstance(query, torch.Tensor) and query.device.type == "cuda"
                   and query.dim() >= 2 and query.shape[-2] <= DECODE_MAX_Q)
    reason = None if short_query else _sdpa_fallback_reason(
        query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, preset)
    if short_query or reason is not None:
        if reason is not None:
            ops.log_once(f"qattn.sdpa: using torch SDPA: {reason}")
        kwargs = {"enable_gqa": enable_gqa} if enable_gqa else {}
        return _torch_sdpa(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
            is_causal=is_causal, scale=scale, **kwargs,
        )

    squeeze = query.dim() == 3
    q, k, v = (x.unsqueeze(1) if squeeze else x for x in (query, key, value))
    config = resolve_config(preset, default_preset(q.device))
    causal_offset = 0 if is_causal else None
    mask = attn_mask
    if mask is not None:
        mask = mask.unsqueeze(1) if squeeze and mask.dim() == 3 else mask
    result, _ = _quantized_attention(q, k, v, config, scale, causal_offset, False, nhd=False,
                                     attn_mask=mask)
    return result.squeeze(1) if squeeze else result


def _sdpa_fallback_reason(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa,
                          preset=None):
    """Why :func:`sdpa` cannot take the quantized path, or None."""
    tensors = (query, key, value)
    if not all(isinstance(x, torch.Tensor) for x in tensors):
        return "non-tensor inputs"
    if dropout_p:
        return f"dropout_p={dropout_p} (the quantized path has no dropout)"
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return "inputs require grad (the quantized path has no backward)"
    if any(x.dtype not in SUPPORTED_DTYPES for x in tensors) or len({x.dtype for x in tensors}) > 1:
        return f"dtypes {[str(x.dtype) for x in tensors]} (need one of fp16/bf16/fp32)"
    if query.device.type not in ("cpu", "cuda") or any(x.device != query.device for x in tensors):
        return f"devices {[str(x.device) for x in tensors]}"
    if query.dim() not in (3, 4) or any(x.dim() != query.dim() for x in tensors):
        return f"ranks {[x.dim() for x in tensors]} (need all 3-D or all 4-D)"
    if is_causal and attn_mask is not None:
        return "both attn_mask and is_causal (torch decides what that means)"
    if query.shape[0] != key.shape[0] or key.shape[:-1] != value.shape[:-1]:
        return "batch shapes differ (broadcasting is left to torch)"
    if query.shape[-1] != key.shape[-1] or query.shape[-1] > MAX_HEAD_DIM or value.shape[-1] > MAX_HEAD_DIM:
        return f"head dims q {query.shape[-1]}, k {key.shape[-1]}, v {value.shape[-1]}"
    if query.dim() == 4:
        hq, hkv = query.shape[1], key.shape[1]
        if hq != hkv and not (enable_gqa and hkv > 0 and hq % hkv == 0):
            return f"heads q {hq}, kv {hkv} (torch decides; GQA needs enable_gqa=True)"
    if attn_mask is not None:
        target = (*query.shape[:-1], key.shape[-2])
        try:
            fits = torch.broadcast_shapes(attn_mask.shape, target) == torch.Size(target)
        except RuntimeError:
            fits = False
        if not fits:
            return f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to {target}"
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in SUPPORTED_DTYPES:
            return f"attn_mask dtype {attn_mask.dtype}"
    if query.numel() == 0 or key.numel() == 0:
        return "empty tensors"
    if query.device.type == "cuda":
        q, k, v = (x.unsqueeze(1) if x.dim() == 3 else x for x in tensors)
        config = resolve_config(preset, default_preset(query.device))
        reason = ops.kernel_skip_reason(q, k, v, config, attn_mask)
        if reason is not None:
            return f"the Triton kernels do not run this call: {reason}"
    return None
