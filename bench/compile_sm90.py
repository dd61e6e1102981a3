"""Compile the Gluon sm_90 kernel for sm_90a without a GPU and report what ptxas made of it.

    PYTHONPATH=src python3 bench/compile_sm90.py [--head-dim 128] [--block-n 128] [--stages 3]
        [--causal] [--lse] [--no-producer-warp] [--sass FILE] [--loop-mix]

Needs a Triton that ``attention_sm90.TESTED_TRITON`` names (its wheel carries ptxas and
cuobjdump). Prints shared memory, registers and spills; --sass writes the disassembly;
--loop-mix counts the SASS instructions of the unmasked main loop by opcode (what the
softmax costs per K/V block and thread: kernel notes, session 5).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

from qattn.kernels import attention_sm90
from qattn.kernels.attention import LOG2_FP8_MAX


def compile_kernel(head_dim: int, block_n: int, stages: int, causal: bool, lse: bool, producer_warp: bool = True):
    from triton.experimental.gluon._runtime import GluonASTSource

    gl = attention_sm90.gl
    fn = attention_sm90._sage_fwd_sm90
    names = list(inspect.signature(fn.fn).parameters)
    k_layout = gl.NVMMASharedLayout.get_default_for([block_n, head_dim], gl.int8)
    v_layout = gl.NVMMASharedLayout.get_default_for([head_dim, block_n], gl.float8e4nv)
    constexprs = dict(HEAD_DIM=head_dim, DPAD=head_dim, BLOCK_N=block_n, Q_GROUP=16, STAGES=stages, CAUSAL=causal,
                      SMOOTH_K=True, SMOOTH_V=False, RETURN_LSE=lse, P_SHIFT=LOG2_FP8_MAX,
                      PRODUCER_WARP=producer_warp, num_warps=4)
    types = {"Q": "*bf16", "O": "*bf16", "K_scale": "*fp32", "Stats": "*fp32", "LSE": "*fp32",
             "k_desc": f"tensordesc<i8[{block_n}, {head_dim}],{k_layout!r}>",
             "v_desc": f"tensordesc<fp8e4nv[{head_dim}, {block_n}],{v_layout!r}>",
             "score_scale": "fp32", "sm_scale": "fp32"}
    # as the JIT specializes a contiguous bf16 [B, H, N, D] call: unit last strides become
    # constants, pointers and the other strides are known multiples of 16
    constexprs.update(stride_qd=1, stride_od=1)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    divisible = [n for n in names if n in ("Q", "O", "K_scale", "Stats", "LSE") or n.startswith("stride_")]
    source = GluonASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                            attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible
                                   if n not in constexprs})
    # the launch's register budget (attention_sm90.launch)
    maxnreg = attention_sm90.HopperConfig(block_n, stages, producer_warp).maxnreg
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": maxnreg})


def loop_mix(sass: str) -> tuple[int, collections.Counter]:
    """Instructions of the first loop (a backward branch) whose body has both the INT8
    (IGMMA) and the FP8 (QGMMA) wgmma: its length and the count of each opcode."""
    code = [(int(m.group(1), 16), m.group(2).strip())
            for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    index = {address: i for i, (address, _) in enumerate(code)}
    for i, (address, text) in enumerate(code):
        target = re.search(r"BRA (0x[0-9a-f]+)", text)
        if target is None or int(target.group(1), 16) >= address or int(target.group(1), 16) not in index:
            continue
        body = [t for _, t in code[index[int(target.group(1), 16)]:i + 1]]
        if any("IGMMA" in t for t in body) and any("QGMMA" in t for t in body):
            ops = (t.split()[1] if t.startswith("@") else t.split()[0] for t in body)
            return len(body), collections.Counter(op.split(".")[0] for op in ops)
    raise ValueError("no loop with both wgmma kinds in this SASS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
    parser.add_argument("--block-n", type=int, default=128, choices=(64, 128))
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--lse", action="store_true")
    parser.add_argument("--no-producer-warp", action="store_true",
                        help="the consumer warpgroup issues the K/V loads (the D=64 form)")
    parser.add_argument("--sass", help="write the SASS disassembly here")
    parser.add_argument("--loop-mix", action="store_true",
                        help="print the instruction mix of the main loop (the first loop with both kinds of wgmma)")
    args = parser.parse_args()
    if not attention_sm90.AVAILABLE:
        raise SystemExit(f"triton {triton.__version__} is not one of {attention_sm90.TESTED_TRITON}")
    kernel = compile_kernel(args.head_dim, args.block_n, args.stages, args.causal, args.lse,
                            not args.no_producer_warp)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        cubin = os.path.join(tmp, "k.cubin")
        report = subprocess.run([os.path.join(tools, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o", cubin],
                                capture_output=True, text=True, check=True).stderr
        if args.sass or args.loop_mix:
            sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin],
                                  capture_output=True, text=True, check=True).stdout
        if args.sass:
            with open(args.sass, "w") as f:
                f.write(sass)
    print(f"shared memory: {kernel.metadata.shared} bytes")
    print("\n".join(line.strip() for line in report.splitlines() if "registers" in line or "spill" in line
                    or "C75" in line))
    if args.loop_mix:
        length, ops = loop_mix(sass)
        print(f"main loop: {length} instructions per K/V block and thread")
        print(" ".join(f"{op}:{n}" for op, n in ops.most_common()))


if __name__ == "__main__":
    main()
