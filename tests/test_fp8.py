"""FP8 (e4m3, row-wise scales): quantising norm ops, quantize_fp8, fp8_linear, joint_fp8_linear, and
``patch(model, precision="fp8")`` on a tiny Qwen-Image model (CPU: the reference implementations),
interpreter tests of the Triton kernels, GPU tests at the real Qwen-Image-Edit block dims."""
from __future__ import annotations


import pytest
import torch

import fused_dit_ops as fdo
from fused_dit_ops import reference as ref
from fused_dit_ops.ops import fp8 as F8
from fused_dit_ops.bench import fp8_recipe
from helpers import (cuda_fp8, expect_input_error, fp8_fast_accum_errors, native_diffusers_backend, needs_fp8_gpu,
                     randn, rel_err, run_blocks_compiled, run_no_grad, spy_fp8_gemms, tiny_bench_block_rows, tiny_fp8_qwen,
                     tiny_fp8_qwen_inputs)  # noqa: F401

pytestmark = pytest.mark.usefixtures("native_diffusers_backend")

E4M3 = torch.float8_e4m3fn
# e4m3 keeps 3 mantissa bits: rounding to nearest is within 2^-4 of |value| for normal values; below
# 2^-6 (subnormal) the spacing is 2^-9, so the absolute bound there is 2^-10 (in units of the scale)
HALF_ULP_REL = 2.0 ** -4
SUBNORMAL_ABS = 2.0 ** -10


def make_norm_inputs(B, L, C, *, dtype=torch.float32, index=True, device="cpu"):
    x = randn(B, L, 2 * C, dtype=dtype, device=device)[:, :, :C]  # strided rows
    rows = 2 * B if index else B
    mod = randn(rows, 6 * C, dtype=dtype, device=device, std=0.5)
    sh, sc, g, sh2, sc2, _ = mod.chunk(6, -1)
    idx = None
    if index:
        idx = torch.randint(0, 2, (B, L), dtype=torch.int32, device=device)
    upd = randn(B, L, C, dtype=dtype, device=device)
    return x, sh, sc, g, sh2, sc2, idx, upd


def assert_quantised(q, s, y):
    """(q, s) is the row-wise e4m3 quantisation of y (fp32/fp64): the scales are amax/448 and every
    dequantised value is within half an e4m3 ulp of y."""
    assert q.dtype == E4M3 and s.dtype == torch.float32
    assert q.shape == y.shape and s.shape == y.shape[:-1]
    y = y.double()
    amax = y.abs().amax(-1)
    want = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    torch.testing.assert_close(s.double(), want, rtol=2e-6, atol=0)
    deq = q.double() * s.double().unsqueeze(-1)
    bound = torch.maximum(y.abs() * HALF_ULP_REL, SUBNORMAL_ABS * s.double().unsqueeze(-1)) * 1.001 + 1e-12
    assert ((deq - y).abs() <= bound).all(), ((deq - y).abs() / bound).max()


# --- reference and CPU ops --------------------------------------------------------------------------

def test_quantize_rows_reference_semantics():
    y = randn(5, 7, 48) * torch.logspace(-3, 3, 7).view(1, 7, 1)
    y[0, 0] = 0  # an all-zero row: scale 1, values 0
    y[1, 1, :5] = torch.tensor([1e-9, -1e-9, 3.0, -2.5, 0.0])
    q, s = ref.quantize_fp8_rows(y)
    assert s[0, 0] == 1 and (q[0, 0].float() == 0).all()
    assert_quantised(q, s, y)
    # the row maximum maps to +-448 exactly
    top = (y.abs() == y.abs().amax(-1, keepdim=True))
    top[0, 0] = False  # the zero row
    assert top.sum() >= 34 and (q.float().abs()[top] == 448).all()


@pytest.mark.parametrize("index", [True, False])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_norm_scale_shift_fp8_cpu(index, norm):
    x, sh, sc, _, _, _, idx, _ = make_norm_inputs(2, 13, 48, index=index)
    q, s = F8.norm_scale_shift_fp8(x, sh, sc, idx if index else None, 1e-6, norm)
    y = ref.norm_scale_shift(x.double(), sh.double(), sc.double(), idx if index else None, norm=norm)
    assert_quantised(q, s, y)


def test_gate_residual_norm_scale_shift_fp8_cpu():
    x, _, _, g, sh2, sc2, idx, upd = make_norm_inputs(2, 7, 80, dtype=torch.bfloat16)
    r, q, s = F8.gate_residual_norm_scale_shift_fp8(x, upd, g, sh2, sc2, idx)
    r_ref, _ = ref.gate_residual_norm_scale_shift(x, upd, g, sh2, sc2, idx)
    assert r.dtype == torch.bfloat16 and torch.equal(r, r_ref)
    # the norm reads the residual as stored (bf16), math in fp64 here
    y = ref.norm_scale_shift(r.double(), sh2.double(), sc2.double(), idx)
    assert_quantised(q, s, y)


def test_dual_ops_are_two_single_calls():
    xa, sha, sca, ga, sh2a, sc2a, ia, ua = make_norm_inputs(2, 13, 48)
    xb, shb, scb, gb, sh2b, sc2b, _, ub = make_norm_inputs(2, 5, 48, index=False)
    d = F8.dual_norm_scale_shift_fp8(xa, sha, sca, ia, 1e-6, xb, shb, scb, None, 1e-5)
    one = (*F8.norm_scale_shift_fp8(xa, sha, sca, ia, 1e-6), *F8.norm_scale_shift_fp8(xb, shb, scb, None, 1e-5))
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(d, one))
    d = F8.dual_gate_residual_norm_scale_shift_fp8(xa, ua, ga, sh2a, sc2a, ia, 1e-6, xb, ub, gb, sh2b, sc2b, None, 1e-6)
    one = (*F8.gate_residual_norm_scale_shift_fp8(xa, ua, ga, sh2a, sc2a, ia),
           *F8.gate_residual_norm_scale_shift_fp8(xb, ub, gb, sh2b, sc2b, None))
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(d, one))


@pytest.mark.parametrize("activation", ["none", "gelu_tanh"])
def test_quantize_fp8_cpu(activation):
    x = randn(2, 7, 64)
    b = randn(64)
    q, s = F8.quantize_fp8(x, b, activation)
    y = x.double() + b.double()
    if activation == "gelu_tanh":
        y = torch.nn.functional.gelu(y, approximate="tanh")
    assert_quantised(q, s, y)


@pytest.mark.parametrize("activation", ["none", "gelu_tanh"])
def test_fp8_linear_cpu_is_dequantised_matmul(activation):
    x, w, b = randn(3, 5, 48), randn(80, 48), randn(80)
    xq, xs = F8.quantize_fp8(x)
    wq, ws = F8.quantize_weight(w)
    out = F8.fp8_linear(xq, xs, wq, ws, b, torch.float32, activation)
    want = (xq.double() * xs.double()[..., None]) @ (wq.double() * ws.double()[:, None]).t() + b.double()
    if activation == "gelu_tanh":
        want = torch.nn.functional.gelu(want, approximate="tanh")
    assert out.shape == (3, 5, 80) and out.dtype == torch.float32
    assert rel_err(out, want) < 1e-6
    # and close to the unquantised product (the FP8 error budget of one GEMM on gaussian data)
    exact = x.double() @ w.double().t() + b.double()
    if activation == "gelu_tanh":
        exact = torch.nn.functional.gelu(exact, approximate="tanh")
    assert 1e-3 < rel_err(out, exact) < 6e-2


