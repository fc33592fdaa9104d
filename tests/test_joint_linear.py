"""joint_linear: two streams' (packed or separate) projections written into one joint buffer.

Tiers: plain (CPU reference vs an fp64 oracle, packing detection, opcheck, compile with aot_eager and
with inductor next to the in-place QK-norm + RoPE, bad inputs); ``gpu`` (real Qwen-Image shapes:
packed and separate weights vs the oracle, the GEMMs used, strided inputs, CUDA-graph capture).
"""
from __future__ import annotations

import pytest
import torch

import fused_dit_ops as fdo
from fused_dit_ops.ops.linear import packed_rows

from helpers import expect_input_error, randn, rel_err

OPS = torch.ops.fused_dit


def oracle(txt, img, tw, tb, iw, ib):
    """fp64: cat([txt @ W_t.T + b_t, img @ W_i.T + b_i], 1), per projection (no packing)."""
    def proj(x, ws, bs):
        cols = [x.double() @ w.double().t() + (b.double() if b is not None else 0) for w, b in zip(ws, bs)]
        return torch.cat(cols, -1)
    return torch.cat([proj(txt, tw, tb), proj(img, iw, ib)], 1)


def make(B, Lt, Li, K, ns, *, dtype=torch.float32, device="cpu", packed=False, bias="all", std=0.02):
    """Streams and per-projection weights/biases; ``packed``: each stream's weights (and biases)
    are consecutive row views of one tensor, as fdo.patch's pack_qkv leaves them."""
    txt, img = randn(B, Lt, K, dtype=dtype, device=device), randn(B, Li, K, dtype=dtype, device=device)

    def weights():
        if packed:
            w = randn(sum(ns), K, dtype=dtype, device=device, std=std)
            b = randn(sum(ns), dtype=dtype, device=device, std=std)
            c = [0]
            for n in ns:
                c.append(c[-1] + n)
            return [w[c[j]:c[j + 1]] for j in range(len(ns))], [b[c[j]:c[j + 1]] for j in range(len(ns))]
        return ([randn(n, K, dtype=dtype, device=device, std=std) for n in ns],
                [randn(n, dtype=dtype, device=device, std=std) for n in ns])
    tw, tb = weights()
    iw, ib = weights()
    if bias == "none":
        tb, ib = [None] * len(ns), [None] * len(ns)
    elif bias == "mixed":
        tb = [None if j % 2 else b for j, b in enumerate(tb)]
        ib = [b if j % 2 else None for j, b in enumerate(ib)]
    return txt, img, tw, tb, iw, ib


# --- CPU: reference -------------------------------------------------------------------------------

@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("bias", ["all", "none", "mixed"])
@pytest.mark.parametrize("B", [1, 2])
def test_cpu_matches_oracle(packed, bias, B):
    args = make(B, 5, 11, 32, [16, 16, 8], packed=packed, bias=bias)
    out = fdo.joint_linear(*args)
    assert out.shape == (B, 16, 40) and out.is_contiguous()
    assert rel_err(out, oracle(*args)) < 1e-6


def test_cpu_empty_streams():
    args = make(1, 0, 4, 16, [8, 8])
    assert rel_err(fdo.joint_linear(*args), oracle(*args)) < 1e-6
    args = make(1, 3, 0, 16, [8])
    assert fdo.joint_linear(*args).shape == (1, 3, 8)


def test_packed_rows():
    w = torch.randn(24, 16)
    parts = [w[0:8], w[8:16], w[16:24]]
    v = packed_rows(parts)
    assert v is not None and v.shape == (24, 16) and v.data_ptr() == w.data_ptr() and torch.equal(v, w)
    assert packed_rows([w[0:8], w[16:24]]) is None                      # a gap
    assert packed_rows([w[8:16], w[0:8]]) is None                       # out of order
    assert packed_rows([torch.randn(8, 16), torch.randn(8, 16)]) is None  # separate tensors
    assert packed_rows([w[:, :8]]) is None                              # not contiguous
    assert packed_rows([w[0:8], None]) is None
    b = torch.randn(12)
    assert torch.equal(packed_rows([b[:4], b[4:8], b[8:]]), b)


def test_packed_rows_single_and_adjacent_storages():
    w = torch.randn(8, 16)
    assert packed_rows([w]) is not None and packed_rows([w]).data_ptr() == w.data_ptr()
    # two separate allocations that happen to be adjacent are not one storage: never viewed as one
    big = torch.randn(16, 16)
    a = torch.empty(0).set_(big.untyped_storage(), 0, (8, 16))
    b2 = torch.empty(0).set_(torch.UntypedStorage(8 * 16 * 4), 0, (8, 16))
    assert packed_rows([a, b2]) is None


