"""Kernel-level timing of qattn.kernels.attention_forward (GPU only).

    PYTHONPATH=src python3 bench/kernel_sweep.py sweep   # block-size sweep at N=4096
    PYTHONPATH=src python3 bench/kernel_sweep.py table   # TOPS table vs SDPA cuDNN / flash
    PYTHONPATH=src python3 bench/kernel_sweep.py masks   # mask variants (block skipping on/off)
    PYTHONPATH=src python3 bench/kernel_sweep.py tma     # TMA descriptor loads vs pointer loads

Whole call timed (K/V quantization launch included), triton.testing.do_bench median.
TOPS = 4 * B * H * N^2 * D / time, halved for causal.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from qattn.kernels import attention as attn
from qattn.kernels import quantize_kv
from qattn.presets import PRESETS

B, H = 4, 32


def inputs(n, d, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(B, H, n, d, device="cuda", dtype=dtype, generator=g) for _ in range(3)]


def tops(ms, n, d, causal):
    flops = 4 * B * H * n * n * d * (0.5 if causal else 1.0)
    return flops / (ms * 1e-3) / 1e12


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def run_qattn(q, k, v, preset, causal):
    cfg = PRESETS[preset]
    return lambda: attn.attention_forward(q, k, v, cfg, sm_scale=None, causal_offset=0 if causal else None)


def info():
    """Compile the main variants once and print registers, spills, shared memory, MMA kinds."""
    rows = []
    for d in (128, 64):
        q, k, v = inputs(1024, d)
        for preset in ("sage2-8b", "sage1"):
            for causal in (False, True):
                run_qattn(q, k, v, preset, causal)()
    torch.cuda.synchronize()
    for jit_fn in (attn._attn_fwd_kernel, attn.quantize_kv.__globals__["_quantize_kv_kernel"]):
        caches = getattr(jit_fn, "device_caches", {})
        for dev_cache in caches.values():
            kernel_cache = dev_cache[0] if isinstance(dev_cache, tuple) else dev_cache
            for key, kern in kernel_cache.items():
                ptx = kern.asm.get("ptx", "")
                consts = {k2: v2 for k2, v2 in getattr(kern.src, "constants", {}).items() if not isinstance(k2, tuple)} if hasattr(kern, "src") else {}
                row = dict(name=jit_fn.__name__, regs=getattr(kern, "n_regs", None), spills=getattr(kern, "n_spills", None),
                           shared=getattr(kern.metadata, "shared", None), wgmma=ptx.count("wgmma.mma_async"),
                           mma_sync=ptx.count("mma.sync"), e4m3=ptx.count(".e4m3"), s8=ptx.count(".s8"),
                           consts=str(consts)[:300])
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def sweep():
    from qattn.kernels import quantize as quant_mod

    results = []
    BC = attn.BlockConfig
    plan = {
        (64, "sage2-8b"): [BC(64, 128, 4, 3), BC(64, 64, 4, 3), BC(128, 64, 4, 3), BC(128, 128, 4, 3)],
        (128, "sage1"): [BC(64, 128, 4, 3), BC(128, 128, 8, 3)],
        (128, "sage2-8b"): [BC(64, 128, 4, 4), BC(64, 128, 4, 3)],
    }
    quant_plan = {128: ((128, 8), (256, 8), (256, 16), (128, 16), (128, 4)), 64: ((128, 4), (256, 8), (256, 4))}
    for (d, preset), cands in plan.items():
        q, k, v = inputs(4096, d)
        for causal in (False, True):
            for cand in cands:
                attn._BLOCK_OVERRIDE = cand
                try:
                    t0 = time.time()
                    fn = run_qattn(q, k, v, preset, causal)
                    fn()
                    torch.cuda.synchronize()
                    ms = bench(fn)
                    row = dict(d=d, causal=causal, preset=preset, cfg=tuple(cand), ms=round(ms, 4),
                               tops=round(tops(ms, 4096, d, causal)), wall=round(time.time() - t0, 1))
                except Exception as err:  # noqa: BLE001
                    row = dict(d=d, causal=causal, preset=preset, cfg=tuple(cand), error=repr(err)[:300])
                results.append(row)
                print(json.dumps(row), flush=True)
        attn._BLOCK_OVERRIDE = None
        if preset == "sage2-8b":
            for n in (1024, 4096):
                kq, vq = inputs(n, d)[:2]
                for qo in quant_plan[d]:
                    quant_mod._QUANT_OVERRIDE = qo
                    try:
                        ms = bench(lambda: quantize_kv(kq, vq, PRESETS[preset]))
                        row = dict(d=d, n=n, quant=qo, ms=round(ms, 4),
                                   gbps=round(kq.numel() * 2 * (2 * 2 + 1) / ms / 1e6))
                    except Exception as err:  # noqa: BLE001
                        row = dict(d=d, n=n, quant=qo, error=repr(err)[:300])
                    results.append(row)
                    print(json.dumps(row), flush=True)
            quant_mod._QUANT_OVERRIDE = None
    return results


def table():
    rows = []
    print("| D | causal | N | qattn sage2-8b | qattn sage1 | quant only (ms) | SDPA cuDNN | SDPA flash |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for d in (128, 64):
        for causal in (False, True):
            for n in (1024, 4096):
                q, k, v = inputs(n, d)
                r = dict(d=d, causal=causal, n=n)
                for preset in ("sage2-8b", "sage1"):
                    fn = run_qattn(q, k, v, preset, causal)
                    fn()
                    r[preset] = tops(bench(fn), n, d, causal)
                r["quant_ms"] = bench(lambda: quantize_kv(k, v, PRESETS["sage2-8b"]))
                for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                    try:
                        with sdpa_kernel(backend):
                            f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
                            f()
                            r[name] = tops(bench(f), n, d, causal)
                    except Exception as err:  # noqa: BLE001
                        r[name] = float("nan")
                        print("sdpa", name, repr(err)[:200])
                rows.append(r)
                print(f"| {d} | {'yes' if causal else 'no'} | {n} | {r['sage2-8b']:.0f} | {r['sage1']:.0f} | "
                      f"{r['quant_ms']:.3f} | {r['cudnn']:.0f} | {r['flash']:.0f} |", flush=True)
    return rows


def masks():
    """Masked calls at D=128, sage2-8b: a [B,1,1,N] key-padding mask (25% padded, and 0%
    padded: the cost of reading a mask), a general [B,1,N,N] mask with the same padding,
    with the skipping of fully masked blocks on and off; unmasked and cuDNN beside."""
    rows = []
    cfg = PRESETS["sage2-8b"]
    print("| N | variant | qattn ms | TOPS (unmasked work) | cuDNN ms (same mask) | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n, batch in ((4096, 4), (16384, 1)):
        g = torch.Generator(device="cuda").manual_seed(1)
        q, k, v = (torch.randn(batch, H, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        flops = 4 * batch * H * n * n * 128
        pad25 = torch.ones(batch, 1, 1, n, dtype=torch.bool, device="cuda")
        pad25[..., n - n // 4:] = False
        variants = {
            "unmasked": (None, True),
            "key pad 0%": (torch.ones_like(pad25), True),
            "key pad 25%, skip": (pad25, True),
            "key pad 25%, no skip": (pad25, False),
            "[B,1,N,N] pad 25%, skip": (pad25.expand(batch, 1, n, n).contiguous(), True),
            "[B,1,N,N] pad 25%, no skip": (pad25.expand(batch, 1, n, n).contiguous(), False),
        }
        for name, (mask, skip) in variants.items():
            attn._SKIP_EMPTY_BLOCKS = skip
            fn = lambda: attn.attention_forward(q, k, v, cfg, sm_scale=None, attn_mask=mask)  # noqa: E731
            fn()
            ms = bench(fn)
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                ref = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
                try:
                    ref()
                    cudnn_ms = bench(ref)
                except Exception as err:  # noqa: BLE001
                    cudnn_ms = float("nan")
                    print("cudnn refused", name, repr(err)[:120])
            row = dict(n=n, variant=name, ms=ms, tops=flops / ms / 1e9, cudnn_ms=cudnn_ms,
                       ratio=cudnn_ms / ms)
            rows.append(row)
            print(f"| {n} | {name} | {ms:.3f} | {row['tops']:.0f} | {cudnn_ms:.3f} | {row['ratio']:.2f}x |",
                  flush=True)
        attn._SKIP_EMPTY_BLOCKS = True
    return rows


def tma():
    """K/V tiles through TMA descriptors or pointer loads, for a few tilings, N=4096."""
    rows = []
    BC = attn.BlockConfig
    plan = {
        (128, "sage2-8b"): [BC(64, 128, 4, 3), BC(128, 128, 8, 3), BC(128, 128, 8, 2), BC(64, 128, 4, 4)],
        (64, "sage2-8b"): [BC(64, 128, 4, 3), BC(128, 128, 8, 3)],
        (128, "sage1"): [BC(128, 128, 8, 3)],
    }
    print("| D | preset | causal | tile | pointer loads TOPS | TMA TOPS |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (d, preset), cands in plan.items():
        q, k, v = inputs(4096, d)
        for causal in (False, True):
            for cand in cands:
                row = dict(d=d, preset=preset, causal=causal, cfg=tuple(cand))
                for use_tma in (False, True):
                    attn._BLOCK_OVERRIDE = cand._replace(tma=use_tma)
                    key = "tma" if use_tma else "pointer"
                    try:
                        fn = run_qattn(q, k, v, preset, causal)
                        out = fn()[0]
                        attn._BLOCK_OVERRIDE = cand._replace(tma=False)
                        ref = run_qattn(q, k, v, preset, causal)()[0]
                        attn._BLOCK_OVERRIDE = cand._replace(tma=use_tma)
                        row[key + "_equal"] = bool(torch.equal(out, ref))
                        row[key] = tops(bench(fn), 4096, d, causal)
                    except Exception as err:  # noqa: BLE001
                        row[key] = float("nan")
                        row[key + "_error"] = repr(err)[:300]
                rows.append(row)
                print(f"| {d} | {preset} | {causal} | {tuple(cand)} | {row['pointer']:.0f} | "
                      f"{row['tma']:.0f} (same output: {row.get('tma_equal')}) |", flush=True)
                if "tma_error" in row:
                    print(row["tma_error"])
    attn._BLOCK_OVERRIDE = None
    return rows


if __name__ == "__main__":
    out_dir = os.environ.get("OUT", ".")
    what = sys.argv[1:] or ["table"]
    all_results = {}
    for w in what:
        all_results[w] = {"sweep": sweep, "table": table, "info": info, "masks": masks, "tma": tma}[w]()
    with open(os.path.join(out_dir, f"kernel_{'_'.join(what)}.json"), "w") as f:
        json.dump(all_results, f, indent=1)