def test_joint_fp8_linear_cpu():
    txt, img = randn(2, 5, 48), randn(2, 13, 48)
    wt, wi, bt = randn(96, 48), randn(96, 48), randn(96)
    (tq, ts), (iq, is_) = F8.quantize_fp8(txt), F8.quantize_fp8(img)
    (wtq, wts), (wiq, wis) = F8.quantize_weight(wt), F8.quantize_weight(wi)
    out = F8.joint_fp8_linear(tq, ts, iq, is_, wtq, wts, bt, wiq, wis, None, torch.float32)
    assert out.shape == (2, 18, 96)
    torch.testing.assert_close(out[:, :5], F8.fp8_linear(tq, ts, wtq, wts, bt, torch.float32))
    torch.testing.assert_close(out[:, 5:], F8.fp8_linear(iq, is_, wiq, wis, None, torch.float32))


def test_fp8_gemms_cpu_ignore_fast_accum():
    """The CPU reference accumulates in fp32 whatever ``fast_accum`` says: the same values."""
    xq, xs = F8.quantize_fp8(randn(3, 5, 48))
    wq, ws = F8.quantize_weight(randn(80, 48))
    b = randn(80)
    for act in ("none", "gelu_tanh"):
        assert torch.equal(F8.fp8_linear(xq, xs, wq, ws, b, torch.float32, act, fast_accum=True),
                           F8.fp8_linear(xq, xs, wq, ws, b, torch.float32, act))
    (tq, ts), (iq, is_) = F8.quantize_fp8(randn(2, 5, 48)), F8.quantize_fp8(randn(2, 13, 48))
    args = (tq, ts, iq, is_, wq, ws, b, wq, ws, None, torch.float32)
    assert torch.equal(F8.joint_fp8_linear(*args, fast_accum=True), F8.joint_fp8_linear(*args))


@pytest.mark.parametrize("M", [16, 37, 5])
@pytest.mark.parametrize("into", [False, True])
def test_scaled_mm_token_counts_not_divisible_by_16(monkeypatch, M, into):
    """cuBLAS's FP8 GEMM refuses sizes not divisible by 16: the CUDA path pads the token rows. A
    stand-in for torch._scaled_mm with that rule and the row-wise semantics checks the padding and
    that the dropped rows never reach the output."""
    calls = []

    def scaled_mm(a, b, *, scale_a, scale_b, bias=None, out_dtype=None, out=None, use_fast_accum=False):
        assert all(n % 16 == 0 for n in (*a.shape, *b.shape)), ("not divisible by 16", a.shape, b.shape)
        assert use_fast_accum is False
        calls.append(a.shape[0])
        y = (a.double() * scale_a.double()) @ (b.double() * scale_b.double())
        if bias is not None:
            y = y + bias.double()
        y = y.to(out_dtype)
        return y if out is None else out.copy_(y)

    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    xq, xs = F8.quantize_fp8(randn(M, 48))
    wq, ws = F8.quantize_weight(randn(32, 48))
    b = randn(32)
    want = F8.fp8_linear(xq, xs, wq, ws, b, torch.float32)  # CPU reference
    dst = torch.full((M + 3, 32), float("nan"))
    got = F8._scaled_mm_into(xq, xs, wq, ws, b, torch.float32, out=dst[1:M + 1] if into else None)
    assert calls == [M + (-M % 16)]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if into:
        assert got.data_ptr() == dst[1].data_ptr()
        assert dst[0].isnan().all() and dst[M + 1:].isnan().all()



@pytest.mark.parametrize("Lt", [225, 208, 1])
def test_scaled_mm_scale_views_16_byte_aligned(monkeypatch, Lt):
    """cuBLASLt refuses (CUBLAS_STATUS_NOT_SUPPORTED) a row-wise scale vector that is not 16-byte
    aligned. The image rows' scales of one joint [text + image] quantisation are a view starting
    4 x L_txt bytes in: the CUDA path hands cuBLAS an aligned copy, without changing the result."""
    seen = []

    def scaled_mm(a, b, *, scale_a, scale_b, bias=None, out_dtype=None, out=None, use_fast_accum=False):
        seen.append(scale_a.data_ptr() % 16)
        y = ((a.double() * scale_a.double()) @ (b.double() * scale_b.double())).to(out_dtype)
        return y if out is None else out.copy_(y)

    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    oq, osc = F8.quantize_fp8(randn(1, Lt + 32, 48))
    wq, ws = F8.quantize_weight(randn(16, 48))
    iq, isc = oq[0, Lt:], osc[0, Lt:]
    assert (isc.data_ptr() % 16 != 0) == (Lt % 4 != 0)
    got = F8._scaled_mm_into(iq, isc, wq, ws, None, torch.float32)
    assert seen == [0]
    torch.testing.assert_close(got, F8.fp8_linear(iq, isc, wq, ws, None, torch.float32), rtol=1e-5, atol=1e-5)


def test_fast_accum_reaches_every_scaled_mm_call(monkeypatch):
    """``fast_accum`` becomes ``torch._scaled_mm``'s ``use_fast_accum`` on the CUDA path: the unchecked
    GEMMs (padded and unpadded token counts, the joint one per sample and stream) and the eager fast path
    that the integrations call (a stand-in for ``torch._scaled_mm`` records the flag; CPU tensors)."""
    from fused_dit_ops.ops import _eager
    seen = []

    def scaled_mm(a, b, *, scale_a, scale_b, bias=None, out_dtype=None, out=None, use_fast_accum=False):
        seen.append(use_fast_accum)
        y = ((a.double() * scale_a.double()) @ (b.double() * scale_b.double())).to(out_dtype)
        return y if out is None else out.copy_(y)

    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    wq, ws = F8.quantize_weight(randn(32, 48))
    (xq, xs), (tq, ts), (iq, is_) = (F8.quantize_fp8(randn(*s, 48)) for s in ((2, 16), (2, 5), (2, 7)))
    for fast in (True, False):
        seen.clear()
        F8.fp8_linear_unchecked(xq, xs, wq, ws, None, torch.float32, "none", fast)
        F8.fp8_linear_unchecked(tq, ts, wq, ws, None, torch.float32, fast_accum=fast)  # padded to 16 rows
        F8.joint_fp8_linear_unchecked(tq, ts, iq, is_, wq, ws, None, wq, ws, None, torch.float32, fast)
        assert seen == [fast] * 6, seen
    # the eager fast path (what CUDA runs in eager mode) hands it on; otherwise the op gets it
    monkeypatch.setattr(_eager, "fast", lambda x: True)
    seen.clear()
    _eager.fp8_linear_unchecked(xq, xs, wq, ws, None, torch.float32, fast_accum=True)
    _eager.joint_fp8_linear_unchecked(tq, ts, iq, is_, wq, ws, None, wq, ws, None, torch.float32, fast_accum=True)
    assert seen == [True] * 5, seen
    monkeypatch.setattr(_eager, "fast", lambda x: False)
    ops = []
    monkeypatch.setattr(_eager, "_L8", lambda *a: ops.append(("fp8_linear", a[-1])))
    monkeypatch.setattr(_eager, "_JL8", lambda *a: ops.append(("joint_fp8_linear", a[-1])))
    _eager.fp8_linear_unchecked(xq, xs, wq, ws, None, torch.float32, fast_accum=True)
    _eager.joint_fp8_linear_unchecked(tq, ts, iq, is_, wq, ws, None, wq, ws, None, torch.float32, fast_accum=True)
    assert ops == [("fp8_linear", True), ("joint_fp8_linear", True)]

