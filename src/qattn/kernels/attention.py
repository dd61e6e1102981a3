"""Quantized FlashAttention forward (SageAttention / SageAttention2) in Triton.

One call = three launches: :func:`~qattn.kernels.quantize.quantize_kv` (two: K -> INT8
after smoothing, V -> FP8 per channel or fp16), then :func:`_attn_fwd_kernel` over the
grid ``(cdiv(Nq, BLOCK_M), B * Hq)``. Each program owns BLOCK_M query rows of one head
of one sequence (a batch entry, or with ``VARLEN`` a sequence of a packed batch found
through ``cu_seqlens``):

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

On sm_90 with a tested Triton, large dense unmasked FP8 calls launch the Gluon kernel of
:mod:`.attention_sm90` instead (:func:`sm90_tiles` decides; :func:`kernel_name` reports;
:func:`softmax_block` gives its block size for the reference).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton
    TensorDescriptor = None

from ..ops import device_capability
from ..presets import PVAccum, PVDtype, QKDtype, QuantConfig
from . import attention_sm90
from .launch import CachedLauncher, cdiv, interpreting
from .quantize import (
    _group_amax,
    _quant_multiplier,
    _round_half_up,
    _round_to_e4m3_grid,
    padded_head_dim,
    quantize_kv,
)

__all__ = [
    "attention_forward",
    "attention_forward_varlen",
    "supports",
    "block_config",
    "BlockConfig",
    "kernel_name",
    "softmax_block",
]

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
    tma: bool = False  # load K/V tiles through TMA descriptors (sm_90+, triton >= 3.4)


# (padded head dim, causal, FP8 P~V) -> BlockConfig, per GPU generation. BLOCK_N must
# divide quantize.KV_PAD (128). BLOCK_M may be smaller than a Q quantization group (block
# granularity: 128 rows): the prologue then reads the whole group for its scale.
# sm_90, measured on an H100 at N=4096 (docs/kernel_notes.md): with FP8 V, 64 x 128 tiles
# and 4 warps (two CTAs per SM, so one's softmax overlaps the other's MMAs) beat 128 x 128
# with 8 warps by ~13% at D=128; with fp16 V (twice the shared memory per stage, so only
# one 64-row CTA fits) 128 x 128 with 8 warps wins by ~17% at D=128. TMA loads gained 2%
# (FP8 V) and 5-9% (fp16 V) at D=128 and lost 4-11% at D=64. D=32 and 256 are not
# measured. BLOCK_N is 128 wherever measured, so ``block_config(...).BLOCK_N`` does not
# depend on the config there. The interpreter uses the sm_90 table so CPU tests run the
# GPU's tiling. The sm_8x table is a guess (not measured).
_HOPPER = {
    (32, False, True): BlockConfig(64, 128, 4, 3),
    (32, True, True): BlockConfig(64, 128, 4, 3),
    (64, False, True): BlockConfig(64, 128, 4, 3),
    (64, True, True): BlockConfig(64, 128, 4, 3),
    (128, False, True): BlockConfig(64, 128, 4, 3, tma=True),
    (128, True, True): BlockConfig(64, 128, 4, 3, tma=True),
    (256, False, True): BlockConfig(64, 64, 4, 2),
    (256, True, True): BlockConfig(64, 64, 4, 2),
    (32, False, False): BlockConfig(64, 128, 4, 3),
    (32, True, False): BlockConfig(64, 128, 4, 3),
    (64, False, False): BlockConfig(64, 128, 4, 3),
    (64, True, False): BlockConfig(64, 128, 4, 3),
    (128, False, False): BlockConfig(128, 128, 8, 3, tma=True),
    (128, True, False): BlockConfig(128, 128, 8, 3, tma=True),
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
# Skip K/V blocks that a general (not one-row) user mask removes for a whole tile of rows
# (a runtime branch in the masked loop); a switch so that bench/kernel_sweep.py can time
# both.
_SKIP_EMPTY_BLOCKS = True
# Smallest B * Hq * Nq * Nk for which a config's ``tma`` is used (see _launch).
_TMA_MIN_WORK = 2**29
# Use the Gluon kernel (attention_sm90) where it applies; tests and benchmarks switch it
# off to run this file's kernel on the same cases.
_USE_SM90 = True


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
def _kept_key_span(mask_base, stride_mk, n_k, MASK_KIND: tl.constexpr, SCAN: tl.constexpr = 1024):
    """First and last key that a one-row mask keeps (n_k and -1 when it keeps none): a
    scan of n_k mask entries, small next to the K/V tiles the span saves (key padding)."""
    zero = tl.program_id(0) * 0  # a tensor even when n_k arrives as the constant 1
    first = n_k + zero
    last = zero - 1
    for start in range(0, n_k, SCAN):
        offs = start + tl.arange(0, SCAN)
        in_range = offs < n_k
        entry = tl.load(mask_base + offs * stride_mk, mask=in_range, other=0)
        if MASK_KIND == 1:
            kept = in_range & (entry != 0)
        else:
            kept = in_range & (entry.to(tl.float32) > float("-inf"))
        first = tl.minimum(first, tl.min(tl.where(kept, offs, n_k), axis=0))
        last = tl.maximum(last, tl.max(tl.where(kept, offs, -1), axis=0))
    return first, last


@triton.jit
def _attn_inner(
    acc, l_i, m_i, q_i8, q_scale, offs_m, offs_d,
    k_base, ks_base, v_base, k_desc, v_desc, k_row, v_row, kv_row0,
    lo, hi, N_K, ROWS, causal_offset,
    mask_base, stride_mq, stride_mk, row_ok,
    DPAD: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_KEYS_ONLY: tl.constexpr, SKIP_EMPTY: tl.constexpr,
    PV_FP8: tl.constexpr, PV_ACC_FP16: tl.constexpr, EXACT: tl.constexpr, P_SHIFT: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Online softmax over K/V blocks [lo, hi). MASKED: apply the bounds/causal mask and
    the user's mask (MASK_KIND 1: bool, True = keep; 2: additive, natural-log units;
    MASK_KEYS_ONLY: the mask has one row per (batch, head), e.g. key padding, and is
    loaded as a [BLOCK_N] vector). SKIP_EMPTY: blocks that a general mask removes for
    every row of the tile are not computed."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_K

        # -- the user's mask first: a tile it removes entirely is not computed --
        any_kept = True
        if MASKED and MASK_KIND != 0:
            if MASK_KEYS_ONLY:
                # No skip test here: the caller trimmed [lo, hi) to the kept keys' span, and
                # a branch around the block's work costs more than it saves for masks whose
                # rows are all alike (it stops Triton from pipelining the loop: measured).
                mask_vec = tl.load(mask_base + offs_n * stride_mk, mask=n_ok, other=0)
                if MASK_KIND == 1:
                    user_keep = (mask_vec != 0)[None, :]
                else:
                    bias = tl.where(n_ok, mask_vec.to(tl.float32), float("-inf"))[None, :]
            else:
                in_range = row_ok[:, None] & n_ok[None, :]
                mask_ptrs = mask_base + offs_m[:, None] * stride_mq + offs_n[None, :] * stride_mk
                mask_tile = tl.load(mask_ptrs, mask=in_range, other=0)
                if MASK_KIND == 1:
                    user_keep = mask_tile != 0
                    if SKIP_EMPTY:
                        any_kept = tl.max(tl.max(user_keep.to(tl.int32), axis=1), axis=0) > 0
                else:
                    bias = mask_tile.to(tl.float32)
                    if SKIP_EMPTY:
                        any_kept = tl.max(tl.max(tl.where(in_range, bias, float("-inf")), axis=1),
                                          axis=0) > float("-inf")
        if any_kept:
            # -- S = Q K^T in the log2 domain (K buffers are padded: no load masks) --
            if USE_TMA:  # k_desc: [Hkv * rows, DPAD] in [BLOCK_N, DPAD] boxes
                k = k_desc.load([(k_row + start_n).to(tl.int32), 0])
            else:
                k = tl.load(k_base + offs_n[:, None] * DPAD + offs_d[None, :])
            k_scale = tl.load(ks_base + offs_n)
            s_int = tl.dot(q_i8, tl.trans(k), out_dtype=tl.int32)
            # S = t * q_scale with t = int * k_scale. Since q_scale >= 0,
            # max_j S = q_scale * max_j t exactly, so the unmasked path takes the row max on
            # t and applies q_scale inside one fused multiply-add with the max subtraction.
            t = _i32_to_f32(s_int) * k_scale[None, :]
            if MASKED:
                s = t * q_scale[:, None]
                keep = n_ok[None, :]
                if CAUSAL:
                    keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
                if MASK_KIND == 1:
                    keep = keep & user_keep
                elif MASK_KIND == 2:
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
                # V is stored [D, rows] (tokens contiguous): load [DPAD, BLOCK_N], use its
                # transpose.
                if USE_TMA:  # v_desc: [Hkv * DPAD, rows] in [DPAD, BLOCK_N] boxes
                    v = v_desc.load([v_row.to(tl.int32), (kv_row0 + start_n).to(tl.int32)])
                else:
                    v = tl.load(v_base + offs_d[:, None] * ROWS + offs_n[None, :])
                if EXACT:
                    p = _round_to_e4m3_grid(p)
                pv = tl.dot(p.to(tl.float8e4nv), tl.trans(v), out_dtype=tl.float32)
            else:
                if USE_TMA:  # v_desc: [Hkv * rows, DPAD] in [BLOCK_N, DPAD] boxes
                    v = v_desc.load([(k_row + start_n).to(tl.int32), 0])
                else:
                    v = tl.load(v_base + offs_n[:, None] * DPAD + offs_d[None, :])
                if PV_ACC_FP16:
                    if EXACT:  # interpreter: numpy's fp16 matmul would round every partial sum
                        pv = tl.dot(p.to(tl.float16), v, out_dtype=tl.float32).to(tl.float16).to(tl.float32)
                    else:
                        pv = tl.dot(p.to(tl.float16), v, out_dtype=tl.float16).to(tl.float32)
                else:
                    pv = tl.dot(p.to(tl.float16), v, out_dtype=tl.float32)
            acc = acc * alpha[:, None] + pv  # two-level accumulation: fresh block product in fp32
            m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, stride_qb, stride_qh, stride_qn, stride_qd,
    K_q, K_scale, V_q, Stats, K_desc, V_desc,
    O, stride_ob, stride_oh, stride_on, stride_od,
    LSE, CuQ, CuK,
    Mask, stride_mb, stride_mh, stride_mq, stride_mk,
    score_scale, sm_scale,
    H_Q, KV_GROUP, N_Q, N_K, N_K_PAD, ROWS, STATS_STRIDE, causal_offset, TOTAL_Q,
    HEAD_DIM: tl.constexpr, DPAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Q_GROUP: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_KEYS_ONLY: tl.constexpr, SKIP_EMPTY: tl.constexpr,
    PV_FP8: tl.constexpr, PV_ACC_FP16: tl.constexpr,
    SMOOTH_K: tl.constexpr, SMOOTH_V: tl.constexpr, RETURN_LSE: tl.constexpr,
    EXACT: tl.constexpr, P_SHIFT: tl.constexpr, USE_TMA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the longest rows (most K/V blocks) first: a shorter tail
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H_Q
    h = bh % H_Q
    bh_kv = bh // KV_GROUP  # GQA/MQA: q head h reads kv head h // (Hq // Hkv)
    h_kv = h // KV_GROUP

    # -- where this program's sequence is (see quantize.py for the K/V buffer layout) --
    if VARLEN:  # packed tokens: sequence b is Cu[b] .. Cu[b+1]; causal aligned bottom-right
        q_start = tl.load(CuQ + b).to(tl.int64)
        n_q = tl.load(CuQ + b + 1).to(tl.int64) - q_start
        k_start = tl.load(CuK + b).to(tl.int64)
        n_k = tl.load(CuK + b + 1).to(tl.int64) - k_start
        kv_row0 = tl.multiple_of(tl.cdiv(k_start, 128) * 128 + 128 * b, 128)
        if CAUSAL:
            causal_offset = n_k - n_q
        lse_row0 = h * TOTAL_Q + q_start  # LSE [Hq, total_q], as flash-attn's varlen
    else:
        q_start = 0
        n_q = N_Q
        n_k = N_K
        kv_row0 = b * N_K_PAD
        lse_row0 = bh * N_Q  # LSE [B, Hq, Nq]

    start_m = pid_m * BLOCK_M
    if VARLEN:
        if start_m >= n_q:  # the grid covers the longest sequence
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DPAD)
    row_ok = offs_m < n_q
    if HEAD_DIM == DPAD:
        io_mask = row_ok[:, None]
    else:
        io_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]

    # -- prologue: load Q (any strides, zero padding) and quantize it to INT8 --
    q_base = Q + b * stride_qb + q_start * stride_qn + h * stride_qh
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=io_mask, other=0.0).to(tl.float32)
    if Q_GROUP > BLOCK_M:
        # The tile is part of one larger group (groups start at multiples of Q_GROUP):
        # read the whole group once for its max.
        tl.static_assert(Q_GROUP % BLOCK_M == 0, "BLOCK_M must divide a Q group")
        offs_g = (start_m // Q_GROUP) * Q_GROUP + tl.arange(0, Q_GROUP)
        g_mask = (offs_g < n_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
        q_group = tl.load(q_base + offs_g[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                          mask=g_mask, other=0.0).to(tl.float32)
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

    k_base = K_q + (h_kv * ROWS + kv_row0) * DPAD
    ks_base = K_scale + h_kv * ROWS + kv_row0
    if PV_FP8:
        v_base = V_q + h_kv * DPAD * ROWS + kv_row0
    else:
        v_base = V_q + (h_kv * ROWS + kv_row0) * DPAD
    k_row = h_kv * ROWS + kv_row0  # row of this sequence's first token in the 2-D descriptors
    v_row = h_kv * DPAD

    # -- K/V ranges: [0, n_unmasked) needs no mask; [lo_masked, hi) is masked --
    n_full = (n_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        # key j is kept for row i iff j <= i + causal_offset
        hi = tl.minimum(n_k, tl.maximum(start_m + BLOCK_M + causal_offset, 0))
        lo_masked = tl.minimum(n_full, (tl.maximum(start_m + causal_offset + 1, 0) // BLOCK_N) * BLOCK_N)
    else:
        hi = n_k
        lo_masked = n_full
    n_unmasked = lo_masked
    mask_base = Mask + b * stride_mb + h * stride_mh
    if MASK_KIND != 0:  # a user mask: every block goes through the masked loop...
        n_unmasked = 0
        lo_masked = 0
        if MASK_KEYS_ONLY:  # ...from the first to the last block with a kept key
            first_kept, last_kept = _kept_key_span(mask_base, stride_mk, n_k, MASK_KIND)
            lo_masked = (first_kept // BLOCK_N) * BLOCK_N
            hi = tl.minimum(hi, last_kept + 1)

    acc, l_i, m_i = _attn_inner(
        acc, l_i, m_i, q_i8, q_scale, offs_m, offs_d,
        k_base, ks_base, v_base, K_desc, V_desc, k_row, v_row, kv_row0,
        0, n_unmasked, n_k, ROWS, causal_offset,
        mask_base, stride_mq, stride_mk, row_ok,
        DPAD, BLOCK_N, False, CAUSAL, MASK_KIND, MASK_KEYS_ONLY, SKIP_EMPTY,
        PV_FP8, PV_ACC_FP16, EXACT, P_SHIFT, USE_TMA,
    )
    acc, l_i, m_i = _attn_inner(
        acc, l_i, m_i, q_i8, q_scale, offs_m, offs_d,
        k_base, ks_base, v_base, K_desc, V_desc, k_row, v_row, kv_row0,
        lo_masked, hi, n_k, ROWS, causal_offset,
        mask_base, stride_mq, stride_mk, row_ok,
        DPAD, BLOCK_N, True, CAUSAL, MASK_KIND, MASK_KEYS_ONLY, SKIP_EMPTY,
        PV_FP8, PV_ACC_FP16, EXACT, P_SHIFT, USE_TMA,
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
    o_ptrs = (O + b * stride_ob + q_start * stride_on + h * stride_oh
              + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=io_mask)

    if RETURN_LSE:
        lse = (m_i + (tl.math.log2(l_safe) - P_SHIFT)) * 0.6931471805599453
        if SMOOTH_K:
            lse = lse + lse_shift
        lse = tl.where(empty, float("-inf"), lse)
        tl.store(LSE + lse_row0 + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------- host

_launch_attn_fwd = CachedLauncher(_attn_fwd_kernel)


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
            a row whose keys are all masked gives 0 (and LSE -inf). K/V blocks that the
            mask removes for a whole tile of rows are skipped.
        check: run :func:`supports` first (callers that already did pass False).

    Returns:
        (out, lse or None). Three kernel launches, no device synchronization.
    """
    reason = supports(config, q, k, v) if check else None
    if reason is not None:
        raise ValueError(f"attention_forward: {reason}")
    batch, hq, nq, head_dim = q.shape
    hkv, nk = k.shape[1], k.shape[2]
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

    tiles = sm90_tiles(config, head_dim, causal_offset is not None, q.device, False, attn_mask is not None,
                       batch * hq * nq * nk)
    sm90 = tiles is not None
    kv = quantize_kv(k, v, config, wgmma_v_order=sm90, launch_dependents=sm90 and attention_sm90.PDL)
    if attn_mask is None:
        mask, mask_strides, mask_kind = out, (0, 0, 0, 0), 0
    else:
        mask = attn_mask.expand(batch, hq, nq, nk)  # a view: broadcast dims get stride 0
        mask_strides, mask_kind = mask.stride(), 1 if mask.dtype == torch.bool else 2
    _launch(
        q, (q.stride(0), q.stride(1), q.stride(2), q.stride(3)), kv,
        out, (out.stride(0), out.stride(1), out.stride(2), out.stride(3)), lse, None, None,
        mask, mask_strides, mask_kind, config, sm_scale,
        batch=batch, hq=hq, hkv=hkv, nq=nq, nk=nk, head_dim=head_dim,
        causal_offset=causal_offset, total_q=0, sm90=tiles,
    )
    return out, lse


