"""The public API on the CPU: layouts, GQA, LSE, presets, validation, sdpa fallback."""

import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import make_qkv

import qattn
from qattn import PRESETS, QuantConfig, sageattn, sdpa
from qattn.metrics import accuracy
from qattn.reference import exact_attention, sage_attention


@pytest.fixture(autouse=True)
def _reset_default_preset():
    yield
    qattn.set_default_preset(None)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_sageattn_hnd_equals_reference(is_causal, hkv):
    q, k, v = make_qkv(2, 4, hkv, 33, 70, 64, seed=hkv)
    out, lse = sageattn(q, k, v, is_causal=is_causal, return_lse=True)
    ref, ref_lse = sage_attention(q, k, v, PRESETS["sage2-8b"], return_lse=True,
                                  causal_offset=70 - 33 if is_causal else None)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    assert lse.shape == (2, 4, 33) and lse.dtype == torch.float32


def test_sageattn_nhd_matches_hnd():
    q, k, v = make_qkv(2, 4, 2, 50, 50, 32, seed=1)
    out_hnd = sageattn(q, k, v, tensor_layout="HND", is_causal=True)
    out_nhd, lse = sageattn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                            tensor_layout="NHD", is_causal=True, return_lse=True)
    assert out_nhd.shape == (2, 50, 4, 32) and lse.shape == (2, 4, 50)
    assert torch.equal(out_nhd.transpose(1, 2), out_hnd)


def test_sageattn_bottom_right_causal_is_chunked_prefill():
    """A chunk of new queries at the end of a KV cache equals the tail of the full call."""
    q, k, v = make_qkv(1, 2, 2, 200, 200, 64, seed=2)
    full = sageattn(q, k, v, is_causal=True, preset="sage1")
    chunk = sageattn(q[:, :, 150:], k, v, is_causal=True, preset="sage1")
    ref, _ = exact_attention(q, k, v, causal_offset=0)
    assert accuracy(chunk, ref[:, :, 150:])["cosine"] > 0.9995
    assert accuracy(chunk, full[:, :, 150:])["cosine"] > 0.9995


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_by_name_and_by_config(preset):
    q, k, v = make_qkv(1, 2, 2, 40, 40, 64, seed=3)
    by_name = sageattn(q, k, v, preset=preset)
    by_config = sageattn(q, k, v, preset=QuantConfig(**{
        f: getattr(PRESETS[preset], f) for f in ("qk_dtype", "granularity", "smooth_k", "smooth_q",
                                                  "pv_dtype", "pv_accum", "smooth_v")}))
    assert torch.equal(by_name, by_config)


def test_options_override_preset_fields_and_original_names():
    q, k, v = make_qkv(1, 2, 2, 40, 80, 64, k_bias=4.0, seed=4)
    got = sageattn(q, k, v, preset="sage2-8b", smooth_k=False, qk_quant_gran="per_thread")
    want = sage_attention(q, k, v, PRESETS["sage2-8b"].replace(smooth_k=False, granularity="token"))
    assert torch.equal(got, want)
    got = sageattn(q, k, v, preset="sage1", pv_accum_dtype="fp32")
    assert torch.equal(got, sage_attention(q, k, v, PRESETS["sage1"].replace(pv_accum="fp32")))


def test_set_default_preset():
    q, k, v = make_qkv(1, 2, 2, 40, 40, 64, seed=5)
    qattn.set_default_preset("sage1")
    assert torch.equal(sageattn(q, k, v), sageattn(q, k, v, preset="sage1"))
    assert torch.equal(sdpa(q, k, v), sageattn(q, k, v, preset="sage1"))
    with pytest.raises(ValueError, match="preset"):
        qattn.set_default_preset("sage3")


def test_fp32_inputs_and_dv_differs():
    q, k, v = make_qkv(1, 2, 2, 30, 60, 64, dv=40, dtype=torch.float32, seed=6)
    out = sageattn(q, k, v)
    ref, _ = exact_attention(q, k, v)
    assert out.shape == (1, 2, 30, 40) and out.dtype == torch.float32
    assert accuracy(out, ref)["cosine"] > 0.999


def test_inputs_requiring_grad_are_refused_but_fine_under_no_grad():
    q, k, v = make_qkv(1, 2, 2, 16, 16, 32)
    q.requires_grad_(True)
    with pytest.raises(ValueError, match="require grad"):
        sageattn(q, k, v)
    with torch.no_grad():
        assert sageattn(q, k, v).shape == q.shape


# -- validation: each error names the argument, what was given and what is accepted --