# --- opcheck, compile, bad inputs ---------------------------------------------------------------------

def _op_cases(device="cpu"):
    # CUDA: bfloat16 activations and GEMM outputs (torch._scaled_mm with row-wise scales)
    dt, out = (torch.float32, torch.float32) if device == "cpu" else (torch.bfloat16, torch.bfloat16)
    x, sh, sc, g, sh2, sc2, idx, upd = make_norm_inputs(2, 7, 48, dtype=dt, device=device)
    xb, shb, scb, gb, sh2b, sc2b, _, ub = make_norm_inputs(2, 5, 48, index=False, dtype=dt, device=device)
    xq, xs = F8.quantize_fp8(randn(3, 48, device=device))
    wq, ws = F8.quantize_weight(randn(32, 48, device=device))
    tq, ts = F8.quantize_fp8(randn(2, 5, 48, device=device))
    iq, is_ = F8.quantize_fp8(randn(2, 7, 48, device=device))
    return {
        "norm_scale_shift_fp8": (x, sh, sc, idx, 1e-6, "layer"),
        "dual_norm_scale_shift_fp8": (x, sh, sc, idx, 1e-6, xb, shb, scb, None, 1e-6, "rms"),
        "gate_residual_norm_scale_shift_fp8": (x, upd, g, sh2, sc2, idx, 1e-6),
        "dual_gate_residual_norm_scale_shift_fp8": (x, upd, g, sh2, sc2, idx, 1e-6, xb, ub, gb, sh2b, sc2b, None,
                                                    1e-6),
        "quantize_fp8": (randn(2, 7, 48, dtype=dt, device=device), randn(48, dtype=dt, device=device), "gelu_tanh"),
        "fp8_linear": (xq, xs, wq, ws, randn(32, dtype=out, device=device), out, "none"),
        "joint_fp8_linear": (tq, ts, iq, is_, wq, ws, randn(32, dtype=out, device=device), wq, ws, None, out),
        # [attention | GELU(MLP columns of a wider buffer)]: b a strided column view
        "quantize_fp8_cat": (randn(2, 7, 48, dtype=dt, device=device),
                             randn(2, 7, 112, dtype=dt, device=device)[..., 32:], "gelu_tanh"),
        "gate_residual_layer_norm_fp8": (x, upd, g, idx, randn(48, device=device), randn(48, device=device), 1e-6),
    }


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("op", F8.OPS)
def test_opcheck(op, device):
    if device == "cuda" and not cuda_fp8():
        pytest.skip("needs a CUDA GPU with compute capability 8.9+")
    _opcheck(op, _op_cases(device)[op])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("op", ["fp8_linear", "joint_fp8_linear"])
def test_opcheck_fast_accum(op, device):
    """The FP8 GEMMs with their trailing ``fast_accum=True``."""
    if device == "cuda" and not cuda_fp8():
        pytest.skip("needs a CUDA GPU with compute capability 8.9+")
    _opcheck(op, (*_op_cases(device)[op], True))


def _opcheck(op, args):
    fp8_inputs = any(isinstance(a, torch.Tensor) and a.dtype == E4M3 for a in args)
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    # opcheck's schema test compares inputs with torch.allclose, which CPU torch lacks for float8:
    # for ops with e4m3 inputs, the same "inputs unmodified, outputs not aliased" check is done here
    torch.library.opcheck(getattr(torch.ops.fused_dit, op).default, args,
                          test_utils=utils if fp8_inputs else utils + ("test_schema",))
    if fp8_inputs:
        before = [a.view(torch.uint8).clone() if a.dtype == E4M3 else a.clone()
                  for a in args if isinstance(a, torch.Tensor)]
        out = getattr(torch.ops.fused_dit, op).default(*args)
        after = [a.view(torch.uint8) if a.dtype == E4M3 else a for a in args if isinstance(a, torch.Tensor)]
        assert all(torch.equal(x, y) for x, y in zip(before, after))
        ptrs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        assert out.untyped_storage().data_ptr() not in ptrs


def test_compile_fullgraph_dynamic_lengths():
    """A block-like chain of the FP8 ops under torch.compile (fullgraph, symbolic lengths): no graph
    break, no recompile for a new length, same values as eager."""
    import torch._dynamo as dynamo

    wq, ws = F8.quantize_weight(randn(96, 48))
    w2q, w2s = F8.quantize_weight(randn(48, 96))

    def chain(x, sh, sc, g, idx, upd):
        q, s = F8.norm_scale_shift_fp8(x, sh, sc, idx)
        hq, hs = F8.quantize_fp8(F8.fp8_linear(q, s, wq, ws, None, torch.float32), None, "gelu_tanh")
        y = F8.fp8_linear(hq, hs, w2q, w2s, None, torch.float32)
        r, q2, s2 = F8.gate_residual_norm_scale_shift_fp8(x, y + upd, g, sh, sc, idx)
        return r, q2.float() * s2[..., None]

    dynamo.reset()
    f = torch.compile(chain, fullgraph=True, backend="aot_eager", dynamic=True)
    for L in (13, 7):
        x, sh, sc, g, _, _, idx, upd = make_norm_inputs(1, L, 48)
        with dynamo.config.patch(error_on_recompile=L == 7):
            got = f(x, sh, sc, g, idx, upd)
        want = chain(x, sh, sc, g, idx, upd)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_input_errors():
    x, sh, sc, g, sh2, sc2, idx, upd = make_norm_inputs(1, 5, 40)
    expect_input_error(lambda: F8.norm_scale_shift_fp8(x, sh, sc, idx), "norm_scale_shift_fp8", "'x'",
                       "multiple of 16", "40")
    expect_input_error(lambda: F8.gate_residual_norm_scale_shift_fp8(x, upd, g, sh2, sc2, idx), "'residual'",
                       "multiple of 16")
    expect_input_error(lambda: F8.quantize_fp8(randn(3, 40)), "quantize_fp8", "'x'", "multiple of 16")
    expect_input_error(lambda: F8.quantize_fp8(randn(3, 48), None, "relu"), "'activation'", "relu")
    expect_input_error(lambda: F8.quantize_fp8(randn(2, 4, 3, 64)[:, :, :2, :48]), "collapse")
    xq, xs = F8.quantize_fp8(randn(3, 48))
    wq, ws = F8.quantize_weight(randn(32, 48))
    L = F8.fp8_linear
    expect_input_error(lambda: L(randn(3, 48), xs, wq, ws, None, torch.float32), "'x'", "float8_e4m3fn", "float32")
    expect_input_error(lambda: L(xq, xs[:2], wq, ws, None, torch.float32), "'x_scale'", "[3]", "[2]")
    expect_input_error(lambda: L(xq, xs.double(), wq, ws, None, torch.float32), "'x_scale'", "float64")
    expect_input_error(lambda: L(xq, xs, wq[:, :32], ws, None, torch.float32), "'weight'", "K = 48")
    expect_input_error(lambda: L(xq, xs, wq[:24], ws[:24], None, torch.float32), "'weight'", "rows N",
                       "multiple of 16")
    expect_input_error(lambda: L(xq, xs, wq, ws, randn(32).bfloat16(), torch.float32), "'bias'", "bfloat16",
                       "out_dtype")
    expect_input_error(lambda: L(xq, xs, wq, ws, None, torch.int32), "'out_dtype'")
    expect_input_error(lambda: L(xq, xs, wq, ws, None, torch.float32, "silu"), "'activation'")
    for bad, kind in ((1, "int"), ("yes", "str"), (None, "NoneType")):
        expect_input_error(lambda: L(xq, xs, wq, ws, None, torch.float32, "none", bad), "fp8_linear", "'fast_accum'",
                           "must be a bool", kind)
    (tq, ts), (iq, is_) = F8.quantize_fp8(randn(1, 5, 48)), F8.quantize_fp8(randn(1, 7, 48))
    expect_input_error(lambda: F8.joint_fp8_linear(tq, ts, iq, is_, wq, ws, None, wq, ws, None, torch.float32,
                                                   fast_accum=0), "joint_fp8_linear", "'fast_accum'", "bool", "int 0")
    # the validator the implementations share (through torch.ops they get a bool already)
    expect_input_error(lambda: F8._check_fp8_linear(xq, xs, wq, ws, None, torch.float32, "none", 1.0),
                       "'fast_accum'", "float")


