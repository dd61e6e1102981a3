"""SageAttention and SageAttention2 in plain PyTorch: the oracle for every kernel.

Everything here works on [B, H, N, D] ("HND") tensors on any device. The quantized
path (:func:`sage_attention`) does exactly what a :class:`~qattn.presets.QuantConfig`
says, tile by tile over K/V with an online softmax, so memory grows with N (one
[B, H, Nq, BLOCK_KV] score tile at a time), never with Nq * Nk.

Conventions shared with the kernels (a kernel that differs here is wrong):

* Scores live in the log2 domain: S = (Q K^T) * sm_scale * log2(e), softmax by exp2.
* Symmetric quantization of a group of rows x: ``scale = amax / qmax``;
  ``x_q = floor(x * (qmax / amax) + 0.5)`` (round half up; an all-zero group gives 0).
* P~ = exp2(S - m) in [0, 1]. FP8: P~ * 448 cast to E4M3, V' / (amax_over_tokens / 448)
  per channel cast to E4M3; both scales undone in the epilogue.
* The row sum l is taken from P~ in fp32 before P~ is rounded.
* Causal masking keeps key j for query i iff j <= i + causal_offset
  (0: top-left aligned as torch's SDPA; Nk - Nq: bottom-right aligned).
* A query row that no key may attend to gives output 0 and LSE -inf.
* LSE is natural-log and of the *unsmoothed* scores (smoothing K shifts each row of S
  by sm_scale * q . mean(K); the shift is added back).
"""

from __future__ import annotations

import math

import torch

from .presets import SMOOTH_Q_BLOCK, PVAccum, PVDtype, QuantConfig

__all__ = [
    "LOG2E",
    "FP8_MAX",
    "BLOCK_KV",
    "quantize_per_group",
    "quantize_v_fp8",
    "sage_attention",
    "sage_attention_varlen",
    "exact_attention",
]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK_KV = 128  # K/V tokens per tile: the granule of online softmax and PV accumulation
# (the GPU kernels' BLOCK_N for head dims up to 128, so CPU and GPU round alike)