def _good():
    return list(make_qkv(1, 4, 2, 8, 8, 32))


@pytest.mark.parametrize("change,exc,pattern", [
    (lambda a: a.update(q=a["q"].double()), TypeError, r"q: dtype torch.float64 .*accepted"),
    (lambda a: a.update(k=a["k"].half()), TypeError, r"k, v: dtypes must equal q's"),
    (lambda a: a.update(v=a["v"][0]), ValueError, r"v: expected a 4-D tensor"),
    (lambda a: a.update(q=a["q"].tolist()), TypeError, r"q: expected a torch.Tensor"),
    (lambda a: a.update(tensor_layout="BHND"), ValueError, r"tensor_layout: got 'BHND'; accepted: 'HND', 'NHD'"),
    (lambda a: a.update(q=a["q"][:, :3]), ValueError, r"number of heads \(2\) must divide q's \(3\)"),
    (lambda a: a.update(k=a["k"][..., :16], v=a["v"][..., :16]), ValueError, r"k: head dim must equal q's \(32\)"),
    (lambda a: a.update(v=a["v"][:, :, :5]), ValueError, r"v: must match k"),
    (lambda a: a.update(k=a["k"].expand(2, -1, -1, -1), v=a["v"].expand(2, -1, -1, -1)), ValueError, r"batch size"),
    (lambda a: a.update(k=a["k"].to("meta")), ValueError, r"k, v: must be on q's device"),
    (lambda a: a.update(preset="sage3"), ValueError, r"preset: got 'sage3'; accepted: 'sage1'"),
    (lambda a: a.update(qk_bits=4), TypeError, r"unexpected option\(s\) 'qk_bits'"),
    (lambda a: a.update(granularity="row"), ValueError, r"granularity: got 'row'"),
    (lambda a: a.update(qk_quant_gran="per_row"), ValueError, r"qk_quant_gran: got 'per_row'"),
    (lambda a: a.update(is_causal=1), TypeError, r"is_causal: expected True or False"),
    (lambda a: a.update(sm_scale="0.1"), TypeError, r"sm_scale: expected a finite number"),
    (lambda a: a.update(sm_scale=float("nan")), TypeError, r"sm_scale"),
    (lambda a: a.update(**dict(zip("qkv", make_qkv(1, 2, 2, 4, 4, 300)))), ValueError, r"head dims must be in 1..256"),
    (lambda a: a.update(attn_mask=torch.ones(1, 4, 8, 9, dtype=torch.bool)), ValueError, r"attn_mask: shape \(1, 4, 8, 9\) does not broadcast to \[B, Hq, Nq, Nk\] = \[1, 4, 8, 8\]"),
    (lambda a: a.update(attn_mask=torch.ones(2, 1, 4, 8, 8, dtype=torch.bool)), ValueError, r"attn_mask: shape .* does not broadcast"),
    (lambda a: a.update(attn_mask=torch.ones(8, 8, dtype=torch.int64)), TypeError, r"attn_mask: dtype torch.int64 is not supported"),
    (lambda a: a.update(attn_mask=[[True]]), TypeError, r"attn_mask: expected a torch.Tensor or None"),
    (lambda a: a.update(decode="always"), ValueError, r"decode: got 'always'; accepted: 'auto', 'quantized', 'sdpa'"),
    (lambda a: a.update(decode="sdpa", return_lse=True), ValueError, r"decode='sdpa'.*cannot return the LSE"),
])
def test_validation_errors(change, exc, pattern):
    q, k, v = _good()
    args = {"q": q, "k": k, "v": v}
    change(args)
    with pytest.raises(exc, match=pattern):
        sageattn(**args)


# -- sdpa: torch's contract --

@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_is_quantized_with_top_left_causal(is_causal):
    q, k, v = make_qkv(2, 4, 4, 60, 90, 64, seed=8)
    out = sdpa(q, k, v, is_causal=is_causal)
    want = sage_attention(q, k, v, PRESETS["sage2-8b"], causal_offset=0 if is_causal else None)
    assert torch.equal(out, want)
    torch_out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=is_causal)
    assert accuracy(out, torch_out)["cosine"] > 0.999


def test_sdpa_gqa_3d_scale_and_mask():
    q, k, v = make_qkv(2, 4, 2, 40, 50, 32, seed=9)
    out = sdpa(q, k, v, enable_gqa=True, scale=0.3)
    torch_out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True, scale=0.3)
    assert accuracy(out, torch_out)["cosine"] > 0.999
    out3 = sdpa(q[:, 0], k[:, 0], v[:, 0])
    assert out3.shape == (2, 40, 32)
    assert torch.equal(out3, sdpa(q[:, :1], k[:, :1], v[:, :1])[:, 0])
    mask = torch.rand(2, 1, 40, 50, generator=torch.Generator().manual_seed(0)) > 0.5
    out = sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
    torch_out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    assert accuracy(out, torch_out)["cosine"] > 0.999


