"""The Triton kernels (qattn.kernels) against the PyTorch reference.

Without CUDA, conftest.py sets TRITON_INTERPRET=1 and the kernels run in Triton's CPU
interpreter on CPU tensors; with CUDA they run on the GPU.

Tolerances (``assert_close_to_reference``): the kernel must reproduce
``reference.sage_attention`` with the same config and ``block_kv = BLOCK_N``. In the
interpreter the two agree to about one unit in the last place of the output dtype (the
kernel pre-rounds P~ and V onto the E4M3 grid there, because the interpreter's own
fp32 -> fp8 cast is wrong when rounding carries into the exponent; the fp16 P~V block
accumulation is rounded once, as the reference does). What can still differ is the
summation order of means and dot products, which very rarely flips one quantized value
by one unit. On the GPU ex2.approx, fused multiply-adds and the tensor cores' own
accumulation (22-bit for FP8, fp16 for sage1) add small differences. So an element is a
mismatch when ``|o - r| > 1e-3 + rtol * |r|`` with rtol = 4 ulps of the output dtype
(fp16 4e-3, bf16 3e-2, fp32 2e-3); we allow at most 0.5% of mismatched elements, a
relative L1 distance of at most 2e-3 (bf16: 5e-3), and a largest error of 5% of max|r|.
LSE: mean absolute error <= 3e-4 and none above 1e-2 (one flipped K value moves the LSE
of the rows attending to that key by up to ~5e-3; seen on the GPU with bf16 inputs);
the pattern of -inf (rows with no key) must match exactly.

Against exact fp64 attention the metrics of the papers: cosine >= 0.999 and relative
L1 <= 0.05 on randn inputs (sage2-8b's published accuracy is cosine ~0.9993, L1 ~0.04).
"""

import math

import pytest
import torch

from qattn import metrics, reference
from qattn.kernels import attention as attn_module
from qattn.kernels import attention_sm90
from qattn.kernels import quantize as quantize_module
from qattn.kernels import (
    attention_forward,
    attention_forward_varlen,
    block_config,
    kernel_name,
    quantize_kv,
    softmax_block,
    supports,
)
from qattn.presets import PRESETS

CONFIGS = {
    "sage1": PRESETS["sage1"],
    "sage2-8b": PRESETS["sage2-8b"],
    "sage2-8b-token": PRESETS["sage2-8b"].replace(granularity="token"),
    "sage2-8b-block": PRESETS["sage2-8b"].replace(granularity="block"),
    "sage1-warp-fp32acc-smoothv": PRESETS["sage1"].replace(granularity="warp", pv_accum="fp32", smooth_v=True),
    "sage2-8b-smoothv-nosmoothk": PRESETS["sage2-8b"].replace(smooth_v=True, smooth_k=False),
}

RTOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 2e-3}


def make_inputs(b, hq, hkv, nq, nk, d, *, dtype=torch.float16, device="cpu", seed=0, k_bias=0.0,
                magnitude=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=gen) * magnitude
    k = torch.randn(b, hkv, nk, d, generator=gen) * magnitude
    v = torch.randn(b, hkv, nk, d, generator=gen) * magnitude
    if k_bias:
        k = k + k_bias * torch.randn(d, generator=gen)
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))


@pytest.fixture(params=["default", "portable"])
def kernel(request, monkeypatch, device):
    """Run a test with the kernel dispatch picks (the Gluon sm_90 kernel on an H100/H200
    wherever it applies, small calls included), and again with the portable Triton
    kernel where that differs."""
    monkeypatch.setattr(attention_sm90, "MIN_WORK", 0)
    if request.param == "portable":
        if kernel_name(PRESETS["sage2-8b"], 128, False, device) == "triton":
            pytest.skip("the portable kernel is the default here")
        monkeypatch.setattr(attn_module, "_USE_SM90", False)
    return request.param


def causal_offset_for(mode, nq, nk):
    return {None: None, "top-left": 0, "bottom-right": nk - nq}[mode]


def run_reference(q, k, v, config, causal_offset):
    """The reference with the online-softmax block of the kernel that runs this
    (dense, unmasked) call."""
    work = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
    block_kv = softmax_block(config, q.shape[-1], causal_offset is not None, q.device, work)
    return reference.sage_attention(q, k, v, config, causal_offset=causal_offset, return_lse=True,
                                    block_kv=block_kv)


