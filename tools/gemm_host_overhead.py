"""Host time per call of the GEMM forms a DiT block uses (GPU, bf16), to see what an eager call
costs on the CPU side: addmm with a bias, mm without one, F.linear, the GELU-epilogue
_addmm_activation, each with torch's default BLAS library and with ``preferred_blas_library``
"cublas" and "cublaslt". Shapes: M tokens x K -> N (a small image's stream). GPU only."""
import argparse
import json
import os

import torch
import torch.nn.functional as F
from block_diag import host_ms  # tools/: the GPU kept busy behind a sleep, so launches never wait
from profile_overhead import per_call_us as wall_us  # tools/: warm-up, then synchronized wall time


def per_call_us(fn, n=300):
    """(host us, wall us) per call."""
    wall = wall_us(fn, n)
    return host_ms(fn, n) * 1e3, wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[208, 2048])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    K, N = 3072, 3072
    rows = []
    default_lib = str(torch.backends.cuda.preferred_blas_library())
    for lib in (None, "cublas", "cublaslt"):
        if lib:
            torch.backends.cuda.preferred_blas_library(lib)
        for M in args.m:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            forms = {
                "addmm(bias)": lambda: torch.addmm(b, x, w.t()),
                "addmm(bias, out=)": lambda: torch.addmm(b, x, w.t(), out=out),
                "mm": lambda: torch.mm(x, w.t()),
                "mm + add_(bias)": lambda: torch.mm(x, w.t()).add_(b),
                "F.linear(bias)": lambda: F.linear(x, w, b),
                "_addmm_activation(gelu)": lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True),
                "torch.add (reference)": lambda: torch.add(out, out),
            }
            for name, fn in forms.items():
                host, wall = per_call_us(fn)
                rows.append({"blas": lib or f"default ({default_lib})", "M": M, "form": name,
                             "host_us": round(host, 1), "wall_us": round(wall, 1)})
                print(f"{rows[-1]['blas']:28s} M={M:5d} {name:26s} host {host:7.1f} us  wall {wall:7.1f} us",
                      flush=True)
    from fused_dit_ops.bench import harness
    with open(os.path.join(args.out, "gemm-host-overhead.json"), "w") as f:
        json.dump({"env": harness.env_info(), "command": "python tools/gemm_host_overhead.py", "K": K, "N": N,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
