"""SageAttention2 forward for Hopper (sm_90) in Triton's Gluon dialect.

The algorithm of :func:`qattn.kernels.attention._attn_fwd_kernel` for the cases it takes
(INT8 QK^T, FP8 P~V with two-level fp32 accumulation, no user mask, dense batches; the
same bits where BLOCK_N matches, i.e. D=128), written against the hardware instead of
through ``tl.dot``:

* K (INT8, ``[BLOCK_N, DPAD]``) and V^T (FP8, ``[DPAD, BLOCK_N]``) tiles arrive by TMA
  into a ring of ``STAGES`` shared-memory slots, each with an mbarrier that the TMA
  completes. A slot is refilled as soon as the block it held is done, so loads run
  ``STAGES`` blocks ahead.
* Both products are asynchronous ``wgmma`` ops. Block j+1's ``Q K^T`` is issued before
  block j's softmax so that it can run under it (FlashAttention-3's intra-warpgroup
  overlap); at BLOCK_N = 128 and 255 registers ptxas moves the issue below the softmax
  (docs/kernel_notes.md, session 4), so there the overlap comes from the second CTA on
  the SM.
* Q is quantized to INT8 in the prologue and kept in shared memory, as wgmma's A operand.

Grid, program and buffer layouts are those of the portable kernel (see attention.py and
quantize.py). The Gluon API moves between Triton releases: :data:`TESTED_TRITON` lists
the versions this file ran on; on any other, :data:`AVAILABLE` is False and the portable
kernel runs. ``bench/compile_sm90.py`` compiles it for sm_90a on a machine without a GPU.
"""

from __future__ import annotations

import triton

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

    AVAILABLE = triton.__version__.startswith(TESTED_TRITON)
except ImportError:  # pragma: no cover - a Triton without Gluon
    AVAILABLE = False

__all__ = ["AVAILABLE", "TESTED_TRITON", "HopperConfig", "hopper_config", "kv_descriptors", "launch"]


