"""Input makers shared by the tests."""

import torch


def make_qkv(b, hq, hkv, nq, nk, d, *, dtype=torch.bfloat16, device="cpu", seed=0, dv=None,
             k_bias=0.0, q_bias=0.0, magnitude=1.0):
    """Random Q [b,hq,nq,d], K [b,hkv,nk,d], V [b,hkv,nk,dv] (HND), optionally with a
    per-channel bias in K / Q (the outliers real models have) and a magnitude scale."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=gen) * magnitude
    k = torch.randn(b, hkv, nk, d, generator=gen) * magnitude
    v = torch.randn(b, hkv, nk, dv or d, generator=gen)
    if k_bias:
        k = k + k_bias * torch.randn(1, hkv, 1, d, generator=gen)
    if q_bias:
        q = q + q_bias * torch.randn(1, hq, 1, d, generator=gen)
    return (x.to(device=device, dtype=dtype) for x in (q, k, v))