def assert_close_to_reference(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    o, r = out.double(), ref.double()
    assert torch.isfinite(o).all()
    err = (o - r).abs()
    bad = err > 1e-3 + RTOL[ref.dtype] * r.abs()
    scale = max(r.abs().max().item(), 1e-6)
    assert bad.float().mean().item() <= 5e-3, f"{bad.sum().item()} of {bad.numel()} mismatched"
    assert err.max().item() <= 0.05 * scale, f"max error {err.max().item():.3g} (max|ref| {scale:.3g})"
    rel_l1 = metrics.relative_l1(o, r)
    assert rel_l1 <= (5e-3 if ref.dtype == torch.bfloat16 else 2e-3), f"rel L1 {rel_l1:.3g}"


def assert_lse_close(lse, ref_lse):
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "empty rows differ"
    finite = torch.isfinite(ref_lse)
    assert torch.isfinite(lse[finite]).all()
    err = (lse[finite].double() - ref_lse[finite].double()).abs()
    if err.numel():
        # One flipped K value moves the LSE of the rows that attend to that key by up to
        # ~5e-3, so: a small mean error, and a bound on the largest.
        assert err.mean().item() <= 3e-4, f"LSE mean error {err.mean().item():.3g}"
        assert err.max().item() <= 1e-2, f"LSE max error {err.max().item():.3g}"


def check_against_exact(out, q, k, v, causal_offset, *, min_cos=0.999, max_l1=0.05):
    exact, _ = reference.exact_attention(q, k, v, causal_offset=causal_offset)
    acc = metrics.accuracy(out, exact)
    assert acc["cosine"] >= min_cos and acc["rel_l1"] <= max_l1, acc


# (B, Hq, Hkv, Nq, Nk, D, k_bias)
SHAPES = [
    (1, 2, 2, 1, 1, 16, 0.0),
    (1, 2, 2, 17, 17, 32, 8.0),
    (2, 4, 2, 100, 257, 64, 8.0),
    (1, 4, 1, 257, 100, 128, 0.0),
    (1, 2, 2, 130, 300, 80, 8.0),
    (2, 2, 1, 64, 128, 128, 8.0),
]
CAUSAL_MODES = [None, "top-left", "bottom-right"]


def _check_case(config_name, shape, causal_mode, device, dtype=torch.float16):
    config = CONFIGS[config_name]
    b, hq, hkv, nq, nk, d, k_bias = shape
    q, k, v = make_inputs(b, hq, hkv, nq, nk, d, dtype=dtype, device=device, k_bias=k_bias, seed=nq + nk + d)
    offset = causal_offset_for(causal_mode, nq, nk)
    out, lse = attention_forward(q, k, v, config, sm_scale=1.0 / math.sqrt(d), causal_offset=offset,
                                 return_lse=True)
    ref, ref_lse = run_reference(q, k, v, config, offset)
    assert_close_to_reference(out, ref)
    assert_lse_close(lse, ref_lse)
    # Accuracy metrics are meaningless on a handful of numbers; and without smoothing a
    # channel bias in K wrecks INT8 accuracy by design (that is what smoothing is for).
    if nq * nk >= 256 and nk > 1 and (config.smooth_k or not k_bias):
        check_against_exact(out, q, k, v, offset)


@pytest.mark.parametrize("causal_mode", CAUSAL_MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])))
@pytest.mark.parametrize("config_name", ["sage1", "sage2-8b"])
def test_presets_match_reference(config_name, shape, causal_mode, device, kernel):
    _check_case(config_name, shape, causal_mode, device)


@pytest.mark.parametrize("causal_mode", CAUSAL_MODES)
@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[4]], ids=lambda s: "x".join(map(str, s[:6])))
@pytest.mark.parametrize("config_name", [c for c in CONFIGS if c not in ("sage1", "sage2-8b")])
def test_other_configs_match_reference(config_name, shape, causal_mode, device):
    _check_case(config_name, shape, causal_mode, device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("config_name", ["sage1", "sage2-8b"])
def test_input_dtypes(config_name, dtype, device, kernel):
    _check_case(config_name, (1, 2, 1, 100, 150, 64, 8.0), "bottom-right", device, dtype=dtype)


@pytest.mark.parametrize("config_name", ["sage1", "sage2-8b"])
def test_nhd_views_and_out_view(config_name, device, kernel):
    """NHD tensors arrive as transposed views; the output is written into an NHD view."""
    config = CONFIGS[config_name]
    b, h, hkv, nq, nk, d = 2, 4, 2, 70, 90, 64
    q, k, v = make_inputs(b, h, hkv, nq, nk, d, device=device, k_bias=8.0, seed=1)
    q_nhd, k_nhd, v_nhd = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, N, H, D]
    out_nhd = torch.full((b, nq, h, d), float("nan"), dtype=q.dtype, device=device)
    out, lse = attention_forward(q_nhd.transpose(1, 2), k_nhd.transpose(1, 2), v_nhd.transpose(1, 2), config,
                                 sm_scale=0.1, causal_offset=nk - nq, return_lse=True,
                                 out=out_nhd.transpose(1, 2))
    assert out.data_ptr() == out_nhd.data_ptr()
    ref, ref_lse = reference.sage_attention(q, k, v, config, sm_scale=0.1, causal_offset=nk - nq,
                                            return_lse=True,
                                            block_kv=softmax_block(config, d, True, device, b * h * nq * nk))
    assert_close_to_reference(out_nhd.transpose(1, 2), ref)
    assert_lse_close(lse, ref_lse)


