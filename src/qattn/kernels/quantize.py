"""K/V preparation for the quantized attention kernel: two Triton launches per call,
both over the grid ``(chunks, B * Hkv, 2)`` (token chunks of one (batch, kv-head); the
last axis picks K or V), so that even short sequences fill the GPU:

1. ``_partial_stats_kernel`` reduces each chunk: per-channel sums (the means for
   smoothing) and, for FP8 V, per-channel max and min (``amax |V - mean|`` follows
   exactly as ``max(vmax - mean, mean - vmin)``);
2. ``_quantize_kv_kernel`` combines the chunks' partials (a few hundred floats, in a
   fixed order, so results are deterministic) and writes the chunk's quantized tokens.

Every input byte is read twice; one launch per (batch, head) would read it twice too,
but with far fewer programs in flight (measured in docs/kernel_notes.md).

Outputs are head-major, with the sequences of a batch one after the other in each head's
plane of ``rows`` token rows. Sequence ``b`` starts at row ``row0(b)``, a multiple of
``KV_PAD`` (128): ``b * nk_pad`` for a dense [B, Hkv, Nk, D] batch (``nk_pad`` = Nk rounded
up to 128), and ``ceil(cu_seqlens[b] / 128) * 128 + 128 * b`` for a packed varlen batch
(no host sync needed to place a sequence; ``rows = ceil(total / 128) * 128 + 128 * B``).
Each sequence's tokens are followed by zeros up to its length rounded up to 128, and
channels are padded with zeros up to ``dpad`` (the next power of two >= 32), so the
attention kernel loads K/V with no masks:

* ``k_q`` int8 [Hkv, rows, dpad]: ``floor((k - mean) * (127 / amax) + 0.5)``, one
  ``amax`` per group of ``config.k_group`` tokens (groups counted from the sequence start).
* ``k_scale`` fp32 [Hkv, rows]: ``amax / 127`` of each token's group (repeated inside a
  group, so the attention kernel loads a plain [BLOCK_N] vector).
* ``stats`` fp32 [3, B, Hkv, dpad]: ``stats[0]`` the K mean (0 if not smoothed),
  ``stats[1]`` the FP8 V scale ``amax_over_tokens / 448``, ``stats[2]`` the V mean; per
  sequence, so a varlen batch is smoothed sequence by sequence.
* ``v_q``: FP8 E4M3 stored transposed [Hkv, dpad, rows] (tokens contiguous: the K-major
  operand that Hopper's FP8 wgmma needs), or fp16 [Hkv, rows, dpad]. With
  ``wgmma_v_order`` (for the Gluon sm_90 kernel) the tokens of every 32-token chunk are
  stored reordered, token ``16 h + 8 i + 2 q + e`` at column ``16 h + 4 q + 2 i + e``: the
  order in which a thread holds P~ as wgmma's FP8 register operand
  (``attention_sm90._pv_operand``).

Numerics follow ``qattn.reference`` (see its module docstring).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..presets import PVDtype, QuantConfig
from .launch import CachedLauncher, cdiv, interpreting

try:  # grid dependency control (triton >= 3.4)
    from triton.language.extra.cuda import gdc_launch_dependents
except ImportError:  # pragma: no cover - older triton: LAUNCH_DEPENDENTS stays False
    gdc_launch_dependents = None

__all__ = ["QuantizedKV", "quantize_kv", "padded_head_dim", "padded_kv_len", "KV_PAD"]

KV_PAD = 128  # K/V token buffers are padded to a multiple of this (the largest BLOCK_N)
_MAX_CHUNKS = 64  # most token chunks one (batch, head) is split into
# (BLOCK_T, num_warps) of pass 1 (statistics) and pass 2 (quantization) by padded head
# dim; D <= 32 and 256 not measured.
_STATS_TILES = {32: (256, 4), 64: (128, 2), 128: (64, 2)}
_QUANT_TILES = {32: (256, 4), 64: (64, 2), 128: (64, 4)}
_STATS_OVERRIDE: tuple[int, int] | None = None  # benchmarks: pass 1's tile instead of the table
_QUANT_OVERRIDE: tuple[int, int] | None = None  # benchmarks: pass 2's tile instead of the table


def padded_head_dim(head_dim: int) -> int:
    """Head dim as the kernels store it: the next power of two, at least 32 (the
    smallest K of an INT8 tensor-core dot)."""
    return max(32, 1 << (head_dim - 1).bit_length())


def padded_kv_len(nk: int) -> int:
    """K/V tokens as the kernels store them: a multiple of ``KV_PAD``."""
    return max(KV_PAD, cdiv(nk, KV_PAD) * KV_PAD)


# ----------------------------------------------------------------------------- helpers
# Shared with attention.py.


@triton.jit
def _group_amax(row_amax, GROUP: tl.constexpr, ROWS: tl.constexpr):
    """Per-row max |x| [ROWS] -> the max over each row's group of GROUP rows, per row.

    Groups are aligned to multiples of GROUP within the tile (the tile itself starts at
    a multiple of GROUP, so they are aligned to the absolute row index too).
    """
    if GROUP == 1:
        return row_amax
    elif GROUP == ROWS:
        return tl.zeros([ROWS], dtype=tl.float32) + tl.max(row_amax, axis=0)
    else:
        tl.static_assert(ROWS % GROUP == 0, "the tile must hold whole quantization groups")
        grouped = tl.max(tl.reshape(row_amax, [ROWS // GROUP, GROUP]), axis=1)
        return tl.reshape(tl.broadcast_to(grouped[:, None], [ROWS // GROUP, GROUP]), [ROWS])


@triton.jit
def _quant_multiplier(amax, QMAX: tl.constexpr):
    """``qmax / amax`` as the reference rounds it (``(1 / amax) * qmax``, IEEE division:
    PyTorch evaluates ``scalar / tensor`` as a reciprocal times the scalar), 0 where
    ``amax == 0`` so that an all-zero group quantizes to 0."""
    safe = tl.where(amax > 0, amax, 1.0)
    return tl.where(amax > 0, tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe) * QMAX, 0.0)


@triton.jit
def _round_half_up(x):
    """Round to the nearest integer, halves up (libdevice.rint fails in the interpreter)."""
    return tl.floor(x + 0.5)


@triton.jit
def _round_to_e4m3_grid(x):
    """Round fp32 ``x`` (|x| <= 448) to the nearest FP8 E4M3 value, ties to even, in fp32.

    Only used under TRITON_INTERPRET: the interpreter's fp32 -> float8e4nv cast rounds
    wrongly when rounding carries into the exponent, but converts representable values
    exactly. On the GPU the hardware cast (cvt.rn.satfinite) is used directly.
    """
    ax = tl.abs(x)
    bits = ax.to(tl.int32, bitcast=True)
    # Normal E4M3 numbers keep 3 of fp32's 23 mantissa bits: round the other 20 away.
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
    normal = bits.to(tl.float32, bitcast=True)
    # Subnormals (|x| < 2^-6) are multiples of 2^-9: adding 2^14 rounds to that grid.
    subnormal = (ax + 16384.0) - 16384.0
    r = tl.minimum(tl.where(ax < 0.015625, subnormal, normal), 448.0)
    return tl.where(x < 0, -r, r)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _kv_sequence(Cu, b, N, N_PAD, VARLEN: tl.constexpr):
    """Where sequence ``b`` is: (first input token, length, length padded to KV_PAD,
    first row in the quantized buffers). Dense: every sequence has N tokens and starts at
    token 0 of its batch entry. Varlen: tokens ``Cu[b] .. Cu[b+1]`` of the packed input."""
    if VARLEN:
        start = tl.load(Cu + b).to(tl.int64)
        n = tl.load(Cu + b + 1).to(tl.int64) - start
        n_pad = tl.cdiv(n, 128) * 128
        row0 = tl.cdiv(start, 128) * 128 + 128 * b
    else:
        start = b * 0
        n = N + b * 0
        n_pad = N_PAD + b * 0
        row0 = b * N_PAD
    return start, n, n_pad, tl.multiple_of(row0, 128)


@triton.jit
def _chunk_stats(
    base, stride_n, stride_d, Partials, bh, chunk, N, CHUNK, N_CHUNKS, n_bh,
    SUM_PLANE: tl.constexpr, RANGE_PLANE: tl.constexpr,
    HEAD_DIM: tl.constexpr, DPAD: tl.constexpr, BLOCK_T: tl.constexpr,
    NEED_SUM: tl.constexpr, NEED_RANGE: tl.constexpr,
):
    """Per-channel sum (and max, min) of one chunk of tokens of one (sequence, head)."""
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, DPAD)
    d_ok = offs_d < HEAD_DIM
    total = tl.zeros([DPAD], dtype=tl.float32)
    vmax = tl.full([DPAD], float("-inf"), dtype=tl.float32)
    vmin = tl.full([DPAD], float("inf"), dtype=tl.float32)
    t_start = chunk * CHUNK
    t_stop = tl.minimum(t_start + CHUNK, N)
    for t0 in range(t_start, t_stop, BLOCK_T):
        t = t0 + offs_t
        mask = (t < t_stop)[:, None] & d_ok[None, :]
        x = tl.load(base + t[:, None] * stride_n + offs_d[None, :] * stride_d,
                    mask=mask, other=0.0).to(tl.float32)
        if NEED_SUM:
            total += tl.sum(x, axis=0)
        if NEED_RANGE:
            # Only the token bound decides: padded channels see zeros, so no infinities
            # reach the arithmetic of channels that do not exist.
            t_ok = (t < t_stop)[:, None]
            vmax = tl.maximum(vmax, tl.max(tl.where(t_ok, x, float("-inf")), axis=0))
            vmin = tl.minimum(vmin, tl.min(tl.where(t_ok, x, float("inf")), axis=0))
    # Partials [4, B*Hkv, N_CHUNKS, DPAD]: K sum, V sum, V max, V min. Chunks past the end
    # of a (short varlen) sequence store the identities.
    row = (bh * N_CHUNKS + chunk) * DPAD + offs_d
    plane = n_bh * N_CHUNKS * DPAD
    if NEED_SUM:
        tl.store(Partials + SUM_PLANE * plane + row, total)
    if NEED_RANGE:
        tl.store(Partials + RANGE_PLANE * plane + row, vmax)
        tl.store(Partials + (RANGE_PLANE + 1) * plane + row, vmin)


@triton.jit
def _partial_stats_kernel(
    K, stride_kb, stride_kh, stride_kn, stride_kd,
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    Cu, Partials, H_KV, N, N_PAD, CHUNK, N_CHUNKS,
    HEAD_DIM: tl.constexpr, DPAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SMOOTH_K: tl.constexpr, SMOOTH_V: tl.constexpr, V_FP8: tl.constexpr, VARLEN: tl.constexpr,
):
    """Pass 1, program (chunk, bh, 0 for K / 1 for V): per-channel sums (and for FP8 V,
    max and min) over one chunk of tokens -> Partials[stat, bh, chunk, :]."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_bh = tl.num_programs(1)
    b = bh // H_KV
    h = bh % H_KV
    start, n, _, _ = _kv_sequence(Cu, b, N, N_PAD, VARLEN)
    if tl.program_id(2) == 0:
        if SMOOTH_K:
            _chunk_stats(K + b * stride_kb + start * stride_kn + h * stride_kh, stride_kn, stride_kd,
                         Partials, bh, chunk, n, CHUNK, N_CHUNKS, n_bh, 0, 2,
                         HEAD_DIM, DPAD, BLOCK_T, True, False)
    else:
        if SMOOTH_V or V_FP8:
            _chunk_stats(V + b * stride_vb + start * stride_vn + h * stride_vh, stride_vn, stride_vd,
                         Partials, bh, chunk, n, CHUNK, N_CHUNKS, n_bh, 1, 2,
                         HEAD_DIM, DPAD, BLOCK_T, SMOOTH_V, V_FP8)


