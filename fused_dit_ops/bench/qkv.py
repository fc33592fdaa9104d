"""``python -m fused_dit_ops bench qkv``: the joint QKV path of the double-stream attention.

Part ``cat`` (joint [txt, img] concat of q, k, v; V a strided chunk of packed QKV, row stride 3HD):
  torch.cat        3x torch.cat (eager; the strided V takes torch's generic path)
  torch.cat-contig 3x torch.cat of contiguous copies (the cat alone, copies not timed)
  compile          torch.compile of the 3 cats
  fused            ``fused_dit_ops.joint_qkv_cat`` (C++ when _C is built, else Triton), and
  fused-out        the variant writing into caller-given buffers
Part ``norm_rope_cat`` (RMSNorm q,k x2 streams -> RoPE -> joint q, k, v):
  eager            the diffusers chain (RMSNorm x4, complex RoPE x4, 3 cats)
  compile          torch.compile of the chain
  flashinfer       RMSNorm (eager) + FlashInfer RoPE raw + 3 cats
  fused            ``qk_norm_rope_cat`` (one launch), ``fused-out`` (into buffers)
  fused-inplace    ``joint_qk_norm_rope_`` on an already-joint q/k (its floor is q/k only)
Part ``proj`` (the q/k/v projections of both streams into joint q, k, v; K = H*D, weights std 0.02):
  torch            6x F.linear + 3x torch.cat (what the stock processor runs before its norms)
  compile          torch.compile of the same
  fused            ``fused_dit_ops.joint_linear`` with each stream's q/k/v weights packed (as
                   ``patch(pack_qkv=True)`` leaves them): one GEMM per stream into one buffer
  fused-separate   ``joint_linear`` with separate weights: one GEMM per projection into its columns
Floors: read q, k, v and write the joint buffers (+ tables) at this run's copy bandwidth; for
``proj`` the GEMM FLOPs at 800 TFLOP/s (a reference rate for bf16 GEMMs on Hopper).
"""
from __future__ import annotations

import argparse

import torch

from . import harness
from .rope import SHAPES, _flashinfer, complex_rope


def _packed(L, H, D, dtype):
    qkv = torch.randn(1, L, 3 * H * D, device="cuda", dtype=dtype)
    return [c.unflatten(-1, (H, D)) for c in qkv.chunk(3, dim=-1)]