def attention_forward_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    config: QuantConfig,
    *,
    sm_scale: float | None,
    causal: bool = False,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantized attention forward on packed variable-length sequences (no host sync).

    Args:
        q: [total_q, Hq, D]; k, v: [total_k, Hkv, D] (any strides), Hq % Hkv == 0.
        cu_seqlens_q, cu_seqlens_k: int32/int64 [B + 1] on q's device, non-decreasing,
            starting at 0 and ending at total_q / total_k: sequence b is tokens
            ``cu[b] .. cu[b+1]``. Not validated here (that would need a device sync).
        max_seqlen_q, max_seqlen_k: at least every sequence's length (sizes the grid).
        config, sm_scale: as :func:`attention_forward`. K is smoothed and V scaled per
            sequence.
        causal: bottom-right aligned per sequence (key j kept for query i iff
            j <= i + n_k - n_q), as flash-attn's varlen functions.
        return_lse: also return the natural-log LSE, [Hq, total_q] fp32.
        out: optional [total_q, Hq, D] view of q's dtype to write into.

    Returns:
        (out, lse or None).
    """
    total_q, hq, head_dim = q.shape
    hkv = k.shape[1]
    batch = cu_seqlens_q.shape[0] - 1
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((hq, total_q), dtype=torch.float32, device=q.device) if return_lse else None
    if out.numel() == 0 or batch == 0:
        return out, lse
    if k.shape[0] == 0 or max_seqlen_k == 0:  # no key at all: every row is empty
        out.zero_()
        if lse is not None:
            lse.fill_(-math.inf)
        return out, lse

    kv = quantize_kv(k, v, config, cu_seqlens=cu_seqlens_k, max_seqlen=max_seqlen_k)
    _launch(
        q, (0, q.stride(1), q.stride(0), q.stride(2)), kv,
        out, (0, out.stride(1), out.stride(0), out.stride(2)), lse, cu_seqlens_q, cu_seqlens_k,
        out, (0, 0, 0, 0), 0, config, sm_scale,
        batch=batch, hq=hq, hkv=hkv, nq=max_seqlen_q, nk=max_seqlen_k, head_dim=head_dim,
        causal_offset=0 if causal else None, total_q=total_q,
    )
    return out, lse


def sm90_tiles(config: QuantConfig, head_dim: int, causal: bool, device: torch.device,
               varlen: bool = False, masked: bool = False, work: int | None = None,
               ) -> "attention_sm90.HopperConfig | None":
    """The Gluon kernel's tiles when it runs this case, else None (the portable kernel
    runs): sm_90, a Triton version it was tested on, FP8 P~V, no user mask, dense
    batches, a head dim in its table, Q groups within a tile, K groups of half a block
    or more, and ``work = B * Hq * Nq * Nk`` (None: large) of at least its ``min_work``."""
    if not (_USE_SM90 and attention_sm90.AVAILABLE) or varlen or masked or device.type != "cuda":
        return None
    if work is not None and work < attention_sm90.min_work(padded_head_dim(head_dim)):
        return None
    if _capability(device) != (9, 0) or config.pv_dtype is not PVDtype.FP8:
        return None
    tiles = attention_sm90.hopper_config(padded_head_dim(head_dim), causal)
    # a Q group within a CTA's rows; a K group covering half a block (one K scale per
    # half: the kernel folds it into the row scale)
    if tiles is None or tiles.BLOCK_M % config.q_group or config.k_group % (tiles.BLOCK_N // 2):
        return None
    return tiles


def softmax_block(config: QuantConfig, head_dim: int, causal: bool, device: torch.device | str,
                  work: int | None = None) -> int:
    """K/V block of the online softmax of the kernel that runs a dense unmasked call
    (``work = B * Hq * Nq * Nk``): pass it as ``block_kv`` to
    :func:`qattn.reference.sage_attention` to reproduce that call's numbers."""
    tiles = sm90_tiles(config, head_dim, causal, torch.device(device), work=work)
    return block_config(head_dim, causal, device, config).BLOCK_N if tiles is None else tiles.BLOCK_N


