"""SageAttention2 forward for Hopper (sm_90) in Triton's Gluon dialect (warp-specialized at D = 128).

The algorithm of :func:`qattn.kernels.attention._attn_fwd_kernel` for the cases it takes
(INT8 QK^T, FP8 P~V with two-level fp32 accumulation, no user mask, dense batches),
written against the hardware instead of through ``tl.dot``. A CTA has 64 query rows and
(at D = 128) two partitions (``gl.warp_specialize``):

* a producer warp (24 registers) that TMA-loads K (INT8, ``[BLOCK_N, DPAD]``) and V^T
  (FP8, ``[DPAD, BLOCK_N]``) tiles, and stores the block's two K scales, into a ring of
  ``STAGES`` shared-memory slots: an mbarrier per slot says "ready" (TMA byte count and
  the scales' arrival) and one says "empty" (the consumer has finished with it);
* a consumer warpgroup (232 registers) that quantizes its Q rows to INT8 in shared
  memory, then per K/V block runs the softmax, issues the block's ``P~ V`` (FP8, P~ from
  registers, fresh fp32 tile) and the next block's ``Q K^T`` (INT8 -> int32) as async
  ``wgmma`` and waits for them (from D = 128 the ``Q K^T`` is issued before the softmax and
  runs under it).

Two CTAs share an SM (32K registers and ~113 KB of shared memory each), so one CTA's
softmax runs under the other's matrix products, as the two consumer warpgroups of
FlashAttention-3's ping-pong do, and one CTA's Q prologue and epilogue run under the
other's main loop, which a ping-pong inside one CTA cannot hide (docs/kernel_notes.md,
session 8: 1.0-1.24x the two-warpgroup CTA's speed below 16k keys, D=64 1.05-1.13x,
0.985x at 16k).

At D = 64 there is no producer warp (``HopperConfig.PRODUCER_WARP``): the consumer
warpgroup issues the TMA loads itself, STAGES - 1 blocks ahead, and reads the K scales from
global memory one block ahead. A CTA is then 4 warps of 168 registers, and three share an
SM: the softmax, a chain of dependent instructions that two warps per scheduler leave
half idle (docs/kernel_notes.md, session 15), has a third warp to hide it (kernel alone
+3-8% and +0-13% in two runs, whole call -1% to +8%). The padded producer warpgroup of the
other form costs a CTA's worth of registers.

The softmax is written for instruction count (docs/kernel_notes.md, session 5): the two
K scales of a block fold into the row scale (one FMA per score), row reductions are
tree-shaped, and P~ goes to wgmma's register operand without shuffles between threads
because V^T is stored with its keys in the matching order (``quantize_kv(...,
wgmma_v_order=True)``; :func:`_pv_operand`).

Grid, program order and buffers are those of the portable kernel (see attention.py and
quantize.py). The Gluon API moves between Triton releases: :data:`TESTED_TRITON` lists
the versions this file ran on; on any other, :data:`AVAILABLE` is False and the portable
kernel runs. ``bench/compile_sm90.py`` compiles it for sm_90a on a machine without a GPU.
"""

from __future__ import annotations

import functools

import triton

from .launch import CachedLauncher, cdiv

TESTED_TRITON = ("3.6.",)

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.language.extra.cuda import gdc_wait

    AVAILABLE = triton.__version__.startswith(TESTED_TRITON)
except ImportError:  # pragma: no cover - a Triton without Gluon
    AVAILABLE = False

__all__ = ["AVAILABLE", "TESTED_TRITON", "HopperConfig", "hopper_config", "kv_descriptors", "launch", "min_work"]


class HopperConfig:
    """Tiles of the Gluon kernel: BLOCK_N keys per block (the online-softmax block, as the
    reference's block_kv) and STAGES K/V slots in flight; with PRODUCER_WARP a producer warp
    loads them, else the consumer warpgroup itself. A CTA always has BLOCK_M = 64 query rows,
    quantized together (a Q group must fit)."""

    __slots__ = ("BLOCK_N", "STAGES", "PRODUCER_WARP")
    BLOCK_M = 64

    def __init__(self, BLOCK_N: int, STAGES: int, PRODUCER_WARP: bool = True):
        self.BLOCK_N, self.STAGES, self.PRODUCER_WARP = BLOCK_N, STAGES, PRODUCER_WARP

    @property
    def maxnreg(self) -> int:
        """Registers per thread at launch. With the producer warp: 4 + 1 (padded to 4) warps
        at 128 take half the SM's 64K, so two CTAs fit, and setmaxnreg then moves them to 232
        per consumer thread and 24 per producer thread. Without it: 4 warps at 168, so three
        CTAs fit."""
        return 128 if self.PRODUCER_WARP else 168

    def __repr__(self) -> str:
        return f"HopperConfig({self.BLOCK_N}, {self.STAGES}, PRODUCER_WARP={self.PRODUCER_WARP})"