@pytest.mark.parametrize("packed", [True, False])
def test_unchecked_impl_takes_grad_requiring_params(packed):
    """The CUDA implementation's GEMMs write into the joint buffer (addmm out=), which autograd
    refuses for inputs that require grad; the op is forward-only, so it detaches its weights (the
    patched block's module parameters are such inputs when a caller runs with grad enabled)."""
    from fused_dit_ops.ops.linear import joint_linear_unchecked
    K, N = 16, 8
    ws = [torch.nn.Parameter(randn(N, K)) for _ in range(4)]
    bs = [torch.nn.Parameter(randn(N)) for _ in range(4)]
    txt, img = randn(1, 3, K), randn(1, 5, K)
    if packed:
        args = ([ws[0]], [bs[0]], [ws[1]], [bs[1]])
    else:
        args = (ws[:2], bs[:2], ws[2:], bs[2:])
    out = joint_linear_unchecked(txt, img, *args)
    ref = torch.cat([txt @ torch.cat(args[0]).T + torch.cat(args[1]),
                     img @ torch.cat(args[2]).T + torch.cat(args[3])], 1)
    assert rel_err(out, ref.detach()) < 1e-6


def test_opcheck_cpu():
    for packed, bias in [(True, "all"), (False, "mixed"), (False, "none")]:
        args = make(2, 3, 5, 16, [8, 8, 8], packed=packed, bias=bias)
        torch.library.opcheck(OPS.joint_linear.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_compile_fullgraph_aot_eager():
    args = make(1, 3, 5, 16, [8, 8, 8], packed=True)

    def f(txt, img):
        buf = fdo.joint_linear(txt, img, *args[2:])
        return buf[..., 8:16] * 2
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(*args[:2]), f(*args[:2]))


def test_compile_inductor_keeps_one_buffer():
    """Under inductor, joint_linear + the in-place joint_qk_norm_rope_ on its q/k column views run
    on the op's own buffer: no copy of it (the in-place op is re-inplaced), as in a compiled block."""
    from torch._inductor.utils import run_and_get_code
    B, Lt, Li, H, D = 1, 3, 5, 2, 16
    args = make(B, Lt, Li, 24, [H * D] * 3, packed=True)
    ws = [randn(D) for _ in range(4)]
    tt, it = torch.rand(Lt, D), torch.rand(Li, D)

    def f(txt, img):
        buf = torch.ops.fused_dit.joint_linear.default(txt, img, *args[2:])
        q, k, v = (buf[..., j * H * D:(j + 1) * H * D].unflatten(-1, (H, D)) for j in range(3))
        torch.ops.fused_dit.joint_qk_norm_rope_.default(q, k, Lt, *ws, tt, it, 1e-6, True)
        return q + 1, k + 1, v + 1

    want = f(*args[:2])
    got, codes = run_and_get_code(torch.compile(f, fullgraph=True), *args[:2])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    code = "\n".join(codes)
    assert "fused_dit.joint_linear" in code and "fused_dit.joint_qk_norm_rope_" in code
    assert "clone" not in code and ".copy_(" not in code, code


# --- bad inputs -----------------------------------------------------------------------------------

_bad = expect_input_error


def test_bad_inputs():
    txt, img, tw, tb, iw, ib = make(1, 3, 5, 16, [8, 8])
    f = fdo.joint_linear
    _bad(lambda: f(txt, img[..., :8], tw, tb, iw, ib), "'img'", "features K")
    _bad(lambda: f(txt, img.double(), tw, tb, iw, ib), "'img'", "dtype")
    _bad(lambda: f(txt[0], img, tw, tb, iw, ib), "'txt'", "3-D")
    _bad(lambda: f(txt.transpose(1, 2), img.transpose(1, 2), tw, tb, iw, ib), "'txt'", "contiguous last")
    _bad(lambda: f(txt, img, [], [], [], []), "'txt_weights'", "at least one")
    _bad(lambda: f(txt, img, tw, tb, iw[:1], ib), "'img_weights'", "one entry per")
    _bad(lambda: f(txt, img, tw, tb[:1], iw, ib), "'txt_biases'", "one entry per")
    _bad(lambda: f(txt, img, [tw[0][:, :8], tw[1]], tb, iw, ib), "'txt_weights[0]'", "K = 16")
    _bad(lambda: f(txt, img, tw, tb, [iw[0], iw[1][:4]], [ib[0], ib[1][:4]]), "'img_weights[1]'", "rows")
    _bad(lambda: f(txt, img, tw, [tb[0][:4], tb[1]], iw, ib), "'txt_biases[0]'", "[N] = [8]")
    _bad(lambda: f(txt, img, [tw[0].double(), tw[1]], tb, iw, ib), "'txt_weights[0]'", "dtype")


