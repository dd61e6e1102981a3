"""Host (CPU) time per call at a tiny shape, where the GPU work is negligible: what
limits short sequences. Calls are issued back to back and synchronized once, so the
time per call is the host's.

    PYTHONPATH=src python3 bench/host_overhead.py
"""

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import qattn
from qattn import PRESETS
from qattn.kernels import attention as attn
from qattn.kernels import attention_forward, block_config, quantize_kv
from qattn.timing import median_ms


def per_call_us(fn, calls=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main():
    q, k, v = (torch.randn(1, 1, 128, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cfg = PRESETS["sage2-8b"]

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    rows = {
        "qattn.sageattn (whole call)": lambda: qattn.sageattn(q, k, v),
        "qattn.sdpa": lambda: qattn.sdpa(q, k, v),
        "kernels.attention_forward": lambda: attention_forward(q, k, v, cfg, sm_scale=None),
        "kernels.quantize_kv alone": lambda: quantize_kv(k, v, cfg),
        "torch.ops.qattn.attention": lambda: torch.ops.qattn.attention(
            q, k, v, None, "int8", "warp", True, False, "fp8", "fp32", False, 0.088, None, False, False),
        "SDPA cuDNN": cudnn,
        "SDPA default": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    print("| call | host us/call |\n| --- | --- |")
    for name, fn in rows.items():
        print(f"| {name} | {per_call_us(fn):.1f} |")
    tma_cost(cfg)


def tma_cost(cfg):
    """TMA descriptors on and off: host time at a tiny shape, and the whole call at
    [4, 32, N, 128] (median of CUDA-event timings), where short N is host-bound."""
    table = block_config(128, False, "cuda", cfg)
    q, k, v = (torch.randn(1, 1, 128, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    print("\n| K/V loads | host us/call | whole call ms, N=1024 | N=2048 | N=4096 |\n| --- | --- | --- | --- | --- |")
    big = {n: [tuple(torch.randn(4, 32, n, 128, device="cuda", dtype=torch.bfloat16)
                     for _ in range(3)) for _ in range(2)] for n in (1024, 2048, 4096)}
    for use_tma in (False, True):
        attn._BLOCK_OVERRIDE = table._replace(tma=use_tma)
        host = per_call_us(lambda: attention_forward(q, k, v, cfg, sm_scale=None))
        ms = [median_ms(lambda *x: attention_forward(*x, cfg, sm_scale=None), sets, repeats=30)
              for sets in big.values()]
        print(f"| {'TMA' if use_tma else 'pointers'} | {host:.1f} | " + " | ".join(f"{m:.3f}" for m in ms) + " |")
    attn._BLOCK_OVERRIDE = None


if __name__ == "__main__":
    main()
