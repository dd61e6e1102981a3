"""Quantized FlashAttention forward (SageAttention / SageAttention2) in Triton.

One call = two launches: :func:`~qattn.kernels.quantize.quantize_kv` (K -> INT8 after
smoothing, V -> FP8 per channel or fp16), then :func:`_attn_fwd_kernel` over the grid
``(cdiv(Nq, BLOCK_M), B * Hq)``. Each program owns BLOCK_M query rows of one head:

1. Prologue: load the Q tile from the caller's tensor (any strides and float dtype),
   quantize it to INT8 with ``config.q_group`` rows per scale, ``sm_scale * log2(e)``
   folded into the scale (scores live in the log2 domain, softmax uses exp2).
2. Main loop over K/V blocks: ``S = (Q_i8 K_i8^T as int32) * q_scale * k_scale``; online
   softmax; P~ V either in FP8 (P~ * 448 -> E4M3 against V E4M3, each block's product in a
   fresh fp32 buffer, then ``acc = acc * alpha + block``: two-level accumulation) or in
   fp16 (optionally accumulated in fp16 per block, as SageAttention v1).
   Blocks that need no mask run in a first loop without any masking; only the blocks
   crossing the causal diagonal or the end of K/V run the masked loop; blocks wholly
   above the diagonal are skipped.
3. Epilogue: ``acc / l``, undo the FP8 V scales, add the V mean if V was smoothed, rows
   with no key give 0; store O in the caller's dtype into the caller's output view, and
   the natural-log LSE (with the K-smoothing shift ``sm_scale * q . mean(K)`` added back).

Numerics are those of :func:`qattn.reference.sage_attention` with ``block_kv=BLOCK_N``
(see :func:`block_config`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..ops import device_capability
from ..presets import PVAccum, PVDtype, QKDtype, QuantConfig
from .quantize import (
    _group_amax,
    _quant_multiplier,
    _round_half_up,
    _round_to_e4m3_grid,
    interpreting,
    padded_head_dim,
    quantize_kv,
)

__all__ = ["attention_forward", "supports", "block_config", "BlockConfig"]

LOG2E = 1.4426950408889634
LOG2_FP8_MAX = math.log2(448.0)
MAX_HEAD_DIM = 256
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- block sizes


class BlockConfig(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int


# (padded head dim, causal, FP8 P~V) -> BlockConfig, per GPU generation. BLOCK_N must
# divide quantize.KV_PAD (128). BLOCK_M may be smaller than a Q quantization group (block
# granularity: 128 rows): the prologue then reads the whole group for its scale.
# sm_90, measured on an H100 at N=4096 (docs/kernel_notes.md): with FP8 V, 64 x 128 tiles
# and 4 warps (two CTAs per SM, so one's softmax overlaps the other's MMAs) beat 128 x 128
# with 8 warps by ~13% at D=128; with fp16 V (twice the shared memory per stage, so only
# one 64-row CTA fits) 128 x 128 with 8 warps wins by ~17% at D=128. D=32 and 256 are not
# measured. BLOCK_N is 128 wherever measured, so ``block_config(...).BLOCK_N`` does not
# depend on the config there. The interpreter uses the sm_90 table so CPU tests run the
# GPU's tiling. The sm_8x table is a guess (not measured).
_HOPPER = {
    (32, False, True): BlockConfig(64, 128, 4, 3),
    (32, True, True): BlockConfig(64, 128, 4, 3),
    (64, False, True): BlockConfig(64, 128, 4, 3),
    (64, True, True): BlockConfig(64, 128, 4, 3),
    (128, False, True): BlockConfig(64, 128, 4, 3),
    (128, True, True): BlockConfig(64, 128, 4, 3),
    (256, False, True): BlockConfig(64, 64, 4, 2),
    (256, True, True): BlockConfig(64, 64, 4, 2),
    (32, False, False): BlockConfig(64, 128, 4, 3),
    (32, True, False): BlockConfig(64, 128, 4, 3),
    (64, False, False): BlockConfig(64, 128, 4, 3),
    (64, True, False): BlockConfig(64, 128, 4, 3),
    (128, False, False): BlockConfig(128, 128, 8, 3),
    (128, True, False): BlockConfig(128, 128, 8, 3),
    (256, False, False): BlockConfig(64, 64, 4, 2),
    (256, True, False): BlockConfig(64, 64, 4, 2),
}
_AMPERE_ADA = {
    (dpad, causal, fp8): BlockConfig(64, 32 if dpad == 256 else 64, 4, 2 if dpad >= 128 else 3)
    for dpad in (32, 64, 128, 256)
    for causal in (False, True)
    for fp8 in (False, True)
}
_TABLES = {9: _HOPPER, 8: _AMPERE_ADA}

# Benchmarks may set this to a BlockConfig to override the table (not thread-safe).
_BLOCK_OVERRIDE: BlockConfig | None = None


def _capability(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return (9, 0)  # interpreter: tile like Hopper
    return device_capability(device)


def block_config(
    head_dim: int,
    causal: bool,
    device: torch.device | str | None = None,
    config: QuantConfig | None = None,
) -> BlockConfig:
    """Tile sizes and launch options the kernel uses for this case on ``device``
    (``config`` None: as for an FP8 P~V config).

    ``BLOCK_N`` is the K/V block of the online softmax: pass it as ``block_kv`` to
    :func:`qattn.reference.sage_attention` to reproduce the kernel's numbers.
    """
    if _BLOCK_OVERRIDE is not None:
        return _BLOCK_OVERRIDE
    device = torch.device(device) if device is not None else torch.device("cpu")
    major = _capability(device)[0]
    table = _TABLES.get(major, _HOPPER if major > 9 else _AMPERE_ADA)
    fp8 = config is None or config.pv_dtype is PVDtype.FP8
    return table[(padded_head_dim(head_dim), bool(causal), fp8)]


# ----------------------------------------------------------------------------- kernel


@triton.jit
def _i32_to_f32(x):
    """Exact int32 -> fp32 for |x| < 2^22 with an integer add instead of a (slow) I2F.

    1.5 * 2^23 + x has spacing 1 in fp32, so its bit pattern is 0x4B400000 + x.
    |Q_i8 K_i8^T| <= 256 * 127 * 127 < 2^22.
    """
    return (x + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _attn_inner(
    acc, l_i, m_i, q_i8, q_scale, offs_m, offs_d,
    k_base, ks_base, v_base, lo, hi, N_K, N_K_PAD, causal_offset,
    mask_base, stride_mq, stride_mk, row_ok,
    DPAD: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    PV_FP8: tl.constexpr, PV_ACC_FP16: tl.constexpr, EXACT: tl.constexpr, P_SHIFT: tl.constexpr,
):
    """Online softmax over K/V blocks [lo, hi). MASKED: apply the bounds/causal mask and
    the user's mask (MASK_KIND 1: bool, True = keep; 2: additive, natural-log units)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)

        # -- S = Q K^T in the log2 domain (K buffers are padded: no load masks) --
        k = tl.load(k_base + offs_n[:, None] * DPAD + offs_d[None, :])
        k_scale = tl.load(ks_base + offs_n)
        s_int = tl.dot(q_i8, tl.trans(k), out_dtype=tl.int32)
        # S = t * q_scale with t = int * k_scale. Since q_scale >= 0, max_j S = q_scale * max_j t
        # exactly, so the unmasked path takes the row max on t and applies q_scale inside
        # one fused multiply-add with the max subtraction.
        t = _i32_to_f32(s_int) * k_scale[None, :]
        if MASKED:
            s = t * q_scale[:, None]
            keep = offs_n[None, :] < N_K
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            if MASK_KIND != 0:
                in_range = row_ok[:, None] & (offs_n[None, :] < N_K)
                mask_ptrs = mask_base + offs_m[:, None] * stride_mq + offs_n[None, :] * stride_mk
                if MASK_KIND == 1:
                    keep = keep & (tl.load(mask_ptrs, mask=in_range, other=0) != 0)
                else:
                    bias = tl.load(mask_ptrs, mask=in_range, other=0.0).to(tl.float32)
                    s = s + bias * 1.4426950408889634  # natural log -> log2 domain
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
            p = tl.math.exp2(s - (m_use - P_SHIFT)[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(t, axis=1) * q_scale)
            m_use = m_new
            p = tl.math.exp2(t * q_scale[:, None] - (m_use - P_SHIFT)[:, None])

        # -- online softmax (p and l carry the factor 2^P_SHIFT: 448 for FP8, else 1) --
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)

        # -- P~ V --
        if PV_FP8:
            # V is stored [D, N] (tokens contiguous): load [DPAD, BLOCK_N], use its transpose.
            v = tl.load(v_base + offs_d[:, None] * N_K_PAD + offs_n[None, :])
            if EXACT:
                p = _round_to_e4m3_grid(p)
            pv = tl.dot(p.to(tl.float8e4nv), tl.trans(v), out_dtype=tl.float32)
        else:
            v = tl.load(v_base + offs_n[:, None] * DPAD + offs_d[None, :])
            if PV_ACC_FP16:
                if EXACT:  # interpreter: numpy's fp16 matmul would round every partial sum
                    pv = tl.dot(p.to(tl.float16), v, out_dtype=tl.float32).to(tl.float16).to(tl.float32)
                else:
                    pv = tl.dot(p.to(tl.float16), v, out_dtype=tl.float16).to(tl.float32)
            else:
                pv = tl.dot(p.to(tl.float16), v, out_dtype=tl.float32)
        acc = acc * alpha[:, None] + pv  # two-level accumulation: fresh block product added in fp32
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, stride_qb, stride_qh, stride_qn, stride_qd,
    K_q, K_scale, V_q, Stats,
    O, stride_ob, stride_oh, stride_on, stride_od,
    LSE,
    Mask, stride_mb, stride_mh, stride_mq, stride_mk,
    score_scale, sm_scale,
    H_Q, KV_GROUP, N_Q, N_K, N_K_PAD, STATS_STRIDE, causal_offset,
    HEAD_DIM: tl.constexpr, DPAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Q_GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PV_FP8: tl.constexpr, PV_ACC_FP16: tl.constexpr,
    SMOOTH_K: tl.constexpr, SMOOTH_V: tl.constexpr, RETURN_LSE: tl.constexpr,
    EXACT: tl.constexpr, P_SHIFT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the longest rows (most K/V blocks) first: a shorter tail
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H_Q
    h = bh % H_Q
    bh_kv = bh // KV_GROUP  # GQA/MQA: q head h reads kv head h // (Hq // Hkv)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DPAD)
    row_ok = offs_m < N_Q
    if HEAD_DIM == DPAD:
        io_mask = row_ok[:, None]
    else:
        io_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]

    # -- prologue: load Q (any strides, zero padding) and quantize it to INT8 --
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=io_mask, other=0.0).to(tl.float32)
    if Q_GROUP > BLOCK_M:
        # The tile is part of one larger group (groups start at multiples of Q_GROUP):
        # read the whole group once for its max.
        tl.static_assert(Q_GROUP % BLOCK_M == 0, "BLOCK_M must divide a Q group")
        offs_g = (start_m // Q_GROUP) * Q_GROUP + tl.arange(0, Q_GROUP)
        g_mask = (offs_g < N_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
        g_ptrs = Q + b * stride_qb + h * stride_qh + offs_g[:, None] * stride_qn + offs_d[None, :] * stride_qd
        q_group = tl.load(g_ptrs, mask=g_mask, other=0.0).to(tl.float32)
        q_amax = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.max(tl.max(tl.abs(q_group), axis=1), axis=0)
    else:
        q_amax = _group_amax(tl.max(tl.abs(q), axis=1), Q_GROUP, BLOCK_M)
    q_inv = _quant_multiplier(q_amax, 127.0)
    q_i8 = _round_half_up(q * q_inv[:, None]).to(tl.int8)
    q_scale = tl.math.div_rn(q_amax, 127.0) * score_scale  # sm_scale * log2(e) folded in
    if RETURN_LSE and SMOOTH_K:
        k_mean = tl.load(Stats + bh_kv * DPAD + offs_d)
        lse_shift = tl.sum(q * k_mean[None, :], axis=1) * sm_scale

    # Online-softmax state. P_SHIFT is log2(448) for FP8 (P~ * 448 = exp2(S - m + P_SHIFT)
    # comes straight out of exp2; l carries the same 448), else 0.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DPAD], dtype=tl.float32)

    k_base = K_q + bh_kv * N_K_PAD * DPAD
    ks_base = K_scale + bh_kv * N_K_PAD
    v_base = V_q + bh_kv * N_K_PAD * DPAD

    # -- K/V ranges: [0, lo_masked) needs no mask; [lo_masked, hi) is masked --
    n_full = (N_K // BLOCK_N) * BLOCK_N
    if CAUSAL:
        # key j is kept for row i iff j <= i + causal_offset
        hi = tl.minimum(N_K, tl.maximum(start_m + BLOCK_M + causal_offset, 0))
        lo_masked = tl.minimum(n_full, (tl.maximum(start_m + causal_offset + 1, 0) // BLOCK_N) * BLOCK_N)
    else:
        hi = N_K
        lo_masked = n_full
    if MASK_KIND != 0:  # a user mask: every block goes through the masked loop
        lo_masked = 0
    mask_base = Mask + b * stride_mb + h * stride_mh

    acc, l_i, m_i = _attn_inner(
        acc, l_i, m_i, q_i8, q_scale, offs_m, offs_d,
        k_base, ks_base, v_base, 0, lo_masked, N_K, N_K_PAD, causal_offset,
        mask_base, stride_mq, stride_mk, row_ok,
        DPAD, BLOCK_N, False, CAUSAL, MASK_KIND, PV_FP8, PV_ACC_FP16, EXACT, P_SHIFT,
    )
    acc, l_i, m_i = _attn_inner(
        acc, l_i, m_i, q_i8, q_scale, offs_m, offs_d,
        k_base, ks_base, v_base, lo_masked, hi, N_K, N_K_PAD, causal_offset,
        mask_base, stride_mq, stride_mk, row_ok,
        DPAD, BLOCK_N, True, CAUSAL, MASK_KIND, PV_FP8, PV_ACC_FP16, EXACT, P_SHIFT,
    )

    # -- epilogue --
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]  # for FP8 both carry 448: it cancels
    if PV_FP8:
        v_scale = tl.load(Stats + STATS_STRIDE + bh_kv * DPAD + offs_d)  # amax / 448
        out = out * v_scale[None, :]
    if SMOOTH_V:
        v_mean = tl.load(Stats + 2 * STATS_STRIDE + bh_kv * DPAD + offs_d)
        out = out + v_mean[None, :]
    out = tl.where(empty[:, None], 0.0, out)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=io_mask)

    if RETURN_LSE:
        lse = (m_i + (tl.math.log2(l_safe) - P_SHIFT)) * 0.6931471805599453
        if SMOOTH_K:
            lse = lse + lse_shift
        lse = tl.where(empty, float("-inf"), lse)
        tl.store(LSE + bh * N_Q + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------- host


def supports(config: QuantConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None if :func:`attention_forward` handles this case, else a short reason."""
    if config.qk_dtype is not QKDtype.INT8:
        return "INT4 QK is not implemented by the Triton kernels (Hopper has no INT4 MMA)"
    if config.smooth_q:
        return "smooth_q is not implemented by the Triton kernels"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be 4-D [B, H, N, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _SUPPORTED_DTYPES:
            return f"{name} dtype {t.dtype} is not fp16, bf16 or fp32"
    if not (q.device == k.device == v.device):
        return "q, k, v are on different devices"
    if q.device.type != "cuda" and not interpreting():
        return "the Triton kernels need CUDA tensors"
    batch, hq, _, head_dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        return "q, k, v have different batch sizes"
    if k.shape[:3] != v.shape[:3]:
        return "k and v have different shapes"
    if k.shape[-1] != head_dim:
        return "k's head dim differs from q's"
    if v.shape[-1] != head_dim:
        return "Dv != D is not supported"
    if head_dim > MAX_HEAD_DIM or head_dim < 1:
        return f"head dim {head_dim} is not in 1..{MAX_HEAD_DIM}"
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        return "the number of q heads must be a multiple of the number of k/v heads"
    if q.device.type == "cuda":
        major, minor = _capability(q.device)
        if major < 8:
            return "INT8 tensor-core attention needs sm_80 or newer"
        if config.pv_dtype is PVDtype.FP8 and (major, minor) < (8, 9):
            return "FP8 P~V needs sm_89 or newer"
    return None


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: QuantConfig,
    *,
    sm_scale: float | None,
    causal_offset: int | None = None,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantized attention forward on [B, H, N, D] views (any strides; nothing is copied).

    Args:
        q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D], Hq % Hkv == 0; fp16, bf16 or fp32.
        config: the quantization (see :func:`supports` for what is handled).
        sm_scale: score scale (None: 1 / sqrt(D)).
        causal_offset: None for no mask, else keep key j for query i iff
            j <= i + causal_offset (0: top-left aligned; Nk - Nq: bottom-right).
        return_lse: also return the natural-log LSE [B, Hq, Nq] fp32.
        out: optional [B, Hq, Nq, D] view (any strides) of q's dtype to write into.
        attn_mask: None, or a bool (True = attend) or additive float mask broadcastable to
            [B, Hq, Nq, Nk] (read through broadcast strides, never expanded in memory);
            a row whose keys are all masked gives 0 (and LSE -inf).
        check: run :func:`supports` first (callers that already did pass False).

    Returns:
        (out, lse or None). Two kernel launches, no device synchronization.
    """
    reason = supports(config, q, k, v) if check else None
    if reason is not None:
        raise ValueError(f"attention_forward: {reason}")
    batch, hq, nq, head_dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif check and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(
            f"attention_forward: out must be {tuple(q.shape)} {q.dtype} on {q.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    lse = torch.empty((batch, hq, nq), dtype=torch.float32, device=q.device) if return_lse else None
    if out.numel() == 0:
        return out, lse
    if nk == 0:  # no key at all: every row is empty
        out.zero_()
        if lse is not None:
            lse.fill_(-math.inf)
        return out, lse

    kv = quantize_kv(k, v, config)
    causal = causal_offset is not None
    dpad = kv.k_q.shape[-1]
    nk_pad = kv.k_q.shape[-2]
    blocks = block_config(head_dim, causal, q.device, config)
    grid = (triton.cdiv(nq, blocks.BLOCK_M), batch * hq)
    if attn_mask is None:
        mask, mask_strides, mask_kind = out, (0, 0, 0, 0), 0
    else:
        mask = attn_mask.expand(batch, hq, nq, nk)  # a view: broadcast dims get stride 0
        mask_strides, mask_kind = mask.stride(), 1 if mask.dtype == torch.bool else 2
    _attn_fwd_kernel[grid](
        q, *q.stride(),
        kv.k_q, kv.k_scale, kv.v_q, kv.stats,
        out, *out.stride(),
        lse if lse is not None else out,
        mask, *mask_strides,
        sm_scale * LOG2E, sm_scale,
        hq, hq // hkv, nq, nk, nk_pad, batch * hkv * dpad, int(causal_offset) if causal else 0,
        HEAD_DIM=head_dim, DPAD=dpad,
        BLOCK_M=blocks.BLOCK_M, BLOCK_N=blocks.BLOCK_N, Q_GROUP=config.q_group,
        CAUSAL=causal, MASK_KIND=mask_kind, PV_FP8=config.pv_dtype is PVDtype.FP8,
        PV_ACC_FP16=config.pv_accum is PVAccum.FP16,
        SMOOTH_K=config.smooth_k, SMOOTH_V=config.smooth_v, RETURN_LSE=return_lse,
        EXACT=interpreting(), P_SHIFT=LOG2_FP8_MAX if config.pv_dtype is PVDtype.FP8 else 0.0,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    return out, lse