def test_fast_path_runs_the_ops_own_checks(monkeypatch):
    """The eager fast path (CUDA) runs each FP8 op's validator before its launcher: the same
    FusedDitInputError (metadata only, so CPU tensors show it)."""
    from fused_dit_ops.ops import _eager
    monkeypatch.setattr(_eager, "fast", lambda x: not torch.is_grad_enabled())
    monkeypatch.setattr(_eager, "_PASSED", set())
    x, sh, sc, g, sh2, sc2, idx, upd = make_norm_inputs(1, 5, 40)
    with torch.no_grad():
        expect_input_error(lambda: _eager.dual_norm_scale_shift_fp8(x, sh, sc, idx, 1e-6, x, sh, sc, idx, 1e-6),
                           "dual_norm_scale_shift_fp8", "'x_a'", "multiple of 16")
        expect_input_error(lambda: _eager.dual_gate_residual_norm_scale_shift_fp8(
            x, upd, g, sh2, sc2, idx, 1e-6, x, upd, g, sh2, sc2, idx, 1e-6), "'residual_a'", "multiple of 16")
        expect_input_error(lambda: _eager.quantize_fp8(randn(3, 40)), "quantize_fp8", "multiple of 16")


# --- Triton kernels under the interpreter --------------------------------------------------------------
# The interpreter's fp32 -> float8_e4m3fn conversion is wrong where rounding carries into the exponent
# (e.g. 127.9 -> 64 instead of 128), so these tests read the kernels' values just before the cast
# (q_dtype=torch.float32, the same kernels with a float32 output pointer); the cast itself is the
# hardware's round-to-nearest conversion, covered by the GPU tests.

def _close_pre_cast(got, want):
    q, s = got
    qw, sw = want
    torch.testing.assert_close(s, sw, rtol=3e-6, atol=0)
    # values in [-448, 448]: a few fp32 ulps of the normalised row
    torch.testing.assert_close(q, qw, rtol=1e-5, atol=1e-3)


@pytest.mark.interpret
@pytest.mark.parametrize("index", [True, False])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_interpret_dual_norm_fp8(index, norm):
    from fused_dit_ops.kernels import fp8 as k
    xa, sha, sca, _, _, _, ia, _ = make_norm_inputs(2, 13, 48, index=index)
    xb, shb, scb, _, _, _, _, _ = make_norm_inputs(2, 5, 48, index=False)
    ia = ia if index else None
    got = k.dual_norm_scale_shift_fp8(xa, sha, sca, ia, 1e-6, xb, shb, scb, None, 1e-5, norm, q_dtype=torch.float32)
    _close_pre_cast(got[:2], ref.norm_scale_shift_fp8(xa, sha, sca, ia, 1e-6, norm, cast=False))
    _close_pre_cast(got[2:], ref.norm_scale_shift_fp8(xb, shb, scb, None, 1e-5, norm, cast=False))
    one = k.norm_scale_shift_fp8(xa, sha, sca, ia, 1e-6, norm, q_dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(one, got[:2]))


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpret_dual_gate_residual_norm_fp8(dtype):
    from fused_dit_ops.kernels import fp8 as k
    ra, _, _, ga, sha, sca, ia, ua = make_norm_inputs(2, 13, 80, dtype=dtype)
    rb, _, _, gb, shb, scb, _, ub = make_norm_inputs(2, 3, 80, dtype=dtype, index=False)
    got = k.dual_gate_residual_norm_scale_shift_fp8(ra, ua, ga, sha, sca, ia, 1e-6, rb, ub, gb, shb, scb, None, 1e-6,
                                                    q_dtype=torch.float32)
    for (r, q, s), args in zip((got[:3], got[3:]), ((ra, ua, ga, sha, sca, ia), (rb, ub, gb, shb, scb, None))):
        rr, qr, sr = ref.gate_residual_norm_scale_shift_fp8(*args, cast=False)
        assert r.dtype == dtype
        # fp32: exact; fp16: the interpreter rounds the residual store toward zero (1 ulp)
        torch.testing.assert_close(r, rr, rtol=0 if dtype == torch.float32 else 1e-3, atol=0)
        if dtype == torch.float32:
            _close_pre_cast((q, s), (qr, sr))
        else:  # the norm reads the residual as the kernel stored it
            _close_pre_cast((q, s), ref.norm_scale_shift_fp8(r, *args[3:5], args[5], cast=False))


# the kernels of wide rows, with 64-column chunks (a ragged last chunk of the 96 columns): two passes, or
# one pass over the chunks held in registers
_CHUNKED = {"CHUNKED": True, "BLOCK_M": 2, "BLOCK_K": 64, "STREAM_STORES": False, "num_warps": 4}
_WIDE = {"whole": None, "chunked": _CHUNKED, "onepass": dict(_CHUNKED, ONEPASS=True)}


@pytest.mark.interpret
@pytest.mark.parametrize("kernel", list(_WIDE))
@pytest.mark.parametrize("bias,gelu", [(False, False), (True, True)])
def test_interpret_quantize_rows(bias, gelu, kernel):
    from fused_dit_ops.kernels import fp8 as k
    cfg = _WIDE[kernel]
    x = randn(2, 7, 96)
    x[0, 3] = 0  # a zero row (no bias): scale 1
    b = randn(96) if bias else None
    got = k.quantize_rows(x, b, gelu, cfg, q_dtype=torch.float32)
    want = ref.quantize_fp8(x, b, "gelu_tanh" if gelu else "none", cast=False)
    _close_pre_cast(got, want)
    if not bias:
        assert got[1][0, 3] == 1 and (got[0][0, 3] == 0).all()
    # rows of a [B, L, K] view with free batch and token strides (a stream's rows of a joint buffer)
    j = randn(2, 19, 96)
    got = k.quantize_rows(j[:, 5:], b, gelu, cfg, q_dtype=torch.float32)
    _close_pre_cast(got, ref.quantize_fp8(j[:, 5:], b, "gelu_tanh" if gelu else "none", cast=False))
    t = randn(4, 3, 96).transpose(0, 1)
    got = k.quantize_rows(t, b, gelu, cfg, q_dtype=torch.float32)
    assert got[0].shape == (3, 4, 96) and got[0].is_contiguous()
    _close_pre_cast(got, ref.quantize_fp8(t, b, "gelu_tanh" if gelu else "none", cast=False))