def kernel_name(config: QuantConfig, head_dim: int, causal: bool, device: torch.device | str,
                varlen: bool = False, masked: bool = False, work: int | None = None) -> str:
    """Which attention kernel a call with these properties runs: 'gluon-sm90' or 'triton'
    (``work = B * Hq * Nq * Nk``; None: a large call)."""
    tiles = sm90_tiles(config, head_dim, causal, torch.device(device), varlen, masked, work)
    return "triton" if tiles is None else "gluon-sm90"


def _launch(q, q_strides, kv, out, out_strides, lse, cu_q, cu_k, mask, mask_strides, mask_kind,
            config, sm_scale, *, batch, hq, hkv, nq, nk, head_dim, causal_offset, total_q, sm90=None):
    """Launch :func:`_attn_fwd_kernel`, or the Gluon kernel with tiles ``sm90`` (what
    :func:`sm90_tiles` chose for this call) (strides in [B, H, N, D] order; varlen when
    cu_q is given, with B = number of sequences, nq / nk the longest lengths)."""
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    causal = causal_offset is not None
    varlen = cu_q is not None
    p_shift = LOG2_FP8_MAX if config.pv_dtype is PVDtype.FP8 else 0.0
    if sm90 is not None:
        attention_sm90.launch(
            q, q_strides, kv, out, out_strides, lse, config, sm90, score_scale=sm_scale * LOG2E,
            sm_scale=sm_scale, batch=batch, hq=hq, hkv=hkv, nq=nq, nk=nk, head_dim=head_dim,
            causal_offset=causal_offset, p_shift=p_shift)
        return
    dpad = kv.k_q.shape[-1]
    rows = kv.k_q.shape[1]
    blocks = block_config(head_dim, causal, q.device, config)
    grid = (cdiv(nq, blocks.BLOCK_M), batch * hq)
    # TMA descriptors cost host time (two built and encoded per call; ~60 us in session
    # 3, before launches were cached): worth it only where the GPU work hides it. Session
    # 12 (H200, D=128, whole calls): slower at N=512; at 1k +3-7% with fp16 V but 6-10%
    # slower with FP8 V and a mask; within 3% at 2k. Hence from B*Hq*Nq*Nk = 2^29.
    use_tma = blocks.tma and TensorDescriptor is not None and batch * hq * nq * nk >= _TMA_MIN_WORK
    k_desc, v_desc = kv.k_q, kv.v_q
    if use_tma:
        k_desc = TensorDescriptor(kv.k_q, [hkv * rows, dpad], [dpad, 1], [blocks.BLOCK_N, dpad])
        if kv.v_q.dtype == torch.float16:
            v_desc = TensorDescriptor(kv.v_q, [hkv * rows, dpad], [dpad, 1], [blocks.BLOCK_N, dpad])
        else:
            v_desc = TensorDescriptor(kv.v_q, [hkv * dpad, rows], [rows, 1], [dpad, blocks.BLOCK_N])
    _launch_attn_fwd[grid](
        q, *q_strides,
        kv.k_q, kv.k_scale, kv.v_q, kv.stats, k_desc, v_desc,
        out, *out_strides,
        lse if lse is not None else out,
        cu_q if varlen else kv.stats, cu_k if varlen else kv.stats,
        mask, *mask_strides,
        sm_scale * LOG2E, sm_scale,
        hq, hq // hkv, nq, nk, rows // batch if not varlen else 0, rows,
        batch * hkv * dpad, int(causal_offset) if causal else 0, total_q,
        HEAD_DIM=head_dim, DPAD=dpad,
        BLOCK_M=blocks.BLOCK_M, BLOCK_N=blocks.BLOCK_N, Q_GROUP=config.q_group,
        CAUSAL=causal, VARLEN=varlen,
        MASK_KIND=mask_kind, MASK_KEYS_ONLY=mask_kind != 0 and mask_strides[2] == 0,
        SKIP_EMPTY=_SKIP_EMPTY_BLOCKS,
        PV_FP8=config.pv_dtype is PVDtype.FP8, PV_ACC_FP16=config.pv_accum is PVAccum.FP16,
        SMOOTH_K=config.smooth_k, SMOOTH_V=config.smooth_v, RETURN_LSE=lse is not None,
        EXACT=interpreting(), P_SHIFT=p_shift,
        USE_TMA=use_tma, num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