@triton.jit
def _reduce_partials(Partials, stat, bh, N_CHUNKS, n_bh, DPAD: tl.constexpr, OP: tl.constexpr):
    """Combine one statistic's per-chunk partials (OP 0 sum, 1 max, 2 min) in a fixed
    order (deterministic): slices of 16 chunks, each loaded at once (one memory round
    trip per slice, not per chunk) and reduced by a tree, the slices one after another."""
    offs_c = tl.arange(0, 16)
    offs_d = tl.arange(0, DPAD)
    ptr = Partials + (stat * n_bh + bh) * N_CHUNKS * DPAD + offs_d[None, :]
    identity = 0.0 if OP == 0 else (float("-inf") if OP == 1 else float("inf"))
    acc = tl.full([DPAD], identity, dtype=tl.float32)
    for c0 in range(0, N_CHUNKS, 16):
        c = c0 + offs_c
        x = tl.load(ptr + c[:, None] * DPAD, mask=(c < N_CHUNKS)[:, None], other=identity)
        if OP == 0:
            acc += tl.sum(x, axis=0)
        elif OP == 1:
            acc = tl.maximum(acc, tl.max(x, axis=0))
        else:
            acc = tl.minimum(acc, tl.min(x, axis=0))
    return acc


@triton.jit
def _finish_k_mean(Partials, Stats, bh, N_CHUNKS, n_bh, n_mean, store, DPAD: tl.constexpr):
    """The K mean of (sequence, head) ``bh`` from its chunks' sums; ``store``: also write
    it to ``Stats[0]``."""
    mean = _reduce_partials(Partials, 0, bh, N_CHUNKS, n_bh, DPAD, 0) / n_mean
    if store:
        tl.store(Stats + bh * DPAD + tl.arange(0, DPAD), mean)
    return mean