@pytest.mark.interpret
@pytest.mark.parametrize("kernel", list(_WIDE))
def test_interpret_nan_row_stays_nan(kernel):
    from fused_dit_ops.kernels import fp8 as k
    x = randn(3, 48)
    x[1, 5] = float("nan")
    q, s = k.quantize_rows(x, None, False, _WIDE[kernel], q_dtype=torch.float32)
    assert torch.isnan(s[1]) and torch.isnan(q[1]).all()
    assert torch.isfinite(s[[0, 2]]).all() and torch.isfinite(q[[0, 2]]).all()
    qr, sr = ref.quantize_fp8_rows(x)
    assert torch.isnan(sr[1]) and torch.isnan(qr[1].float()).all()


# --- patch(model, precision="fp8") on a tiny Qwen-Image model (CPU, fp32) --------------------------------

# measured on CPU: the tiny 3-layer model below, patched FP8 vs the fp32 model, rel_fro ~0.06; the
# per-row recipe in plain PyTorch on the same Linears gives about the same
FP8_MODEL_REL = 0.15


_tiny, _inputs = tiny_fp8_qwen, tiny_fp8_qwen_inputs


_run = run_no_grad


def _block_linears(block):
    a = block.attn
    return [a.to_q, a.to_k, a.to_v, a.add_q_proj, a.add_k_proj, a.add_v_proj, a.to_out[0], a.to_add_out,
            block.img_mlp.net[0].proj, block.img_mlp.net[2], block.txt_mlp.net[0].proj, block.txt_mlp.net[2]]


def test_fp8_recipe_covers_the_fused_linears_and_removes_exactly():
    """The baseline recipe quantises the same twelve Linears per block as precision="fp8" (the
    modulation Linears stay), and :func:`fp8_recipe.remove` restores the stock forward exactly."""
    m = _tiny()
    kw = _inputs(m)
    stock = _run(m, kw)
    lins = fp8_recipe.install(m)
    assert {id(x) for x in lins} == {id(x) for b in m.transformer_blocks for x in _block_linears(b)}
    assert all(x._fp8_recipe_fast_accum is True for x in lins)  # torchao's default
    with pytest.raises(RuntimeError, match="already installed"):
        fp8_recipe.install(m)
    recipe = _run(m, kw)
    assert 0 < rel_err(recipe, stock) < 0.1
    fp8_recipe.remove(m)
    assert torch.equal(_run(m, kw), stock)
    # use_fast_accum=False: stored per Linear (the CPU's _scaled_mm gives the same values), removed exactly
    lins = fp8_recipe.install(m, fast_accum=False)
    assert all(x._fp8_recipe_fast_accum is False for x in lins)
    assert torch.equal(_run(m, kw), recipe)
    fp8_recipe.remove(m)
    assert not any(hasattr(x, "_fp8_recipe_fast_accum") for x in lins)
    assert torch.equal(_run(m, kw), stock)


def test_patch_fp8_tiny_qwen_accuracy_and_unpatch():
    m = _tiny()
    kw = _inputs(m)
    stock = _run(m, kw)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    fp8_recipe.install(m)
    recipe = _run(m, kw)
    fp8_recipe.remove(m)
    r = fdo.patch(m, precision="fp8")
    assert r.options["precision"] == "fp8"
    assert any("FP8 e4m3 GEMMs" in s and "(3 blocks)" in s for s in r.swapped), r
    assert "precision" not in r.stock and "model" not in r.stock, r
    ours = _run(m, kw)
    e_ours, e_recipe = rel_err(ours, stock), rel_err(recipe, stock)
    print(f"tiny Qwen fp32 reference: FP8 patched rel_fro {e_ours:.3e}, per-row recipe {e_recipe:.3e}")
    assert 1e-3 < e_ours < FP8_MODEL_REL  # quantised (not the bf16 path), within the FP8 budget
    assert e_ours <= 1.25 * e_recipe
    assert not r.runtime, r.runtime
    # state_dict has no FP8 buffers; unpatch restores everything exactly
    assert set(m.state_dict()) == set(sd)
    assert any(n.startswith("transformer_blocks.0._fused_dit_fp8_") for n, _ in m.named_buffers())
    assert fdo.unpatch(m)
    assert not any("_fused_dit_fp8_" in n for n, _ in m.named_buffers())
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    assert torch.equal(_run(m, kw), stock)


def test_patch_fp8_fast_accum(monkeypatch):
    """``fp8_fast_accum``: by default (None) with precision="fp8" every FP8 GEMM of the blocks gets
    ``fast_accum=True``; ``fp8_fast_accum=False`` gives every one ``fast_accum=False``; on the CPU (the
    reference accumulates in fp32) the output is the same either way; unpatch restores exactly. Without
    precision="fp8", or not a bool / None, it is refused before anything is patched."""
    from fused_dit_ops.integrations.engine import is_patched
    m = _tiny()
    kw = _inputs(m)
    stock = _run(m, kw)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    calls = spy_fp8_gemms(monkeypatch)
    # per block: q|k|v (joint), two output projections, fc1 and fc2 of both streams
    expect = [("joint_fp8_linear_unchecked",)] * 3 + [("fp8_linear_unchecked",)] * 18
    r = fdo.patch(m, precision="fp8", fp8_fast_accum=False)
    assert r.options["fp8_fast_accum"] is False and m.__dict__["_fused_dit_state"].fp8.fast_accum is False
    assert not any("fast accumulation" in s for s in r.swapped), r
    calls.clear()  # (patch's probe ran the blocks once)
    slow = _run(m, kw)
    assert sorted(calls) == sorted((n, False) for (n,) in expect)
    r = fdo.patch(m, precision="fp8")
    assert r.options["fp8_fast_accum"] is True and m.__dict__["_fused_dit_state"].fp8.fast_accum is True
    assert any("fast accumulation" in s for s in r.swapped), r
    calls.clear()
    fast = _run(m, kw)
    assert sorted(calls) == sorted((n, True) for (n,) in expect)
    assert torch.equal(fast, slow) and not r.runtime, r.runtime
    assert fdo.unpatch(m)
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    assert torch.equal(_run(m, kw), stock)
    assert "fp8_fast_accum" not in fdo.patch(m).options  # bf16: no FP8 GEMMs, no option
    fdo.unpatch(m)
    for kw_bad, match in (({"fp8_fast_accum": True}, r"fp8_fast_accum=True .*needs precision='fp8', got precision='bf16'"),
                          ({"fp8_fast_accum": False}, r"fp8_fast_accum=False .*needs precision='fp8'"),
                          ({"fp8_fast_accum": True, "attention_precision": "fp8"}, "needs precision='fp8'"),
                          ({"precision": "fp8", "fp8_fast_accum": 1},
                           "fp8_fast_accum must be True, False or None, got 1")):
        with pytest.raises(ValueError, match=match):
            fdo.patch(m, **kw_bad)
        assert not is_patched(m)