# (padded head dim, causal) -> tiles, measured on an H100 (docs/kernel_notes.md, session
# 10, whole calls of the two-CTA kernel alternated in one run): BLOCK_N = 128 beats 64 at
# D = 128 and D = 64, causal and not. At D = 128 two CTAs of 3 stages fill an SM's shared
# memory. At D = 64, without the producer warp, three CTAs of 3 stages share an SM (168
# registers per thread): kernel alone +3-8% and +0-13% in two runs over two CTAs with a
# producer warp and 4 stages (session 15; 2 stages +0-7%); at D = 128 the consumer needs ~230
# registers, so two CTAs either way, and the producer warp ran level (0.995x).
_CONFIGS = {
    (64, False): HopperConfig(128, 3, PRODUCER_WARP=False),
    (64, True): HopperConfig(128, 3, PRODUCER_WARP=False),
    (128, False): HopperConfig(128, 3),
    (128, True): HopperConfig(128, 3),
}
# Smallest B * Hq * Nq * Nk for which dispatch picks this kernel, by padded head dim
# (docs/kernel_notes.md, session 12: whole calls alternated with the portable kernel on
# an H200): below, the portable kernel's shorter host path wins (the Gluon one builds TMA
# descriptors). D = 128: faster from [4, 32, 1024, 1024], slower at 512; D = 64: slower at
# 1024, faster at 2048.
_MIN_WORK = {64: 2**29, 128: 2**27}
# Tests and benchmarks may set a number here to replace the table (0: every call).
MIN_WORK: int | None = None
# Benchmarks may set this to a HopperConfig to override the table (not thread-safe).
_CONFIG_OVERRIDE: HopperConfig | None = None
# Launch with programmatic dependent launch after quantize_kv(..., launch_dependents=True):
# CTAs start, and quantize their Q, while the K/V quantization's last programs run, and wait
# for its results (griddepcontrol.wait) before touching K/V. Benchmarks may switch it off.
PDL = True
# Benchmarks and tests may set this to replace causal_head_group's choice (1: each head's
# tiles together).
HEAD_GROUP_OVERRIDE: int | None = None


def min_work(dpad: int) -> int:
    """Smallest ``B * Hq * Nq * Nk`` for which dispatch picks this kernel at ``dpad``."""
    return MIN_WORK if MIN_WORK is not None else _MIN_WORK.get(dpad, 2**29)