class HopperConfig:
    """Tiles of the Gluon kernel: BLOCK_M query rows per CTA (64 per warpgroup),
    BLOCK_N keys per block (the online-softmax block, as the reference's block_kv),
    STAGES K/V slots in flight."""

    __slots__ = ("BLOCK_M", "BLOCK_N", "STAGES", "num_warps")

    def __init__(self, BLOCK_M: int, BLOCK_N: int, STAGES: int):
        self.BLOCK_M, self.BLOCK_N, self.STAGES = BLOCK_M, BLOCK_N, STAGES
        self.num_warps = 4 * (BLOCK_M // 64)

    def __repr__(self) -> str:
        return f"HopperConfig({self.BLOCK_M}, {self.BLOCK_N}, {self.STAGES})"


# (padded head dim, causal) -> tiles, measured on an H100 (bench/kernel_sweep.py sm90,
# docs/kernel_notes.md). D=128: 64 x 128 with 3 stages (two CTAs per SM) beats 2 or 4
# stages, 128-row tiles and BLOCK_N = 64. D=64: BLOCK_N = 64 with 4 stages is 6-8% faster
# than the portable kernel, 64 x 128 is not. BLOCK_N is the online-softmax block, so D=64
# calls compute the reference with block_kv = 64 (see attention.softmax_block).
_CONFIGS = {
    (64, False): HopperConfig(64, 64, 4),
    (64, True): HopperConfig(64, 64, 4),
    (128, False): HopperConfig(64, 128, 3),
    (128, True): HopperConfig(64, 128, 3),
}
# Smallest B * Hq * Nq * Nk for which dispatch picks this kernel: below, the extra host
# time of its launch (TMA descriptors) is not hidden by the GPU work.
MIN_WORK = 2**29
# Benchmarks may set this to a HopperConfig to override the table (not thread-safe).
_CONFIG_OVERRIDE: HopperConfig | None = None


def hopper_config(dpad: int, causal: bool) -> HopperConfig | None:
    """The tiles for this case, or None when the Gluon kernel does not take it."""
    if _CONFIG_OVERRIDE is not None:
        return _CONFIG_OVERRIDE
    return _CONFIGS.get((dpad, bool(causal)))


if AVAILABLE:

    @gluon.jit
    def _i32_to_f32(x):
        # Exact for |x| < 2^22 with an integer add instead of an I2F (see attention.py).
        return (x + 0x4B400000).to(gl.float32, bitcast=True) - 12582912.0

    @gluon.jit
    def _load_kv(k_desc, v_desc, k_smem, v_smem, ready, slot, block, k_row, v_row, kv_row0,
                 BLOCK_N: gl.constexpr):
        """TMA block ``block`` of K and V^T into ring slot ``slot``; ``ready[slot]``
        completes when both tiles have landed."""
        bar = ready.index(slot)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [(k_row + block * BLOCK_N).to(gl.int32), 0], bar,
                                        k_smem.index(slot))
        tma.async_copy_global_to_shared(v_desc, [v_row.to(gl.int32), (kv_row0 + block * BLOCK_N).to(gl.int32)],
                                        bar, v_smem.index(slot))

    @gluon.jit
    def _issue_qk(q_smem, k_smem, ready, block, s_zero, STAGES: gl.constexpr):
        """Start ``S = Q K^T`` of ``block`` (async) once its K tile is in."""
        slot = block % STAGES
        mbarrier.wait(ready.index(slot), (block // STAGES) & 1)
        return warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)

    @gluon.jit
    def _attn_block(
        j, acc, l_i, m_i, s_int, q_scale, offs_m, n_blocks, n_k, causal_offset,
        q_smem, k_smem, v_smem, ready, k_desc, v_desc, k_row, v_row, kv_row0, ks_base,
        s_zero, o_zero,
        BLOCK_N: gl.constexpr, K_GROUP: gl.constexpr, STAGES: gl.constexpr, MASKED: gl.constexpr,
        CAUSAL: gl.constexpr, ISSUE_NEXT: gl.constexpr, P_SHIFT: gl.constexpr,
        s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
    ):
        """One K/V block of the online softmax, from its ``s_int = Q K^T``. With
        ISSUE_NEXT, block j + 1's ``Q K^T`` is issued first (to run under this block's
        softmax) and returned, waited for here with this block's P~ V: a pending wgmma
        result carried across iterations makes ptxas serialize."""
        slot = j % STAGES
        if ISSUE_NEXT:
            s_tok = _issue_qk(q_smem, k_smem, ready, j + 1, s_zero, STAGES)

        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        offs_n = j * BLOCK_N + cols
        # K scales: one per K_GROUP tokens, so a block has one or two (scalar loads; a
        # per-column vector would take 32 registers per thread)
        if K_GROUP >= BLOCK_N:  # one K scale: folded into the row scale (no multiply per score)
            row_scale = q_scale * gl.load(ks_base + j * BLOCK_N)
            t = _i32_to_f32(s_int)
        else:
            k_scale = gl.where(cols < K_GROUP, gl.load(ks_base + j * BLOCK_N), gl.load(ks_base + j * BLOCK_N + K_GROUP))
            row_scale = q_scale
            t = _i32_to_f32(s_int) * k_scale[None, :]
        if MASKED:
            s = t * row_scale[:, None]
            keep = (offs_n < n_k)[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            s = gl.where(keep, s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, axis=1))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
            p = gl.exp2(s - (m_use - P_SHIFT)[:, None])
        else:
            # row_scale >= 0, so max_j S = row_scale * max_j t: one FMA per score below
            m_new = gl.maximum(m_i, gl.max(t, axis=1) * row_scale)
            m_use = m_new
            p = gl.exp2(t * row_scale[:, None] - (m_use - P_SHIFT)[:, None])
        alpha = gl.exp2(m_i - m_use)
        l_i = l_i * alpha + gl.sum(p, axis=1)

        # P~ V in a fresh fp32 buffer (two-level accumulation)
        p8 = gl.convert_layout(p.to(gl.float8e4nv), p_layout)
        pv_tok = warpgroup_mma(p8, v_smem.index(slot).permute((1, 0)), o_zero, use_acc=False, is_async=True)
        alpha = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
        if ISSUE_NEXT:
            s_next, pv = warpgroup_mma_wait(0, deps=(s_tok, pv_tok))
        else:
            s_next = s_int
            pv = warpgroup_mma_wait(0, deps=(pv_tok, ))
        acc = acc * alpha[:, None] + pv  # one FMA per element

        # every warp is past its reads of this slot: refill it, STAGES blocks ahead
        if j + STAGES < n_blocks:
            gl.thread_barrier()
            _load_kv(k_desc, v_desc, k_smem, v_smem, ready, slot, j + STAGES, k_row, v_row, kv_row0, BLOCK_N)
        return acc, l_i, m_new, s_next

    @gluon.jit
    def _sage_fwd_sm90(
        Q, stride_qb, stride_qh, stride_qn, stride_qd,
        k_desc, v_desc, K_scale, Stats,
        O, stride_ob, stride_oh, stride_on, stride_od,
        LSE,
        score_scale, sm_scale,
        H_Q, KV_GROUP, N_Q, N_K, N_K_PAD, ROWS, STATS_STRIDE, causal_offset,
        HEAD_DIM: gl.constexpr, DPAD: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        Q_GROUP: gl.constexpr, K_GROUP: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
        SMOOTH_K: gl.constexpr, SMOOTH_V: gl.constexpr, RETURN_LSE: gl.constexpr,
        P_SHIFT: gl.constexpr, num_warps: gl.constexpr,
    ):
        # -- layouts: wgmma accumulators (one warpgroup per 64 rows), P~ as wgmma's
        # register A operand, and a coalesced layout for Q/O in global memory --
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 32])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, DPAD, 32])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        io_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[256 // DPAD, DPAD // 8],
                                                   warps_per_cta=[num_warps, 1], order=[1, 0])
        s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
        io_rows: gl.constexpr = gl.SliceLayout(1, io_layout)
        io_cols: gl.constexpr = gl.SliceLayout(0, io_layout)

        pid_m = gl.program_id(0)
        if CAUSAL:  # the longest rows (most K/V blocks) first: a shorter tail
            pid_m = gl.num_programs(0) - 1 - pid_m
        bh = gl.program_id(1).to(gl.int64)
        b = bh // H_Q
        h = bh % H_Q
        bh_kv = bh // KV_GROUP  # GQA/MQA: q head h reads kv head h // (Hq // Hkv)
        h_kv = h // KV_GROUP
        start_m = pid_m * BLOCK_M

        # -- K/V blocks: [0, lo_masked) need no mask, [lo_masked, n_blocks) are masked --
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

        # -- K/V ring; the first STAGES blocks go out before Q is even read --
        k_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, DPAD], k_desc.layout)
        v_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, DPAD, BLOCK_N], v_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
        for i in gl.static_range(STAGES):
            if i < n_blocks:
                _load_kv(k_desc, v_desc, k_smem, v_smem, ready, i, i, k_row, v_row, kv_row0, BLOCK_N)

        # -- prologue: Q (any strides) -> INT8 with one scale per Q_GROUP rows --
        offs_m_io = start_m + gl.arange(0, BLOCK_M, layout=io_rows)
        offs_d_io = gl.arange(0, DPAD, layout=io_cols)
        io_mask = (offs_m_io < N_Q)[:, None] & (offs_d_io < HEAD_DIM)[None, :]
        q_base = Q + b * stride_qb + h * stride_qh
        q = gl.load(q_base + offs_m_io[:, None] * stride_qn + offs_d_io[None, :] * stride_qd, mask=io_mask,
                    other=0.0).to(gl.float32)
        q_amax = gl.max(gl.abs(q), axis=1)
        if Q_GROUP > 1:
            grouped = gl.reshape(q_amax, [BLOCK_M // Q_GROUP, Q_GROUP])
            group_max = gl.max(grouped, axis=1)
            grouped = gl.expand_dims(group_max, 1) + gl.zeros_like(grouped)
            q_amax = gl.convert_layout(gl.reshape(grouped, [BLOCK_M]), io_rows)
        has_scale = q_amax > 0
        one = gl.full([BLOCK_M], 1.0, gl.float32, io_rows)
        q_inv = gl.where(has_scale, gl.div_rn(one, gl.where(has_scale, q_amax, 1.0)) * 127.0, 0.0)
        q_i8 = gl.floor(q * q_inv[:, None] + 0.5).to(gl.int8)
        q_scale = gl.convert_layout(gl.div_rn(q_amax, one * 127.0) * score_scale, s_rows)
        q_smem = gl.allocate_shared_memory(gl.int8, [BLOCK_M, DPAD], k_desc.layout)
        q_smem.store(q_i8)
        fence_async_shared()
        gl.thread_barrier()  # all of Q is in shared memory before any warpgroup reads it
        if RETURN_LSE and SMOOTH_K:  # the shift that K smoothing removed from every score
            k_mean = gl.load(Stats + bh_kv * DPAD + offs_d_io)
            lse_shift = gl.convert_layout(gl.sum(q * k_mean[None, :], axis=1) * sm_scale, s_rows)

        # -- main loop --
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, s_rows)
        l_i = gl.zeros([BLOCK_M], gl.float32, s_rows)
        acc = gl.zeros([BLOCK_M, DPAD], gl.float32, o_layout)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout)
        o_zero = gl.zeros([BLOCK_M, DPAD], gl.float32, o_layout)
        offs_m = start_m + gl.arange(0, BLOCK_M, layout=s_rows)
        ks_base = K_scale + h_kv * ROWS + kv_row0
        if n_blocks > 0:
            # blocks [0, last) issue their successor's Q K^T; the last block issues none
            last = n_blocks - 1
            s_int = warpgroup_mma_wait(0, deps=(_issue_qk(q_smem, k_smem, ready, 0, s_zero, STAGES), ))
            for j in range(0, gl.minimum(lo_masked, last)):
                acc, l_i, m_i, s_int = _attn_block(
                    j, acc, l_i, m_i, s_int, q_scale, offs_m, n_blocks, N_K, causal_offset,
                    q_smem, k_smem, v_smem, ready, k_desc, v_desc, k_row, v_row, kv_row0, ks_base,
                    s_zero, o_zero, BLOCK_N, K_GROUP, STAGES, False, CAUSAL, True, P_SHIFT, s_layout, o_layout, p_layout)
            for j in range(lo_masked, last):
                acc, l_i, m_i, s_int = _attn_block(
                    j, acc, l_i, m_i, s_int, q_scale, offs_m, n_blocks, N_K, causal_offset,
                    q_smem, k_smem, v_smem, ready, k_desc, v_desc, k_row, v_row, kv_row0, ks_base,
                    s_zero, o_zero, BLOCK_N, K_GROUP, STAGES, True, CAUSAL, True, P_SHIFT, s_layout, o_layout, p_layout)
            if last >= lo_masked:
                acc, l_i, m_i, s_int = _attn_block(
                    last, acc, l_i, m_i, s_int, q_scale, offs_m, n_blocks, N_K, causal_offset,
                    q_smem, k_smem, v_smem, ready, k_desc, v_desc, k_row, v_row, kv_row0, ks_base,
                    s_zero, o_zero, BLOCK_N, K_GROUP, STAGES, True, CAUSAL, False, P_SHIFT, s_layout, o_layout, p_layout)
            else:
                acc, l_i, m_i, s_int = _attn_block(
                    last, acc, l_i, m_i, s_int, q_scale, offs_m, n_blocks, N_K, causal_offset,
                    q_smem, k_smem, v_smem, ready, k_desc, v_desc, k_row, v_row, kv_row0, ks_base,
                    s_zero, o_zero, BLOCK_N, K_GROUP, STAGES, False, CAUSAL, False, P_SHIFT, s_layout, o_layout, p_layout)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))

        # -- epilogue: acc / l, undo the V scales; rows with no key give 0 --
        o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
        offs_d = gl.arange(0, DPAD, layout=gl.SliceLayout(0, o_layout))
        empty = l_i == 0.0
        l_safe = gl.where(empty, 1.0, l_i)
        out = acc / gl.convert_layout(l_safe, o_rows)[:, None]  # both carry 448: it cancels
        v_scale = gl.load(Stats + STATS_STRIDE + bh_kv * DPAD + offs_d)  # amax / 448
        out = out * v_scale[None, :]
        if SMOOTH_V:
            v_mean = gl.load(Stats + 2 * STATS_STRIDE + bh_kv * DPAD + offs_d)
            out = out + v_mean[None, :]
        out = gl.where(gl.convert_layout(empty, o_rows)[:, None], 0.0, out)
        out = gl.convert_layout(out.to(O.dtype.element_ty), io_layout)
        o_base = O + b * stride_ob + h * stride_oh
        gl.store(o_base + offs_m_io[:, None] * stride_on + offs_d_io[None, :] * stride_od, out, mask=io_mask)
        if RETURN_LSE:
            lse = (m_i + (gl.log2(l_safe) - P_SHIFT)) * 0.6931471805599453
            if SMOOTH_K:
                lse = lse + lse_shift
            lse = gl.where(empty, float("-inf"), lse)
            gl.store(LSE + bh * N_Q + offs_m, lse, mask=offs_m < N_Q)