def test_bench_block_fp8_slow_accum_rows(tmp_path):
    """``bench block --precision fp8 --fp8-slow-accum`` (tiny, CPU): the FP8 GEMMs with (patch's default)
    and without fast accumulation, and the recipe with (torchao's default) and without, in one run, each
    with its options."""
    from fused_dit_ops.bench import block
    rows = tiny_bench_block_rows(tmp_path, "stock-compile,patched-eager", "--fp8-slow-accum")
    assert set(rows) == {"stock-compile", "patched-eager", "patched-eager+fp8", "patched-eager+fp8+slowaccum",
                         "stock-compile+fp8recipe", "stock-compile+fp8recipeslow"}
    assert rows["patched-eager+fp8+slowaccum"]["patch_options"] == {"precision": "fp8", "fp8_fast_accum": False}
    assert rows["stock-compile+fp8recipeslow"]["patch_options"] == {"fp8_recipe": True,
                                                                    "fp8_recipe_fast_accum": False}
    for r in rows.values():
        assert "error" not in r, r
    assert rows["patched-eager+fp8+slowaccum"]["fp8"] == "fp8"
    # the CPU reference ignores the flag
    assert rows["patched-eager+fp8+slowaccum"]["max_rel_diff_vs_stock"] == rows["patched-eager+fp8"][
        "max_rel_diff_vs_stock"]
    with pytest.raises(SystemExit):  # --fp8-slow-accum needs --precision fp8
        block.main(["--device", "cpu", "--tiny", "--providers", "patched-eager", "--fp8-slow-accum", "--out",
                    str(tmp_path)])


def test_patch_fp8_batch_of_two():
    """B = 2 (per-sample index, both streams' rows quantised per stream): each sample as when run alone."""
    m = _tiny(num_layers=2)
    kw = _inputs(m, seed=8, batch=2)
    fdo.patch(m, precision="fp8")
    both = _run(m, kw)
    one = {k: (v[:1] if isinstance(v, torch.Tensor) else v[:1] if k == "img_shapes" else v) for k, v in kw.items()}
    # fp32 GEMMs of another batch size may round differently, and an e4m3 rounding can then flip
    assert rel_err(_run(m, one), both[:1]) < 1e-4
    fdo.unpatch(m)
    assert rel_err(both, _run(m, kw)) < FP8_MODEL_REL


def test_patch_fp8_lookahead_and_second_forward():
    """Look-ahead blocks hand their quantised norm1 to the next block; a second forward (modulation
    reuse) gives the same output; a block called alone (no look-ahead) agrees."""
    m = _tiny()
    kw = _inputs(m, seed=4)
    fdo.patch(m, precision="fp8")
    a = _run(m, kw)
    b = _run(m, kw)
    assert torch.equal(a, b)
    st = m.__dict__["_fused_dit_state"]
    assert st.next_block  # look-ahead pairs recorded
    from fused_dit_ops.integrations.engine import patch_ab
    r = patch_ab(m, precision="fp8", lookahead=False)
    assert "lookahead" in r.stock
    c = _run(m, kw)
    assert rel_err(c, a) < 1e-5


def test_patch_fp8_lora_or_edited_weights_fall_back_to_bf16_path():
    m = _tiny(num_layers=2)
    kw = _inputs(m, seed=6)
    fdo.patch(m, precision="fp8")
    with torch.no_grad():
        m.transformer_blocks[1].img_mlp.net[2].weight.mul_(1.5)  # an in-place edit after patching
    r = m.__dict__["_fused_dit_state"].report
    out = _run(m, kw)
    assert any("weights replaced or edited" in k for k in r.runtime), r.runtime
    fdo.unpatch(m)
    stock = _run(m, kw)  # block 1 ran the model-dtype fused path, block 0 FP8: both close to stock
    assert rel_err(out, stock) < FP8_MODEL_REL


def test_patch_fp8_peft_lora_after_patch_runs_the_adapter():
    """A PEFT adapter added after patching wraps quantised Linears: those blocks take the model-dtype
    fused path (counted), and the adapter takes part in the output."""
    peft = pytest.importorskip("peft")
    m, ref_m = _tiny(num_layers=2), _tiny(num_layers=2)
    kw = _inputs(m, seed=23)
    cfg = dict(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "net.0.proj"])
    torch.manual_seed(5)
    ref_m.add_adapter(peft.LoraConfig(**cfg))
    ref = _run(ref_m, kw)
    r = fdo.patch(m, precision="fp8")
    torch.manual_seed(5)
    m.add_adapter(peft.LoraConfig(**cfg))
    out = _run(m, kw)
    assert any("modules replaced or wrapped" in k for k in r.runtime), r.runtime
    assert rel_err(out, ref) < 2e-6  # every block on the fp32 fused path, adapter included
    assert rel_err(_run(_tiny(num_layers=2), kw), ref) > 1e-2  # the adapter matters


def test_patch_fp8_flux_double_stream_blocks():
    """Flux.1's double-stream blocks take the same FP8 path (its single-stream blocks too: see
    tests/test_fp8_kinds.py)."""
    from fused_dit_ops.models import build_flux_transformer, make_flux_inputs
    m = build_flux_transformer("tiny", seed=1, attention_head_dim=32, axes_dims_rope=(8, 12, 12))
    kw = make_flux_inputs(m, seed=1)
    stock = _run(m, kw)
    r = fdo.patch(m, precision="fp8")
    assert any("FP8 e4m3 GEMMs" in s and "both streams" in s for s in r.swapped), r
    e = rel_err(_run(m, kw), stock)
    assert 1e-3 < e < FP8_MODEL_REL and not r.runtime
    fdo.unpatch(m)
    assert torch.equal(_run(m, kw), stock)


def test_patch_fp8_offloaded_weights_logic(monkeypatch):
    """The bf16-weight offload (CUDA only) exercised on the CPU: the weights are swapped for CPU copies
    while patched, a forward that needs the stock code or a block that must leave the FP8 path raises
    a clear error (instead of running on missing weights), and unpatch gives the original values back."""
    from fused_dit_ops.integrations import fp8 as I8
    monkeypatch.setattr(I8, "_should_offload", lambda dev, keep: not keep)
    m = _tiny(num_layers=2)
    kw = _inputs(m, seed=9)
    stock = _run(m, kw)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    w = m.transformer_blocks[0].img_mlp.net[2].weight
    ptr = w.data_ptr()
    r = fdo.patch(m, precision="fp8")
    assert any("kept on the CPU" in s for s in r.swapped), r
    assert w.data_ptr() != ptr  # swapped for the offload copy
    out = _run(m, kw)
    assert 1e-3 < rel_err(out, stock) < FP8_MODEL_REL
    mask = torch.ones(1, 5, dtype=torch.bool)
    mask[0, -1] = False
    with pytest.raises(RuntimeError, match="keep_bf16_weights"):
        _run(m, dict(kw, encoder_hidden_states_mask=mask))
    with torch.no_grad():
        w.mul_(1.0)  # bumps the version: the block must leave the FP8 path
    with pytest.raises(RuntimeError, match="cannot run its FP8 path"):
        _run(m, kw)
    fdo.unpatch(m)
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    assert torch.equal(_run(m, kw), stock)
    # keep_bf16_weights: no offload, the stock fallback runs
    r = fdo.patch(m, precision="fp8", keep_bf16_weights=True)
    assert not any("kept on the CPU" in s for s in r.swapped)
    _run(m, dict(kw, encoder_hidden_states_mask=mask))
    assert any("padding" in k for k in r.runtime), r.runtime