@triton.jit
def _finish_v_stats(Partials, Stats, bh, N_CHUNKS, n_bh, n_mean, STATS_STRIDE, store,
                    HEAD_DIM: tl.constexpr, DPAD: tl.constexpr, SMOOTH_V: tl.constexpr, V_FP8: tl.constexpr):
    """(V mean, ``amax_over_tokens |V - mean|``) of (sequence, head) ``bh`` from its chunks'
    partials (zeros for what the config does not use); ``store``: also write the mean and
    the FP8 scale ``amax / 448`` to ``Stats[2]`` and ``Stats[1]``."""
    offs_d = tl.arange(0, DPAD)
    mean = tl.zeros([DPAD], dtype=tl.float32)
    amax = tl.zeros([DPAD], dtype=tl.float32)
    if SMOOTH_V:
        mean = _reduce_partials(Partials, 1, bh, N_CHUNKS, n_bh, DPAD, 0) / n_mean
        if store:
            tl.store(Stats + 2 * STATS_STRIDE + bh * DPAD + offs_d, mean)
    if V_FP8:
        vmax = _reduce_partials(Partials, 2, bh, N_CHUNKS, n_bh, DPAD, 1)
        vmin = _reduce_partials(Partials, 3, bh, N_CHUNKS, n_bh, DPAD, 2)
        # max_t |fl(v_t - mean)| == max(fl(vmax - mean), fl(mean - vmin)): rounding is
        # monotone. (-inf for an empty sequence, hence the clamp.)
        amax = tl.where(offs_d < HEAD_DIM, tl.maximum(tl.maximum(vmax - mean, mean - vmin), 0.0), 0.0)
        if store:
            tl.store(Stats + STATS_STRIDE + bh * DPAD + offs_d, tl.math.div_rn(amax, 448.0))
    return mean, amax