def quantize_per_group(
    x: torch.Tensor, group: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric integer quantization of ``x`` [..., N, D] in groups of ``group`` rows.

    Returns ``(x_q, scale)``: ``x_q`` holds integers in [-qmax, qmax] (as fp32, to keep
    matrix products exact on every device) and ``scale`` [..., N] is the scale of each
    row's group, so ``x ~= x_q * scale[..., None]``. The last group may be partial.
    """
    n = x.shape[-2]
    n_groups = -(-n // group)
    pad = n_groups * group - n
    xf = x.float()
    padded = torch.nn.functional.pad(xf, (0, 0, 0, pad)) if pad else xf
    amax = padded.unflatten(-2, (n_groups, group)).abs().amax(dim=(-2, -1))  # [..., G]
    inv = torch.where(amax > 0, qmax / amax, torch.zeros_like(amax))
    scale = amax / qmax
    inv_rows = inv.repeat_interleave(group, dim=-1)[..., :n]
    x_q = torch.floor(xf * inv_rows.unsqueeze(-1) + 0.5)
    return x_q, scale.repeat_interleave(group, dim=-1)[..., :n]


def quantize_v_fp8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 quantization of V [..., N, D] with one scale per channel (over tokens).

    Returns ``(v_fp8_as_fp32, scale)`` with ``scale`` [..., 1, D] = amax / 448.
    """
    vf = v.float()
    amax = vf.abs().amax(dim=-2, keepdim=True)
    inv = torch.where(amax > 0, FP8_MAX / amax, torch.zeros_like(amax))
    v8 = (vf * inv).to(torch.float8_e4m3fn).float()
    return v8, amax / FP8_MAX


def _expand_kv_heads(x: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """Repeat K/V heads for GQA/MQA: head h of Q reads K/V head h // (Hq // Hkv)."""
    return x.repeat_interleave(num_q_heads // x.shape[1], dim=1) if x.shape[1] != num_q_heads else x


def _mask_tile(
    attn_mask: torch.Tensor | None,
    causal_offset: int | None,
    nq: int,
    start: int,
    stop: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Keep-mask ([.., Nq, n] bool) and additive bias (log2 units) for keys start:stop."""
    keep = None
    bias = None
    if causal_offset is not None:
        rows = torch.arange(nq, device=device).unsqueeze(1)
        cols = torch.arange(start, stop, device=device).unsqueeze(0)
        keep = cols <= rows + causal_offset
    if attn_mask is not None:
        tile = attn_mask[..., start:stop]
        if tile.dtype == torch.bool:
            keep = tile if keep is None else keep & tile
        else:
            bias = tile.float() * LOG2E
    return keep, bias


def sage_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: QuantConfig,
    *,
    sm_scale: float | None = None,
    causal_offset: int | None = None,
    attn_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    block_kv: int = BLOCK_KV,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Quantized attention exactly as ``config`` prescribes (see the module docstring).

    Args:
        q: [B, Hq, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv]; Hq % Hkv == 0.
        config: what to quantize and how.
        sm_scale: score scale, default 1 / sqrt(D).
        causal_offset: None for no causal mask, else keep key j for query i iff
            j <= i + causal_offset.
        attn_mask: None, or bool (True = attend) / additive float, broadcastable to
            [B, Hq, Nq, Nk].
        return_lse: also return the natural-log LSE [B, Hq, Nq] in fp32.
        block_kv: K/V tile size (the granule of PV accumulation).

    Returns:
        O [B, Hq, Nq, Dv] in q's dtype, and LSE if asked.
    """
    batch, num_heads, nq, head_dim = q.shape
    nk = k.shape[-2]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    score_scale = sm_scale * LOG2E
    out_dtype = q.dtype
    device = q.device

    qf = q.float()
    kf = _expand_kv_heads(k, num_heads).float()
    vf = _expand_kv_heads(v, num_heads).float()
    if attn_mask is not None:
        attn_mask = attn_mask.expand(batch, num_heads, nq, nk)

    k_mean = kf.mean(dim=-2, keepdim=True) if config.smooth_k else None
    if k_mean is not None:
        kf = kf - k_mean

    q_rows_mean = None
    q_in = qf
    if config.smooth_q:
        q_rows_mean = _block_mean_rows(qf, SMOOTH_Q_BLOCK)
        q_in = qf - q_rows_mean

    q_int, q_scale = quantize_per_group(q_in, config.q_group, config.qk_max)
    k_int, k_scale = quantize_per_group(kf, config.k_group, config.qk_max)
    q_scale = q_scale * score_scale  # fold sm_scale * log2(e) into Q's scale

    v_mean = vf.mean(dim=-2, keepdim=True) if config.smooth_v else None
    v_in = vf - v_mean if v_mean is not None else vf
    if config.pv_dtype is PVDtype.FP8:
        v_q, v_scale = quantize_v_fp8(v_in)
    else:
        v_q, v_scale = v_in.half().float(), None

    m = torch.full((batch, num_heads, nq), -math.inf, device=device)
    l = torch.zeros((batch, num_heads, nq), device=device)
    acc = torch.zeros((batch, num_heads, nq, v.shape[-1]), device=device)

    for start in range(0, nk, block_kv):
        stop = min(start + block_kv, nk)
        s = torch.matmul(q_int, k_int[..., start:stop, :].transpose(-1, -2))  # exact integers
        s = s * q_scale.unsqueeze(-1) * k_scale[..., None, start:stop]
        if q_rows_mean is not None:
            s = s + torch.matmul(q_rows_mean, kf[..., start:stop, :].transpose(-1, -2)) * score_scale
        keep, bias = _mask_tile(attn_mask, causal_offset, nq, start, stop, device)
        if bias is not None:
            s = s + bias
        if keep is not None:
            s = s.masked_fill(~keep, -math.inf)

        m_new = torch.maximum(m, s.amax(dim=-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp2(s - m_safe.unsqueeze(-1))
        alpha = torch.exp2(m - m_safe)
        l = l * alpha + p.sum(dim=-1)

        v_tile = v_q[..., start:stop, :]
        if config.pv_dtype is PVDtype.FP8:
            p_q = (p * FP8_MAX).to(torch.float8_e4m3fn).float()
            block = torch.matmul(p_q, v_tile)
        else:
            block = torch.matmul(p.half().float(), v_tile)
            if config.pv_accum is PVAccum.FP16:
                block = block.half().float()
        acc = acc * alpha.unsqueeze(-1) + block
        m = m_new

    empty = l == 0
    out = acc / torch.where(empty, torch.ones_like(l), l).unsqueeze(-1)
    if v_scale is not None:
        out = out * (v_scale / FP8_MAX)
    if v_mean is not None:
        out = out + v_mean
    out = out.masked_fill(empty.unsqueeze(-1), 0.0).to(out_dtype)
    if not return_lse:
        return out

    lse = (m + torch.log2(l)) * LN2
    if k_mean is not None:
        lse = lse + sm_scale * torch.matmul(qf, k_mean.transpose(-1, -2)).squeeze(-1)
    lse = lse.masked_fill(empty, -math.inf)
    return out, lse


def sage_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    config: QuantConfig,
    *,
    sm_scale: float | None = None,
    causal: bool = False,
    return_lse: bool = False,
    block_kv: int = BLOCK_KV,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`sage_attention` on each sequence of a packed batch, on its own.

    Args:
        q: [total_q, Hq, D]; k: [total_k, Hkv, D]; v: [total_k, Hkv, Dv].
        cu_seqlens_q, cu_seqlens_k: [B + 1] offsets; sequence b is tokens
            ``cu[b] .. cu[b+1]`` (read on the host).
        causal: aligned bottom-right per sequence (``causal_offset = n_k - n_q``).
        Others as :func:`sage_attention`; smoothing and scales are per sequence.

    Returns:
        O [total_q, Hq, Dv] in q's dtype, and LSE [Hq, total_q] (fp32) if asked.
    """
    starts_q = cu_seqlens_q.tolist()
    starts_k = cu_seqlens_k.tolist()
    out = q.new_zeros((q.shape[0], q.shape[1], v.shape[-1]))
    lse = torch.full((q.shape[1], q.shape[0]), -math.inf, device=q.device)
    for b in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[b], starts_q[b + 1], starts_k[b], starts_k[b + 1]
        if q1 == q0 or k1 == k0:  # no query, or no key: rows stay 0 / -inf
            continue
        seq_q, seq_k, seq_v = (x[lo:hi].transpose(0, 1).unsqueeze(0)
                               for x, lo, hi in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        o, l = sage_attention(seq_q, seq_k, seq_v, config, sm_scale=sm_scale,
                              causal_offset=(k1 - k0) - (q1 - q0) if causal else None,
                              return_lse=True, block_kv=block_kv)
        out[q0:q1] = o[0].transpose(0, 1)
        lse[:, q0:q1] = l[0]
    return (out, lse) if return_lse else out


def _block_mean_rows(x: torch.Tensor, block: int) -> torch.Tensor:
    """The mean of each block of ``block`` rows of x [..., N, D], repeated per row."""
    n = x.shape[-2]
    means = [
        x[..., i : i + block, :].mean(dim=-2, keepdim=True).expand(*x.shape[:-2], min(block, n - i), x.shape[-1])
        for i in range(0, n, block)
    ]
    return torch.cat(means, dim=-2)


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sm_scale: float | None = None,
    causal_offset: int | None = None,
    attn_mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unquantized attention in ``dtype`` (fp64 by default): the accuracy yardstick.

    Same shapes and masking conventions as :func:`sage_attention`; materializes the
    [B, H, Nq, Nk] score matrix, so use it at test sizes. Returns (O, LSE).
    """
    num_heads, nq, head_dim = q.shape[1], q.shape[2], q.shape[3]
    nk = k.shape[-2]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    qd = q.to(dtype)
    kd = _expand_kv_heads(k, num_heads).to(dtype)
    vd = _expand_kv_heads(v, num_heads).to(dtype)
    s = torch.matmul(qd, kd.transpose(-1, -2)) * sm_scale
    keep, _ = _mask_tile(None, causal_offset, nq, 0, nk, q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else keep & attn_mask
        else:
            s = s + attn_mask.to(dtype)
    if keep is not None:
        s = s.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isinf(lse) & (lse < 0)
    p = torch.exp(s - torch.where(empty, torch.zeros_like(lse), lse).unsqueeze(-1))
    out = torch.matmul(p, vd).masked_fill(empty.unsqueeze(-1), 0.0)
    return out, lse

