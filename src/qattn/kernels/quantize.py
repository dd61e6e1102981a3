"""K/V preparation for the quantized attention kernel: one Triton launch per call.

The grid is ``(B * Hkv, 2)``. Program ``(bh, 0)`` owns the K of one (batch, kv-head),
program ``(bh, 1)`` its V. Each walks its tokens twice:

* pass 1 reduces over all tokens (the channel mean for smoothing, and for FP8 V the
  per-channel max and min, from which ``amax |V - mean|`` follows exactly:
  ``max(vmax - mean, mean - vmin)``);
* pass 2 writes the quantized tensor.

Outputs (all padded: tokens up to ``nk_pad``, a multiple of 128, channels up to ``dpad``,
the next power of two >= 32; padding holds zeros so the attention kernel needs no load
masks):

* ``k_q`` int8 [B, Hkv, nk_pad, dpad]: ``floor((k - mean) * (127 / amax) + 0.5)``, one
  ``amax`` per group of ``config.k_group`` tokens.
* ``k_scale`` fp32 [B, Hkv, nk_pad]: ``amax / 127`` of each token's group (repeated inside a
  group, so the attention kernel loads a plain [BLOCK_N] vector).
* ``stats`` fp32 [3, B, Hkv, dpad]: ``stats[0]`` the K mean (0 if not smoothed),
  ``stats[1]`` the FP8 V scale ``amax_over_tokens / 448``, ``stats[2]`` the V mean.
* ``v_q``: FP8 E4M3 stored transposed [B, Hkv, dpad, nk_pad] (tokens contiguous: the
  K-major operand that Hopper's FP8 wgmma needs), or fp16 [B, Hkv, nk_pad, dpad].

Numerics follow ``qattn.reference`` (see its module docstring).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..presets import PVDtype, QuantConfig

__all__ = ["QuantizedKV", "quantize_kv", "padded_head_dim", "padded_kv_len", "KV_PAD"]

KV_PAD = 128  # K/V token buffers are padded to a multiple of this (the largest BLOCK_N)
_QUANT_OVERRIDE: tuple[int, int] | None = None  # (BLOCK_T, num_warps), for benchmarks


def padded_head_dim(head_dim: int) -> int:
    """Head dim as the kernels store it: the next power of two, at least 32 (the
    smallest K of an INT8 tensor-core dot)."""
    return max(32, triton.next_power_of_2(head_dim))


def padded_kv_len(nk: int) -> int:
    """K/V tokens as the kernels store them: a multiple of ``KV_PAD``."""
    return max(KV_PAD, triton.cdiv(nk, KV_PAD) * KV_PAD)


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


# ----------------------------------------------------------------------------- kernel


@triton.jit
def _quantize_k(
    base, stride_n, stride_d, k_q, k_scale, k_mean, bh, N, N_PAD,
    HEAD_DIM: tl.constexpr, DPAD: tl.constexpr, BLOCK_T: tl.constexpr,
    K_GROUP: tl.constexpr, SMOOTH_K: tl.constexpr,
):
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, DPAD)
    d_ok = offs_d < HEAD_DIM

    # Pass 1: the channel mean over all tokens.
    mean = tl.zeros([DPAD], dtype=tl.float32)
    if SMOOTH_K:
        for t0 in range(0, N, BLOCK_T):
            t = t0 + offs_t
            mask = (t < N)[:, None] & d_ok[None, :]
            x = tl.load(base + t[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask, other=0.0)
            mean += tl.sum(x.to(tl.float32), axis=0)
        mean = mean / N
        tl.store(k_mean + bh * DPAD + offs_d, mean)

    # Pass 2: quantize K - mean, one scale per K_GROUP tokens; padding gets zeros.
    # Backwards: the blocks pass 1 read last are the likeliest to be still in L2.
    out_base = k_q + bh * N_PAD * DPAD
    scale_base = k_scale + bh * N_PAD
    n_blocks = tl.cdiv(N_PAD, BLOCK_T)
    for i in range(0, n_blocks):
        t = (n_blocks - 1 - i) * BLOCK_T + offs_t
        mask = (t < N)[:, None] & d_ok[None, :]
        in_buf = t < N_PAD
        x = tl.load(base + t[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask, other=0.0)
        x = tl.where(mask, x.to(tl.float32) - mean[None, :], 0.0)
        amax = _group_amax(tl.max(tl.abs(x), axis=1), K_GROUP, BLOCK_T)
        inv = _quant_multiplier(amax, 127.0)
        xq = _round_half_up(x * inv[:, None])
        tl.store(out_base + t[:, None] * DPAD + offs_d[None, :], xq.to(tl.int8), mask=in_buf[:, None])
        tl.store(scale_base + t, tl.math.div_rn(amax, 127.0), mask=in_buf)


@triton.jit
def _quantize_v(
    base, stride_n, stride_d, v_q, v_scale, v_mean, bh, N, N_PAD,
    HEAD_DIM: tl.constexpr, DPAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SMOOTH_V: tl.constexpr, V_FP8: tl.constexpr, EXACT_FP8: tl.constexpr,
):
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, DPAD)
    d_ok = offs_d < HEAD_DIM

    # Pass 1: channel sum (smoothing) and, for FP8, channel max and min.
    mean = tl.zeros([DPAD], dtype=tl.float32)
    vmax = tl.full([DPAD], float("-inf"), dtype=tl.float32)
    vmin = tl.full([DPAD], float("inf"), dtype=tl.float32)
    if SMOOTH_V or V_FP8:
        for t0 in range(0, N, BLOCK_T):
            t = t0 + offs_t
            mask = (t < N)[:, None] & d_ok[None, :]
            x = tl.load(base + t[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask, other=0.0)
            x = x.to(tl.float32)
            if SMOOTH_V:
                mean += tl.sum(x, axis=0)
            if V_FP8:
                vmax = tl.maximum(vmax, tl.max(tl.where(mask, x, float("-inf")), axis=0))
                vmin = tl.minimum(vmin, tl.min(tl.where(mask, x, float("inf")), axis=0))
    if SMOOTH_V:
        mean = mean / N
        tl.store(v_mean + bh * DPAD + offs_d, mean)

    if V_FP8:
        # max_t |fl(v_t - mean)| == max(fl(vmax - mean), fl(mean - vmin)): rounding is monotone.
        amax = tl.where(d_ok, tl.maximum(vmax - mean, mean - vmin), 0.0)
        inv = _quant_multiplier(amax, 448.0)
        tl.store(v_scale + bh * DPAD + offs_d, tl.math.div_rn(amax, 448.0))
        out_base = v_q + bh * DPAD * N_PAD
    else:
        out_base = v_q + bh * N_PAD * DPAD

    # Pass 2 (backwards, as for K): V - mean, FP8 transposed [DPAD, N_PAD] or fp16 [N_PAD, DPAD].
    n_blocks = tl.cdiv(N_PAD, BLOCK_T)
    for i in range(0, n_blocks):
        t = (n_blocks - 1 - i) * BLOCK_T + offs_t
        mask = (t < N)[:, None] & d_ok[None, :]
        in_buf = (t < N_PAD)[:, None]
        x = tl.load(base + t[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask, other=0.0)
        x = tl.where(mask, x.to(tl.float32) - mean[None, :], 0.0)
        if V_FP8:
            y = x * inv[None, :]
            if EXACT_FP8:
                y = _round_to_e4m3_grid(y)
            tl.store(out_base + offs_d[None, :] * N_PAD + t[:, None], y.to(tl.float8e4nv), mask=in_buf)
        else:
            tl.store(out_base + t[:, None] * DPAD + offs_d[None, :], x.to(tl.float16), mask=in_buf)


@triton.jit
def _quantize_kv_kernel(
    K, stride_kb, stride_kh, stride_kn, stride_kd,
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    K_q, K_scale, V_q, Stats,
    H_KV, N, N_PAD, STATS_STRIDE,
    HEAD_DIM: tl.constexpr, DPAD: tl.constexpr, BLOCK_T: tl.constexpr,
    K_GROUP: tl.constexpr, SMOOTH_K: tl.constexpr, SMOOTH_V: tl.constexpr,
    V_FP8: tl.constexpr, EXACT_FP8: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H_KV
    h = bh % H_KV
    if tl.program_id(1) == 0:
        _quantize_k(
            K + b * stride_kb + h * stride_kh, stride_kn, stride_kd,
            K_q, K_scale, Stats, bh, N, N_PAD,
            HEAD_DIM, DPAD, BLOCK_T, K_GROUP, SMOOTH_K,
        )
    else:
        _quantize_v(
            V + b * stride_vb + h * stride_vh, stride_vn, stride_vd,
            V_q, Stats + STATS_STRIDE, Stats + 2 * STATS_STRIDE, bh, N, N_PAD,
            HEAD_DIM, DPAD, BLOCK_T, SMOOTH_V, V_FP8, EXACT_FP8,
        )


# ----------------------------------------------------------------------------- host


class QuantizedKV(NamedTuple):
    """What :func:`quantize_kv` returns (see the module docstring for layouts)."""

    k_q: torch.Tensor  # int8 [B, Hkv, nk_pad, dpad]
    k_scale: torch.Tensor  # fp32 [B, Hkv, nk_pad]
    v_q: torch.Tensor  # fp8 [B, Hkv, dpad, nk_pad] or fp16 [B, Hkv, nk_pad, dpad]
    stats: torch.Tensor  # fp32 [3, B, Hkv, dpad]: k_mean, v_scale (amax / 448), v_mean

    @property
    def k_mean(self) -> torch.Tensor:
        return self.stats[0]

    @property
    def v_scale(self) -> torch.Tensor:
        return self.stats[1]

    @property
    def v_mean(self) -> torch.Tensor:
        return self.stats[2]


def quantize_kv(k: torch.Tensor, v: torch.Tensor, config: QuantConfig) -> QuantizedKV:
    """Quantize K (and V for FP8, or convert it to fp16) as ``config`` says, in one launch.

    ``k`` and ``v`` are [B, Hkv, Nk, D] with any strides (no copies are made); Nk >= 1.
    Entries of ``stats`` that the config does not use are left unwritten.
    """
    batch, heads, nk, head_dim = k.shape
    dpad = padded_head_dim(head_dim)
    nk_pad = padded_kv_len(nk)
    v_fp8 = config.pv_dtype is PVDtype.FP8
    device = k.device

    k_q = torch.empty((batch, heads, nk_pad, dpad), dtype=torch.int8, device=device)
    k_scale = torch.empty((batch, heads, nk_pad), dtype=torch.float32, device=device)
    if v_fp8:
        v_q = torch.empty((batch, heads, dpad, nk_pad), dtype=torch.float8_e4m3fn, device=device)
    else:
        v_q = torch.empty((batch, heads, nk_pad, dpad), dtype=torch.float16, device=device)
    stats = torch.empty((3, batch, heads, dpad), dtype=torch.float32, device=device)

    # Measured on an H100 (docs/kernel_notes.md): 256 x 64 tiles with 8 warps at D=64,
    # 128 x 128 with 4 warps at D=128; D <= 32 and 256 not measured.
    block_t, num_warps = _QUANT_OVERRIDE or {32: (256, 4), 64: (256, 8), 128: (128, 4)}.get(dpad, (64, 8))
    assert block_t % config.k_group == 0
    _quantize_kv_kernel[(batch * heads, 2)](
        k, *k.stride(),
        v, *v.stride(),
        k_q, k_scale, v_q, stats,
        heads, nk, nk_pad, batch * heads * dpad,
        HEAD_DIM=head_dim, DPAD=dpad, BLOCK_T=block_t,
        K_GROUP=config.k_group, SMOOTH_K=config.smooth_k, SMOOTH_V=config.smooth_v,
        V_FP8=v_fp8, EXACT_FP8=interpreting(),
        num_warps=num_warps,
    )
    return QuantizedKV(k_q, k_scale, v_q, stats)