@triton.jit
def _store_k_tile(x, t, t_stop, k_out, k_scale_out, DPAD: tl.constexpr, ROWS_T: tl.constexpr,
                  K_GROUP: tl.constexpr):
    """Quantize a tile of K - mean (fp32 [ROWS_T, DPAD], zeros outside the sequence) into
    rows ``t`` (those below ``t_stop``) of ``k_out`` and ``k_scale_out``."""
    offs_d = tl.arange(0, DPAD)
    amax = _group_amax(tl.max(tl.abs(x), axis=1), K_GROUP, ROWS_T)
    inv = _quant_multiplier(amax, 127.0)
    xq = _round_half_up(x * inv[:, None])
    in_buf = t < t_stop  # a tile may overrun the padded length (a multiple of 128)
    tl.store(k_out + t[:, None] * DPAD + offs_d[None, :], xq.to(tl.int8), mask=in_buf[:, None])
    tl.store(k_scale_out + t, tl.math.div_rn(amax, 127.0), mask=in_buf)


@triton.jit
def _store_v_tile(x, t, t_stop, inv, v_out, ROWS, HEAD_DIM: tl.constexpr, DPAD: tl.constexpr,
                  ROWS_T: tl.constexpr, V_FP8: tl.constexpr, EXACT_FP8: tl.constexpr,
                  WGMMA_V_ORDER: tl.constexpr):
    """Store a tile of V - mean (fp32 [ROWS_T, DPAD], zeros outside the sequence) as rows
    ``t`` (those below ``t_stop``): FP8 ``x * inv`` transposed, or fp16."""
    offs_d = tl.arange(0, DPAD)
    in_buf = t < t_stop
    if V_FP8:
        y = x * inv[None, :]
        if EXACT_FP8:
            y = _round_to_e4m3_grid(y)
        # Transposed [DPAD, ROWS]: tokens contiguous (K-major for FP8 wgmma). Padded
        # channels are not stored: the host zeroes them (on an H100 this store left
        # nonzero bytes there; docs/kernel_notes.md, "Known defect").
        y = y.to(tl.float8e4nv)  # before the reordering and transposition: a quarter of the bytes to move
        if WGMMA_V_ORDER:  # reorder the tile's tokens, then store it as usual
            y = tl.reshape(tl.permute(tl.reshape(y, [ROWS_T // 32, 2, 2, 4, 2, DPAD]), (0, 1, 3, 2, 4, 5)),
                           [ROWS_T, DPAD])
        tl.store(v_out + offs_d[None, :] * ROWS + t[:, None], y, mask=in_buf[:, None] & (offs_d < HEAD_DIM)[None, :])
    else:
        tl.store(v_out + t[:, None] * DPAD + offs_d[None, :], x.to(tl.float16), mask=in_buf[:, None])


@triton.jit
def _quantize_kv_kernel(
    K, stride_kb, stride_kh, stride_kn, stride_kd,
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    Cu, K_q, K_scale, V_q, Stats, Partials,
    H_KV, N, N_PAD, ROWS, CHUNK, N_CHUNKS, STATS_STRIDE,
    HEAD_DIM: tl.constexpr, DPAD: tl.constexpr, BLOCK_T: tl.constexpr,
    K_GROUP: tl.constexpr, SMOOTH_K: tl.constexpr, SMOOTH_V: tl.constexpr,
    V_FP8: tl.constexpr, VARLEN: tl.constexpr, EXACT_FP8: tl.constexpr, WGMMA_V_ORDER: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr,
):
    """Pass 2, program (chunk, bh, 0 for K / 1 for V): finish the statistics from the
    partials, then quantize the chunk's tokens (and the zero padding up to the sequence's
    padded length) into rows ``row0 + t`` of head ``h``'s plane.

    ``LAUNCH_DEPENDENTS`` (sm_90+): let a kernel launched next with programmatic dependent
    launch start once every program of this one has started (it waits for this one's
    results itself: ``griddepcontrol.wait``)."""
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()
    chunk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n_bh = tl.num_programs(1)
    b = bh // H_KV
    h = bh % H_KV
    start, n, n_pad, row0 = _kv_sequence(Cu, b, N, N_PAD, VARLEN)
    n_mean = tl.maximum(n, 1).to(tl.float32)  # an empty varlen sequence: means of 0
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, DPAD)
    d_ok = offs_d < HEAD_DIM
    t_start = chunk * CHUNK
    t_stop = tl.minimum(t_start + CHUNK, n_pad)

    if tl.program_id(2) == 0:
        k_in = K + b * stride_kb + start * stride_kn + h * stride_kh
        mean = tl.zeros([DPAD], dtype=tl.float32)
        if SMOOTH_K:
            mean = _finish_k_mean(Partials, Stats, bh, N_CHUNKS, n_bh, n_mean, chunk == 0, DPAD)
        k_out = K_q + (h * ROWS + row0) * DPAD
        k_scale_out = K_scale + h * ROWS + row0
        for t0 in range(t_start, t_stop, BLOCK_T):
            t = t0 + offs_t
            mask = (t < n)[:, None] & d_ok[None, :]
            x = tl.load(k_in + t[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=mask, other=0.0)
            x = tl.where(mask, x.to(tl.float32) - mean[None, :], 0.0)
            _store_k_tile(x, t, t_stop, k_out, k_scale_out, DPAD, BLOCK_T, K_GROUP)
    else:
        v_in = V + b * stride_vb + start * stride_vn + h * stride_vh
        mean, amax = _finish_v_stats(Partials, Stats, bh, N_CHUNKS, n_bh, n_mean, STATS_STRIDE, chunk == 0,
                                     HEAD_DIM, DPAD, SMOOTH_V, V_FP8)
        inv = _quant_multiplier(amax, 448.0)
        if V_FP8:
            v_out = V_q + h * DPAD * ROWS + row0
        else:
            v_out = V_q + (h * ROWS + row0) * DPAD
        for t0 in range(t_start, t_stop, BLOCK_T):
            t = t0 + offs_t
            mask = (t < n)[:, None] & d_ok[None, :]
            x = tl.load(v_in + t[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=mask, other=0.0)
            x = tl.where(mask, x.to(tl.float32) - mean[None, :], 0.0)
            _store_v_tile(x, t, t_stop, inv, v_out, ROWS, HEAD_DIM, DPAD, BLOCK_T, V_FP8, EXACT_FP8, WGMMA_V_ORDER)


# ----------------------------------------------------------------------------- host

_launch_partial_stats = CachedLauncher(_partial_stats_kernel)
_launch_quantize_kv = CachedLauncher(_quantize_kv_kernel)


class QuantizedKV(NamedTuple):
    """What :func:`quantize_kv` returns (see the module docstring for layouts)."""

    k_q: torch.Tensor  # int8 [Hkv, rows, dpad]
    k_scale: torch.Tensor  # fp32 [Hkv, rows]
    v_q: torch.Tensor  # fp8 [Hkv, dpad, rows] or fp16 [Hkv, rows, dpad]
    stats: torch.Tensor  # fp32 [3, B, Hkv, dpad]: k_mean, v_scale (amax / 448), v_mean
    wgmma_v_order: bool = False  # v_q's tokens reordered within 32-token chunks (see above)

    @property
    def k_mean(self) -> torch.Tensor:
        return self.stats[0]

    @property
    def v_scale(self) -> torch.Tensor:
        return self.stats[1]

    @property
    def v_mean(self) -> torch.Tensor:
        return self.stats[2]

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of a dense batch's buffers per batch entry: k_q [B, Hkv, nk_pad, dpad],
        k_scale [B, Hkv, nk_pad], v_q [B, Hkv, dpad, nk_pad] (FP8) or [B, Hkv, nk_pad, dpad]
        (in ``wgmma_v_order`` when that is set)."""
        heads, rows, dpad = self.k_q.shape
        batch = self.stats.shape[1]
        nk_pad = rows // batch
        k_q = self.k_q.view(heads, batch, nk_pad, dpad).transpose(0, 1)
        k_scale = self.k_scale.view(heads, batch, nk_pad).transpose(0, 1)
        if self.v_q.dtype == torch.float16:
            v_q = self.v_q.view(heads, batch, nk_pad, dpad).transpose(0, 1)
        else:
            v_q = self.v_q.view(heads, dpad, batch, nk_pad).permute(2, 0, 1, 3)
        return k_q, k_scale, v_q


def quantize_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    config: QuantConfig,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    wgmma_v_order: bool = False,
    launch_dependents: bool = False,
) -> QuantizedKV:
    """Quantize K (and V for FP8, or convert it to fp16) as ``config`` says, in two
    launches (statistics, then quantization); no host synchronization.

    Dense: ``k`` and ``v`` are [B, Hkv, Nk, D] with any strides (no copies are made);
    Nk >= 1. Varlen: ``k`` and ``v`` are packed [total, Hkv, D] (any strides),
    ``cu_seqlens`` int32/int64 [B + 1] on their device, ``max_seqlen`` >= every length.
    Entries of ``stats`` that the config does not use are left unwritten.
    ``wgmma_v_order``: store FP8 V^T in the Gluon sm_90 kernel's token order (dense only).
    ``launch_dependents`` (sm_90+): the next kernel, if launched with programmatic
    dependent launch, may start while the quantization's last programs run.
    """
    varlen = cu_seqlens is not None
    if varlen:
        total, heads, head_dim = k.shape
        batch = cu_seqlens.shape[0] - 1
        nk = max_seqlen
        rows = cdiv(total, KV_PAD) * KV_PAD + KV_PAD * batch
        # [B, H, N, D]-style strides: batch 0 (sequences are found through cu_seqlens).
        k_strides = (0, k.stride(1), k.stride(0), k.stride(2))
        v_strides = (0, v.stride(1), v.stride(0), v.stride(2))
    else:
        batch, heads, nk, head_dim = k.shape
        rows = batch * padded_kv_len(nk)
        k_strides, v_strides = k.stride(), v.stride()
    dpad = padded_head_dim(head_dim)
    nk_pad = padded_kv_len(nk)
    v_fp8 = config.pv_dtype is PVDtype.FP8
    if wgmma_v_order and (varlen or not v_fp8):
        raise ValueError("quantize_kv: wgmma_v_order applies to dense batches with FP8 V only")
    device = k.device

    k_q = torch.empty((heads, rows, dpad), dtype=torch.int8, device=device)
    k_scale = torch.empty((heads, rows), dtype=torch.float32, device=device)
    if v_fp8:
        # Rows of padded channels are zeroed here, not by the kernel (see its store).
        alloc = torch.zeros if dpad != head_dim else torch.empty
        v_q = alloc((heads, dpad, rows), dtype=torch.float8_e4m3fn, device=device)
    else:
        v_q = torch.empty((heads, rows, dpad), dtype=torch.float16, device=device)
    stats = torch.empty((3, batch, heads, dpad), dtype=torch.float32, device=device)

    # Tiles (BLOCK_T tokens, warps) of each pass, measured on an H100 (docs/kernel_notes.md,
    # session 10): few warps per program win, the reductions across warps cost.
    stats_t, stats_warps = _STATS_OVERRIDE or _STATS_TILES.get(dpad, (64, 8))
    block_t, num_warps = _QUANT_OVERRIDE or _QUANT_TILES.get(dpad, (64, 8))
    assert block_t % config.k_group == 0
    # Token chunks per (sequence, head): enough programs to fill the GPU (~2048 in all),
    # few enough that finishing the statistics from the partials stays cheap; whole tiles
    # of both passes.
    target_chunks = max(1, min(_MAX_CHUNKS, 1024 // max(1, batch * heads)))
    tile = max(block_t, stats_t)  # powers of two: a multiple of both
    chunk = cdiv(cdiv(nk_pad, target_chunks), tile) * tile
    n_chunks = cdiv(nk_pad, chunk)
    partials = torch.empty((4, batch * heads, n_chunks, dpad), dtype=torch.float32, device=device)
    args = (k, *k_strides, v, *v_strides, cu_seqlens if varlen else k_scale)
    meta = dict(HEAD_DIM=head_dim, DPAD=dpad, SMOOTH_K=config.smooth_k, SMOOTH_V=config.smooth_v,
                V_FP8=v_fp8, VARLEN=varlen)
    grid = (n_chunks, batch * heads, 2)
    _launch_partial_stats[grid](*args, partials, heads, nk, nk_pad, chunk, n_chunks,
                                BLOCK_T=stats_t, num_warps=stats_warps, **meta)
    _launch_quantize_kv[grid](
        *args, k_q, k_scale, v_q, stats, partials,
        heads, nk, nk_pad, rows, chunk, n_chunks, batch * heads * dpad,
        K_GROUP=config.k_group, EXACT_FP8=interpreting(), WGMMA_V_ORDER=wgmma_v_order,
        LAUNCH_DEPENDENTS=launch_dependents and gdc_launch_dependents is not None,
        BLOCK_T=block_t, num_warps=num_warps, **meta,
    )
    return QuantizedKV(k_q, k_scale, v_q, stats, wgmma_v_order)