def causal_head_group(heads: int, nk_pad: int, dpad: int) -> int:
    """How many of the ``heads`` (B * Hq) (b, h) pairs a causal grid interleaves, longest
    rows first: as many as keep their quantized K/V (2 * nk_pad * dpad bytes each) within
    4 MiB of L2, at most 16. (docs/kernel_notes.md, session 12: +3-5% from 1k to 4k, where
    the tail of one head's tiles is a few percent of the grid; groups of 16 at 16k tokens
    (64 MiB) ran 5% slower, groups of 2-4 at 8k-16k within the noise of 1.)"""
    if HEAD_GROUP_OVERRIDE is not None:
        return HEAD_GROUP_OVERRIDE
    return max(1, min(16, heads, (4 << 20) // (2 * nk_pad * dpad)))


def hopper_config(dpad: int, causal: bool) -> HopperConfig | None:
    """The tiles for this case, or None when the Gluon kernel does not take it."""
    if _CONFIG_OVERRIDE is not None:
        return _CONFIG_OVERRIDE
    return _CONFIGS.get((dpad, bool(causal)))


if AVAILABLE:

    @gluon.jit
    def _i32_to_f32(x, CVT: gl.constexpr):
        """int32 -> fp32, exact for |x| < 2^22: with CVT the conversion instruction (I2FP),
        else an integer add and an fp32 subtraction (the bit trick of attention.py)."""
        if CVT:
            return x.to(gl.float32)
        else:
            return (x + 0x4B400000).to(gl.float32, bitcast=True) - 12582912.0

    @gluon.jit
    def _row_max(x):
        """max over axis 1 of a [M, W] tile in the wgmma accumulator layout (a thread holds
        columns 8 i + 2 q + e for its q): over e and i inside the thread first, then over q
        across the quad, so the dependent chain is W / 8 operations long, not W / 4."""
        M: gl.constexpr = x.shape[0]
        W: gl.constexpr = x.shape[1]
        x = gl.max(gl.reshape(x, [M, W // 8, 4, 2]), axis=3)
        return gl.max(gl.max(x, axis=1), axis=1)

    @gluon.jit
    def _row_sum(x):
        """sum over axis 1, in the order of :func:`_row_max`."""
        M: gl.constexpr = x.shape[0]
        W: gl.constexpr = x.shape[1]
        x = gl.sum(gl.reshape(x, [M, W // 8, 4, 2]), axis=3)
        return gl.sum(gl.sum(x, axis=1), axis=1)

    @gluon.jit
    def _pv_operand(p, p_layout: gl.constexpr):
        """P~ (fp32, wgmma accumulator layout) as FP8 in the layout of wgmma's register A
        operand. The keys of every 32-key chunk are reordered (16 h + 8 i + 2 q + e ->
        16 h + 4 q + 2 i + e) so that each thread already holds the values of its operand
        registers: no shuffles between threads. V^T is stored in the same key order
        (``quantize_kv(..., wgmma_v_order=True)``), so P~ V is unchanged."""
        M: gl.constexpr = p.shape[0]
        N: gl.constexpr = p.shape[1]
        x = gl.permute(gl.reshape(p, [M, N // 32, 2, 2, 4, 2]), (0, 1, 2, 4, 3, 5))
        x = gl.convert_layout(gl.reshape(x, [M, N]), p_layout)  # in fp32: registers renamed
        # four fp32 -> one register of four e4m3 (round to nearest, saturating, as .to()
        # rounds), packed as wgmma reads them
        packed = gl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; "
            "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; mov.b32 $0, {lo, hi}; }",
            "=r,r,r,r,r", [x], dtype=gl.int8, is_pure=True, pack=4)
        return packed.to(gl.float8e4nv, bitcast=True)

    @gluon.jit
    def _halves(x):
        """A block's [M, BLOCK_N] tile as its two [M, BLOCK_N / 2] halves of keys."""
        M: gl.constexpr = x.shape[0]
        HALF: gl.constexpr = x.shape[1] // 2
        return gl.split(gl.permute(gl.reshape(x, [M, 2, HALF]), (0, 2, 1)))

    @gluon.jit
    def _scores(s_int, I2F_HALVES: gl.constexpr, ROW_MAX: gl.constexpr):
        """``s_int = Q K^T`` of a block as fp32, split into its two halves of keys: the
        halves are scaled separately so that each K scale folds into the row scale, one FMA
        per score (a K group covers at least half a block; dispatch checks). The first
        ``I2F_HALVES`` halves are converted by I2FP, the others by the bit trick (at D = 128
        one of each ran faster than either alone: docs/kernel_notes.md, session 14).
        With ROW_MAX also each half's row max, taken over the int32 scores before their
        conversion: exact (scale * max t = max(scale * t) for scales >= 0, rounding being
        monotonic), off the conversion's path, and in three-input integer max instructions
        (VIMNMX3), half as many as the fp32 ones. Without it (a masked block, whose max is
        taken after masking) the maxima returned are unused zeros."""
        h0, h1 = _halves(s_int)
        if ROW_MAX:
            max0 = _row_max(h0).to(gl.float32)
            max1 = _row_max(h1).to(gl.float32)
        else:
            max0 = 0.0
            max1 = 0.0
        return _i32_to_f32(h0, I2F_HALVES >= 1), _i32_to_f32(h1, I2F_HALVES == 2), max0, max1

    @gluon.jit
    def _softmax(t0, t1, t_max0, t_max1, j, q_scale, ks0, ks1, m_i, l_i, offs_m, n_k, causal_offset,
                 BLOCK_N: gl.constexpr, MASKED: gl.constexpr, CAUSAL: gl.constexpr, P_SHIFT: gl.constexpr,
                 s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr):
        """Online softmax of block j from its scores' halves ``t0``, ``t1`` (:func:`_scores`)
        and their K scales: P~ in FP8 (wgmma's register operand), the factor that rescales
        the accumulator, the new row max and row sum. Without a mask the row maxima of the
        halves are ``t_max0``, ``t_max1`` (:func:`_scores`); with one they are taken after
        masking."""
        M: gl.constexpr = t0.shape[0]
        HALF: gl.constexpr = BLOCK_N // 2
        half_layout: gl.constexpr = t0.type.layout
        rows: gl.constexpr = gl.SliceLayout(1, half_layout)
        q_scale = gl.convert_layout(q_scale, rows)
        sc0 = q_scale * ks0
        sc1 = q_scale * ks1
        m_i = gl.convert_layout(m_i, rows)
        if MASKED:
            cols = j * BLOCK_N + gl.arange(0, HALF, layout=gl.SliceLayout(0, half_layout))
            keep0 = (cols < n_k)[None, :]
            keep1 = (cols + HALF < n_k)[None, :]
            if CAUSAL:  # key c is kept for row i iff c <= i + causal_offset
                last_key = gl.convert_layout(offs_m, rows)[:, None] + causal_offset
                keep0 = keep0 & (cols[None, :] <= last_key)
                keep1 = keep1 & (cols[None, :] + HALF <= last_key)
            s0 = gl.where(keep0, t0 * sc0[:, None], float("-inf"))
            s1 = gl.where(keep1, t1 * sc1[:, None], float("-inf"))
            m_new = gl.maximum(m_i, gl.convert_layout(_row_max(gl.maximum(s0, s1)), rows))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
            p0 = gl.exp2(s0 - (m_use - P_SHIFT)[:, None])
            p1 = gl.exp2(s1 - (m_use - P_SHIFT)[:, None])
        else:
            # scales >= 0, so max_c S = scale * max_c t
            m_new = gl.maximum(m_i, gl.maximum(gl.convert_layout(t_max0, rows) * sc0,
                                               gl.convert_layout(t_max1, rows) * sc1))
            m_use = m_new
            p0 = gl.exp2(t0 * sc0[:, None] - (m_use - P_SHIFT)[:, None])
            p1 = gl.exp2(t1 * sc1[:, None] - (m_use - P_SHIFT)[:, None])
        alpha = gl.exp2(m_i - m_use)
        l_i = gl.convert_layout(l_i, rows) * alpha + gl.convert_layout(_row_sum(p0 + p1), rows)
        p8 = _pv_operand(gl.reshape(gl.permute(gl.join(p0, p1), (0, 2, 1)), [M, BLOCK_N]), p_layout)
        s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
        return (p8, gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), gl.convert_layout(m_new, s_rows),
                gl.convert_layout(l_i, s_rows))

    @gluon.jit
    def _k_scales(ks_slot):
        """The two K scales of a block (its halves) from their shared-memory slot."""
        layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[2], threads_per_warp=[32], warps_per_cta=[4],
                                                order=[0])
        ks = ks_slot.load(layout)
        half = gl.arange(0, 2, layout=layout)
        return gl.sum(gl.where(half == 0, ks, 0.0), axis=0), gl.sum(gl.where(half == 1, ks, 0.0), axis=0)

    @gluon.jit
    def _issue_qk(q_smem, k_smem, ks_smem, ready, j, s_zero, STAGES: gl.constexpr, PRODUCER_WARP: gl.constexpr,
                  ks_ptr, BLOCK_N: gl.constexpr):
        """Wait for block j's K/V slot, read its two K scales (from the slot, or without the
        producer warp from ``ks_ptr``: the loads are issued before the wait, and the scales
        are first used by the next iteration's softmax), issue its Q K^T (async)."""
        slot = j % STAGES
        if not PRODUCER_WARP:
            ks0 = gl.load(ks_ptr + j * BLOCK_N)
            ks1 = gl.load(ks_ptr + j * BLOCK_N + BLOCK_N // 2)
        mbarrier.wait(ready.index(slot), (j // STAGES) & 1)
        if PRODUCER_WARP:
            ks0, ks1 = _k_scales(ks_smem.index(slot))
        s_tok = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        return s_tok, ks0, ks1

    @gluon.jit
    def _block(j, s_int, ks0, ks1, acc, m_i, l_i, q_scale, offs_m, n_k, causal_offset,
               q_smem, k_smem, v_smem, ks_smem, ready, empty, s_zero, o_zero,
               BLOCK_N: gl.constexpr, STAGES: gl.constexpr, MASKED: gl.constexpr,
               CAUSAL: gl.constexpr, ISSUE_NEXT: gl.constexpr, P_SHIFT: gl.constexpr, I2F_HALVES: gl.constexpr,
               EARLY_QK: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
               PRODUCER_WARP: gl.constexpr, ks_ptr, tma_args):
        """Block j: softmax of its scores ``s_int`` (K scales ``ks0``, ``ks1``), then its
        P~ V and, with ISSUE_NEXT, block j + 1's Q K^T (whose scores and K scales are
        returned), then the accumulator update and the release of its K/V slot. With
        EARLY_QK the next Q K^T is issued before the softmax, once the scores are in fp32
        registers, and runs under it.
        P~ is consumed in the iteration that makes it: carried across iterations, its FP8
        bytes were unpacked and repacked (~200 instructions per block)."""
        if not PRODUCER_WARP:  # block j + STAGES - 1 into the slot that block j - 1 released
            _load_kv(j + STAGES - 1, j + STAGES - 1 < tma_args[5], k_smem, v_smem, ready, STAGES, BLOCK_N, tma_args)
        t0, t1, t_max0, t_max1 = _scores(s_int, I2F_HALVES, not MASKED)
        if ISSUE_NEXT and EARLY_QK:
            s_tok, ks0_next, ks1_next = _issue_qk(q_smem, k_smem, ks_smem, ready, j + 1, s_zero, STAGES,
                                                  PRODUCER_WARP, ks_ptr, BLOCK_N)
        p8, alpha, m_i, l_i = _softmax(t0, t1, t_max0, t_max1, j, q_scale, ks0, ks1, m_i, l_i, offs_m, n_k,
                                       causal_offset, BLOCK_N, MASKED, CAUSAL, P_SHIFT, s_layout, o_layout, p_layout)
        pv_tok = warpgroup_mma(p8, v_smem.index(j % STAGES).permute((1, 0)), o_zero, use_acc=False, is_async=True)
        if ISSUE_NEXT and not EARLY_QK:
            s_tok, ks0_next, ks1_next = _issue_qk(q_smem, k_smem, ks_smem, ready, j + 1, s_zero, STAGES,
                                                  PRODUCER_WARP, ks_ptr, BLOCK_N)
        if ISSUE_NEXT:
            s_int, pv = warpgroup_mma_wait(0, deps=(s_tok, pv_tok))
            ks0, ks1 = ks0_next, ks1_next
        else:
            pv = warpgroup_mma_wait(0, deps=(pv_tok, ))
        acc = acc * alpha[:, None] + pv  # one FMA per element (two-level accumulation)
        if PRODUCER_WARP:
            mbarrier.arrive(empty.index(j % STAGES), count=1)
        return s_int, ks0, ks1, acc, m_i, l_i

    @gluon.jit
    def _load_kv(j, pred, k_smem, v_smem, ready, STAGES: gl.constexpr, BLOCK_N: gl.constexpr, tma_args):
        """TMA block j's K and V^T into its slot, announcing their bytes on its ``ready``
        barrier (nothing where ``pred`` is false). The producer warp calls it for every block;
        without it the consumer calls it for block j + STAGES - 1 at the start of block j,
        into the slot that block j - 1 released (its wgmmas were waited for), with
        ``pred = j + STAGES - 1 < n_blocks``."""
        k_desc, v_desc, k_row, v_row, kv_row0, n_blocks = tma_args
        slot = j % STAGES
        bar = ready.index(slot)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(k_desc, [(k_row + j * BLOCK_N).to(gl.int32), 0], bar, k_smem.index(slot),
                                        pred=pred)
        tma.async_copy_global_to_shared(v_desc, [v_row.to(gl.int32), (kv_row0 + j * BLOCK_N).to(gl.int32)],
                                        bar, v_smem.index(slot), pred=pred)

    @gluon.jit
    def _producer(k_desc, v_desc, K_scale, V_stats, k_smem, v_smem, ks_smem, vs_smem, ready, empty, n_blocks, k_row,
                  v_row, kv_row0, STATS_STRIDE,
                  DPAD: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, SMOOTH_V: gl.constexpr):
        """One warp: TMA every K/V block of the CTA into the ring, into a slot as soon as
        the consumer has released it. The block's two K scales go into the slot too, after
        the TMA is issued (so that their load latency overlaps it), with a second arrival
        on ``ready``: the consumer then reads no global memory per block. First, the V
        channel scale (and mean) that the epilogue needs go to ``vs_smem``, published by
        block 0's arrival: read there, the epilogue waits for no global load."""
        channels_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[DPAD // 32], threads_per_warp=[32],
                                                         warps_per_cta=[1], order=[0])
        channels = gl.arange(0, DPAD, layout=channels_layout)
        # under programmatic dependent launch, wait for the K/V quantization to finish and
        # its writes to be visible (at once otherwise)
        gdc_wait()
        vs_smem.index(0).store(gl.load(V_stats + channels))
        if SMOOTH_V:
            vs_smem.index(1).store(gl.load(V_stats + STATS_STRIDE + channels))
        halves_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[2], threads_per_warp=[32], warps_per_cta=[1],
                                                       order=[0])
        halves = gl.arange(0, 2, layout=halves_layout) * (BLOCK_N // 2)
        tma_args = (k_desc, v_desc, k_row, v_row, kv_row0, n_blocks)
        for j in range(n_blocks):
            slot = j % STAGES
            # a fresh mbarrier counts as having completed the phase before phase 0
            mbarrier.wait(empty.index(slot), ((j // STAGES) & 1) ^ 1)
            _load_kv(j, True, k_smem, v_smem, ready, STAGES, BLOCK_N, tma_args)
            ks_smem.index(slot).store(gl.load(K_scale + k_row + j * BLOCK_N + halves))
            gl.thread_barrier()  # whichever lane stored (the K scales, at j = 0 the V statistics) before the arrival
            mbarrier.arrive(ready.index(slot), count=1)

    @gluon.jit
    def _consumer(
        Q, stride_qn, stride_qd, O, stride_on, stride_od, LSE, Stats,
        q_smem, k_smem, v_smem, ks_smem, vs_smem, ready, empty,
        score_scale, sm_scale, bh, bh_kv, start_m, n_blocks, lo_masked,
        N_Q, N_K, causal_offset,
        HEAD_DIM: gl.constexpr, DPAD: gl.constexpr, BLOCK_N: gl.constexpr, Q_GROUP: gl.constexpr,
        STAGES: gl.constexpr, CAUSAL: gl.constexpr, SMOOTH_K: gl.constexpr, SMOOTH_V: gl.constexpr,
        RETURN_LSE: gl.constexpr, P_SHIFT: gl.constexpr, PRODUCER_WARP: gl.constexpr, ks_ptr, v_stats_ptr,
        STATS_STRIDE, tma_args,
    ):
        """The consumer warpgroup: the 64 query rows from ``start_m``, over all
        ``n_blocks`` K/V blocks of the CTA (``[0, lo_masked)`` need no mask). Q and O point
        at this (batch, head). Without the producer warp it also issues the K/V loads
        (``tma_args``: descriptors, rows, block count; :func:`_load_kv`), reads the K scales
        from global memory (``ks_ptr``, this sequence's first token) one block ahead, and the
        V statistics (``v_stats_ptr``) in the epilogue."""
        ROWS: gl.constexpr = 64
        # Per head dim, measured (docs/kernel_notes.md, sessions 13-14, H100, kernel alone):
        # the scores to fp32 by I2FP (+7-11% at D = 64; at D = 128 1-2% slower than the bit
        # trick, and half by I2FP, half by the bit trick +1.9% in the median), the next
        # block's Q K^T issued before the softmax (+1-5% at D = 128; at D = 64 +0.4-1.2%
        # with the fp32 row max, -3.5% with the integer one).
        I2F_HALVES: gl.constexpr = 2 if DPAD <= 64 else 1
        EARLY_QK: gl.constexpr = DPAD > 64
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 32])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, DPAD, 32])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        io_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[256 // DPAD, DPAD // 8],
                                                   warps_per_cta=[4, 1], order=[1, 0])
        s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
        io_rows: gl.constexpr = gl.SliceLayout(1, io_layout)
        io_cols: gl.constexpr = gl.SliceLayout(0, io_layout)

        if not PRODUCER_WARP:  # the first STAGES - 1 blocks in flight while Q is read
            gdc_wait()  # (under programmatic dependent launch: the K/V quantization's results)
            for i in gl.static_range(STAGES - 1):
                _load_kv(i, i < n_blocks, k_smem, v_smem, ready, STAGES, BLOCK_N, tma_args)
        # -- prologue: Q (any strides) -> INT8 with one scale per Q_GROUP rows --
        offs_m_io = start_m + gl.arange(0, ROWS, layout=io_rows)
        offs_d_io = gl.arange(0, DPAD, layout=io_cols)
        io_mask = (offs_m_io < N_Q)[:, None] & (offs_d_io < HEAD_DIM)[None, :]
        q = gl.load(Q + offs_m_io[:, None] * stride_qn + offs_d_io[None, :] * stride_qd, mask=io_mask,
                    other=0.0).to(gl.float32)
        q_amax = gl.max(gl.abs(q), axis=1)
        if Q_GROUP > 1:
            grouped = gl.reshape(q_amax, [ROWS // Q_GROUP, Q_GROUP])
            group_max = gl.max(grouped, axis=1)
            grouped = gl.expand_dims(group_max, 1) + gl.zeros_like(grouped)
            q_amax = gl.convert_layout(gl.reshape(grouped, [ROWS]), io_rows)
        has_scale = q_amax > 0
        one = gl.full([ROWS], 1.0, gl.float32, io_rows)
        q_inv = gl.where(has_scale, gl.div_rn(one, gl.where(has_scale, q_amax, 1.0)) * 127.0, 0.0)
        q_i8 = gl.floor(q * q_inv[:, None] + 0.5).to(gl.int8)
        q_scale = gl.convert_layout(gl.div_rn(q_amax, one * 127.0) * score_scale, s_rows)
        q_smem.store(q_i8)
        fence_async_shared()
        gl.thread_barrier()  # all of this warpgroup's Q rows are in shared memory
        gdc_wait()  # the K/V quantization's results, before reading K statistics or writing
        if RETURN_LSE and SMOOTH_K:  # the shift that K smoothing removed from every score
            k_mean = gl.load(Stats + bh_kv * DPAD + offs_d_io)
            lse_shift = gl.convert_layout(gl.sum(q * k_mean[None, :], axis=1) * sm_scale, s_rows)

        # -- main loop: block 0's Q K^T first; iteration j is block j's softmax, its P~ V and
        # block j + 1's Q K^T (last: P~ V only); unmasked blocks, masked blocks and the last
        # block are separate code paths --
        m_i = gl.full([ROWS], float("-inf"), gl.float32, s_rows)
        l_i = gl.zeros([ROWS], gl.float32, s_rows)
        acc = gl.zeros([ROWS, DPAD], gl.float32, o_layout)
        s_zero = gl.zeros([ROWS, BLOCK_N], gl.int32, s_layout)
        o_zero = gl.zeros([ROWS, DPAD], gl.float32, o_layout)
        offs_m = start_m + gl.arange(0, ROWS, layout=s_rows)
        if n_blocks > 0:
            s_tok, ks0, ks1 = _issue_qk(q_smem, k_smem, ks_smem, ready, 0, s_zero, STAGES, PRODUCER_WARP, ks_ptr,
                                        BLOCK_N)
            s_int = warpgroup_mma_wait(0, deps=(s_tok, ))
            last = n_blocks - 1
            for j in range(0, gl.minimum(lo_masked, last)):
                s_int, ks0, ks1, acc, m_i, l_i = _block(
                    j, s_int, ks0, ks1, acc, m_i, l_i, q_scale, offs_m, N_K, causal_offset,
                    q_smem, k_smem, v_smem, ks_smem, ready, empty, s_zero, o_zero,
                    BLOCK_N, STAGES, False, CAUSAL, True, P_SHIFT, I2F_HALVES, EARLY_QK, s_layout, o_layout, p_layout,
                    PRODUCER_WARP, ks_ptr, tma_args)
            for j in range(lo_masked, last):
                s_int, ks0, ks1, acc, m_i, l_i = _block(
                    j, s_int, ks0, ks1, acc, m_i, l_i, q_scale, offs_m, N_K, causal_offset,
                    q_smem, k_smem, v_smem, ks_smem, ready, empty, s_zero, o_zero,
                    BLOCK_N, STAGES, True, CAUSAL, True, P_SHIFT, I2F_HALVES, EARLY_QK, s_layout, o_layout, p_layout,
                    PRODUCER_WARP, ks_ptr, tma_args)
            if last >= lo_masked:
                s_int, ks0, ks1, acc, m_i, l_i = _block(
                    last, s_int, ks0, ks1, acc, m_i, l_i, q_scale, offs_m, N_K, causal_offset,
                    q_smem, k_smem, v_smem, ks_smem, ready, empty, s_zero, o_zero,
                    BLOCK_N, STAGES, True, CAUSAL, False, P_SHIFT, I2F_HALVES, EARLY_QK, s_layout, o_layout, p_layout,
                    PRODUCER_WARP, ks_ptr, tma_args)
            else:
                s_int, ks0, ks1, acc, m_i, l_i = _block(
                    last, s_int, ks0, ks1, acc, m_i, l_i, q_scale, offs_m, N_K, causal_offset,
                    q_smem, k_smem, v_smem, ks_smem, ready, empty, s_zero, o_zero,
                    BLOCK_N, STAGES, False, CAUSAL, False, P_SHIFT, I2F_HALVES, EARLY_QK, s_layout, o_layout, p_layout,
                    PRODUCER_WARP, ks_ptr, tma_args)

        # -- epilogue: acc / l, undo the V scales; rows with no key give 0 (and with no
        # block, vs_smem was never written: its values are not used) --
        o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
        o_cols: gl.constexpr = gl.SliceLayout(0, o_layout)
        empty_row = l_i == 0.0
        l_safe = gl.where(empty_row, 1.0, l_i)
        out = acc * gl.convert_layout(1.0 / l_safe, o_rows)[:, None]  # both carry 448: it cancels
        if PRODUCER_WARP:
            out = out * vs_smem.index(0).load(o_cols)[None, :]  # amax / 448
            if SMOOTH_V:
                out = out + vs_smem.index(1).load(o_cols)[None, :]
        else:
            o_channels = gl.arange(0, DPAD, layout=o_cols)
            out = out * gl.load(v_stats_ptr + o_channels)[None, :]
            if SMOOTH_V:
                out = out + gl.load(v_stats_ptr + STATS_STRIDE + o_channels)[None, :]
        out = gl.where(gl.convert_layout(empty_row, o_rows)[:, None], 0.0, out)
        out = gl.convert_layout(out.to(O.dtype.element_ty), io_layout)
        gl.store(O + offs_m_io[:, None] * stride_on + offs_d_io[None, :] * stride_od, out, mask=io_mask)
        if RETURN_LSE:
            lse = (m_i + (gl.log2(l_safe) - P_SHIFT)) * 0.6931471805599453
            if SMOOTH_K:
                lse = lse + lse_shift
            lse = gl.where(empty_row, float("-inf"), lse)
            gl.store(LSE + bh * N_Q + offs_m, lse, mask=offs_m < N_Q)

    @gluon.jit
    def _sage_fwd_sm90(
        Q, stride_qb, stride_qh, stride_qn, stride_qd,
        k_desc, v_desc, K_scale, Stats,
        O, stride_ob, stride_oh, stride_on, stride_od,
        LSE,
        score_scale, sm_scale,
        H_Q, KV_GROUP, N_Q, N_K, N_K_PAD, ROWS, STATS_STRIDE, causal_offset, HEAD_GROUP,
        HEAD_DIM: gl.constexpr, DPAD: gl.constexpr, BLOCK_N: gl.constexpr, Q_GROUP: gl.constexpr,
        STAGES: gl.constexpr, CAUSAL: gl.constexpr, SMOOTH_K: gl.constexpr, SMOOTH_V: gl.constexpr,
        RETURN_LSE: gl.constexpr, P_SHIFT: gl.constexpr, PRODUCER_WARP: gl.constexpr, num_warps: gl.constexpr,
    ):
        gl.static_assert(num_warps == 4, "the default partition is the consumer warpgroup")
        BLOCK_M: gl.constexpr = 64
        if CAUSAL:
            # CTAs start in launch order (program_id(0) fastest). Heads go in groups of
            # HEAD_GROUP, and within a group the longest rows (most K/V blocks) of every
            # head come first: the grid ends on short tiles whichever head is last, and
            # the group's K/V stay in L2 while its CTAs run.
            n_m = gl.num_programs(0)
            position = gl.program_id(1) * n_m + gl.program_id(0)
            first_bh = position // (HEAD_GROUP * n_m) * HEAD_GROUP
            heads_in_group = gl.minimum(HEAD_GROUP, gl.num_programs(1) - first_bh)
            rank = position - first_bh * n_m
            pid_m = n_m - 1 - rank // heads_in_group
            bh = (first_bh + rank % heads_in_group).to(gl.int64)
        else:
            pid_m = gl.program_id(0)
            bh = gl.program_id(1).to(gl.int64)
        b = bh // H_Q
        h = bh % H_Q
        bh_kv = bh // KV_GROUP  # GQA/MQA: q head h reads kv head h // (Hq // Hkv)
        h_kv = h // KV_GROUP
        start_m = pid_m * BLOCK_M

        # K/V blocks [0, lo_masked) need no mask for any row of the CTA
        kv_row0 = b * N_K_PAD
        k_row = h_kv * ROWS + kv_row0  # this sequence's first token in the 2-D descriptors
        v_row = h_kv * DPAD
        n_full = N_K // BLOCK_N
        if CAUSAL:  # key j is kept for row i iff j <= i + causal_offset
            hi = gl.minimum(N_K, gl.maximum(start_m + BLOCK_M + causal_offset, 0))
            lo_masked = gl.minimum(n_full, gl.maximum(start_m + causal_offset + 1, 0) // BLOCK_N)
        else:
            hi = N_K
            lo_masked = n_full
        n_blocks = gl.cdiv(hi, BLOCK_N)

        k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, DPAD], k_desc.layout)
        v_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, DPAD, BLOCK_N], v_desc.layout)
        q_smem = gl.allocate_shared_memory(gl.int8, [BLOCK_M, DPAD], k_desc.layout)
        ks_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 2],  # the layout of one slot
                                            gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0]))
        # the V channel scale (and with SMOOTH_V the V mean) of this kv head, a row each
        vs_smem = gl.allocate_shared_memory(gl.float32, [2 if SMOOTH_V else 1, DPAD],  # the layout of one row
                                            gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0]))
        # (without the producer warp, ks_smem, vs_smem and the "empty" barriers go unused: a
        # few hundred bytes, and one code path for the consumer's arguments)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            # the TMA bytes' arrival (and the producer's, once the K scales are in the slot)
            mbarrier.init(ready.index(i), count=2 if PRODUCER_WARP else 1)
            mbarrier.init(empty.index(i), count=1)

        q_base = Q + b * stride_qb + h * stride_qh
        o_base = O + b * stride_ob + h * stride_oh
        tma_args = (k_desc, v_desc, k_row, v_row, kv_row0, n_blocks)
        if not PRODUCER_WARP:
            gl.static_assert(STAGES >= 2, "a slot is refilled while the next block's is read")
            fence_async_shared()  # the barriers' initialisation, before the TMA engine uses them
            gl.thread_barrier()  # and before any warp waits on them
            _consumer(q_base, stride_qn, stride_qd, o_base, stride_on, stride_od, LSE, Stats,
                      q_smem, k_smem, v_smem, ks_smem, vs_smem, ready, empty,
                      score_scale, sm_scale, bh, bh_kv, start_m, n_blocks, lo_masked,
                      N_Q, N_K, causal_offset,
                      HEAD_DIM, DPAD, BLOCK_N, Q_GROUP, STAGES, CAUSAL, SMOOTH_K, SMOOTH_V, RETURN_LSE, P_SHIFT,
                      False, K_scale + k_row, Stats + STATS_STRIDE + bh_kv * DPAD, STATS_STRIDE, tma_args)
        else:
            gl.warp_specialize([
                (_consumer, (q_base, stride_qn, stride_qd, o_base, stride_on, stride_od, LSE, Stats,
                             q_smem, k_smem, v_smem, ks_smem, vs_smem, ready, empty,
                             score_scale, sm_scale, bh, bh_kv, start_m, n_blocks, lo_masked,
                             N_Q, N_K, causal_offset,
                             HEAD_DIM, DPAD, BLOCK_N, Q_GROUP, STAGES, CAUSAL, SMOOTH_K, SMOOTH_V, RETURN_LSE,
                             P_SHIFT, True, K_scale, Stats, STATS_STRIDE, tma_args)),
                (_producer, (k_desc, v_desc, K_scale, Stats + STATS_STRIDE + bh_kv * DPAD, k_smem, v_smem, ks_smem,
                             vs_smem, ready, empty, n_blocks, k_row, v_row, kv_row0, STATS_STRIDE,
                             DPAD, BLOCK_N, STAGES, SMOOTH_V)),
            ], [1], [24])

    _launch_sage_fwd_sm90 = CachedLauncher(_sage_fwd_sm90)


@functools.lru_cache(maxsize=None)
def _kv_layouts(block_n: int, dpad: int):
    return (gl.NVMMASharedLayout.get_default_for([block_n, dpad], gl.int8),
            gl.NVMMASharedLayout.get_default_for([dpad, block_n], gl.float8e4nv))


def kv_descriptors(kv, block_n: int):
    """Host TMA descriptors of the quantized K ([Hkv * rows, dpad] in [block_n, dpad]
    boxes) and V^T ([Hkv * dpad, rows] in [dpad, block_n] boxes)."""
    hkv, rows, dpad = kv.k_q.shape
    k_layout, v_layout = _kv_layouts(block_n, dpad)
    k_desc = TensorDescriptor(kv.k_q, [hkv * rows, dpad], [dpad, 1], [block_n, dpad], k_layout)
    v_desc = TensorDescriptor(kv.v_q, [hkv * dpad, rows], [rows, 1], [dpad, block_n], v_layout)
    return k_desc, v_desc


def launch(q, q_strides, kv, out, out_strides, lse, config, tiles: HopperConfig, *, score_scale, sm_scale,
           batch, hq, hkv, nq, nk, head_dim, causal_offset, p_shift):
    """Launch the Gluon kernel on a dense batch (the caller checked that it applies; ``kv``
    comes from ``quantize_kv(..., wgmma_v_order=True)``)."""
    if not kv.wgmma_v_order:
        raise ValueError("attention_sm90.launch: kv must be quantized with wgmma_v_order=True")
    dpad = kv.k_q.shape[-1]
    rows = kv.k_q.shape[1]
    k_desc, v_desc = kv_descriptors(kv, tiles.BLOCK_N)
    causal = causal_offset is not None
    grid = (cdiv(nq, tiles.BLOCK_M), batch * hq)
    _launch_sage_fwd_sm90[grid](
        q, *q_strides, k_desc, v_desc, kv.k_scale, kv.stats,
        out, *out_strides,
        lse if lse is not None else out,
        score_scale, sm_scale,
        hq, hq // hkv, nq, nk, rows // batch, rows, batch * hkv * dpad, int(causal_offset) if causal else 0,
        causal_head_group(batch * hq, rows // batch, dpad) if causal else 1,
        HEAD_DIM=head_dim, DPAD=dpad, BLOCK_N=tiles.BLOCK_N, Q_GROUP=config.q_group, STAGES=tiles.STAGES,
        CAUSAL=causal, SMOOTH_K=config.smooth_k, SMOOTH_V=config.smooth_v, RETURN_LSE=lse is not None,
        P_SHIFT=p_shift, PRODUCER_WARP=tiles.PRODUCER_WARP, num_warps=4, maxnreg=tiles.maxnreg, launch_pdl=PDL,
    )
