"""Compile the modulation Triton kernels for sm_90 on a CPU-only machine and print ptxas's
register / spill report per launch configuration. Usage:
    PYTHONPATH=. python tools/triton_regs_modulation.py"""
import inspect
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fused_dit_ops.kernels import modulation as m

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
INT_NO_DIV = {"L", "B"}  # runtime ints that are not multiples of 16 in general


def report(kernel, consts, num_warps, dtype="bf16"):
    names = list(inspect.signature(kernel.fn).parameters)
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in consts:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = "*i32" if n == "idx_ptr" else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n == "eps":
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if n not in INT_NO_DIV:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(c.asm["ptx"])
    out = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    lines = [ln.split("info    :")[-1].strip() for ln in out.stderr.splitlines() if "registers" in ln or "spill" in ln]
    ptx = c.asm["ptx"]
    v4 = ptx.count("ld.global.v4") + ptx.count("ld.global.L1::evict_first.v4") + ptx.count("ld.global.L1::evict_last.v4")
    print(f"{kernel.fn.__name__:42s} w={num_warps:2d} {consts} | {' | '.join(lines)} | ld.v4~{v4} st.v4 {ptx.count('st.global.v4')}")


if __name__ == "__main__":
    for bm, it, w, g in [(1, 1, 8, False), (4, 1, 16, False), (1, 1, 4, True), (1, 1, 8, True)]:
        c = dict(HAS_INDEX=True, HAS_WEIGHT=False, HAS_BIAS=False, IS_RMS=False, BLOCK_M=bm, BLOCK_C=4096, ITERS=it,
                 PARAM_GATHER=g, STREAM_STORES=True)
        report(m._norm_scale_shift_kernel, c, w)
    for bm, it, w, g in [(1, 1, 8, False), (1, 1, 4, True)]:
        report(m._gate_residual_norm_scale_shift_kernel,
               dict(HAS_INDEX=True, BLOCK_M=bm, BLOCK_C=4096, ITERS=it, PARAM_GATHER=g, STREAM_STORES=True), w)
    for bm, bc, w in [(4, 1024, 4), (2, 1024, 4), (1, 1024, 4)]:
        report(m._scale_shift_gate_kernel, dict(HAS_INDEX=True, BLOCK_M=bm, BLOCK_C=bc, ITERS=1, STREAM_STORES=True, SPLIT_OUTPUTS=True), w)
        report(m._gate_residual_kernel, dict(HAS_INDEX=True, BLOCK_M=bm, BLOCK_C=bc, ITERS=1, STREAM_STORES=False), w)
    sys.exit(0)