def test_patch_fp8_model_to_dtype_after_patch_is_reported():
    """model.to(dtype) converts every floating buffer, the FP8 weights included: the blocks then run
    the model-dtype fused path, counted."""
    m = _tiny(num_layers=1)
    kw = _inputs(m, seed=10)
    r = fdo.patch(m, precision="fp8")
    m.to(torch.float64).to(torch.float32)
    stock_m = _tiny(num_layers=1)
    out = _run(m, kw)
    assert any("weight buffers converted" in k for k in r.runtime), r.runtime
    assert rel_err(out, _run(stock_m, kw)) < 2e-6


def test_patch_fp8_unsupported_shape_reported():
    """Channels that are not a multiple of 16 (3 heads x 24 = 72): the blocks stay on the model-dtype
    fused path, with the reason in report.stock."""
    m = _tiny(num_layers=2, attention_head_dim=24, axes_dims_rope=(8, 8, 8))
    kw = _inputs(m, seed=2)
    stock = _run(m, kw)
    r = fdo.patch(m, precision="fp8")
    assert any(k.startswith("fp8") and "multiples of 16" in v for k, v in r.stock.items()), r
    assert not any("FP8 e4m3" in s for s in r.swapped)
    assert rel_err(_run(m, kw), stock) < 2e-6
    with pytest.raises(ValueError, match="precision"):
        fdo.patch(m, precision="int8")


def test_patch_fp8_ops_subset_reported():
    m = _tiny(num_layers=1)
    r = fdo.patch(m, ops="modulation,attention", precision="fp8")
    assert "needs every fused op" in r.stock.get("precision", ""), r


def test_patch_fp8_compile_blocks_fullgraph():
    """Regional compile (fullgraph, aot_eager) of the FP8-patched blocks: no graph break, same output
    as eager, no recompile for the next step."""
    m = _tiny(num_layers=2)
    kw = _inputs(m, seed=3)
    fdo.patch(m, precision="fp8")
    eager = _run(m, kw)
    got, got2 = run_blocks_compiled(m, m.transformer_blocks, kw, _inputs(m, seed=5))
    assert torch.isfinite(got2).all()
    # compiled blocks have no look-ahead (each block does its own quantised norm1): same math
    assert rel_err(got, eager) < 1e-5


# --- GPU --------------------------------------------------------------------------------------------------



def _e4m3_ulps(a, b):
    """Elementwise distance in e4m3 code points (same sign side)."""
    ai, bi = a.view(torch.uint8).int(), b.view(torch.uint8).int()
    # sign-magnitude -> ordered integers
    ao = torch.where(ai >= 128, -(ai - 128), ai)
    bo = torch.where(bi >= 128, -(bi - 128), bi)
    return (ao - bo).abs()


@pytest.mark.gpu
@needs_fp8_gpu
@pytest.mark.parametrize("C", [3072, 96])
def test_gpu_kernels_match_reference(C):
    dev = "cuda"
    xa, sha, sca, ga, sh2a, sc2a, ia, ua = make_norm_inputs(2, 333, C, dtype=torch.bfloat16, device=dev)
    xb, shb, scb, gb, sh2b, sc2b, _, ub = make_norm_inputs(2, 37, C, dtype=torch.bfloat16, device=dev, index=False)
    got = F8.dual_norm_scale_shift_fp8(xa, sha, sca, ia, 1e-6, xb, shb, scb, None, 1e-6)
    want = (*ref.norm_scale_shift_fp8(xa, sha, sca, ia), *ref.norm_scale_shift_fp8(xb, shb, scb, None))
    got2 = F8.dual_gate_residual_norm_scale_shift_fp8(xa, ua, ga, sh2a, sc2a, ia, 1e-6, xb, ub, gb, sh2b, sc2b, None,
                                                      1e-6)
    want2 = (*ref.gate_residual_norm_scale_shift_fp8(xa, ua, ga, sh2a, sc2a, ia),
             *ref.gate_residual_norm_scale_shift_fp8(xb, ub, gb, sh2b, sc2b, None))
    h = randn(2, 333, 4 * C, dtype=torch.bfloat16, device=dev)
    bias = randn(4 * C, dtype=torch.bfloat16, device=dev)
    got3, want3 = F8.quantize_fp8(h, bias, "gelu_tanh"), ref.quantize_fp8(h, bias, "gelu_tanh")
    for g, w in zip((*got, *got2, *got3), (*want, *want2, *want3)):
        assert g.dtype == w.dtype and g.shape == w.shape
        if g.dtype == E4M3:
            d = _e4m3_ulps(g, w)
            assert d.max() <= 1 and (d > 0).float().mean() < 1e-3, (d.max(), (d > 0).float().mean())
        elif g.dtype == torch.float32:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=0)
        else:  # the residual in bf16: fp32 math, one rounding (an FMA may round differently: 1 ulp)
            torch.testing.assert_close(g.float(), w.float(), rtol=2.0 ** -7, atol=1e-6)


@pytest.mark.gpu
@needs_fp8_gpu
@pytest.mark.parametrize("K", [96, 12288])
def test_gpu_nan_and_zero_rows(K):
    """A row holding a NaN gets a NaN scale (every dequantised value NaN), an all-zero row scale 1, on
    the whole-row kernel (96) and the two-pass one (12288); quantize_fp8_cat likewise."""
    x = randn(4, K, dtype=torch.bfloat16, device="cuda")
    x[1, 7] = float("nan")
    x[2] = 0
    for q, s in (F8.quantize_fp8(x), F8.quantize_fp8_cat(x[:, :48], x[:, 48:], "gelu_tanh")):
        assert torch.isnan(s[1]) and s[2] == 1 and torch.isfinite(s[[0, 3]]).all(), s
        assert torch.isnan(ref.dequantize_fp8_rows(q, s)[1]).all()
        assert (q[2].float() == 0).all() and torch.isfinite(q[[0, 3]].float()).all()


@pytest.mark.gpu
@needs_fp8_gpu
def test_gpu_fp8_linear_matches_reference():
    dev = "cuda"
    x, w, b = (randn(2, 300, 3072, dtype=torch.bfloat16, device=dev), randn(12288, 3072, dtype=torch.bfloat16,
                                                                            device=dev) * 0.02,
               randn(12288, dtype=torch.bfloat16, device=dev))
    xq, xs = F8.quantize_fp8(x)
    wq, ws = F8.quantize_weight(w)
    for act in ("none", "gelu_tanh"):
        out = F8.fp8_linear(xq, xs, wq, ws, b, torch.bfloat16, act)
        want = ref.fp8_linear(xq, xs, wq, ws, b, torch.float32, act)
        assert rel_err(out, want) < 5e-3
    txt = F8.quantize_fp8(randn(2, 37, 3072, dtype=torch.bfloat16, device=dev))
    out = F8.joint_fp8_linear(*txt, xq, xs, wq, ws, b, wq, ws, None, torch.bfloat16)
    want = ref.joint_fp8_linear(*txt, xq, xs, wq, ws, b, wq, ws, None, torch.float32)
    assert rel_err(out, want) < 5e-3


# fast_accum=True: the bound above covers the bf16 output rounding (2^-9 relative) and cuBLAS's
# summation order with fp32-promoted partial sums; fast accumulation keeps the sums over all of K = 3072 in
# the tensor cores' accumulator, whose precision is below fp32, so the bound is doubled. A wrong flag
# path (dropped scales, bias or activation) misses by far more.
FAST_ACCUM_REL = 1e-2


