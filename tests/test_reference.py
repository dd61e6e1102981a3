"""The reference algorithms against fp64 attention, on the CPU."""

import pytest
import torch
from helpers import make_qkv

from qattn import PRESETS, QuantConfig
from qattn.metrics import THRESHOLDS, accuracy, meets
from qattn.reference import exact_attention, quantize_per_group, quantize_v_fp8, sage_attention


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_meets_documented_bar_on_randn(preset):
    q, k, v = make_qkv(1, 8, 8, 1024, 1024, 128, seed=11)
    out = sage_attention(q, k, v, PRESETS[preset])
    ref, _ = exact_attention(q, k, v)
    m = accuracy(out, ref)
    assert meets(m, preset), (preset, m, THRESHOLDS[preset])


# (B, Hq, Hkv, Nq, Nk, D): GQA, MQA, Nq != Nk both ways, odd lengths, every head dim.
SHAPES = [
    (1, 2, 2, 1, 1, 64),
    (2, 4, 2, 17, 17, 32),
    (1, 4, 1, 257, 100, 80),
    (1, 2, 2, 100, 257, 96),
    (1, 2, 1, 1000, 1000, 128),
    (1, 2, 2, 129, 300, 256),
    (2, 3, 3, 1, 1000, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", ["none", "top_left", "bottom_right"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sage2_8b_close_to_exact(shape, causal, dtype):
    b, hq, hkv, nq, nk, d = shape
    q, k, v = make_qkv(b, hq, hkv, nq, nk, d, dtype=dtype, seed=hash((shape, causal)) % 1000)
    offset = {"none": None, "top_left": 0, "bottom_right": nk - nq}[causal]
    out, lse = sage_attention(q, k, v, PRESETS["sage2-8b"], causal_offset=offset, return_lse=True)
    ref, ref_lse = exact_attention(q, k, v, causal_offset=offset)
    assert out.dtype == dtype and out.shape == (b, hq, nq, d)
    rows = ~torch.isinf(ref_lse)
    assert torch.isfinite(out).all()
    m = accuracy(out, ref)
    # Few keys per row average little quantization noise away; the randn bar holds for
    # long rows and a looser one for rows of a handful of keys.
    bar = 0.999 if min(nk, nq) >= 100 or causal == "none" else 0.995
    assert m["cosine"] >= bar, m
    assert torch.equal(torch.isinf(lse), ~rows)
    assert (lse[rows].double() - ref_lse[rows]).abs().max() < 0.05


def test_lse_is_of_unsmoothed_scores_with_k_bias():
    q, k, v = make_qkv(1, 2, 2, 64, 200, 64, k_bias=8.0)
    _, lse = sage_attention(q, k, v, PRESETS["sage2-8b"], return_lse=True)
    _, ref_lse = exact_attention(q, k, v)
    assert (lse.double() - ref_lse).abs().max() < 0.05


def test_rows_without_keys_give_zero_and_minus_inf_lse():
    q, k, v = make_qkv(1, 2, 2, 10, 4, 32)
    out, lse = sage_attention(q, k, v, PRESETS["sage2-8b"], causal_offset=4 - 10, return_lse=True)
    assert torch.equal(out[:, :, :6], torch.zeros_like(out[:, :, :6]))
    assert torch.isneginf(lse[:, :, :6]).all() and torch.isfinite(lse[:, :, 6:]).all()
    ref, _ = exact_attention(q, k, v, causal_offset=4 - 10)
    assert accuracy(out[:, :, 6:], ref[:, :, 6:])["cosine"] > 0.995


@pytest.mark.parametrize("kind", ["bool", "additive", "key_padding"])
def test_masks_match_exact(kind):
    q, k, v = make_qkv(2, 2, 2, 70, 90, 64, seed=3)
    gen = torch.Generator().manual_seed(4)
    if kind == "bool":
        mask = torch.rand(2, 2, 70, 90, generator=gen) > 0.3
        mask[0, 0, 5] = False  # a fully masked row
    elif kind == "additive":
        mask = torch.randn(1, 2, 70, 90, generator=gen) * 2
    else:
        mask = torch.ones(2, 1, 1, 90, dtype=torch.bool)
        mask[1, ..., 60:] = False
    out = sage_attention(q, k, v, PRESETS["sage2-8b"], attn_mask=mask)
    ref, _ = exact_attention(q, k, v, attn_mask=mask)
    assert torch.isfinite(out).all()
    assert accuracy(out, ref)["cosine"] > 0.999
    if kind == "bool":
        assert torch.equal(out[0, 0, 5], torch.zeros_like(out[0, 0, 5]))


@pytest.mark.parametrize("preset", ["sage1", "sage2-8b"])
def test_k_channel_bias_needs_smoothing(preset):
    """A channel bias in K dominates the INT8 scale; smoothing K removes it."""
    q, k, v = make_qkv(1, 4, 4, 512, 512, 128, k_bias=8.0, seed=5)
    ref, _ = exact_attention(q, k, v)
    # fp16 P~V with fp32 accumulation isolates the QK error.
    base = PRESETS[preset].replace(pv_dtype="fp16", pv_accum="fp32")
    smooth = accuracy(sage_attention(q, k, v, base), ref)
    raw = accuracy(sage_attention(q, k, v, base.replace(smooth_k=False)), ref)
    assert raw["rel_l1"] > 3 * smooth["rel_l1"], (raw, smooth)
    assert meets(accuracy(sage_attention(q, k, v, PRESETS[preset]), ref), preset)


def test_int4_needs_smoothing_q_and_k():
    """INT4 has 15 levels: a bias in K or Q ruins it, smoothing both restores it."""
    ref_bar = THRESHOLDS["sage2-4b"]
    for bias in ({"k_bias": 8.0}, {"q_bias": 8.0}):
        q, k, v = make_qkv(1, 4, 4, 512, 512, 128, seed=6, **bias)
        ref, _ = exact_attention(q, k, v)
        good = accuracy(sage_attention(q, k, v, PRESETS["sage2-4b"]), ref)
        assert meets(good, "sage2-4b"), (bias, good)
        unsmoothed = "smooth_k" if "k_bias" in bias else "smooth_q"
        bad = accuracy(sage_attention(q, k, v, PRESETS["sage2-4b"].replace(**{unsmoothed: False})), ref)
        assert bad["cosine"] < ref_bar["cosine"] and bad["rel_l1"] > 1.5 * good["rel_l1"], (bias, bad, good)


def test_smooth_v_keeps_accuracy_with_v_offset():
    q, k, v = make_qkv(1, 4, 4, 256, 256, 64, seed=7)
    v = v + 20.0  # a large common offset: FP8's relative error hits the offset, not the signal
    ref, _ = exact_attention(q, k, v)
    cfg = PRESETS["sage2-8b"]
    raw = accuracy(sage_attention(q, k, v, cfg), ref)
    smooth = accuracy(sage_attention(q, k, v, cfg.replace(smooth_v=True)), ref)
    assert smooth["rmse"] < raw["rmse"] / 2, (raw, smooth)


@pytest.mark.parametrize("group,qmax", [(1, 127), (16, 127), (64, 7), (128, 127)])
def test_quantize_per_group_is_within_half_a_step(group, qmax):
    x = torch.randn(2, 3, 301, 40) * torch.rand(2, 3, 301, 1) * 10
    x[0, 0, :group] = 0  # an all-zero group
    x_q, scale = quantize_per_group(x, group, qmax)
    assert x_q.abs().max() <= qmax and torch.equal(x_q, x_q.round())
    err = (x_q * scale.unsqueeze(-1) - x).abs()
    assert (err <= scale.unsqueeze(-1) / 2 * (1 + 1e-5) + 1e-30).all()
    assert torch.equal(x_q[0, 0, :group], torch.zeros_like(x_q[0, 0, :group]))
    # Every row of a group has the scale of the group's first row.
    first_row = (torch.arange(301) // group) * group
    assert torch.equal(scale, scale[..., first_row])


def test_quantize_v_fp8_per_channel():
    v = torch.randn(1, 2, 100, 16) * torch.logspace(-2, 2, 16)
    v8, scale = quantize_v_fp8(v)
    assert scale.shape == (1, 2, 1, 16)
    assert v8.abs().amax(-2).eq(448).all()  # each channel's largest value maps to E4M3's max
    assert ((v8 * scale - v).abs() <= v.abs() * 2**-4 + scale * 2**-9).all()


def test_fp16_block_accumulation_differs_from_fp32_but_is_accurate():
    q, k, v = make_qkv(1, 2, 2, 256, 512, 64, seed=8)
    ref, _ = exact_attention(q, k, v)
    fp16 = sage_attention(q.float(), k.float(), v.float(), PRESETS["sage1"])
    fp32 = sage_attention(q.float(), k.float(), v.float(), PRESETS["sage1"].replace(pv_accum="fp32"))
    assert not torch.equal(fp16, fp32)
    assert accuracy(fp16, ref)["cosine"] > 0.9995 and accuracy(fp32, ref)["cosine"] > 0.9995


def test_config_validation():
    with pytest.raises(ValueError, match="qk_dtype"):
        QuantConfig(qk_dtype="int2")
    with pytest.raises(ValueError, match="granularity"):
        QuantConfig(granularity="row")
    with pytest.raises(ValueError, match="pv_accum"):
        QuantConfig(pv_dtype="fp8", pv_accum="fp16")
    with pytest.raises(TypeError, match="smooth_k"):
        QuantConfig(smooth_k="yes")
    with pytest.raises(Exception):
        PRESETS["sage1"].smooth_k = False  # frozen
