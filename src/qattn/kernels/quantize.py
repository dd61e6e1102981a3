"""K/V preparation for the quantized attention kernel: one Triton launch per call
(``_prepare_kv_kernel``), persistent programs taking work items from a counter. Each
chunk of tokens of one (sequence, kv-head) of K or V has two items:

1. statistics: per-channel sums (the means for smoothing) and, for FP8 V, per-channel
   max and min (``amax |V - mean|`` follows exactly as ``max(vmax - mean, mean - vmin)``);
   the last chunk of its (sequence, head) to finish combines the partials, in a fixed
   order (deterministic);
2. quantization, handed out a fixed number of items after the chunk's statistics: it
   waits until its (sequence, head)'s statistics are complete, reads the chunk again
   (mostly from L2) and writes the quantized tokens.

The statistics need every token before any can be quantized, so each input byte is read
twice; the interleaving is meant to take the second read from L2. Measured on an H100
(docs/kernel_notes.md, session 6) it is 3-4% faster than the previous two launches at
D = 128 and as fast at D = 64, and saves one launch's host time.

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

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..presets import PVDtype, QuantConfig

__all__ = ["QuantizedKV", "quantize_kv", "padded_head_dim", "padded_kv_len", "KV_PAD"]

KV_PAD = 128  # K/V token buffers are padded to a multiple of this (the largest BLOCK_N)
_MAX_CHUNKS = 64  # most token chunks one (sequence, head) is split into
_PROGRAMS_PER_SM = 2  # persistent programs of the quantization launch
_CHUNK_BYTES = 64 * 1024  # input bytes per chunk (before the _MAX_CHUNKS cap)
# (BLOCK_T, num_warps, programs per SM, chunk bytes), for benchmarks
_QUANT_OVERRIDE: tuple[int, int, int, int] | None = None


def padded_head_dim(head_dim: int) -> int:
    """Head dim as the kernels store it: the next power of two, at least 32 (the
    smallest K of an INT8 tensor-core dot)."""
    return max(32, triton.next_power_of_2(head_dim))


def padded_kv_len(nk: int) -> int:
    """K/V tokens as the kernels store them: a multiple of ``KV_PAD``."""
    return max(KV_PAD, triton.cdiv(nk, KV_PAD) * KV_PAD)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
        # evict_last: the quantization reads these bytes again right after
        x = tl.load(base + t[:, None] * stride_n + offs_d[None, :] * stride_d,
                    mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
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
def _finish_stats(Partials, Stats, Final, bh, n, N_CHUNKS, N_BH, KV: tl.constexpr,
                  DPAD: tl.constexpr, HEAD_DIM: tl.constexpr, SMOOTH: tl.constexpr, RANGE: tl.constexpr):
    """Combine the chunks' partials of K (KV = 0) or V (KV = 1) of one (sequence, head)
    into its statistics: the mean -> Stats[0] (K) or Stats[2] (V); for FP8 V (RANGE) the
    scale ``amax / 448`` -> Stats[1] and ``amax`` -> Final, which the quantization reads
    back. Partials are read past L1 (.cg: other programs wrote them) in [ROWS, DPAD]
    pieces (few registers: they bound the whole kernel's occupancy), in a fixed order
    (deterministic)."""
    ROWS: tl.constexpr = 8
    offs_c = tl.arange(0, ROWS)
    offs_d = tl.arange(0, DPAD)
    plane = N_BH * N_CHUNKS * DPAD
    stats_plane = N_BH * DPAD
    total = tl.zeros([DPAD], dtype=tl.float32)
    vmax = tl.full([DPAD], float("-inf"), dtype=tl.float32)
    vmin = tl.full([DPAD], float("inf"), dtype=tl.float32)
    for c0 in range(0, N_CHUNKS, ROWS):
        tile = (bh * N_CHUNKS + c0 + offs_c[:, None]) * DPAD + offs_d[None, :]
        c_ok = (c0 + offs_c < N_CHUNKS)[:, None]
        if SMOOTH:
            total += tl.sum(tl.load(Partials + KV * plane + tile, mask=c_ok, other=0.0, cache_modifier=".cg"), axis=0)
        if RANGE:
            vmax = tl.maximum(vmax, tl.max(tl.load(Partials + 2 * plane + tile, mask=c_ok, other=float("-inf"),
                                                   cache_modifier=".cg"), axis=0))
            vmin = tl.minimum(vmin, tl.min(tl.load(Partials + 3 * plane + tile, mask=c_ok, other=float("inf"),
                                                   cache_modifier=".cg"), axis=0))
    mean = tl.zeros([DPAD], dtype=tl.float32)
    if SMOOTH:
        mean = total / tl.maximum(n, 1).to(tl.float32)  # an empty varlen sequence has means of 0
        tl.store(Stats + 2 * KV * stats_plane + bh * DPAD + offs_d, mean)
    if RANGE:
        # max_t |fl(v_t - mean)| == max(fl(vmax - mean), fl(mean - vmin)): rounding is
        # monotone. (-inf for an empty sequence, hence the clamp.)
        amax = tl.where(offs_d < HEAD_DIM, tl.maximum(tl.maximum(vmax - mean, mean - vmin), 0.0), 0.0)
        tl.store(Stats + stats_plane + bh * DPAD + offs_d, tl.math.div_rn(amax, 448.0))
        tl.store(Final + bh * DPAD + offs_d, amax)


@triton.jit
def _quantize_k_chunk(k_in, stride_kn, stride_kd, k_out, k_scale_out, mean, n, t_start, t_stop,
                      HEAD_DIM: tl.constexpr, DPAD: tl.constexpr, BLOCK_T: tl.constexpr,
                      K_GROUP: tl.constexpr):
    """Tokens [t_start, t_stop) of one (sequence, head) of K -> INT8 rows and group scales
    (tokens from ``n`` on are the zero padding)."""
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, DPAD)
    d_ok = offs_d < HEAD_DIM
    for t0 in range(t_start, t_stop, BLOCK_T):
        t = t0 + offs_t
        mask = (t < n)[:, None] & d_ok[None, :]
        # evict_first: the second and last read of these bytes
        x = tl.load(k_in + t[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=mask, other=0.0, eviction_policy="evict_first")
        x = tl.where(mask, x.to(tl.float32) - mean[None, :], 0.0)
        amax = _group_amax(tl.max(tl.abs(x), axis=1), K_GROUP, BLOCK_T)
        inv = _quant_multiplier(amax, 127.0)
        xq = _round_half_up(x * inv[:, None])
        in_buf = t < t_stop  # BLOCK_T may overrun the padded length (a multiple of 128)
        tl.store(k_out + t[:, None] * DPAD + offs_d[None, :], xq.to(tl.int8), mask=in_buf[:, None])
        tl.store(k_scale_out + t, tl.math.div_rn(amax, 127.0), mask=in_buf)


@triton.jit
def _quantize_v_chunk(v_in, stride_vn, stride_vd, v_out, ROWS, mean, amax, n, t_start, t_stop,
                      HEAD_DIM: tl.constexpr, DPAD: tl.constexpr, BLOCK_T: tl.constexpr,
                      V_FP8: tl.constexpr, EXACT_FP8: tl.constexpr, WGMMA_V_ORDER: tl.constexpr):
    """Tokens [t_start, t_stop) of one (sequence, head) of V -> FP8 V^T columns (scaled by
    448 / amax per channel) or fp16 rows."""
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, DPAD)
    d_ok = offs_d < HEAD_DIM
    inv = _quant_multiplier(amax, 448.0)
    for t0 in range(t_start, t_stop, BLOCK_T):
        t = t0 + offs_t
        mask = (t < n)[:, None] & d_ok[None, :]
        x = tl.load(v_in + t[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=mask, other=0.0, eviction_policy="evict_first")
        x = tl.where(mask, x.to(tl.float32) - mean[None, :], 0.0)
        in_buf = t < t_stop
        if V_FP8:
            y = x * inv[None, :]
            if EXACT_FP8:
                y = _round_to_e4m3_grid(y)
            # Transposed [DPAD, ROWS]: tokens contiguous (K-major for FP8 wgmma). Padded
            # channels are not stored: the host zeroes them (on an H100 this store left
            # nonzero bytes there; docs/kernel_notes.md, "Known defect").
            if WGMMA_V_ORDER:  # reorder the tile's tokens, then store it as usual
                y = tl.reshape(tl.permute(tl.reshape(y, [BLOCK_T // 32, 2, 2, 4, 2, DPAD]), (0, 1, 3, 2, 4, 5)),
                               [BLOCK_T, DPAD])
            tl.store(v_out + offs_d[None, :] * ROWS + t[:, None], y.to(tl.float8e4nv),
                     mask=in_buf[:, None] & d_ok[None, :])
        else:
            tl.store(v_out + t[:, None] * DPAD + offs_d[None, :], x.to(tl.float16), mask=in_buf[:, None])


@triton.jit
def _prepare_chunk(
    is_stats, x_in, stride_n, stride_d, K_q, K_scale, V_q, Stats, Partials, Final, Arrived, Ready,
    group, chunk, bh, h, n, n_pad, row0, ROWS, CHUNK, N_CHUNKS, N_BH,
    KV: tl.constexpr, SMOOTH: tl.constexpr, RANGE: tl.constexpr,
    HEAD_DIM: tl.constexpr, DPAD: tl.constexpr, BLOCK_T: tl.constexpr,
    K_GROUP: tl.constexpr, EXACT_FP8: tl.constexpr, WGMMA_V_ORDER: tl.constexpr,
):
    """One work item of :func:`_prepare_kv_kernel` on chunk ``chunk`` of K (KV = 0) or V
    (1) of (sequence, kv-head) ``bh``: its statistics (``is_stats``) or its quantization.
    SMOOTH: subtract the per-channel mean; RANGE: FP8 V (per-channel amax, hence max and
    min)."""
    stats_stride = N_BH * DPAD
    if is_stats:
        if SMOOTH or RANGE:
            _chunk_stats(x_in, stride_n, stride_d, Partials, bh, chunk, n, CHUNK, N_CHUNKS, N_BH,
                         KV, 2, HEAD_DIM, DPAD, BLOCK_T, SMOOTH, RANGE)
            tl.debug_barrier()  # every thread's partials are stored before the release below
            if tl.atomic_add(Arrived + group, 1, sem="acq_rel") == N_CHUNKS - 1:
                _finish_stats(Partials, Stats, Final, bh, n, N_CHUNKS, N_BH, KV, DPAD, HEAD_DIM, SMOOTH, RANGE)
                tl.debug_barrier()
                tl.atomic_xchg(Ready + group, 1, sem="release")
    else:
        if SMOOTH or RANGE:  # wait until the statistics are final
            while tl.atomic_add(Ready + group, 0, sem="acquire") == 0:
                pass
        t_start = chunk * CHUNK
        t_stop = tl.minimum(t_start + CHUNK, n_pad)
        offs_d = tl.arange(0, DPAD)
        mean = tl.zeros([DPAD], dtype=tl.float32)
        if KV == 0:
            if SMOOTH:
                mean = tl.load(Stats + bh * DPAD + offs_d, cache_modifier=".cg")
            _quantize_k_chunk(x_in, stride_n, stride_d, K_q + (h * ROWS + row0) * DPAD,
                              K_scale + h * ROWS + row0, mean, n, t_start, t_stop,
                              HEAD_DIM, DPAD, BLOCK_T, K_GROUP)
        else:
            if SMOOTH:
                mean = tl.load(Stats + 2 * stats_stride + bh * DPAD + offs_d, cache_modifier=".cg")
            amax = tl.zeros([DPAD], dtype=tl.float32)
            if RANGE:
                amax = tl.load(Final + bh * DPAD + offs_d, cache_modifier=".cg")
                v_out = V_q + h * DPAD * ROWS + row0
            else:
                v_out = V_q + (h * ROWS + row0) * DPAD
            _quantize_v_chunk(x_in, stride_n, stride_d, v_out, ROWS, mean, amax, n, t_start, t_stop,
                              HEAD_DIM, DPAD, BLOCK_T, RANGE, EXACT_FP8, WGMMA_V_ORDER)


@triton.jit
def _prepare_kv_kernel(
    K, stride_kb, stride_kh, stride_kn, stride_kd,
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    Cu, K_q, K_scale, V_q, Stats, Partials, Final, Tickets, Arrived, Ready,
    H_KV, N, N_PAD, ROWS, CHUNK, N_CHUNKS, N_BH, LAG,
    HEAD_DIM: tl.constexpr, DPAD: tl.constexpr, BLOCK_T: tl.constexpr,
    K_GROUP: tl.constexpr, SMOOTH_K: tl.constexpr, SMOOTH_V: tl.constexpr,
    V_FP8: tl.constexpr, VARLEN: tl.constexpr, EXACT_FP8: tl.constexpr, WGMMA_V_ORDER: tl.constexpr,
):
    """Persistent programs taking tickets from a counter. Chunk ``c`` (of ``N_ITEMS =
    N_BH * 2 * N_CHUNKS``, numbered ``(bh * 2 + kv) * N_CHUNKS + chunk``: chunk ``chunk``
    of K (kv = 0) or V (kv = 1) of (sequence, kv-head) ``bh``) has two work items:

    * S_c, statistics: per-channel sums (max, min) of the chunk -> Partials; the last
      chunk of its (bh, kv) to arrive combines them (``_finish_stats``) and sets Ready;
    * Q_c, quantization: wait for Ready, read the chunk again and quantize it.

    Tickets run S_0 .. S_{LAG-1}, then S_{LAG+j} and Q_j alternately, then the last Qs:
    Q_c reads its bytes again about 2 LAG tickets after S_c read them, so they are mostly
    still in L2 (one HBM read of K and V instead of two), and everything a Q waits for
    was handed out before it (LAG >= N_CHUNKS) to a program that never waits itself: no
    deadlock, whatever the number of resident programs, and a program running the
    tickets one after another (TRITON_INTERPRET) never waits at all.
    """
    n_items = N_BH * 2 * N_CHUNKS
    ticket = tl.atomic_add(Tickets, 1)
    while ticket < 2 * n_items:
        r = ticket - LAG
        interleaved = r < 2 * (n_items - LAG)
        is_stats = (r < 0) | (interleaved & (r % 2 == 0))
        item = tl.where(r < 0, ticket, tl.where(interleaved, tl.where(r % 2 == 0, LAG + r // 2, r // 2),
                                                r - (n_items - LAG)))
        group = item // N_CHUNKS
        chunk = item % N_CHUNKS
        bh = (group // 2).to(tl.int64)
        b = bh // H_KV
        h = bh % H_KV
        start, n, n_pad, row0 = _kv_sequence(Cu, b, N, N_PAD, VARLEN)
        if group % 2 == 0:
            _prepare_chunk(is_stats, K + b * stride_kb + start * stride_kn + h * stride_kh, stride_kn, stride_kd,
                           K_q, K_scale, V_q, Stats, Partials, Final, Arrived, Ready,
                           group, chunk, bh, h, n, n_pad, row0, ROWS, CHUNK, N_CHUNKS, N_BH,
                           0, SMOOTH_K, False, HEAD_DIM, DPAD, BLOCK_T, K_GROUP, EXACT_FP8, WGMMA_V_ORDER)
        else:
            _prepare_chunk(is_stats, V + b * stride_vb + start * stride_vn + h * stride_vh, stride_vn, stride_vd,
                           K_q, K_scale, V_q, Stats, Partials, Final, Arrived, Ready,
                           group, chunk, bh, h, n, n_pad, row0, ROWS, CHUNK, N_CHUNKS, N_BH,
                           1, SMOOTH_V, V_FP8, HEAD_DIM, DPAD, BLOCK_T, K_GROUP, EXACT_FP8, WGMMA_V_ORDER)
        ticket = tl.atomic_add(Tickets, 1)


# ----------------------------------------------------------------------------- host


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
) -> QuantizedKV:
    """Quantize K (and V for FP8, or convert it to fp16) as ``config`` says, in two
    launches (statistics, then quantization); no host synchronization.

    Dense: ``k`` and ``v`` are [B, Hkv, Nk, D] with any strides (no copies are made);
    Nk >= 1. Varlen: ``k`` and ``v`` are packed [total, Hkv, D] (any strides),
    ``cu_seqlens`` int32/int64 [B + 1] on their device, ``max_seqlen`` >= every length.
    Entries of ``stats`` that the config does not use are left unwritten.
    ``wgmma_v_order``: store FP8 V^T in the Gluon sm_90 kernel's token order (dense only).
    """
    varlen = cu_seqlens is not None
    if varlen:
        total, heads, head_dim = k.shape
        batch = cu_seqlens.shape[0] - 1
        nk = max_seqlen
        rows = triton.cdiv(total, KV_PAD) * KV_PAD + KV_PAD * batch
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

    # Tiles of BLOCK_T tokens, warps: measured on an H100 at D = 64 and 128
    # (docs/kernel_notes.md, session 6: `bench/kernel_sweep.py quant`); D = 32 and 256 not.
    block_t, num_warps, programs_per_sm, chunk_bytes = _QUANT_OVERRIDE or (
        *{32: (256, 4), 64: (128, 4), 128: (128, 4)}.get(dpad, (64, 8)), _PROGRAMS_PER_SM, _CHUNK_BYTES)
    assert block_t % config.k_group == 0
    interpret = interpreting()
    # Tokens per chunk: about chunk_bytes of input (at most _MAX_CHUNKS chunks per
    # (sequence, head), so that combining the partials stays cheap).
    n_bh = batch * heads
    chunk = max(block_t, chunk_bytes // (head_dim * k.element_size()) // block_t * block_t)
    chunk = max(chunk, triton.cdiv(triton.cdiv(nk_pad, _MAX_CHUNKS), block_t) * block_t)
    n_chunks = triton.cdiv(nk_pad, chunk)
    n_items = n_bh * 2 * n_chunks
    programs = 1 if interpret else min(n_items, programs_per_sm * _sm_count(device))
    # Q_c follows S_c by ~2 * lag tickets: long enough for the chunk's (bh, kv) to have
    # its statistics (>= n_chunks, plus the tickets the programs hold at once), short
    # enough that the chunks read in between stay in L2
    lag = min(n_items, n_chunks + programs)
    # fp32 scratch: partials [4, n_bh, n_chunks, dpad] (K sum, V sum, V max, V min), then
    # V's amax [n_bh, dpad]; int32 counters: the ticket counter, then per (bh, K|V) the
    # chunks arrived and the statistics-ready flag
    scratch = torch.empty((4 * n_chunks + 1) * n_bh * dpad, dtype=torch.float32, device=device)
    counters = torch.zeros(1 + 4 * n_bh, dtype=torch.int32, device=device)
    _prepare_kv_kernel[(programs,)](
        k, *k_strides, v, *v_strides, cu_seqlens if varlen else k_scale,
        k_q, k_scale, v_q, stats, scratch, scratch[4 * n_chunks * n_bh * dpad:],
        counters, counters[1: 1 + 2 * n_bh], counters[1 + 2 * n_bh:],
        heads, nk, nk_pad, rows, chunk, n_chunks, n_bh, lag,
        HEAD_DIM=head_dim, DPAD=dpad, BLOCK_T=block_t, K_GROUP=config.k_group, SMOOTH_K=config.smooth_k,
        SMOOTH_V=config.smooth_v, V_FP8=v_fp8, VARLEN=varlen, EXACT_FP8=interpret, WGMMA_V_ORDER=wgmma_v_order,
        num_warps=num_warps,
    )
    return QuantizedKV(k_q, k_scale, v_q, stats, wgmma_v_order)