@pytest.mark.parametrize("config_name", ["sage1", "sage2-8b"])
def test_non_contiguous_inputs(config_name, device, kernel):
    """Slices of larger tensors (row stride != D, every other token, every other head)."""
    config = CONFIGS[config_name]
    b, h, nq, nk, d = 1, 2, 50, 120, 64
    gen = torch.Generator().manual_seed(2)
    q_big = torch.randn(b, 2 * h, nq, 2 * d, generator=gen).to(device=device, dtype=torch.bfloat16)
    k_big = (torch.randn(b, h, 2 * nk, d + 16, generator=gen) + 5).to(device=device, dtype=torch.bfloat16)
    v_big = torch.randn(b, h, nk, 3 * d, generator=gen).to(device=device, dtype=torch.bfloat16)
    q, k, v = q_big[:, ::2, :, d:], k_big[:, :, ::2, 16:], v_big[..., d : 2 * d]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out, lse = attention_forward(q, k, v, config, sm_scale=1 / 8, return_lse=False)
    assert lse is None
    ref, _ = run_reference(q.contiguous(), k.contiguous(), v.contiguous(), config, None)
    assert_close_to_reference(out, ref)
    check_against_exact(out, q, k, v, None)


def test_empty_rows_and_lse(device, kernel):
    """Nq > Nk bottom-right: the first Nq - Nk rows see no key: output 0, LSE -inf."""
    config = CONFIGS["sage2-8b"]
    q, k, v = make_inputs(1, 2, 2, 150, 40, 64, device=device, seed=3)
    out, lse = attention_forward(q, k, v, config, sm_scale=0.125, causal_offset=40 - 150, return_lse=True)
    assert (out[:, :, :110] == 0).all() and torch.isneginf(lse[:, :, :110]).all()
    assert torch.isfinite(lse[:, :, 110:]).all()
    ref, ref_lse = run_reference(q, k, v, config, 40 - 150)
    assert_close_to_reference(out, ref)
    assert_lse_close(lse, ref_lse)
    _, exact_lse = reference.exact_attention(q, k, v, sm_scale=0.125, causal_offset=40 - 150)
    assert (lse[:, :, 110:] - exact_lse[:, :, 110:]).abs().max().item() < 0.05


