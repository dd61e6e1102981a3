"""A/B of the Gluon sm_90 kernel: the working tree's against a baseline revision's (GPU only).

    git show REV:src/qattn/kernels/attention_sm90.py > bench/_baseline_sm90.py
    PYTHONPATH=src OUT=dir python3 bench/sm90_ab.py

First each check case (GQA, odd lengths, causal offsets incl. rows without keys, NHD,
D=72, |x| ~ 1e3) through ``attention_forward`` with either kernel: the largest output
and LSE difference between them, the difference to the reference of the same algorithm
and the accuracy against fp32 attention. Then TOPS of each kernel alone (K/V quantized
beforehand) and of the whole call, beside SDPA cuDNN. Writes sm90_ab.json to $OUT.
"""
import json
import os
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))

from qattn.kernels import attention as attn
from qattn.kernels import attention_sm90 as new
from qattn.kernels import quantize_kv
from qattn.presets import PRESETS
from qattn import reference, metrics
import _baseline_sm90 as old
import kernel_sweep as ks

cfg = PRESETS["sage2-8b"]
new.MIN_WORK = old.MIN_WORK = 0
rows = []
# 1. correctness: new vs old bit-exactness and vs reference
cases = [(2, 8, 2, 1000, 1000, 128, None, 4.0, 1.0, False), (2, 8, 2, 1000, 1000, 128, 0, 4.0, 1.0, True),
         (1, 4, 4, 257, 300, 64, 43, 8.0, 1.0, True), (1, 4, 1, 300, 129, 128, None, 0.0, 1.0, False),
         (1, 4, 4, 64, 4000, 72, 3936, 0.0, 1.0, True), (1, 4, 4, 3000, 100, 128, -50, 0.0, 1.0, True),
         (2, 4, 4, 4096, 4096, 128, None, 0.0, 1.0, False), (1, 2, 2, 2048, 2048, 128, 0, 0.0, 1e3, True),
         (3, 40, 8, 777, 777, 64, 0, 2.0, 1.0, False), (1, 3, 3, 5000, 5000, 128, None, 0.0, 1.0, False),
         (2, 2, 1, 130, 2000, 128, 1870, 1.0, 1.0, True)]
for b, hq, hkv, nq, nk, d, offset, k_bias, mag, nhd in cases:
    g = torch.Generator(device="cuda").manual_seed(nq + nk + d)
    q = torch.randn(b, hq, nq, d, device="cuda", generator=g) * mag
    k = torch.randn(b, hkv, nk, d, device="cuda", generator=g) * mag
    k = k + k_bias * torch.randn(d, device="cuda", generator=g)
    v = torch.randn(b, hkv, nk, d, device="cuda", generator=g) * mag
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    if nhd:
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    row = dict(case=(b, hq, hkv, nq, nk, d, offset, k_bias, mag, nhd))
    try:
        attn.attention_sm90 = new
        out, lse = attn.attention_forward(q, k, v, cfg, sm_scale=None, causal_offset=offset, return_lse=True)
        attn.attention_sm90 = old
        o_old, lse_old = attn.attention_forward(q, k, v, cfg, sm_scale=None, causal_offset=offset, return_lse=True)
        attn.attention_sm90 = new
        same = reference.sage_attention(q, k, v, cfg, causal_offset=offset,
                                        block_kv=attn.softmax_block(cfg, d, offset is not None, q.device))
        exact, _ = reference.exact_attention(q, k, v, causal_offset=offset, dtype=torch.float32)
        row.update(diff_vs_old=(out.float() - o_old.float()).abs().max().item(),
                   rel_vs_old=metrics.relative_l1(out.float(), o_old.float()),
                   kernel=attn.kernel_name(cfg, d, offset is not None, q.device),
                   lse_vs_old=(lse - lse_old).nan_to_num(0.0, 0.0, 0.0).abs().max().item(),
                   diff_vs_ref=(out.float() - same.float()).abs().max().item(),
                   finite=bool(torch.isfinite(out).all()), acc=metrics.accuracy(out.float(), exact))
    except Exception as err:
        row["error"] = repr(err)[:600]
    attn.attention_sm90 = new
    print(row, flush=True)
    rows.append(row)

# 2. timing: kernel alone and whole call, old vs new
print("| D | causal | N | old kernel | new kernel | old whole | new whole | cuDNN | new/cuDNN |")
for d in (128, 64):
    for n in ((1024, 4096, 16384) if d == 128 else (4096,)):
        B = 1 if n >= 16384 else 4
        ks.B = B
        q, k, v = ks.inputs(n, d)
        kv = quantize_kv(k, v, cfg, wgmma_v_order=True)
        out = torch.empty_like(q)
        for causal in (False, True):
            offset = 0 if causal else None
            r = dict(d=d, n=n, causal=causal)
            for name, mod in (("old", old), ("new", new)):
                tiles = mod.hopper_config(d, causal)
                kern = lambda: mod.launch(q, q.stride(), kv, out, out.stride(), None, cfg, tiles,
                                          score_scale=attn.LOG2E / d**0.5, sm_scale=1 / d**0.5, batch=B, hq=32, hkv=32,
                                          nq=n, nk=n, head_dim=d, causal_offset=offset, p_shift=attn.LOG2_FP8_MAX)
                attn.attention_sm90 = mod
                whole = lambda: attn.attention_forward(q, k, v, cfg, sm_scale=None, causal_offset=offset)
                r[name + "_kernel"] = ks.tops(ks.bench(kern), n, d, causal)
                r[name + "_whole"] = ks.tops(ks.bench(whole), n, d, causal)
            attn.attention_sm90 = new
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                r["cudnn"] = ks.tops(ks.bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=causal)), n, d, causal)
            rows.append(r)
            print(f"| {d} | {causal} | {n} | {r['old_kernel']:.0f} | {r['new_kernel']:.0f} | {r['old_whole']:.0f} | "
                  f"{r['new_whole']:.0f} | {r['cudnn']:.0f} | {r['new_whole'] / r['cudnn']:.2f}x |", flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "sm90_ab.json"), "w"), indent=1)
