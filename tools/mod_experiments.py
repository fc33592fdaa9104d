"""Kernel-variant experiments for issue 2 (GPU only; not shipped): norm_scale_shift and
gate_residual on the Qwen-Image-Edit image stream (1 x 8192 x 3072 bf16, 0/1 index, parameters
as row views of a [2, 6C] modulation output), against torch.compile of the eager expression.

Each round times every variant once (CUDA-graph replay over rotating inputs > L2, the harness of
``bench modulation``); rounds interleave the providers so that drift hits all alike. Prints the
median over rounds and writes mod-experiments.json to $OUT. Also dumps inductor's generated code
for the two compiled expressions (inductor-*.py) so that its schedule can be compared.
"""
from __future__ import annotations

import json
import os
import statistics

import torch
import triton
import triton.language as tl

from fused_dit_ops.bench import harness
from fused_dit_ops.bench import modulation as bm
from fused_dit_ops.kernels import modulation as k
from fused_dit_ops.shapes import STREAMS


@triton.jit
def _gate_residual_flat(r_ptr, u_ptr, g_ptr, idx_ptr, out_ptr, N, C, B, L, stride_g,
                        XBLOCK: tl.constexpr, STORE_CS: tl.constexpr):
    # inductor-like: 1-D over the flattened contiguous [B*L*C], int32 offsets, per-element index
    offs = tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK)
    m = offs < N
    row = offs // C
    col = offs % C
    b = row // L
    sel = tl.load(idx_ptr + row, mask=m, other=0, eviction_policy="evict_last") != 0
    prow = b + tl.where(sel, B, 0)
    g = tl.load(g_ptr + prow * stride_g + col, mask=m, other=0.0, eviction_policy="evict_last").to(tl.float32)
    r = tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    o = (r + g * u).to(out_ptr.dtype.element_ty)
    if STORE_CS:
        tl.store(out_ptr + offs, o, mask=m, cache_modifier=".cs")
    else:
        tl.store(out_ptr + offs, o, mask=m)


def gate_residual_flat(r, u, gate, idx, XBLOCK=1024, num_warps=4, STORE_CS=False):
    B, L, C = r.shape
    out = torch.empty_like(r)
    N = r.numel()
    _gate_residual_flat[(triton.cdiv(N, XBLOCK),)](r, u, gate, idx, out, N, C, B, L, gate.stride(0),
                                                   XBLOCK=XBLOCK, STORE_CS=STORE_CS, num_warps=num_warps)
    return out


@triton.jit
def _ssg_flat(x_ptr, sh_ptr, sc_ptr, g_ptr, idx_ptr, y_ptr, go_ptr, N, C, B, L, stride_p,
              XBLOCK: tl.constexpr, STORE_CS: tl.constexpr):
    offs = tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK)
    m = offs < N
    row = offs // C
    col = offs % C
    b = row // L
    sel = tl.load(idx_ptr + row, mask=m, other=0, eviction_policy="evict_last") != 0
    po = (b + tl.where(sel, B, 0)) * stride_p + col
    sh = tl.load(sh_ptr + po, mask=m, other=0.0, eviction_policy="evict_last").to(tl.float32)
    sc = tl.load(sc_ptr + po, mask=m, other=0.0, eviction_policy="evict_last").to(tl.float32)
    g = tl.load(g_ptr + po, mask=m, other=0.0, eviction_policy="evict_last")
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = (x * (1.0 + sc) + sh).to(y_ptr.dtype.element_ty)
    if STORE_CS:
        tl.store(y_ptr + offs, y, mask=m, cache_modifier=".cs")
        tl.store(go_ptr + offs, g, mask=m, cache_modifier=".cs")
    else:
        tl.store(y_ptr + offs, y, mask=m)
        tl.store(go_ptr + offs, g, mask=m)


def ssg_flat(x, sh, sc, g, idx, XBLOCK=1024, num_warps=4, STORE_CS=False):
    B, L, C = x.shape
    y, go = torch.empty_like(x), torch.empty_like(x)
    N = x.numel()
    _ssg_flat[(triton.cdiv(N, XBLOCK),)](x, sh, sc, g, idx, y, go, N, C, B, L, sh.stride(0),
                                         XBLOCK=XBLOCK, STORE_CS=STORE_CS, num_warps=num_warps)
    return y, go