def kv_descriptors(kv, block_n: int):
    """Host TMA descriptors of the quantized K ([Hkv * rows, dpad] in [block_n, dpad]
    boxes) and V^T ([Hkv * dpad, rows] in [dpad, block_n] boxes)."""
    hkv, rows, dpad = kv.k_q.shape
    k_layout = gl.NVMMASharedLayout.get_default_for([block_n, dpad], gl.int8)
    v_layout = gl.NVMMASharedLayout.get_default_for([dpad, block_n], gl.float8e4nv)
    k_desc = TensorDescriptor(kv.k_q, [hkv * rows, dpad], [dpad, 1], [block_n, dpad], k_layout)
    v_desc = TensorDescriptor(kv.v_q, [hkv * dpad, rows], [rows, 1], [dpad, block_n], v_layout)
    return k_desc, v_desc


def launch(q, q_strides, kv, out, out_strides, lse, config, tiles: HopperConfig, *, score_scale, sm_scale,
           batch, hq, hkv, nq, nk, head_dim, causal_offset, p_shift):
    """Launch the Gluon kernel on a dense batch (the caller checked that it applies)."""
    dpad = kv.k_q.shape[-1]
    rows = kv.k_q.shape[1]
    k_desc, v_desc = kv_descriptors(kv, tiles.BLOCK_N)
    causal = causal_offset is not None
    grid = (triton.cdiv(nq, tiles.BLOCK_M), batch * hq)
    _sage_fwd_sm90[grid](
        q, *q_strides, k_desc, v_desc, kv.k_scale, kv.stats,
        out, *out_strides,
        lse if lse is not None else out,
        score_scale, sm_scale,
        hq, hq // hkv, nq, nk, rows // batch, rows, batch * hkv * dpad, int(causal_offset) if causal else 0,
        HEAD_DIM=head_dim, DPAD=dpad, BLOCK_M=tiles.BLOCK_M, BLOCK_N=tiles.BLOCK_N, Q_GROUP=config.q_group, K_GROUP=config.k_group,
        STAGES=tiles.STAGES, CAUSAL=causal, SMOOTH_K=config.smooth_k, SMOOTH_V=config.smooth_v,
        RETURN_LSE=lse is not None, P_SHIFT=p_shift, num_warps=tiles.num_warps,
    )