@pytest.mark.gpu
@needs_fp8_gpu
def test_gpu_fp8_linear_fast_accum_matches_reference():
    dev = "cuda"
    x, w, b = (randn(2, 300, 3072, dtype=torch.bfloat16, device=dev),
               randn(12288, 3072, dtype=torch.bfloat16, device=dev) * 0.02,
               randn(12288, dtype=torch.bfloat16, device=dev))
    xq, xs = F8.quantize_fp8(x)
    wq, ws = F8.quantize_weight(w)
    for act in ("none", "gelu_tanh"):
        out = F8.fp8_linear(xq, xs, wq, ws, b, torch.bfloat16, act, fast_accum=True)
        want = ref.fp8_linear(xq, xs, wq, ws, b, torch.float32, act)
        e = rel_err(out, want)
        print(f"\nfp8_linear fast_accum {act}: rel_err {e:.3e} "
              f"(fp32-promoted: {rel_err(F8.fp8_linear(xq, xs, wq, ws, b, torch.bfloat16, act), want):.3e})")
        assert e < FAST_ACCUM_REL
    txt = F8.quantize_fp8(randn(2, 37, 3072, dtype=torch.bfloat16, device=dev))
    out = F8.joint_fp8_linear(*txt, xq, xs, wq, ws, b, wq, ws, None, torch.bfloat16, fast_accum=True)
    want = ref.joint_fp8_linear(*txt, xq, xs, wq, ws, b, wq, ws, None, torch.float32)
    assert rel_err(out, want) < FAST_ACCUM_REL



@pytest.mark.gpu
@needs_fp8_gpu
@pytest.mark.parametrize("Lt", [225, 208])
def test_gpu_fp8_linear_on_joint_row_views(Lt):
    """The attention output of a joint block is quantised in one pass and its image rows are a view:
    their scales start 4 x L_txt bytes in (not 16-byte aligned for a text length of 225)."""
    dev = "cuda"
    oq, osc = F8.quantize_fp8(randn(1, Lt + 512, 3072, dtype=torch.bfloat16, device=dev))
    wq, ws = F8.quantize_weight(randn(3072, 3072, dtype=torch.bfloat16, device=dev) * 0.02)
    for rows in (slice(0, Lt), slice(Lt, None)):
        x, s = oq[0, rows], osc[0, rows]
        out = F8.fp8_linear(x, s, wq, ws, None, torch.bfloat16)
        assert rel_err(out, ref.fp8_linear(x, s, wq, ws, None, torch.float32)) < 5e-3

@pytest.mark.gpu
@needs_fp8_gpu
def test_gpu_tiny_model_fp8_eager_and_compiled():
    """A small bf16 model (3 heads x 32) on the GPU: the FP8 path runs (report, no runtime fallback),
    regional compile with inductor (fullgraph) agrees with eager, unpatch restores the weights."""
    from fused_dit_ops.models import build_qwen_image_transformer, make_qwen_inputs
    m = build_qwen_image_transformer("tiny", num_layers=3, num_attention_heads=3, device="cuda",
                                     dtype=torch.bfloat16, seed=3)
    kw = make_qwen_inputs(m, img_tokens=(13, 7), txt_len=5, seed=1)
    stock = _run(m, kw)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    r = fdo.patch(m, precision="fp8")
    assert any("FP8 e4m3 GEMMs" in s for s in r.swapped) and "precision" not in r.stock, r
    eager = _run(m, kw)
    assert not r.runtime, r.runtime
    assert 1e-3 < rel_err(eager, stock) < 0.2
    compiled, _ = run_blocks_compiled(m, m.transformer_blocks, kw, backend="inductor")
    assert rel_err(compiled, eager) < 2e-2  # bf16: inductor fuses the glue differently
    fdo.unpatch(m)
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


def add_outlier_channels_(model, n: int = 4, factor: float = 30.0, seed: int = 5) -> list[int]:
    """A few large-magnitude channels in the residual streams, as trained DiTs have: ``n`` output
    channels of the image and text input projections scaled by ``factor`` (the same channels for
    both streams). Returns them."""
    g = torch.Generator().manual_seed(seed)
    chans = torch.randperm(model.img_in.out_features, generator=g)[:n].tolist()
    with torch.no_grad():
        for lin in (model.img_in, model.txt_in):
            lin.weight[chans] *= factor
            if lin.bias is not None:
                lin.bias[chans] *= factor
    return chans


@pytest.mark.gpu
@needs_fp8_gpu
@pytest.mark.parametrize("layers,outliers", [(1, False), (1, True), (4, True)])
def test_gpu_qwen_edit_block_fp8_vs_recipe(layers, outliers):
    """Qwen-Image-Edit-2511 at the real dims (3072 = 24 x 128), bf16, 1 x (1024 + 1024) image + 208 text
    tokens, one block or a few (with a few outlier channels in the activations, as trained DiTs have, or
    without): the FP8-patched model's error against the same model in fp32 must not exceed the per-row
    recipe's (torchao's dynamic activation + weight per-row scheme, in plain PyTorch) by more than
    10%, both with fp32-promoted accumulation, then both with fast accumulation. Prints the errors.
    Unpatch restores the bf16 weights (moved to the CPU while patched) bit for bit."""
    from fused_dit_ops.models import build_qwen_image_transformer, make_qwen_inputs
    m32 = build_qwen_image_transformer("edit-2511", num_layers=layers, device="cuda", dtype=torch.float32, seed=0)
    if outliers:
        add_outlier_channels_(m32)
    kw32 = make_qwen_inputs(m32, img_tokens=(1024, 1024), txt_len=208, seed=1)
    truth = _run(m32, kw32)
    m = m32.to(torch.bfloat16)
    del m32
    kw = make_qwen_inputs(m, img_tokens=(1024, 1024), txt_len=208, seed=1)
    bf16 = _run(m, kw)
    fp8_recipe.install(m, fast_accum=False)  # fp32-promoted accumulation on both sides first
    recipe = _run(m, kw)
    fp8_recipe.remove(m)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    r = fdo.patch(m, precision="fp8", fp8_fast_accum=False)
    assert any("FP8 e4m3 GEMMs" in s for s in r.swapped), r
    assert any("kept on the CPU" in s for s in r.swapped), r
    assert m.transformer_blocks[0].img_mlp.net[2].weight.device.type == "cpu"
    ours = _run(m, kw)
    e_bf16, e_recipe, e_ours = rel_err(bf16, truth), rel_err(recipe, truth), rel_err(ours, truth)
    print(f"\nQwen-Image-Edit {layers} block(s){' with outlier channels' if outliers else ''} vs fp32: "
          f"bf16 {e_bf16:.3e}, per-row FP8 recipe {e_recipe:.3e}, fused FP8 {e_ours:.3e}")
    assert not r.runtime, r.runtime
    assert e_ours <= 1.1 * e_recipe
    mask = torch.ones(1, 208, dtype=torch.bool, device="cuda")
    mask[0, -1] = False  # padding: the stock forward would be needed
    with pytest.raises(RuntimeError, match="keep_bf16_weights"):
        _run(m, dict(kw, encoder_hidden_states_mask=mask))
    fdo.unpatch(m)
    assert m.transformer_blocks[0].img_mlp.net[2].weight.device.type == "cuda"
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    # the weights are bit-exact (above); the stock forward again (cuBLAS may pick another kernel for the
    # new allocations, hence not bitwise)
    assert rel_err(_run(m, kw), bf16) < 5e-3
    e_recipe_fast, e_ours_fast = fp8_fast_accum_errors(m, kw, truth, _run)
    assert e_ours_fast <= 1.1 * e_recipe_fast