@triton.jit
def _ssg_tma(x_ptr, sh_ptr, sc_ptr, g_ptr, idx_ptr, y_desc, go_desc, L, C, B, stride_p,
             BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # 2-D tiles over the flattened [B*L, C] rows (B == 1 here), outputs stored through TMA
    n_c = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    r0 = (pid // n_c) * BLOCK_M
    c0 = (pid % n_c) * BLOCK_C
    rows = r0 + tl.arange(0, BLOCK_M)
    cols = c0 + tl.arange(0, BLOCK_C)
    rm = rows < L
    m = rm[:, None] & (cols < C)[None, :]
    sel = tl.load(idx_ptr + rows, mask=rm, other=0) != 0
    po = tl.where(sel, B, 0)[:, None] * stride_p + cols[None, :]
    sh = tl.load(sh_ptr + po, mask=m, other=0.0).to(tl.float32)
    sc = tl.load(sc_ptr + po, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + po, mask=m, other=0.0)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
    y_desc.store([r0, c0], (x * (1.0 + sc) + sh).to(y_desc.dtype))
    go_desc.store([r0, c0], g)


@triton.jit
def _ssg_split(x_ptr, sh_ptr, sc_ptr, g_ptr, idx_ptr, y_ptr, go_ptr, L, C, B, stride_p, n_half,
               BLOCK_C: tl.constexpr, INTERLEAVE: tl.constexpr):
    # each program writes ONE output tile: y tiles (read x) or gate tiles (params only, no DRAM read)
    pid = tl.program_id(0)
    if INTERLEAVE:
        is_g = pid % 2
        t = pid // 2
    else:
        is_g = pid >= n_half
        t = tl.where(is_g, pid - n_half, pid)
    n_c = tl.cdiv(C, BLOCK_C)
    row = (t // n_c).to(tl.int64)
    cols = (t % n_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = cols < C
    sel = tl.load(idx_ptr + row) != 0
    po = tl.where(sel, B, 0) * stride_p + cols
    if is_g:
        g = tl.load(g_ptr + po, mask=m, other=0.0)
        tl.store(go_ptr + row * C + cols, g, mask=m, cache_modifier=".cs")
    else:
        sh = tl.load(sh_ptr + po, mask=m, other=0.0).to(tl.float32)
        sc = tl.load(sc_ptr + po, mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * C + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * C + cols, (x * (1.0 + sc) + sh).to(y_ptr.dtype.element_ty), mask=m,
                 cache_modifier=".cs")


def ssg_split(x, sh, sc, g, idx, BLOCK_C=1024, num_warps=4, INTERLEAVE=False):
    B, L, C = x.shape
    assert B == 1
    y, go = torch.empty_like(x), torch.empty_like(x)
    n_half = L * triton.cdiv(C, BLOCK_C)
    _ssg_split[(2 * n_half,)](x, sh, sc, g, idx, y, go, L, C, B, sh.stride(0), n_half, BLOCK_C=BLOCK_C,
                              INTERLEAVE=INTERLEAVE, num_warps=num_warps)
    return y, go


def ssg_tma(x, sh, sc, g, idx, BLOCK_M=2, BLOCK_C=512, num_warps=4):
    from triton.tools.tensor_descriptor import TensorDescriptor
    B, L, C = x.shape
    assert B == 1
    y, go = torch.empty_like(x), torch.empty_like(x)
    yd = TensorDescriptor.from_tensor(y.view(B * L, C), [BLOCK_M, BLOCK_C])
    gd = TensorDescriptor.from_tensor(go.view(B * L, C), [BLOCK_M, BLOCK_C])
    grid = (triton.cdiv(L, BLOCK_M) * triton.cdiv(C, BLOCK_C),)
    _ssg_tma[grid](x, sh, sc, g, idx, yd, gd, L, C, B, sh.stride(0), BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C,
                   num_warps=num_warps)
    return y, go


@triton.jit
def _norm_one_pass(x_ptr, shift_ptr, scale_ptr, idx_ptr, y_ptr, L, C, B, eps, stride_xl, stride_p,
                   BLOCK_C: tl.constexpr, ONE_PASS: tl.constexpr, STORE_CS: tl.constexpr):
    # one row per program; ONE_PASS: shifted sums (x - x[0]) and their squares in one reduction
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    x = tl.load(x_ptr + row * stride_xl + cols, mask=cm, other=0.0, eviction_policy="evict_first").to(tl.float32)
    if ONE_PASS:
        k0 = tl.load(x_ptr + row * stride_xl).to(tl.float32)
        d0 = tl.where(cm, x - k0, 0.0)
        s1 = tl.sum(d0, axis=0)
        s2 = tl.sum(d0 * d0, axis=0)
        m1 = s1 / C
        var = tl.maximum(s2 / C - m1 * m1, 0.0)
        d = tl.where(cm, d0 - m1, 0.0)
    else:
        mean = tl.sum(x, axis=0) / C
        d = tl.where(cm, x - mean, 0.0)
        var = tl.sum(d * d, axis=0) / C
    n = d * tl.rsqrt(var + eps)
    sel = tl.load(idx_ptr + row) != 0
    prow = b + tl.where(sel, B, 0)
    sc = tl.load(scale_ptr + prow * stride_p + cols, mask=cm, other=0.0).to(tl.float32)
    sh = tl.load(shift_ptr + prow * stride_p + cols, mask=cm, other=0.0).to(tl.float32)
    y = (n * (1.0 + sc) + sh).to(y_ptr.dtype.element_ty)
    if STORE_CS:
        tl.store(y_ptr + row * C + cols, y, mask=cm, cache_modifier=".cs")
    else:
        tl.store(y_ptr + row * C + cols, y, mask=cm)


def norm_variant(x, shift, scale, idx, ONE_PASS=False, STORE_CS=False, num_warps=4):
    B, L, C = x.shape
    y = torch.empty_like(x)
    _norm_one_pass[(B * L,)](x, shift, scale, idx, y, L, C, B, 1e-6, x.stride(1), shift.stride(0),
                             BLOCK_C=triton.next_power_of_2(C), ONE_PASS=ONE_PASS, STORE_CS=STORE_CS,
                             num_warps=num_warps)
    return y


def _cfg(m, c, i, w, **kw):
    return dict(BLOCK_M=m, BLOCK_C=c, ITERS=i, num_warps=w, **kw)


def variants():
    import fused_dit_ops as fdo
    from fused_dit_ops import _extension
    comp = lambda op: torch.compile(bm.EAGER[op], dynamic=False)  # noqa: E731
    ker = lambda op, cfg: (lambda *a: getattr(k, op)(*a, config=cfg))  # noqa: E731
    gr = {"compile": comp("gate_residual"), "fused(default)": fdo.gate_residual,
          "triton[1,1024,1,w4]": ker("gate_residual", _cfg(1, 1024, 1, 4)),
          "triton[1,1024,1,w4] cs": ker("gate_residual", _cfg(1, 1024, 1, 4, STREAM_STORES=True)),
          "triton[1,4096,1,w8] cs": ker("gate_residual", _cfg(1, 4096, 1, 8, STREAM_STORES=True)),
          "flat512w4": lambda *a: gate_residual_flat(*a, XBLOCK=512),
          "flat1024w4": lambda *a: gate_residual_flat(*a)}
    if _extension.C_LOADED:
        gr["cpp"] = lambda r, u, g, i: torch.ops.fused_dit.gate_residual.default(r, u, g, i)
    g = dict(PARAM_GATHER=True)
    ns = {"compile": comp("norm_scale_shift"), "fused(default)": fdo.norm_scale_shift,
          "gather[1,4096,1,w4]": ker("norm_scale_shift", _cfg(1, 4096, 1, 4, **g)),
          "gather[1,4096,1,w4] cs": ker("norm_scale_shift", _cfg(1, 4096, 1, 4, STREAM_STORES=True, **g)),
          "gather[1,4096,1,w8] cs": ker("norm_scale_shift", _cfg(1, 4096, 1, 8, STREAM_STORES=True, **g)),
          "gather[2,4096,1,w8] cs": ker("norm_scale_shift", _cfg(2, 4096, 1, 8, STREAM_STORES=True, **g)),
          "gather[1,4096,2,w4] cs": ker("norm_scale_shift", _cfg(1, 4096, 2, 4, STREAM_STORES=True, **g)),
          "row2pass w4 cs": lambda *a: norm_variant(*a, STORE_CS=True)}
    op = "gate_residual_norm_scale_shift"
    grn = {"compile": comp(op), "fused(default)": fdo.gate_residual_norm_scale_shift,
           "gather[1,4096,1,w4]": ker(op, _cfg(1, 4096, 1, 4, **g)),
           "gather[1,4096,1,w4] cs": ker(op, _cfg(1, 4096, 1, 4, STREAM_STORES=True, **g)),
           "gather[1,4096,1,w8] cs": ker(op, _cfg(1, 4096, 1, 8, STREAM_STORES=True, **g)),
           "gather[2,4096,1,w8] cs": ker(op, _cfg(2, 4096, 1, 8, STREAM_STORES=True, **g))}
    op = "scale_shift_gate"
    ssg = {"compile": comp(op), "fused(default)": fdo.scale_shift_gate,
           "triton[1,1024,1,w4] cs": ker(op, _cfg(1, 1024, 1, 4, STREAM_STORES=True)),
           "triton[1,2048,1,w8] cs": ker(op, _cfg(1, 2048, 1, 8, STREAM_STORES=True)),
           "triton[2,1024,1,w8] cs": ker(op, _cfg(2, 1024, 1, 8, STREAM_STORES=True)),
           "flat2048w8": lambda *a: ssg_flat(*a, XBLOCK=2048, num_warps=8),
           "flat2048w8 cs": lambda *a: ssg_flat(*a, XBLOCK=2048, num_warps=8, STORE_CS=True),
           "tma[2,512,w4]": lambda *a: ssg_tma(*a),
           "split1024w4": lambda *a: ssg_split(*a),
           "split1024w4 interleave": lambda *a: ssg_split(*a, INTERLEAVE=True),
           "split2048w8": lambda *a: ssg_split(*a, BLOCK_C=2048, num_warps=8),
           "split2048w8 interleave": lambda *a: ssg_split(*a, BLOCK_C=2048, num_warps=8, INTERLEAVE=True)}
    only = os.environ.get("OPS")
    out = {"gate_residual": gr, "norm_scale_shift": ns, "gate_residual_norm_scale_shift": grn, "scale_shift_gate": ssg}
    return {k_: v for k_, v in out.items() if not only or k_ in only.split(",")}


def dump_inductor(out_dir):
    from torch._inductor.utils import run_and_get_code
    s = STREAMS["qwen-edit-img"]
    for op in ("gate_residual", "norm_scale_shift"):
        torch._dynamo.reset()
        a = bm.make_args(op, s, torch.bfloat16)
        _, codes = run_and_get_code(torch.compile(bm.EAGER[op], dynamic=False), *a)
        with open(os.path.join(out_dir, f"inductor-{op}.py"), "w") as f:
            f.write("\n\n# ----\n\n".join(codes))


def main():
    out_dir = os.environ.get("OUT", ".")
    rounds = int(os.environ.get("ROUNDS", "5"))
    s = STREAMS["qwen-edit-img"]
    dt = torch.bfloat16
    bw = harness.copy_bandwidth_bytes_per_s()
    try:
        dump_inductor(out_dir)
    except Exception as e:
        print("inductor dump failed:", type(e).__name__, e)
    res = {"gpu": torch.cuda.get_device_name(), "copy_TBps": bw / 1e12, "rounds": rounds, "ops": {}}
    for op, provs in variants().items():
        floor = bm.TRAFFIC[op] * s.B * s.L * s.C * dt.itemsize / bw * 1e6
        # correctness against the eager expression first
        a = bm.make_args(op, s, dt)
        tup = lambda r: r if isinstance(r, tuple) else (r,)  # noqa: E731
        ref = tup(bm.EAGER[op](*a))
        errs = {}
        for n, fn in list(provs.items()):
            try:
                errs[n] = max((o.float() - r.float()).abs().max().item() for o, r in zip(tup(fn(*a)), ref))
            except Exception as e:  # a variant that does not compile/run here is dropped, said so
                print(f"  {op} {n}: FAILED {type(e).__name__}: {str(e)[:300]}")
                provs.pop(n)
        times = {n: [] for n in provs}
        for _ in range(rounds):
            for n, fn in provs.items():
                times[n].append(harness.time_graph_us(lambda: bm.make_args(op, s, dt), fn))
            torch.cuda.empty_cache()
        rows = {n: {"median_us": statistics.median(t), "min_us": min(t), "all": t, "max_abs_err_vs_eager": errs[n],
                    "pct_floor": 100 * floor / statistics.median(t)} for n, t in times.items()}
        res["ops"][op] = {"floor_us": floor, "rows": rows}
        print(f"\n{op} (floor {floor:.1f} us, {rounds} rounds)")
        for n, r in sorted(rows.items(), key=lambda kv: kv[1]["median_us"]):
            print(f"  {n:24s} median {r['median_us']:6.1f}  min {r['min_us']:6.1f}  "
                  f"{r['pct_floor']:5.1f}% floor  err {r['max_abs_err_vs_eager']:.3g}")
    with open(os.path.join(out_dir, "mod-experiments.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
