"""The torch.library op: opcheck, torch.compile(fullgraph=True) without graph breaks,
and (on a GPU) CUDA-graph replay equal to eager."""

import pytest
import torch
from helpers import make_qkv
from torch._dynamo.utils import counters

import qattn


@pytest.mark.parametrize("case", ["plain", "mask_nhd_lse"])
def test_opcheck(case, device):
    q, k, v = make_qkv(1, 2, 2, 40, 70, 32, device=device, seed=1)
    mask = None
    if case == "mask_nhd_lse":
        mask = torch.rand(1, 1, 40, 70, generator=torch.Generator().manual_seed(2)).to(device) > 0.3
    args = (q, k, v, mask, "int8", "warp", True, False, "fp8", "fp32", False, 0.2,
            None if mask is None else 0, case != "plain", case != "plain")
    result = torch.library.opcheck(torch.ops.qattn.attention.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def _packed(device, lens=(5, 40, 0, 17), hq=4, hkv=2, d=32, seed=9):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(lens), h, d, generator=gen).to(device, torch.bfloat16)
               for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu, max(lens)


@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_varlen(causal, device):
    q, k, v, cu, longest = _packed(device)
    args = (q, k, v, cu, cu, longest, longest, "int8", "warp", True, False, "fp8", "fp32", False,
            0.2, causal, causal)
    result = torch.library.opcheck(torch.ops.qattn.attention_varlen.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def _compiled_matches_eager(fn, *args):
    torch._dynamo.reset()
    counters.clear()
    backend = "inductor" if args[0].is_cuda else "aot_eager"
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    got = compiled(*args)
    assert dict(counters["graph_break"]) == {}
    return got, fn(*args)


def test_compile_sdpa_in_a_model_has_no_graph_break(device):
    q, k, v = make_qkv(2, 4, 2, 64, 64, 64, device=device, seed=3)
    proj = torch.nn.Linear(64, 64).to(device=device, dtype=q.dtype)

    def block(q, k, v):
        with torch.no_grad():
            return proj(qattn.sdpa(q, k, v, is_causal=True, enable_gqa=True)) + q

    got, want = _compiled_matches_eager(block, q, k, v)
    assert torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_compile_sageattn_with_options_and_lse(device):
    q, k, v = make_qkv(1, 2, 2, 50, 80, 32, device=device, seed=4)

    def call(q, k, v):
        return qattn.sageattn(q, k, v, tensor_layout="NHD", is_causal=True, preset="sage1",
                              smooth_v=True, return_lse=True)

    (out, lse), (out_eager, lse_eager) = _compiled_matches_eager(
        call, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert torch.equal(out, out_eager) and torch.equal(lse, lse_eager)


def test_compile_sageattn_varlen(device):
    q, k, v, cu, longest = _packed(device)

    def call(q, k, v, cu):
        return qattn.sageattn_varlen(q, k, v, cu, cu, longest, longest, is_causal=True,
                                     return_lse=True)

    (out, lse), (out_eager, lse_eager) = _compiled_matches_eager(call, q, k, v, cu)
    assert torch.equal(out, out_eager) and torch.equal(lse, lse_eager)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["sage1", "sage2-8b"])
def test_cuda_graph_replay_equals_eager(preset):
    q, k, v = make_qkv(2, 8, 4, 300, 300, 128, device="cuda", seed=5)
    static = [x.clone() for x in (q, k, v)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles the kernels outside the capture
        qattn.sageattn(*static, is_causal=True, preset=preset)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qattn.sageattn(*static, is_causal=True, preset=preset)
    for seed in (6, 7):  # new data in the static inputs: replay must not be stale
        fresh = make_qkv(2, 8, 4, 300, 300, 128, device="cuda", seed=seed)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, qattn.sageattn(*static, is_causal=True, preset=preset))