@pytest.mark.parametrize("case", ["dropout", "grad", "float64", "rank5", "gqa_without_flag"])
def test_sdpa_falls_back_to_torch_and_says_why_once(case, caplog):
    q, k, v = make_qkv(1, 4, 4, 16, 16, 32, dtype=torch.float32, seed=10)
    kwargs = {}
    if case == "dropout":
        kwargs["dropout_p"] = 0.5
    elif case == "grad":
        q.requires_grad_(True)
    elif case == "float64":
        q, k, v = q.double(), k.double(), v.double()
    elif case == "rank5":
        q, k, v = q[None], k[None], v[None]
    else:
        k, v = k[:, :2], v[:, :2]
    qattn.ops._logged.clear()
    with caplog.at_level(logging.WARNING, logger="qattn"):
        torch.manual_seed(0)
        if case == "gqa_without_flag":
            with pytest.raises(RuntimeError):  # torch's own error, as without qattn
                F.scaled_dot_product_attention(q, k, v)
            with pytest.raises(RuntimeError):
                sdpa(q, k, v)
            return
        out = sdpa(q, k, v, **kwargs)
        sdpa(q, k, v, **kwargs)
    torch.manual_seed(0)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, **kwargs))
    messages = [r.getMessage() for r in caplog.records if "using torch SDPA" in r.getMessage()]
    assert len(messages) == 1, messages
    if case == "grad":
        out.sum().backward()
        assert q.grad is not None


def test_monkey_patching_torch_with_sdpa_does_not_recurse_on_fallback(monkeypatch):
    q, k, v = make_qkv(1, 2, 2, 16, 16, 32, dtype=torch.float32, seed=11)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    torch.manual_seed(0)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)  # falls back to torch
    torch.manual_seed(0)
    assert torch.equal(out, qattn.api._torch_sdpa(q, k, v, dropout_p=0.3))
    assert torch.equal(F.scaled_dot_product_attention(q, k, v, preset="sage1"),
                       sageattn(q, k, v, preset="sage1", is_causal=False))


def test_default_preset_may_be_a_config():
    q, k, v = make_qkv(1, 2, 2, 40, 40, 64, seed=12)
    config = QuantConfig(granularity="token", smooth_v=True)
    qattn.set_default_preset(config)
    assert torch.equal(sdpa(q, k, v), sage_attention(q, k, v, config))
    assert torch.equal(sageattn(q, k, v), sage_attention(q, k, v, config))


def test_readme_support_table_matches_the_code():
    """The README's "What is supported" claims, checked against the code."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme[readme.index("## What is supported"):].split("\n\n")[1]
    assert f"| head dims | 1..{qattn.api.MAX_HEAD_DIM} " in table
    assert "fp16, bf16, fp32 in" in table and qattn.api.SUPPORTED_DTYPES == (
        torch.float16, torch.bfloat16, torch.float32)
    for name in PRESETS:
        assert f"`{name}`" in table
    q, k, v = make_qkv(1, 2, 1, 8, 8, 256)  # GQA, largest head dim
    assert sageattn(q, k, v).shape == q.shape
    with pytest.raises(ValueError):
        sageattn(*make_qkv(1, 2, 2, 8, 8, qattn.api.MAX_HEAD_DIM + 1))


# -- short queries (decode) --

@pytest.mark.parametrize("nq,is_causal", [(1, True), (5, True), (5, False), (16, True)])
def test_decode_sdpa_keeps_the_bottom_right_contract(nq, is_causal):
    """decode='sdpa' (what "auto" picks for Nq <= 16 on a GPU) computes sageattn's
    contract with torch's SDPA: GQA, bottom-right causal, NHD."""
    q, k, v = make_qkv(2, 8, 2, nq, 40, 64, seed=nq)
    out = sageattn(q, k, v, is_causal=is_causal, decode="sdpa")
    exact, _ = exact_attention(q, k, v, causal_offset=40 - nq if is_causal else None)
    assert accuracy(out, exact)["cosine"] > 0.99999
    quantized = sageattn(q, k, v, is_causal=is_causal, decode="quantized")
    assert accuracy(quantized, exact)["cosine"] > 0.999 and not torch.equal(quantized, out)
    nhd = sageattn(*(x.transpose(1, 2) for x in (q, k, v)), tensor_layout="NHD",
                   is_causal=is_causal, decode="sdpa")
    assert nhd.shape == (2, nq, 8, 64) and torch.equal(nhd.transpose(1, 2), out)


