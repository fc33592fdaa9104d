"""``python -m fused_dit_ops bench rope``: RoPE on q and k of both streams (in place).

Providers (each skipped with a printed reason when unavailable):
  eager      diffusers ``apply_rotary_emb_qwen(use_real=False)`` (complex multiply) x4
  compile    torch.compile of the same
  flashinfer FlashInfer ``apply_rope_with_cos_sin_cache_inplace`` called raw, per stream
  fi-img     FlashInfer raw on the image stream only (for comparison with FlashInfer's own figures)
  fused      ``fused_dit_ops.rope`` per stream (auto backend), and ``fused-triton`` (Triton forced)
Floor: read + write q and k of both streams + the table rows, at the copy bandwidth of this run.
"""
from __future__ import annotations

import argparse

import torch

from . import harness

SHAPES = {  # name: (L_img, L_txt, H, D)
    "qwen-edit": (8192, 208, 24, 128),
    "flux": (4096, 512, 24, 128),
    "flux2": (4096, 512, 48, 128),
    "wan14b": (32760, 0, 40, 128),
}


def complex_rope(x, freqs):
    """diffusers apply_rotary_emb_qwen(x, freqs, use_real=False), written out (no diffusers import)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs.unsqueeze(1)).flatten(3).type_as(x)


def make_rope_inputs(Li, Lt, H, D, dtype=torch.bfloat16):
    dev = "cuda"
    g = lambda L: torch.randn(1, L, H, D, device=dev, dtype=dtype)  # noqa: E731
    ang_i = torch.rand(Li, D // 2, device=dev) * 6.28
    ang_t = torch.rand(max(Lt, 1), D // 2, device=dev) * 6.28
    return dict(
        iq=g(Li), ik=g(Li), tq=g(Lt), tk=g(Lt),
        img_tab=torch.cat([ang_i.cos(), ang_i.sin()], -1).contiguous(),
        txt_tab=torch.cat([ang_t.cos(), ang_t.sin()], -1).contiguous(),
        img_f=torch.polar(torch.ones_like(ang_i), ang_i), txt_f=torch.polar(torch.ones_like(ang_t), ang_t)[:Lt],
    )


def _flashinfer():
    from ..ops.rope import flashinfer_status
    ok, why = flashinfer_status()
    if not ok:
        return None, f"flashinfer not importable ({why})"
    from flashinfer.rope import apply_rope_with_cos_sin_cache_inplace
    return apply_rope_with_cos_sin_cache_inplace, None


def providers(x):
    import fused_dit_ops as fdo
    Lt = x["tq"].shape[1]
    D = x["iq"].shape[-1]
    out = {}

    def eager():
        a = complex_rope(x["iq"], x["img_f"]), complex_rope(x["ik"], x["img_f"])
        if Lt:
            a += (complex_rope(x["tq"], x["txt_f"]), complex_rope(x["tk"], x["txt_f"]))
        return a
    out["eager"] = (eager, None)
    out["compile"] = (torch.compile(eager), None)
    fi, why = _flashinfer()
    if fi is None:
        out["flashinfer"] = (None, why)
        out["fi-img"] = (None, why)
    else:
        pi = torch.arange(x["iq"].shape[1], device="cuda")
        pt = torch.arange(max(Lt, 1), device="cuda")[:Lt]

        def fi_img():
            fi(pi, x["iq"][0], x["ik"][0], D, x["img_tab"], is_neox=False)

        def fi_both():
            fi_img()
            if Lt:
                fi(pt, x["tq"][0], x["tk"][0], D, x["txt_tab"], is_neox=False)
        out["flashinfer"] = (fi_both, None)
        out["fi-img"] = (fi_img, None)

    def fused(backend=None):
        def f():
            fdo.rope(x["iq"], x["ik"], x["img_tab"], backend=backend)
            if Lt:
                fdo.rope(x["tq"], x["tk"], x["txt_tab"], backend=backend)
        return f
    out["fused"] = (fused(), None)
    out["fused-triton"] = (fused("triton"), None)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fused_dit_ops bench rope",
                                description=harness.plain_doc(__doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    p.add_argument("--out", default=None, help="directory for the JSON results (default bench/results)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    args = p.parse_args(argv)
    harness.require_cuda()
    import fused_dit_ops as fdo
    print(f"warmup_rope: backend {fdo.warmup_rope()}")
    bw = harness.copy_bandwidth_bytes_per_s()
    rows = []
    for name in args.shapes.split(","):
        Li, Lt, H, D = SHAPES[name]
        x = make_rope_inputs(Li, Lt, H, D)
        esz = x["iq"].element_size()
        bytes_all = 2 * 2 * (Li + Lt) * H * D * esz + (Li + Lt) * D * 4
        bytes_img = 2 * 2 * Li * H * D * esz + Li * D * 4
        base = {}
        for prov, (fn, why) in providers(x).items():
            if prov == "compile" and args.no_compile:
                fn, why = None, "--no-compile"
            if fn is None:
                print(f"[{name}] skip {prov}: {why}")
                continue
            try:
                us = harness.time_graph_us(lambda: (), fn)  # GPU time, no host launch cost
            except Exception as e:  # noqa: BLE001  (a provider failing must not stop the others)
                print(f"[{name}] skip {prov}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            nbytes = bytes_img if prov == "fi-img" else bytes_all
            floor = nbytes / bw * 1e6
            row = dict(shape=name, provider=prov, us=us, GBps=nbytes / us / 1e3, floor_us=floor,
                       pct_floor=100 * floor / us)
            if prov in ("eager", "compile", "flashinfer"):
                base[prov] = us
            rows.append(row)
        for r in rows:
            if r["shape"] == name:
                for b, us in base.items():
                    r[f"x_vs_{b}"] = us / r["us"] if r["provider"] != "fi-img" else None
        del x
        torch.cuda.empty_cache()
    cols = ["shape", "provider", "us", "GBps", "floor_us", "pct_floor", "x_vs_eager", "x_vs_compile",
            "x_vs_flashinfer"]
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; targets (H100): qwen-edit fused <= 85 us, fi-img ~79 us")
    print(harness.format_table(rows, cols))
    path = harness.write_results("rope", rows, {"copy_bw_bytes_per_s": bw}, out_dir=args.out)
    print(f"wrote {path}")
    return 0
