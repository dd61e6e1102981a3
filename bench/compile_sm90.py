"""Compile the Gluon sm_90 kernel for sm_90a without a GPU and report what ptxas made of it.

    PYTHONPATH=src python3 bench/compile_sm90.py [--head-dim 128] [--block-n 128] [--stages 3]
        [--causal] [--lse] [--sass FILE]

Needs a Triton that ``attention_sm90.TESTED_TRITON`` names (its wheel carries ptxas and
cuobjdump). Prints shared memory, registers and spills, and with --sass writes the
disassembly (where ptxas placed the wgmma issues, WARPGROUP.ARRIVE, relative to the
MUFU.EX2 of the softmax: kernel notes, session 4).
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

from qattn.kernels import attention_sm90
from qattn.kernels.attention import LOG2_FP8_MAX


def compile_kernel(head_dim: int, block_m: int, block_n: int, stages: int, causal: bool, lse: bool):
    from triton.experimental.gluon._runtime import GluonASTSource

    gl = attention_sm90.gl
    fn = attention_sm90._sage_fwd_sm90
    names = list(inspect.signature(fn.fn).parameters)
    k_layout = gl.NVMMASharedLayout.get_default_for([block_n, head_dim], gl.int8)
    v_layout = gl.NVMMASharedLayout.get_default_for([head_dim, block_n], gl.float8e4nv)
    constexprs = dict(HEAD_DIM=head_dim, DPAD=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, Q_GROUP=16,
                      K_GROUP=64, STAGES=stages, CAUSAL=causal, SMOOTH_K=True, SMOOTH_V=False, RETURN_LSE=lse,
                      P_SHIFT=LOG2_FP8_MAX, num_warps=4 * (block_m // 64))
    types = {"Q": "*bf16", "O": "*bf16", "K_scale": "*fp32", "Stats": "*fp32", "LSE": "*fp32",
             "k_desc": f"tensordesc<i8[{block_n}, {head_dim}],{k_layout!r}>",
             "v_desc": f"tensordesc<fp8e4nv[{head_dim}, {block_n}],{v_layout!r}>",
             "score_scale": "fp32", "sm_scale": "fp32"}
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    source = GluonASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": constexprs["num_warps"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
    parser.add_argument("--block-m", type=int, default=64, choices=(64, 128))
    parser.add_argument("--block-n", type=int, default=128, choices=(64, 128))
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--lse", action="store_true")
    parser.add_argument("--sass", help="write the SASS disassembly here")
    args = parser.parse_args()
    if not attention_sm90.AVAILABLE:
        raise SystemExit(f"triton {triton.__version__} is not one of {attention_sm90.TESTED_TRITON}")
    kernel = compile_kernel(args.head_dim, args.block_m, args.block_n, args.stages, args.causal, args.lse)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        cubin = os.path.join(tmp, "k.cubin")
        report = subprocess.run([os.path.join(tools, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o", cubin],
                                capture_output=True, text=True, check=True).stderr
        if args.sass:
            with open(args.sass, "w") as f:
                f.write(subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin],
                                       capture_output=True, text=True, check=True).stdout)
    print(f"shared memory: {kernel.metadata.shared} bytes")
    print("\n".join(line.strip() for line in report.splitlines() if "registers" in line or "spill" in line
                    or "C75" in line))


if __name__ == "__main__":
    main()