def test_decode_auto_is_quantized_on_the_cpu():
    q, k, v = make_qkv(1, 2, 2, 1, 30, 32, seed=4)
    assert torch.equal(sageattn(q, k, v), sageattn(q, k, v, decode="quantized"))


# -- varlen --

def _packed(lens_q, lens_k, hq=4, hkv=2, d=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), hq, d, generator=gen).bfloat16()
    k = torch.randn(sum(lens_k), hkv, d, generator=gen).bfloat16()
    v = torch.randn(sum(lens_k), hkv, d, generator=gen).bfloat16()
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("is_causal", [False, True])
def test_sageattn_varlen_is_sageattn_per_sequence(is_causal):
    lens_q, lens_k = [3, 50, 0, 20], [10, 50, 4, 20]
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, seed=1)
    out, lse = qattn.sageattn_varlen(q, k, v, cu_q, cu_k, 50, 50, is_causal=is_causal,
                                     return_lse=True)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    for b in range(4):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if q1 == q0:
            continue
        alone, alone_lse = sageattn(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                                    tensor_layout="NHD", is_causal=is_causal, return_lse=True)
        assert torch.equal(out[q0:q1], alone[0]) and torch.equal(lse[:, q0:q1], alone_lse[0])


def _good_varlen():
    q, k, v, cu_q, cu_k = _packed([3, 5], [4, 6])
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=6)


@pytest.mark.parametrize("change,exc,pattern", [
    (lambda a: a.update(q=a["q"][None]), ValueError, r"q: expected a packed 3-D tensor"),
    (lambda a: a.update(k=a["k"].half()), TypeError, r"k, v: dtypes must equal q's"),
    (lambda a: a.update(v=a["v"][:-1]), ValueError, r"v: must match k in tokens and heads"),
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].float()), ValueError, r"cu_seqlens_q: expected a 1-D int32/int64"),
    (lambda a: a.update(cu_seqlens_k=[0, 4, 10]), TypeError, r"cu_seqlens_k: expected a torch.Tensor"),
    (lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"][:2]), ValueError, r"must have the same length"),
    (lambda a: a.update(cu_seqlens_q=torch.tensor([0, 9, 8], dtype=torch.int32)), ValueError, r"cu_seqlens_q: must start at 0, never decrease and end at the number of tokens \(8\)"),
    (lambda a: a.update(cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, r"cu_seqlens_k: must start at 0"),
    (lambda a: a.update(max_seqlen_k=5), ValueError, r"max_seqlen_k: 5 is less than the longest sequence \(6\)"),
    (lambda a: a.update(max_seqlen_q=5.0), TypeError, r"max_seqlen_q: expected an int >= 0"),
    (lambda a: a.update(q=a["q"][:, :3]), ValueError, r"number of heads \(2\) must divide q's \(3\)"),
    (lambda a: a.update(is_causal="yes"), TypeError, r"is_causal: expected True or False"),
    (lambda a: a.update(preset="sage3"), ValueError, r"preset: got 'sage3'"),
])
def test_sageattn_varlen_validation(change, exc, pattern):
    args = _good_varlen()
    change(args)
    with pytest.raises(exc, match=pattern):
        qattn.sageattn_varlen(**args)


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_sageattn_takes_masks_like_sdpa(layout):
    """attn_mask in sageattn: [B, Hq, Nq, Nk] order in either layout, combined with the
    bottom-right causal mask; a row with no kept key gives zeros."""
    q, k, v = make_qkv(2, 4, 2, 30, 50, 32, seed=12)
    keep = torch.rand(2, 1, 30, 50, generator=torch.Generator().manual_seed(3)) > 0.4
    keep[1, 0, 7] = False
    args = (q, k, v) if layout == "HND" else tuple(x.transpose(1, 2) for x in (q, k, v))
    out = sageattn(*args, tensor_layout=layout, is_causal=True, attn_mask=keep)
    out = out if layout == "HND" else out.transpose(1, 2)
    ref = sage_attention(q, k, v, PRESETS["sage2-8b"], causal_offset=20, attn_mask=keep)
    assert torch.equal(out, ref)
    assert torch.equal(out[1, :, 7], torch.zeros_like(out[1, :, 7]))
    exact, _ = exact_attention(q, k, v, causal_offset=20, attn_mask=keep)
    assert accuracy(out, exact)["cosine"] > 0.999