def test_no_keys(device):
    q, k, v = make_inputs(1, 2, 2, 5, 0, 32, device=device)
    out, lse = attention_forward(q, k, v, CONFIGS["sage2-8b"], sm_scale=None, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("config_name", ["sage1", "sage2-8b"])
def test_large_magnitude_bf16(config_name, device, kernel):
    """|x| up to 1e3 in bf16: no overflow anywhere (scores ~1e6 in the log2 domain)."""
    config = CONFIGS[config_name]
    gen = torch.Generator().manual_seed(4)
    q, k, v = ((torch.randn(1, 2, n, 64, generator=gen) * 400).clamp(-1e3, 1e3).to(device=device, dtype=torch.bfloat16)
               for n in (60, 130, 130))
    out, lse = attention_forward(q, k, v, config, sm_scale=0.125, causal_offset=70, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref, ref_lse = run_reference(q, k, v, config, 70)
    # Scores reach ~1e5 here, so the order in which the kernel applies the Q and K scales
    # (the reference multiplies in another order) moves them by ~1e-2: a looser bound.
    acc = metrics.accuracy(out, ref)
    assert acc["cosine"] >= 0.9999 and acc["rel_l1"] <= 0.02, acc
    assert (lse - ref_lse).abs().max().item() <= 1e-3 * ref_lse.abs().max().item()


def _check_quantize_kv(config, b, h, n, d, device, seed=5):
    """quantize_kv gives K INT8 and V FP8 (or fp16) as the reference quantizes them, and
    zeroes the padding."""
    _, k, v = make_inputs(b, h, h, 1, n, d, device=device, k_bias=8.0, seed=seed)
    kv = quantize_kv(k, v, config)
    k_q, k_scale_q, v_q = kv.dense()
    kf, vf = k.float(), v.float()
    if config.smooth_k:
        k_mean = kf.mean(dim=-2, keepdim=True)
        torch.testing.assert_close(kv.k_mean[..., :d], k_mean[..., 0, :], rtol=1e-5, atol=1e-5)
        kf = kf - k_mean
    k_int, k_scale = reference.quantize_per_group(kf, config.k_group, 127)
    assert (k_q[:, :, :n, :d].float() - k_int).abs().max() <= 1
    assert (k_q[:, :, :n, :d].float() != k_int).float().mean() < 1e-3
    assert (k_q[:, :, n:] == 0).all() and (k_q[..., d:] == 0).all()
    torch.testing.assert_close(k_scale_q[:, :, :n], k_scale, rtol=1e-5, atol=0)
    if config.smooth_v:
        v_mean = vf.mean(dim=-2, keepdim=True)
        torch.testing.assert_close(kv.v_mean[..., :d], v_mean[..., 0, :], rtol=1e-5, atol=1e-5)
        vf = vf - v_mean
    if config.pv_dtype.value == "fp8":
        v8, v_scale = reference.quantize_v_fp8(vf)
        torch.testing.assert_close(kv.v_scale[..., :d], v_scale[..., 0, :], rtol=1e-5, atol=0)
        got = v_q.float().transpose(-1, -2)  # stored [D, N]
        assert ((got[:, :, :n, :d] - v8).abs() > 1e-3 * v8.abs() + 1e-6).float().mean() < 1e-3
        assert (got[:, :, n:] == 0).all() and (got[..., d:] == 0).all()
    else:
        assert v_q.dtype == torch.float16
        torch.testing.assert_close(v_q[:, :, :n, :d].float(), vf.half().float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("config_name", ["sage1", "sage2-8b", "sage2-8b-token", "sage2-8b-smoothv-nosmoothk"])
def test_quantize_kv_matches_reference(config_name, device):
    _check_quantize_kv(CONFIGS[config_name], 2, 2, 150, 80, device)


@pytest.mark.parametrize("config_name", ["sage1", "sage2-8b", "sage1-warp-fp32acc-smoothv"])
@pytest.mark.parametrize("tile, n", [(128, 1000), (64, 2100)])
def test_quantize_kv_many_chunks(config_name, tile, n, device, monkeypatch):
    """Statistics combined over many chunks per (sequence, head): 8 chunks of one
    128-token tile, or 34 of 64 tokens (three slices of the partials: 16, 16 and 2)."""
    monkeypatch.setattr(quantize_module, "_STATS_OVERRIDE", (tile, 2))
    monkeypatch.setattr(quantize_module, "_QUANT_OVERRIDE", (tile, 4))
    _check_quantize_kv(CONFIGS[config_name], 2, 3, n, 64, device, seed=9)


@pytest.mark.parametrize("stats_tile, quant_tile", [((32, 1), (128, 4)), ((256, 2), (64, 2))])
def test_quantize_kv_passes_tiled_differently(stats_tile, quant_tile, device, monkeypatch):
    """The two passes with different (BLOCK_T, warps): chunks are whole tiles of the
    larger one (128 or 256 tokens here), which the other pass covers in four tiles."""
    monkeypatch.setattr(quantize_module, "_STATS_OVERRIDE", stats_tile)
    monkeypatch.setattr(quantize_module, "_QUANT_OVERRIDE", quant_tile)
    _check_quantize_kv(CONFIGS["sage2-8b"], 2, 3, 1000, 64, device, seed=10)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_quantize_kv_long(head_dim):
    """Default tiles and chunking at a long length: 32 chunks per (sequence, head), each
    several tiles of both passes, the last one partial."""
    _check_quantize_kv(CONFIGS["sage2-8b"], 2, 16, 20000 + head_dim + 1, head_dim, "cuda", seed=head_dim)


def test_quantize_kv_wgmma_v_order(device):
    """wgmma_v_order stores exactly the plain FP8 V^T with the tokens of every 32-token
    chunk reordered as the Gluon kernel's reshape/permute of P~ reorders its keys."""
    config = PRESETS["sage2-8b"]
    _, k, v = make_inputs(2, 2, 2, 1, 150, 64, device=device, seed=11)
    plain = quantize_kv(k, v, config)
    ordered = quantize_kv(k, v, config, wgmma_v_order=True)
    assert ordered.wgmma_v_order and not plain.wgmma_v_order
    rows = plain.v_q.shape[-1]
    # the kernel: key (chunk, h, i, q, e) of P~ lands at operand column (chunk, h, q, i, e)
    source = torch.arange(rows, device=device).reshape(rows // 32, 2, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(rows)
    assert torch.equal(ordered.v_q.view(torch.uint8), plain.v_q.view(torch.uint8)[..., source])
    assert not torch.equal(source, torch.arange(rows, device=device))
    for a, b in ((ordered.k_q, plain.k_q), (ordered.k_scale, plain.k_scale), (ordered.k_mean, plain.k_mean),
                 (ordered.v_scale, plain.v_scale)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="wgmma_v_order"):
        quantize_kv(k, v, PRESETS["sage1"], wgmma_v_order=True)


def test_supports_reasons(device):
    q, k, v = make_inputs(1, 4, 2, 8, 8, 64, device=device)
    cfg = PRESETS["sage2-8b"]
    assert supports(cfg, q, k, v) is None
    assert "INT4" in supports(PRESETS["sage2-4b"], q, k, v)
    assert "smooth_q" in supports(cfg.replace(smooth_q=True), q, k, v)
    assert "Dv" in supports(cfg, q, k, torch.zeros(1, 2, 8, 32, dtype=q.dtype, device=device))
    big = torch.zeros(1, 1, 4, 320, dtype=q.dtype, device=device)
    assert "head dim" in supports(cfg, big, big, big)
    assert "dtype" in supports(cfg, q.double(), k, v)
    assert "multiple" in supports(cfg, q[:, :3], k, v)
    with pytest.raises(ValueError, match="INT4"):
        attention_forward(q, k, v, PRESETS["sage2-4b"], sm_scale=None)


def test_block_config_table():
    for d in (16, 32, 64, 80, 128, 256):
        for causal in (False, True):
            for config in CONFIGS.values():
                cfg = block_config(d, causal, "cpu", config)
                assert cfg.BLOCK_M in (64, 128) and 128 % cfg.BLOCK_N == 0


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("config_name", ["sage1", "sage2-8b"])
def test_gpu_big_shape_accuracy(config_name, causal, kernel):
    q, k, v = make_inputs(1, 8, 8, 2048, 2048, 128, dtype=torch.bfloat16, device="cuda", k_bias=4.0)
    config = CONFIGS[config_name]
    out, _ = attention_forward(q, k, v, config, sm_scale=None, causal_offset=0 if causal else None)
    ref, _ = run_reference(q, k, v, config, 0 if causal else None)
    assert_close_to_reference(out, ref)
    exact = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    acc = metrics.accuracy(out, exact)
    assert acc["cosine"] >= 0.999 and acc["rel_l1"] <= 0.05, acc


def test_kernel_dispatch():
    """The Gluon kernel is chosen only for CUDA sm_90 FP8-P~V dense unmasked calls."""
    sage2 = PRESETS["sage2-8b"]
    assert kernel_name(sage2, 128, False, "cpu") == "triton"
    if kernel_name(sage2, 128, False, "cuda" if torch.cuda.is_available() else "cpu") == "gluon-sm90":
        assert kernel_name(PRESETS["sage1"], 128, False, "cuda") == "triton"  # fp16 P~V
        assert kernel_name(sage2, 256, False, "cuda") == "triton"
        assert kernel_name(sage2, 128, False, "cuda", work=4 * 32 * 512 * 512) == "triton"  # host-bound
        assert kernel_name(sage2, 128, True, "cuda", masked=True) == "triton"
        assert kernel_name(sage2, 128, True, "cuda", varlen=True) == "triton"
        assert kernel_name(CONFIGS["sage2-8b-token"], 128, True, "cuda") == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("causal_mode", [None, "top-left", "bottom-right"])
@pytest.mark.parametrize("head_dim", [80, 128])
@pytest.mark.parametrize("config_name", ["sage2-8b", "sage2-8b-smoothv-nosmoothk"])
def test_gpu_sm90_kernel_long_gqa_odd_lengths(config_name, head_dim, causal_mode, monkeypatch):
    """The Gluon kernel over many K/V blocks (its shared-memory ring wraps several times),
    GQA and lengths that are not block multiples: same numbers as the reference and,
    within the same tolerance, as the portable kernel."""
    config = CONFIGS[config_name]
    monkeypatch.setattr(attention_sm90, "MIN_WORK", 0)
    if kernel_name(config, head_dim, causal_mode is not None, "cuda") != "gluon-sm90":
        pytest.skip("the Gluon kernel does not run here (needs sm_90 and a tested Triton)")
    q, k, v = make_inputs(2, 8, 2, 1000, 1531, head_dim, dtype=torch.bfloat16, device="cuda", k_bias=4.0,
                          seed=head_dim)
    offset = causal_offset_for(causal_mode, 1000, 1531)
    out, lse = attention_forward(q, k, v, config, sm_scale=None, causal_offset=offset, return_lse=True)
    ref, ref_lse = run_reference(q, k, v, config, offset)
    assert_close_to_reference(out, ref)
    assert_lse_close(lse, ref_lse)
    if config.smooth_k:  # without smoothing, K's channel bias costs INT8 accuracy by design
        check_against_exact(out, q, k, v, offset)
    monkeypatch.setattr(attn_module, "_USE_SM90", False)
    portable, portable_lse = attention_forward(q, k, v, config, sm_scale=None, causal_offset=offset,
                                               return_lse=True)
    assert_close_to_reference(out, portable)
    assert_lse_close(lse, portable_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("causal_mode", [None, "bottom-right"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_sm90_kv_loads_with_and_without_producer_warp(head_dim, causal_mode, monkeypatch):
    """The Gluon kernel's two ways to load K/V (a producer warp, or the consumer warpgroup
    itself STAGES - 1 blocks ahead; the table picks one per head dim) change only who issues
    the loads: outputs and LSE bit-identical, over a ring that wraps several times, GQA and
    lengths that are not block multiples, and the same as the reference."""
    config = CONFIGS["sage2-8b"]
    monkeypatch.setattr(attention_sm90, "MIN_WORK", 0)
    if kernel_name(config, head_dim, causal_mode is not None, "cuda") != "gluon-sm90":
        pytest.skip("the Gluon kernel does not run here (needs sm_90 and a tested Triton)")
    q, k, v = make_inputs(2, 8, 2, 1000, 1531, head_dim, dtype=torch.bfloat16, device="cuda", k_bias=4.0,
                          seed=head_dim + 15)
    offset = causal_offset_for(causal_mode, 1000, 1531)
    results = []
    for producer_warp in (True, False):
        for stages in (2, 3):
            monkeypatch.setattr(attention_sm90, "_CONFIG_OVERRIDE",
                                attention_sm90.HopperConfig(128, stages, PRODUCER_WARP=producer_warp))
            results.append(attention_forward(q, k, v, config, sm_scale=None, causal_offset=offset, return_lse=True))
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])
    ref, ref_lse = run_reference(q, k, v, config, offset)
    assert_close_to_reference(results[0][0], ref)
    assert_lse_close(results[0][1], ref_lse)


def test_causal_head_group_keeps_kv_within_l2_budget(monkeypatch):
    group = attention_sm90.causal_head_group
    assert group(128, 4096, 128) == 4  # 1 MiB of quantized K/V per head, 4 MiB budget
    assert group(128, 16384, 64) == 2
    assert group(128, 1024, 128) == 16  # at most 16
    assert group(32, 16384, 128) == 1
    assert group(3, 1024, 64) == 3  # never more than the heads
    monkeypatch.setattr(attention_sm90, "HEAD_GROUP_OVERRIDE", 5)
    assert group(128, 4096, 128) == 5


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_sm90_causal_tile_order_does_not_change_results(head_dim, monkeypatch):
    """The causal grid's order (heads interleaved in groups, longest rows first) only
    moves tiles between CTAs: outputs and LSE bit-identical for every group size,
    including groups that do not divide the heads (15 (b, h) pairs in groups of 4)."""
    config = CONFIGS["sage2-8b"]
    monkeypatch.setattr(attention_sm90, "MIN_WORK", 0)
    if kernel_name(config, head_dim, True, "cuda") != "gluon-sm90":
        pytest.skip("the Gluon kernel does not run here (needs sm_90 and a tested Triton)")
    q, k, v = make_inputs(3, 5, 5, 777, 901, head_dim, dtype=torch.bfloat16, device="cuda", k_bias=2.0,
                          seed=11)
    results = []
    for group in (1, 4, 15, 16):
        monkeypatch.setattr(attention_sm90, "HEAD_GROUP_OVERRIDE", group)
        results.append(attention_forward(q, k, v, config, sm_scale=None, causal_offset=124, return_lse=True))
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_no_sync_and_stream(head_dim, kernel):
    """Runs on a side stream and under CUDA graph capture (no host syncs inside; the
    Gluon kernel's TMA descriptors are kernel parameters, so a replay reuses them)."""
    q, k, v = make_inputs(2, 4, 2, 300, 300, head_dim, dtype=torch.bfloat16, device="cuda")
    config = CONFIGS["sage2-8b"]
    expected, _ = attention_forward(q, k, v, config, sm_scale=None, causal_offset=0)
    out = torch.empty_like(q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        attention_forward(q, k, v, config, sm_scale=None, causal_offset=0, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(out, expected)
    graph = torch.cuda.CUDAGraph()
    out.zero_()
    with torch.cuda.graph(graph):
        attention_forward(q, k, v, config, sm_scale=None, causal_offset=0, out=out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


def _make_mask(kind, b, hq, nq, nk, device):
    gen = torch.Generator().manual_seed(nq * 7 + nk)
    if kind == "bool":
        mask = torch.rand(b, hq, nq, nk, generator=gen) > 0.3
        mask[0, 0, min(5, nq - 1)] = False  # a fully masked row
    elif kind == "key_padding":  # [B, 1, 1, Nk]: the last 25% of keys padded in batch 0
        mask = torch.ones(b, 1, 1, nk, dtype=torch.bool)
        mask[0, ..., nk - nk // 4:] = False
    elif kind == "additive":  # [1, H, Nq, Nk] float bias with -inf entries
        mask = torch.randn(1, hq, nq, nk, generator=gen) * 2
        mask[..., : nk // 3] = float("-inf")
    else:  # 2-D [Nq, Nk], broadcast over batch and heads
        mask = torch.rand(nq, nk, generator=gen) > 0.5
    return mask.to(device)


@pytest.mark.parametrize("causal", [False, True], ids=["no_causal", "bottom_right"])
@pytest.mark.parametrize("kind", ["bool", "key_padding", "additive", "2d"])
@pytest.mark.parametrize("config_name", ["sage1", "sage2-8b"])
def test_masks_match_reference(kind, config_name, causal, device):
    config = CONFIGS[config_name]
    b, hq, hkv, nq, nk, d = 2, 4, 2, 70, 200, 64
    q, k, v = make_inputs(b, hq, hkv, nq, nk, d, device=device, k_bias=4.0, seed=21)
    mask = _make_mask(kind, b, hq, nq, nk, device)
    offset = nk - nq if causal else None
    out, lse = attention_forward(q, k, v, config, sm_scale=None, attn_mask=mask, causal_offset=offset,
                                 return_lse=True)
    block_kv = block_config(d, causal, q.device, config).BLOCK_N
    ref, ref_lse = reference.sage_attention(q, k, v, config, attn_mask=mask, causal_offset=offset,
                                            return_lse=True, block_kv=block_kv)
    assert_close_to_reference(out, ref)
    assert_lse_close(lse, ref_lse)
    exact, _ = reference.exact_attention(q, k, v, attn_mask=mask, causal_offset=offset)
    assert metrics.cosine_similarity(out, exact) >= 0.999
    if kind == "bool":
        assert torch.equal(out[0, 0, 5], torch.zeros_like(out[0, 0, 5]))
        assert torch.isneginf(lse[0, 0, 5])


@pytest.mark.parametrize("config_name", ["sage1", "sage2-8b"])
def test_tma_loads_equal_pointer_loads(config_name, device, monkeypatch):
    """The TMA-descriptor variant of the K/V loads (used on sm_90 for large D=128 calls)
    gives the same bits as plain loads, dense and varlen."""
    config = CONFIGS[config_name]
    q, k, v = make_inputs(2, 4, 2, 100, 300, 128, device=device, k_bias=4.0, seed=31)
    table = block_config(128, True, q.device, config)
    monkeypatch.setattr(attn_module, "_TMA_MIN_WORK", 0)
    monkeypatch.setattr(attn_module, "_USE_SM90", False)
    results = []
    for use_tma in (False, True):
        monkeypatch.setattr(attn_module, "_BLOCK_OVERRIDE", table._replace(tma=use_tma))
        out, lse = attention_forward(q, k, v, config, sm_scale=None, causal_offset=200, return_lse=True)
        lens = [5, 0, 130, 257]
        qv, kv, vv, cu_q, cu_k = make_varlen(lens, lens, 4, 2, 128, device=device, seed=32)
        out_v, _ = attention_forward_varlen(qv, kv, vv, cu_q, cu_k, 257, 257, config, sm_scale=None,
                                            causal=True)
        results.append((out, lse, out_v))
    for pointer, tma in zip(*results):
        assert torch.equal(pointer, tma)


@pytest.mark.parametrize("additive", [False, True])
def test_one_row_masks_compute_only_the_kept_span(additive, device):
    """Key masks with one row per (batch, head) ([B, H, 1, Nk] here): the kernel computes
    only the blocks from the first to the last kept key; a (batch, head) with no kept key
    gives zeros and LSE -inf."""
    config = CONFIGS["sage2-8b"]
    b, hq, hkv, nq, nk, d = 2, 2, 1, 40, 600, 64
    q, k, v = make_inputs(b, hq, hkv, nq, nk, d, device=device, k_bias=4.0, seed=23)
    keep = torch.zeros(b, hq, 1, nk, dtype=torch.bool)
    keep[0, 0, :, 200:450] = True  # padded on both sides
    keep[0, 1, :, 5:7] = True
    keep[1, 0, :, 590:] = True  # batch 1, head 1: nothing kept
    mask = keep if not additive else torch.where(keep, 0.0, float("-inf")).to(torch.float16)
    mask = mask.to(device)
    out, lse = attention_forward(q, k, v, config, sm_scale=None, attn_mask=mask, return_lse=True)
    block_kv = block_config(d, False, q.device, config).BLOCK_N
    ref, ref_lse = reference.sage_attention(q, k, v, config, attn_mask=mask, return_lse=True,
                                            block_kv=block_kv)
    assert_close_to_reference(out, ref)
    assert_lse_close(lse, ref_lse)
    assert torch.equal(out[1, 1], torch.zeros_like(out[1, 1])) and torch.isneginf(lse[1, 1]).all()


@pytest.mark.parametrize("head_dim", [8, 40, 72, 160, 192, 256])
@pytest.mark.parametrize("config_name", ["sage1", "sage2-8b"])
def test_head_dims_padded_to_a_power_of_two(head_dim, config_name, device, kernel):
    """Any D up to 256: stored padded to the next power of two (>= 32), exact for dots."""
    _check_case(config_name, (1, 2, 1, 70, 150, head_dim, 4.0), "bottom-right", device)


# ----------------------------------------------------------------------------- varlen


def make_varlen(lens_q, lens_k, hq, hkv, d, *, dtype=torch.float16, device="cpu", seed=0):
    """Packed q [sum(lens_q), hq, d], k/v [sum(lens_k), hkv, d] and int32 offsets. Each
    sequence's K gets its own channel bias, so smoothing over the whole batch instead of
    per sequence would show."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), hq, d, generator=gen)
    k = torch.randn(sum(lens_k), hkv, d, generator=gen)
    v = torch.randn(sum(lens_k), hkv, d, generator=gen)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    for b in range(len(lens_k)):
        k[cu_k[b]:cu_k[b + 1]] += 6.0 * torch.randn(d, generator=gen) * (b + 1)
        v[cu_k[b]:cu_k[b + 1]] *= 1 + 3 * b
    q, k, v = (x.to(device=device, dtype=dtype) for x in (q, k, v))
    return q, k, v, cu_q.to(device), cu_k.to(device)


# (lengths of q, lengths of k, Hq, Hkv, D): empty sequences, 1 token, block edges, q < k
# (chunked prefill) and q > k (rows with no key when causal).
VARLEN_CASES = [
    ([5, 0, 130, 1, 257], [5, 3, 130, 1, 257], 4, 2, 64),
    ([1, 17, 100], [300, 17, 129], 2, 1, 80),
    ([40, 7], [20, 0], 2, 2, 128),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"{len(c[0])}seqs-d{c[4]}")
@pytest.mark.parametrize("config_name", ["sage1", "sage2-8b", "sage2-8b-smoothv-nosmoothk"])
def test_varlen_matches_reference(config_name, case, causal, device):
    lens_q, lens_k, hq, hkv, d = case
    config = CONFIGS[config_name]
    q, k, v, cu_q, cu_k = make_varlen(lens_q, lens_k, hq, hkv, d, device=device, seed=len(lens_q) + d)
    out, lse = attention_forward_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), config,
                                        sm_scale=None, causal=causal, return_lse=True)
    block_kv = block_config(d, causal, q.device, config).BLOCK_N
    ref, ref_lse = reference.sage_attention_varlen(q, k, v, cu_q, cu_k, config, causal=causal,
                                                   return_lse=True, block_kv=block_kv)
    assert out.shape == q.shape and lse.shape == (hq, q.shape[0])
    assert_close_to_reference(out, ref)
    assert_lse_close(lse, ref_lse)


def test_varlen_equals_each_sequence_alone(device):
    """Per-sequence smoothing and scales: a sequence packed with others gives what it
    gives alone (same kernel, same numbers), and strided (non-contiguous) packed views
    are read in place."""
    lens = [70, 200, 3]
    q, k, v, cu_q, cu_k = make_varlen(lens, lens, 4, 2, 64, device=device, seed=11)
    qkv = torch.stack([q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)], dim=1)
    q_view, k_view, v_view = qkv[:, 0], qkv[:, 1, ::2], qkv[:, 2, ::2]  # [T, H, D] strided
    assert not k_view.is_contiguous()
    config = CONFIGS["sage2-8b"]
    out, _ = attention_forward_varlen(q_view, k_view, v_view, cu_q, cu_k, max(lens), max(lens),
                                      config, sm_scale=None, causal=True)
    for b, n in enumerate(lens):
        lo = int(cu_q[b])
        alone, _ = attention_forward(*(x[lo:lo + n].transpose(0, 1).unsqueeze(0) for x in (q, k, v)),
                                     config, sm_scale=None, causal_offset=0)
        assert_close_to_reference(out[lo:lo + n], alone[0].transpose(0, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_varlen_mixed_lengths(causal):
    """Lengths 1..4097 mixed, bf16, against the reference and fp32 attention per sequence."""
    lens = [1, 4097, 63, 1000, 128, 2, 129, 2049]
    q, k, v, cu_q, cu_k = make_varlen(lens, lens, 8, 2, 128, dtype=torch.bfloat16, device="cuda", seed=3)
    config = CONFIGS["sage2-8b"]
    out, lse = attention_forward_varlen(q, k, v, cu_q, cu_k, max(lens), max(lens), config,
                                        sm_scale=None, causal=causal, return_lse=True)
    ref, ref_lse = reference.sage_attention_varlen(q, k, v, cu_q, cu_k, config, causal=causal,
                                                   return_lse=True)
    assert_close_to_reference(out, ref)
    assert_lse_close(lse, ref_lse)
    for b in range(len(lens)):
        lo, hi = int(cu_q[b]), int(cu_q[b + 1])
        seq = [x[lo:hi].transpose(0, 1).unsqueeze(0).float() for x in (q, k, v)]
        exact = torch.nn.functional.scaled_dot_product_attention(*seq, is_causal=causal, enable_gqa=True)
        if hi - lo >= 64:  # metrics over a handful of values are noise
            acc = metrics.accuracy(out[lo:hi].transpose(0, 1).unsqueeze(0), exact)
            assert acc["cosine"] >= 0.999 and acc["rel_l1"] <= 0.05, (b, acc)


@pytest.mark.gpu
@pytest.mark.parametrize("config_name", ["sage1", "sage2-8b"])
def test_gpu_chunked_prefill_equals_single_shot(config_name):
    """A prompt in chunks appended to a KV cache (bottom-right causal) gives the rows of
    the single-shot causal call, within the preset's tolerance (the quantization of K/V
    differs: each call sees a prefix of K/V)."""
    q, k, v = make_inputs(1, 8, 2, 1000, 1000, 128, dtype=torch.bfloat16, device="cuda", k_bias=4.0)
    config = CONFIGS[config_name]
    full, _ = attention_forward(q, k, v, config, sm_scale=None, causal_offset=0)
    chunks = []
    for start in range(0, 1000, 300):
        stop = min(start + 300, 1000)
        out, _ = attention_forward(q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop], config,
                                   sm_scale=None, causal_offset=start)
        chunks.append(out)
    chunked = torch.cat(chunks, dim=2)
    exact = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                             is_causal=True, enable_gqa=True)
    for result in (chunked, full):  # both within the preset's bar against exact attention
        assert metrics.meets(metrics.accuracy(result, exact), config_name)
    # and close to each other: two quantizations of the same K/V prefix
    acc = metrics.accuracy(chunked, full)
    assert acc["cosine"] >= 0.998 and acc["rel_l1"] <= 0.07, acc