def make_inputs(Li, Lt, H, D, dtype=torch.bfloat16):
    tq, tk, tv = _packed(Lt, H, D, dtype)
    iq, ik, iv = _packed(Li, H, D, dtype)
    # Q, K as the processor sees them after its own projections (contiguous), V a strided chunk
    tq, tk, iq, ik = (t.contiguous() for t in (tq, tk, iq, ik))
    ws = [(1 + 0.1 * torch.randn(D, device="cuda")).to(dtype) for _ in range(4)]
    ang_i = torch.rand(Li, D // 2, device="cuda") * 6.28
    ang_t = torch.rand(max(Lt, 1), D // 2, device="cuda")[:Lt] * 6.28
    tab = lambda a: torch.cat([a.cos(), a.sin()], -1).contiguous()  # noqa: E731
    return dict(ins=(tq, tk, tv, iq, ik, iv), ws=ws, txt_tab=tab(ang_t), img_tab=tab(ang_i),
                txt_f=torch.polar(torch.ones_like(ang_t), ang_t), img_f=torch.polar(torch.ones_like(ang_i), ang_i))


def _rms(x, w, eps=1e-6):
    var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return (x * torch.rsqrt(var + eps)).to(w.dtype) * w


def cat_providers(x):
    import fused_dit_ops as fdo
    tq, tk, tv, iq, ik, iv = x["ins"]
    contig = [t.contiguous() for t in x["ins"]]
    bufs = tuple(torch.empty(1, tq.shape[1] + iq.shape[1], *tq.shape[2:], device="cuda", dtype=tq.dtype)
                 for _ in range(3))

    def cats(a, b, c, d, e, f):
        return torch.cat([a, d], 1), torch.cat([b, e], 1), torch.cat([c, f], 1)
    return {
        "torch.cat": (lambda: cats(*x["ins"]), None),
        "torch.cat-contig": (lambda: cats(*contig), None),
        "compile": (lambda c=torch.compile(cats): c(*x["ins"]), None),
        "fused": (lambda: fdo.joint_qkv_cat(*x["ins"]), None),
        "fused-out": (lambda: fdo.joint_qkv_cat(*x["ins"], out=bufs), None),
    }


def norm_rope_providers(x):
    import fused_dit_ops as fdo
    tq, tk, tv, iq, ik, iv = x["ins"]
    ws, D = x["ws"], tq.shape[-1]
    Lt = tq.shape[1]
    bufs = tuple(torch.empty(1, Lt + iq.shape[1], *tq.shape[2:], device="cuda", dtype=tq.dtype)
                 for _ in range(3))
    jq, jk, _ = fdo.joint_qkv_cat(*x["ins"])

    def chain(tq, tk, tv, iq, ik, iv):
        a = complex_rope(_rms(tq, ws[0]), x["txt_f"])
        b = complex_rope(_rms(tk, ws[1]), x["txt_f"])
        c = complex_rope(_rms(iq, ws[2]), x["img_f"])
        d = complex_rope(_rms(ik, ws[3]), x["img_f"])
        return torch.cat([a, c], 1), torch.cat([b, d], 1), torch.cat([tv, iv], 1)
    out = {
        "eager": (lambda: chain(*x["ins"]), None),
        "compile": (lambda c=torch.compile(chain): c(*x["ins"]), None),
    }
    fi, why = _flashinfer()
    if fi is None:
        out["flashinfer"] = (None, why)
    else:
        pi = torch.arange(iq.shape[1], device="cuda")
        pt = torch.arange(max(Lt, 1), device="cuda")[:Lt]

        def fi_chain():
            a, b, c, d = _rms(tq, ws[0]), _rms(tk, ws[1]), _rms(iq, ws[2]), _rms(ik, ws[3])
            fi(pi, c[0], d[0], D, x["img_tab"], is_neox=False)
            if Lt:
                fi(pt, a[0], b[0], D, x["txt_tab"], is_neox=False)
            return torch.cat([a, c], 1), torch.cat([b, d], 1), torch.cat([tv, iv], 1)
        out["flashinfer"] = (fi_chain, None)
    args = (*x["ins"], *ws, x["txt_tab"], x["img_tab"])
    out["fused"] = (lambda: fdo.qk_norm_rope_cat(*args), None)
    out["fused-out"] = (lambda: fdo.qk_norm_rope_cat(*args, out=bufs), None)
    out["fused-inplace"] = (lambda: fdo.joint_qk_norm_rope_(jq, jk, Lt, *ws, x["txt_tab"], x["img_tab"]), None)
    return out


def proj_providers(x, std=0.02):
    import fused_dit_ops as fdo
    tq, _, _, iq, _, _ = x["ins"]
    (B, Lt, H, D), Li = tq.shape, iq.shape[1]
    K = H * D
    dt = tq.dtype
    txt, img = torch.randn(B, Lt, K, device="cuda", dtype=dt), torch.randn(B, Li, K, device="cuda", dtype=dt)
    packed = []
    for _ in range(2):  # text, image: q|k|v weights as consecutive rows of one tensor
        w = (torch.randn(3 * K, K, device="cuda") * std).to(dt)
        b = (torch.randn(3 * K, device="cuda") * std).to(dt)
        packed.append(([w[j * K:(j + 1) * K] for j in range(3)], [b[j * K:(j + 1) * K] for j in range(3)]))
    separate = [([w.clone() for w in ws], [b.clone() for b in bs]) for ws, bs in packed]

    def chain(t, i):
        (tw, tb), (iw, ib) = packed
        tp = [torch.nn.functional.linear(t, w, b).unflatten(-1, (H, D)) for w, b in zip(tw, tb)]
        ip = [torch.nn.functional.linear(i, w, b).unflatten(-1, (H, D)) for w, b in zip(iw, ib)]
        return tuple(torch.cat([a, c], 1) for a, c in zip(tp, ip))
    return {
        "torch": (lambda: chain(txt, img), None),
        "compile": (lambda c=torch.compile(chain): c(txt, img), None),
        "fused": (lambda: fdo.joint_linear(txt, img, *packed[0], *packed[1]), None),
        "fused-separate": (lambda: fdo.joint_linear(txt, img, *separate[0], *separate[1]), None),
    }


def _run(part, name, provs, nbytes_fn, bw, rows, baselines, skip_compile, flops=None):
    base = {}
    start = len(rows)
    for prov, (fn, why) in provs.items():
        if prov == "compile" and skip_compile:
            fn, why = None, "--no-compile"
        if fn is None:
            print(f"[{part} {name}] skip {prov}: {why}")
            continue
        try:
            us = harness.time_graph_us(lambda: (), fn)  # GPU time, no host launch cost
        except Exception as e:  # noqa: BLE001
            print(f"[{part} {name}] skip {prov}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        if flops is not None:  # compute-bound part: floor at 800 TFLOP/s
            floor = flops / 800e12 * 1e6
            rows.append(dict(part=part, shape=name, provider=prov, us=us, TFLOPs=flops / us / 1e6,
                             floor_us=floor, pct_floor=100 * floor / us))
        else:
            nb = nbytes_fn(prov)
            floor = nb / bw * 1e6
            rows.append(dict(part=part, shape=name, provider=prov, us=us, GBps=nb / us / 1e3, floor_us=floor,
                             pct_floor=100 * floor / us))
        if prov in baselines:
            base[prov] = us
    for r in rows[start:]:
        for b, us in base.items():
            r[f"x_vs_{b}"] = us / r["us"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fused_dit_ops bench qkv",
                                description=harness.plain_doc(__doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(k for k, v in SHAPES.items() if v[1] > 0),
                   help="comma list of " + ", ".join(k for k, v in SHAPES.items() if v[1] > 0))
    p.add_argument("--parts", default="cat,norm_rope_cat,proj")
    p.add_argument("--out", default=None, help="directory for the JSON results (default bench/results)")
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    harness.require_cuda()
    import fused_dit_ops as fdo
    from .._extension import C_LOADED
    print(f"joint_qkv_cat CUDA kernel: {'C++ (_C)' if C_LOADED else 'Triton (no _C)'}; "
          f"warmup_rope: {fdo.warmup_rope()}")
    bw = harness.copy_bandwidth_bytes_per_s()
    rows: list[dict] = []
    parts = args.parts.split(",")
    for name in args.shapes.split(","):
        Li, Lt, H, D = SHAPES[name]
        x = make_inputs(Li, Lt, H, D)
        act = (Li + Lt) * H * D * 2
        tabs = (Li + Lt) * D * 4
        if "cat" in parts:
            _run("cat", name, cat_providers(x), lambda prov: 2 * 3 * act, bw, rows,
                 ("torch.cat", "compile"), args.no_compile)
        if "norm_rope_cat" in parts:
            _run("norm_rope_cat", name, norm_rope_providers(x),
                 lambda prov: (4 * act + tabs) if prov == "fused-inplace" else (6 * act + tabs), bw, rows,
                 ("eager", "compile", "flashinfer"), args.no_compile)
        if "proj" in parts:
            _run("proj", name, proj_providers(x), None, bw, rows, ("torch", "compile"), args.no_compile,
                 flops=2 * (Li + Lt) * (H * D) * 3 * (H * D))
        del x
        torch.cuda.empty_cache()
    cols = ["part", "shape", "provider", "us", "GBps", "TFLOPs", "floor_us", "pct_floor", "x_vs_torch.cat",
            "x_vs_eager", "x_vs_torch", "x_vs_compile", "x_vs_flashinfer"]
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; targets (H100, qwen-edit): cat fused <= 115 us "
          f"(floor ~103), norm_rope_cat fused <= 135 us and faster than compile")
    print(harness.format_table(rows, cols))
    path = harness.write_results("qkv", rows, {"copy_bw_bytes_per_s": bw, "cpp_cat": C_LOADED},
                                 out_dir=args.out)
    print(f"wrote {path}")
    return 0