# --- GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("packed", [True, False])
def test_gpu_qwen_shape_vs_oracle(packed):
    """Qwen-Image-Edit joint q|k|v at real dims (bf16, weights std 0.02): packed (one GEMM per
    stream) and separate (one per projection into column slices) against the fp64 oracle."""
    args = make(1, 208, 8192, 3072, [3072] * 3, dtype=torch.bfloat16, device="cuda", packed=packed)
    out = fdo.joint_linear(*args)
    want = oracle(*args)
    e = rel_err(out, want)
    print(f"\njoint_linear packed={packed}: rel vs fp64 {e:.2e}")
    assert e < 4e-3
    # each projection's columns as torch computes them (F.linear: a cuBLASLt GEMM with the bias in
    # its epilogue, like ours; separate weights are concatenated first, so the same GEMM)
    for j in range(3):
        c = slice(3072 * j, 3072 * (j + 1))
        ref_t = torch.nn.functional.linear(args[0], args[2][j], args[3][j])
        ref_i = torch.nn.functional.linear(args[1], args[4][j], args[5][j])
        assert rel_err(out[:, :208, c], ref_t) < 2e-3 and rel_err(out[:, 208:, c], ref_i) < 2e-3


@pytest.mark.gpu
def test_gpu_packed_runs_one_gemm_per_stream():
    args = make(1, 64, 256, 256, [256] * 3, dtype=torch.bfloat16, device="cuda", packed=True)
    unpacked = make(1, 64, 256, 256, [256] * 3, dtype=torch.bfloat16, device="cuda", packed=False)
    fdo.joint_linear(*args), fdo.joint_linear(*unpacked)
    torch.cuda.synchronize()

    def kernels(a):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fdo.joint_linear(*a)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                 and "memset" not in e.name.lower()]
        return [n for n in names if "elementwise" not in n and "opy" not in n and "Cat" not in n], names
    g, names = kernels(args)  # packed: one GEMM per stream, nothing else
    assert len(g) == 2 and len(names) == 2, names
    g, names = kernels(unpacked)  # separate: the weights (and biases) concatenated, then the same
    assert len(g) == 2 and len(names) > 2, names


@pytest.mark.gpu
@pytest.mark.parametrize("bias", ["all", "mixed", "none"])
def test_gpu_batch_strided_inputs(bias):
    txt, img, tw, tb, iw, ib = make(2, 7, 33, 64, [32, 32, 16], dtype=torch.float16, device="cuda",
                                    packed=bias == "all", bias=bias)
    wide = randn(2, 40, 72, dtype=torch.float16, device="cuda")  # row stride 72: slices of a wider buffer
    txt, img = wide[:, :7, :64], wide[:, 7:, :64]
    out = fdo.joint_linear(txt, img, tw, tb, iw, ib)
    assert rel_err(out, oracle(txt, img, tw, tb, iw, ib)) < 2e-3


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    args = make(1, 16, 48, 128, [128] * 3, dtype=torch.bfloat16, device="cuda", packed=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fdo.joint_linear(*args)  # cuBLAS handles and workspaces before capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fdo.joint_linear(*args)
    args[0].copy_(randn(*args[0].shape, dtype=torch.bfloat16, device="cuda"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fdo.joint_linear(*args))


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("bias", ["all", "mixed", "none"])
def test_unchecked_implementation_cpu(packed, bias):
    """The CUDA implementation's body (packing detection, concatenation of separate weights, GEMMs
    into the row slices), which the patched block calls directly in eager mode, run on CPU."""
    from fused_dit_ops.ops.linear import joint_linear_unchecked
    args = make(2, 5, 11, 32, [16, 16, 8], packed=packed, bias=bias)
    out = joint_linear_unchecked(*args)
    assert out.shape == (2, 16, 40)
    assert rel_err(out, oracle(*args)) < 1e-6


@pytest.mark.parametrize("bias", ["mixed", "none", "separate"])
def test_packed_weights_never_copied_for_the_biases(bias, monkeypatch):
    """Packed weights with unpacked (separate, partly None or absent) biases: the GEMM reads the
    packed weight storage itself; only the biases (a few KB) are concatenated."""
    from fused_dit_ops.ops import linear
    txt, img, tw, tb, iw, ib = make(1, 5, 11, 32, [16, 16, 16], packed=True, bias="all" if bias == "separate" else bias)
    assert packed_rows(tw) is not None and packed_rows(iw) is not None
    if bias == "separate":
        tb, ib = [b.clone() for b in tb], [b.clone() for b in ib]
    cats = []
    real_cat = torch.cat

    def spy(ts, dim=0, **kw):
        cats.append(tuple(ts[0].shape))
        return real_cat(ts, dim, **kw)
    monkeypatch.setattr(linear.torch, "cat", spy)
    out = linear.joint_linear_unchecked(txt, img, tw, tb, iw, ib)
    monkeypatch.undo()
    assert all(len(s) == 1 for s in cats), cats  # 1-D bias pieces only, no [N, K] weight copy
    assert rel_err(out, oracle(txt, img, tw, tb, iw, ib)) < 1e-6
