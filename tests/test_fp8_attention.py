"""FP8 attention: ``joint_qk_norm_rope_fp8`` (e4m3 q/k with the static bound scale, v per (batch, head)),
``attention_fp8`` (FlashAttention-3's FP8 forward on CUDA, the reference on CPU) and
``patch(model, attention_precision="fp8")`` on tiny Qwen-Image and Flux models (CPU: the reference
implementations); interpreter tests of the Triton kernels; GPU tests at the real dims."""
from __future__ import annotations

import pytest
import torch

import fused_dit_ops as fdo
from fused_dit_ops import attention_dispatch as dispatch
from fused_dit_ops import reference as ref
from fused_dit_ops.ops import attention_fp8 as A8
from helpers import (expect_input_error, native_diffusers_backend, randn, rel_err, run_blocks_compiled,
                     run_no_grad, tiny_bench_block_rows, tiny_fp8_qwen, tiny_fp8_qwen_inputs)  # noqa: F401

pytestmark = pytest.mark.usefixtures("native_diffusers_backend")

E4M3 = torch.float8_e4m3fn
HALF_ULP_REL = 2.0 ** -4  # e4m3 round to nearest, normal values
SUBNORMAL_ABS = 2.0 ** -10  # in units of the scale


def rope_table(P, R, base=10000.0):
    pos = torch.arange(P, dtype=torch.float32)[:, None]
    freqs = 1.0 / base ** (torch.arange(R // 2, dtype=torch.float32) / (R // 2))
    ang = pos * freqs
    return torch.cat([ang.cos(), ang.sin()], 1).contiguous()


def joint_inputs(B=2, N=13, H=3, D=32, Lt=5, R=None, wdtype=torch.float32, dtype=torch.float32, device="cpu",
                 wstd=0.3):
    """q, k, v [B, N, H, D] as column views of one joint projection buffer [B, N, 3 H D], the four RMSNorm
    weights and the two RoPE tables (R rotated dims; more table rows than tokens)."""
    buf = randn(B, N, 3 * H * D, dtype=dtype, device=device, std=2.0)
    q, k, v = (buf[..., i * H * D:(i + 1) * H * D].unflatten(-1, (H, D)) for i in range(3))
    ws = [(1 + wstd * torch.randn(D)).to(device=device, dtype=wdtype) for _ in range(4)]
    R = R or D
    return q, k, v, ws, rope_table(Lt + 3, R).to(device), rope_table(N - Lt + 2, R, 500.0).to(device)


def normed_roped(q, k, Lt, ws, tt, ti, interleaved=True):
    """fp32 q, k after the joint QK RMSNorm + RoPE (the bf16 op's math before its rounding)."""
    out = []
    for x, wt, wi in ((q, ws[0], ws[2]), (k, ws[1], ws[3])):
        out.append(torch.cat([ref.apply_rope(ref.rms_norm_diffusers(x[:, :Lt], wt).float(), tt, None, interleaved),
                              ref.apply_rope(ref.rms_norm_diffusers(x[:, Lt:], wi).float(), ti, None, interleaved)],
                             1))
    return out


def assert_head_quantised(q8, d, y):
    """(q8, d) dequantise to y within half an e4m3 ulp (subnormals: 2^-10 of the scale)."""
    assert q8.dtype == E4M3 and d.dtype == torch.float32 and d.shape == (y.shape[0], y.shape[2])
    deq = ref.dequantize_fp8_heads(q8, d).double()
    s = d.double()[:, None, :, None]
    bound = torch.maximum(y.double().abs() * HALF_ULP_REL, SUBNORMAL_ABS * s) * 1.001 + 1e-12
    assert ((deq - y.double()).abs() <= bound).all(), ((deq - y.double()).abs() / bound).max()


# --- reference semantics ----------------------------------------------------------------------------

@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_qk_bound_scale_never_saturates(wdtype):
    """Adversarial rows (all of a head's energy in the pair where the weight is largest) reach the bound
    and stay below 448 before the clamp; random rows sit far inside it."""
    B, N, H, D, Lt = 1, 9, 3, 48, 4
    q, k, v, ws, tt, ti = joint_inputs(B, N, H, D, Lt, wdtype=wdtype)
    ws[0][6], ws[2][7] = 2.5, -2.75  # the largest |w| of q's weights, in pair (6, 7)
    q = q.clone()
    q[:, :, 0] = 0
    q[:, :, 0, 6] = 3.0  # one-hot rows: the normalised value is sqrt(D) there
    o = ref.joint_qk_norm_rope_fp8(q, k, v, Lt, *ws, tt, ti, cast=False)
    s = ref.qk_bound_scale((ws[0], ws[2]), D)
    assert torch.equal(o[3], s.expand(B, H)) and o[3].dtype == torch.float32
    y = normed_roped(q, k, Lt, ws, tt, ti)[0]
    top = (y[:, :, 0].abs() / s).max()
    assert 0.9 * 448 / ref.QK_BOUND_MARGIN < top <= 448  # the bound is reached, not exceeded
    assert (y[:, :, 1:].abs() / s).max() < 448 / 2  # gaussian rows: far inside


def test_bound_scale_costs_little_against_amax():
    """The static q/k scale against a per-(batch, head) amax scale (a reduction pass over q and k):
    the same attention error, measured against fp64 attention of the unquantised inputs."""
    B, N, H, D, Lt = 1, 300, 4, 128, 40
    q, k, v, ws, tt, ti = joint_inputs(B, N, H, D, Lt, wstd=0.5)
    ws[1][5] = 6.0  # an outlier weight makes the bound loose for k
    yq, yk = normed_roped(q, k, Lt, ws, tt, ti)
    exact = ref.attention(yq.double(), yk.double(), v.double())
    errs = {}
    for mode in ("bound", "amax"):
        o = ref.joint_qk_norm_rope_fp8(q, k, v, Lt, *ws, tt, ti, qk_scale=mode)
        errs[mode] = rel_err(ref.attention_fp8(*o, out_dtype=torch.float64), exact)
    print(f"\nFP8 attention error vs fp64 (reference, P unquantised): bound {errs['bound']:.3e}, "
          f"amax {errs['amax']:.3e}")
    assert 1e-3 < errs["bound"] < 1.1 * errs["amax"]


def test_v_descale_is_per_head_amax():
    B, N, H, D = 2, 11, 3, 32
    v = randn(B, N, H, D) * torch.tensor([1.0, 30.0, 0.01]).view(1, 1, 3, 1)
    v[1, :, 2] = 0  # an all-zero head: descale 1
    v[0, 4, 1, 3] = float("nan")  # a NaN: every dequantised value of that head NaN
    q8, d = ref.quantize_fp8_heads(v)
    amax = v.abs().amax(dim=(1, 3))
    want = torch.where(amax == 0, torch.ones_like(amax), amax / 448)
    want[0, 1] = float("inf")
    torch.testing.assert_close(d, want, rtol=0, atol=0)
    deq = ref.dequantize_fp8_heads(q8, d)
    assert deq[0, :, 1].isnan().all() and not deq[[0, 0, 1, 1], :, [0, 2, 0, 1]].isnan().any()
    keep = torch.ones(B, H, dtype=torch.bool)
    keep[0, 1] = False
    for b, h in keep.nonzero().tolist():
        assert_head_quantised(q8[b:b + 1, :, h:h + 1], d[b:b + 1, h:h + 1], v[b:b + 1, :, h:h + 1])


@pytest.mark.parametrize("interleaved", [True, False])
def test_joint_op_cpu_quantises_the_bf16_ops_values(interleaved):
    """The op's e4m3 q/k dequantise to the joint QK norm + RoPE values (what joint_qk_norm_rope_ computes,
    before its rounding) within half an e4m3 ulp; v to v. Rotary width R < D: the tail passes through
    normalised. The inputs are not modified."""
    q, k, v, ws, tt, ti = joint_inputs(2, 13, 3, 32, 5, R=24)
    before = [t.clone() for t in (q, k, v)]
    o = A8.joint_qk_norm_rope_fp8(q, k, v, 5, *ws, tt, ti, 1e-6, interleaved)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v)))
    assert all(t.is_contiguous() and t.shape == q.shape for t in o[:3])
    yq, yk = normed_roped(q, k, 5, ws, tt, ti, interleaved)
    for q8, d, y in ((o[0], o[3], yq), (o[1], o[4], yk), (o[2], o[5], v)):
        assert_head_quantised(q8, d, y)
    # the bf16 op's values (in place, rounded to the activation dtype) agree with the dequantised ones
    q2, k2 = q.clone(), k.clone()
    fdo.joint_qk_norm_rope_(q2, k2, 5, *ws, tt, ti, 1e-6, interleaved)
    assert rel_err(ref.dequantize_fp8_heads(o[0], o[3]), q2) < 4e-2


@pytest.mark.parametrize("gqa", [False, True])
def test_attention_fp8_cpu_is_dequantised_attention(gqa):
    B, Sq, Sk, H, D = 2, 13, 7, 6, 32
    Hkv = 3 if gqa else H
    q8, qd = ref.quantize_fp8_heads(randn(B, Sq, H, D))
    if gqa:  # FA3's layout: one q descale per kv head
        qd = ref.quantize_fp8_heads(randn(B, Sq, H, D).view(B, Sq, Hkv, -1))[1]
    k8, kd = ref.quantize_fp8_heads(randn(B, Sk, Hkv, D))
    v8, vd = ref.quantize_fp8_heads(randn(B, Sk, Hkv, D))
    out = A8.attention_fp8(q8, k8, v8, qd, kd, vd, 0.3, False, torch.float32)
    assert out.shape == (B, Sq, H, D) and out.dtype == torch.float32
    qf = ref.dequantize_fp8_heads(q8, qd.repeat_interleave(H // Hkv, dim=1)).double()
    want = ref.attention(qf, ref.dequantize_fp8_heads(k8, kd).double(), ref.dequantize_fp8_heads(v8, vd).double(), 0.3)
    assert rel_err(out, want) < 1e-6
    assert A8.attention_fp8(q8, k8, v8, qd, kd, vd).dtype == torch.bfloat16  # the default out_dtype
    assert (A8.attention_fp8(q8, k8[:, :0], v8[:, :0], qd, kd, vd, None, False, torch.float32) == 0).all()


def test_fp8_attention_error_budget_vs_bf16():
    """The full FP8 attention step (norm + RoPE + quantisation, attention) against fp64: an FP8-sized
    error, about ten times the bf16 step's."""
    q, k, v, ws, tt, ti = joint_inputs(1, 200, 4, 64, 30)
    yq, yk = normed_roped(q, k, 30, ws, tt, ti)
    exact = ref.attention(yq.double(), yk.double(), v.double())
    o = A8.joint_qk_norm_rope_fp8(q, k, v, 30, *ws, tt, ti)
    e8 = rel_err(A8.attention_fp8(*o, None, False, torch.float32), exact)
    e16 = rel_err(ref.attention(yq.bfloat16(), yk.bfloat16(), v.bfloat16()), exact)
    print(f"\nattention step vs fp64: bf16 {e16:.3e}, FP8 (CPU reference) {e8:.3e}")
    assert e16 < e8 < 8e-2


# --- opcheck, compile, bad inputs ----------------------------------------------------------------------

def _op_cases(device="cpu"):
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v, ws, tt, ti = joint_inputs(2, 13, 3, 32, 5, dtype=dt, wdtype=dt, device=device)
    o = ref.joint_qk_norm_rope_fp8(q.cpu(), k.cpu(), v.cpu(), 5, *[w.cpu() for w in ws], tt.cpu(), ti.cpu())
    o = [t.to(device) for t in o]
    return {"joint_qk_norm_rope_fp8": (q, k, v, 5, *ws, tt, ti, 1e-6, True),
            "attention_fp8": (*o, None, False, torch.bfloat16),
            "quantize_fp8_heads": (v,)}


def _cuda_fa3_fp8():
    return torch.cuda.is_available() and A8.fp8_attention_unavailable_reason("cuda") is None


needs_fa3_fp8 = pytest.mark.skipif(not _cuda_fa3_fp8(), reason="needs an sm90 GPU with FlashAttention-3 FP8")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_fa3_fp8])])
@pytest.mark.parametrize("op", A8.OPS)
def test_opcheck(op, device):
    args = _op_cases(device)[op]
    fp8_inputs = any(isinstance(a, torch.Tensor) and a.dtype == E4M3 for a in args)
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    # opcheck's schema test compares e4m3 tensors with torch.allclose, which CPU torch lacks for float8: the
    # same "inputs unmodified, outputs not aliased" check is done here
    torch.library.opcheck(getattr(torch.ops.fused_dit, op).default, args,
                          test_utils=utils if fp8_inputs else utils + ("test_schema",))
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    before = [a.view(torch.uint8).clone() if a.dtype == E4M3 else a.clone() for a in tensors]
    out = getattr(torch.ops.fused_dit, op).default(*args)
    after = [a.view(torch.uint8) if a.dtype == E4M3 else a for a in tensors]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    ptrs = {a.untyped_storage().data_ptr() for a in tensors}
    outs = out if isinstance(out, tuple) else (out,)
    assert not any(o.untyped_storage().data_ptr() in ptrs for o in outs)


def test_compile_fullgraph_dynamic_lengths():
    """The FP8 attention step under torch.compile (fullgraph, symbolic lengths): no graph break, no
    recompile for a new length, the eager values."""
    import torch._dynamo as dynamo

    def step(q, k, v, txt_len, *rest):
        o = A8.joint_qk_norm_rope_fp8(q, k, v, txt_len, *rest)
        return A8.attention_fp8(*o, None, False, torch.float32)

    dynamo.reset()
    f = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    for N in (13, 21):
        q, k, v, ws, tt, ti = joint_inputs(1, N, 3, 32, 5)
        with dynamo.config.patch(error_on_recompile=N == 21):
            got = f(q, k, v, 5, *ws, tt, ti)
        torch.testing.assert_close(got, step(q, k, v, 5, *ws, tt, ti))


def test_input_errors():
    q, k, v, ws, tt, ti = joint_inputs(1, 9, 3, 24, 4)
    J = A8.joint_qk_norm_rope_fp8
    expect_input_error(lambda: J(q, k, v, 4, *ws, tt, ti), "joint_qk_norm_rope_fp8", "'q'", "multiple of 16", "24")
    q, k, v, ws, tt, ti = joint_inputs(1, 9, 3, 32, 4)
    expect_input_error(lambda: J(q, k, v[:, :, :2], 4, *ws, tt, ti), "'v'", "[1, 9, 3, 32]")
    expect_input_error(lambda: J(q, k, v.double(), 4, *ws, tt, ti), "'v'", "float64")
    expect_input_error(lambda: J(q, k, v, 10, *ws, tt, ti), "'txt_len'", "[0, 9]")
    expect_input_error(lambda: J(q, k, v, 4, ws[0].bfloat16(), *ws[1:], tt, ti), "RMSNorm weights", "one dtype")
    expect_input_error(lambda: J(q, k, v, 4, *ws, tt[:2], ti), "'txt_cos_sin'", "4 tokens")
    o = ref.joint_qk_norm_rope_fp8(q, k, v, 4, *ws, tt, ti)
    A = A8.attention_fp8
    expect_input_error(lambda: A(q, *o[1:]), "attention_fp8", "'q'", "float8_e4m3fn", "float32")
    expect_input_error(lambda: A(*o[:4], o[4][:, :2], o[5]), "'k_descale'", "[1, 3]", "[1, 2]")
    expect_input_error(lambda: A(*o[:3], o[3].double(), *o[4:]), "'q_descale'", "float64")
    expect_input_error(lambda: A(*o, None, False, torch.int32), "'out_dtype'")
    expect_input_error(lambda: A(o[0], o[1][:, :5], o[2][:, :5], *o[3:], None, True), "'causal'", "Sq=9, Sk=5")
    expect_input_error(lambda: A(*o, -1.0), "'softmax_scale'")
    expect_input_error(lambda: A(o[0], o[1][:, :, :2], o[2][:, :, :2], *o[3:]), "'k'", "Hkv must divide")


def test_quantize_fp8_heads_cpu_semantics():
    """x [B, N, H, D] (a strided column view) -> contiguous e4m3 with descale amax / 448 per (batch,
    head); 1 for an all-zero head; +inf for a head holding a NaN; the input untouched."""
    _, _, v, _, _, _ = joint_inputs(2, 11, 3, 32, 4)
    v[1, :, 2] = 0
    before = v.clone()
    q8, d = A8.quantize_fp8_heads(v)
    assert q8.dtype == E4M3 and q8.is_contiguous() and q8.shape == v.shape and d.shape == (2, 3)
    assert torch.equal(v, before)
    amax = v.abs().amax(dim=(1, 3))
    torch.testing.assert_close(d[amax > 0], (amax / 448)[amax > 0], rtol=1e-6, atol=0)
    assert d[1, 2] == 1 and (q8[1, :, 2].float() == 0).all()
    deq = ref.dequantize_fp8_heads(q8, d)
    assert rel_err(deq, v) < 2.0 ** -4
    w = v.clone()
    w[0, 3, 1, 5] = float("nan")
    q8, d = A8.quantize_fp8_heads(w)
    assert d[0, 1] == float("inf") and ref.dequantize_fp8_heads(q8, d)[0, :, 1].isnan().all()
    assert torch.isfinite(d[[0, 0, 1], [0, 2, 0]]).all()


def test_quantize_fp8_heads_input_errors():
    Q = A8.quantize_fp8_heads
    expect_input_error(lambda: Q(torch.randn(1, 5, 2, 24)), "quantize_fp8_heads", "'x'", "multiple of 16", "24")
    expect_input_error(lambda: Q(torch.randn(5, 2, 32)), "quantize_fp8_heads", "'x'")
    expect_input_error(lambda: Q(torch.randn(1, 5, 2, 32, dtype=torch.float64)), "'x'", "float64")
    expect_input_error(lambda: Q(torch.randn(1, 5, 2, 64)[..., ::2]), "'x'", "contiguous")


def test_quantize_fp8_heads_compile_fullgraph_dynamic():
    import torch._dynamo as dynamo

    def step(q, k, v):
        (q8, qd), (k8, kd), (v8, vd) = (A8.quantize_fp8_heads(t) for t in (q, k, v))
        return A8.attention_fp8(q8, k8, v8, qd, kd, vd, None, False, torch.float32)

    dynamo.reset()
    f = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    for N in (13, 21):
        q, k, v, _, _, _ = joint_inputs(1, N, 3, 32, 5)
        with dynamo.config.patch(error_on_recompile=N == 21):
            got = f(q, k, v)
        torch.testing.assert_close(got, step(q, k, v))


def test_fast_path_runs_the_ops_own_checks(monkeypatch):
    from fused_dit_ops.ops import _eager
    monkeypatch.setattr(_eager, "fast", lambda x: not torch.is_grad_enabled())
    monkeypatch.setattr(_eager, "_PASSED", set())
    q, k, v, ws, tt, ti = joint_inputs(1, 9, 3, 24, 4)
    with torch.no_grad():
        expect_input_error(lambda: _eager.joint_qk_norm_rope_fp8(q, k, v, 4, *ws, tt, ti), "joint_qk_norm_rope_fp8",
                           "multiple of 16")
        expect_input_error(lambda: _eager.quantize_fp8_heads(v), "quantize_fp8_heads", "multiple of 16")


def test_cuda_without_fa3_fp8_is_a_clear_error(monkeypatch):
    """Capability tables: no FA3, not sm90, an FA3 build without FP8 each give the reason; the CUDA
    implementation raises AttentionBackendError with it (driven here on CPU tensors)."""
    C = dispatch.Capabilities
    assert "not importable" in A8.fp8_attention_unavailable_reason(
        caps=C(device_type="cuda", sm=(9, 0), missing=(("fa3", "not importable: fa3_fwd_interface"),)))
    assert "sm90" in A8.fp8_attention_unavailable_reason(caps=C(device_type="cuda", sm=(8, 9), fa3="fa3_fwd_interface"))
    assert A8.fp8_attention_unavailable_reason(caps=C(device_type="cpu")).startswith("FP8 attention runs")
    monkeypatch.setattr(A8, "_fa3_fp8_built", lambda name: False)
    assert "no FP8 kernels" in A8.fp8_attention_unavailable_reason(caps=C(device_type="cuda", sm=(9, 0),
                                                                           fa3="fa3_fwd_interface"))
    monkeypatch.setattr(A8, "_reason_for", lambda t, i: "FlashAttention-3 is not importable (x)")
    q, k, v, ws, tt, ti = joint_inputs(1, 9, 3, 32, 4)
    o = ref.joint_qk_norm_rope_fp8(q, k, v, 4, *ws, tt, ti)
    with pytest.raises(dispatch.AttentionBackendError, match="not importable.*attention_precision='bf16'"):
        A8.attention_fp8_cuda_unchecked(*o)


@pytest.mark.parametrize("raw", [True, False])
def test_cuda_path_passes_the_descales_to_fa3(monkeypatch, raw):
    """The CUDA implementation's call into FlashAttention-3, against stand-ins with its signatures (the
    registered ``fa3_fwd.fwd`` op, or ``flash_attn_func``) computing the reference semantics: the
    descales, the default softmax scale and num_splits=1 arrive (driven on CPU tensors)."""
    import types
    calls = []

    def semantics(q, k, v, qd, kd, vd, scale, causal):
        return ref.attention_fp8(q, k, v, qd, kd, vd, scale, causal, torch.bfloat16)

    def fwd(q, k, v, *, q_descale=None, k_descale=None, v_descale=None, softmax_scale=None, is_causal=False,
            num_splits=0):
        calls.append(("fwd", softmax_scale, num_splits))
        return semantics(q, k, v, q_descale, k_descale, v_descale, softmax_scale, is_causal), None, None, None
    fwd._schema = types.SimpleNamespace(arguments=[types.SimpleNamespace(name=n) for n in (
        "q", "k", "v", "q_descale", "k_descale", "v_descale", "softmax_scale", "is_causal", "num_splits")])

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                        v_descale=None):
        calls.append(("func", softmax_scale, None))
        return semantics(q, k, v, q_descale, k_descale, v_descale, softmax_scale, causal)

    mod = types.SimpleNamespace(__name__="fa3_fwd_interface", flash_attn_func=flash_attn_func)
    monkeypatch.setattr(A8, "_reason_for", lambda t, i: None)
    monkeypatch.setattr(dispatch, "_fa3_module", lambda: mod)
    monkeypatch.setattr(A8, "_FA3_DESCALE_OP", {id(mod): fwd if raw else None})
    q, k, v, ws, tt, ti = joint_inputs(2, 13, 3, 32, 4)
    o = ref.joint_qk_norm_rope_fp8(q, k, v, 4, *ws, tt, ti)
    out = A8.attention_fp8_cuda_unchecked(*o)
    assert calls == [("fwd", 32 ** -0.5, 1)] if raw else [("func", 32 ** -0.5, None)]
    assert torch.equal(out, ref.attention_fp8(*o))


# --- Triton kernels under the interpreter ---------------------------------------------------------------
# The interpreter's fp32 -> e4m3 conversion is wrong where rounding carries into the exponent: these tests
# read the values just before the cast (q_dtype=torch.float32); the cast is covered by the GPU tests.

def _kernel(q, k, v, Lt, ws, tt, ti, interleaved=True):
    from fused_dit_ops.kernels import attention_fp8 as ka
    return ka.joint_qk_norm_rope_fp8(q, k, v, Lt, ws, (tt, ti), 1e-6, interleaved, q_dtype=torch.float32)


@pytest.mark.interpret
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("R", [32, 24])
def test_interpret_joint_qk_norm_rope_fp8(interleaved, R):
    q, k, v, ws, tt, ti = joint_inputs(2, 13, 3, 32, 5, R=R)  # 3 heads: a masked head lane
    got = _kernel(q, k, v, 5, ws, tt, ti, interleaved)
    want = ref.joint_qk_norm_rope_fp8(q, k, v, 5, *ws, tt, ti, 1e-6, interleaved, cast=False)
    for g, w in zip(got, want):
        if g.dim() == 2:
            assert torch.equal(g, w)  # descales: the same fp32 operations
        else:
            assert g.is_contiguous()
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-3)


@pytest.mark.interpret
@pytest.mark.parametrize("Lt", [0, 300])
def test_interpret_long_v_edges(Lt):
    """More tokens than one v-amax program takes (atomics across programs); one stream only (txt_len 0 or
    N); bf16 weights (diffusers' roundings; the interpreter rounds them toward zero: 2 bf16 ulps); an
    all-zero head and a NaN in v."""
    q, k, v, ws, tt, ti = joint_inputs(1, 300, 2, 16, Lt, wdtype=torch.bfloat16)
    v = v.clone()
    v[0, :, 1] = 0
    got = _kernel(q, k, v, Lt, ws, tt, ti)
    want = ref.joint_qk_norm_rope_fp8(q, k, v, Lt, *ws, tt, ti, cast=False)
    for i in range(2):  # rounded inputs of the rotation: errors of the order of a bf16 ulp of the pair norm
        assert rel_err(got[i], want[i]) < 2.0 ** -7
        torch.testing.assert_close(got[i], want[i], rtol=0, atol=2.0 ** -6 * float(want[i].abs().amax()))
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-3)
    for i in range(3, 6):
        assert torch.equal(got[i], want[i])
    assert got[5][0, 1] == 1 and (got[2][0, :, 1] == 0).all()
    v[0, 250, 0, 3] = float("nan")
    got = _kernel(q, k, v, Lt, ws, tt, ti)
    assert got[5][0, 0] == float("inf") and got[5][0, 1] == 1
    assert ref.dequantize_fp8_heads(got[2], got[5])[0, :, 0].isnan().all()


@pytest.mark.interpret
def test_interpret_quantize_fp8_heads():
    """More tokens than one amax program takes, 3 heads (a masked head lane), a strided view, an all-zero
    head, a NaN."""
    from fused_dit_ops.kernels import attention_fp8 as ka
    _, _, v, _, _, _ = joint_inputs(2, 300, 3, 32, 5)
    v[1, :, 1] = 0
    got = ka.quantize_heads(v, q_dtype=torch.float32)
    want = ref.quantize_fp8_heads(v, None, cast=False)
    assert got[0].is_contiguous()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-3)
    assert torch.equal(got[1], want[1]) and got[1][1, 1] == 1
    v[0, 200, 2, 7] = float("nan")
    x8, d = ka.quantize_heads(v, q_dtype=torch.float32)
    assert d[0, 2] == float("inf") and torch.isfinite(d[0, :2]).all()


# --- patch(model, attention_precision="fp8") on tiny models (CPU, fp32) --------------------------------

# measured on CPU (the tiny 3-layer Qwen-Image model below, against the fp32 model): bf16 patch +
# FP8 attention ~1.1e-2, FP8 GEMMs ~6.1e-2, FP8 GEMMs + FP8 attention ~6.3e-2
FP8_ATTN_MODEL_REL = 5e-2
FP8_MODEL_REL = 0.15  # tests/test_fp8.py's bound for the FP8 GEMM path


_tiny, _inputs = tiny_fp8_qwen, tiny_fp8_qwen_inputs


_run = run_no_grad


def _swapped(r):
    return any("FP8 e4m3 attention" in s for s in r.swapped)


def test_patch_fp8_attention_tiny_qwen_accuracy_and_unpatch():
    m = _tiny()
    kw = _inputs(m)
    stock = _run(m, kw)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    errs = {}
    for prec in ("bf16", "fp8"):
        r = fdo.patch(m, precision=prec)
        base = _run(m, kw)
        r = fdo.patch(m, precision=prec, attention_precision="fp8")
        assert r.options["attention_precision"] == "fp8" and _swapped(r), r
        assert "attention_precision" not in r.stock, r
        out = _run(m, kw)
        assert not r.runtime, r.runtime
        errs[prec] = (rel_err(base, stock), rel_err(out, stock), rel_err(out, base))
        assert fdo.unpatch(m)
        assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    print(f"\ntiny Qwen vs fp32 (patched, + FP8 attention, FP8 attention's own share): bf16 {errs['bf16']}, "
          f"fp8 GEMMs {errs['fp8']}")
    assert 1e-3 < errs["bf16"][1] < FP8_ATTN_MODEL_REL and errs["bf16"][0] < 2e-6
    assert 1e-3 < errs["bf16"][2] < FP8_ATTN_MODEL_REL  # FP8 attention ran (not the bf16 path)
    assert 1e-3 < errs["fp8"][2] < FP8_ATTN_MODEL_REL and errs["fp8"][1] < FP8_MODEL_REL
    assert torch.equal(_run(m, kw), stock)
    assert fdo.patch(m).options.get("attention_precision") is None  # the default: bf16
    with pytest.raises(ValueError, match="attention_precision"):
        fdo.patch(m, attention_precision="fp16")


def _count_fp8_attention(monkeypatch):
    """{"calls": n}: FP8 attention steps run (every block kind calls the state's attention)."""
    from fused_dit_ops.integrations import fp8_attention as FA
    seen = {"calls": 0}
    real = FA.Fp8AttentionState.attention

    def counted(self, *a, **k):
        seen["calls"] += 1
        return real(self, *a, **k)
    monkeypatch.setattr(FA.Fp8AttentionState, "attention", counted)
    return seen


def test_patch_fp8_attention_flux_double_and_single_stream_blocks(monkeypatch):
    """Flux.1: the double- and the single-stream blocks take FP8 attention, with bf16 and with FP8 GEMMs
    (one FP8 attention step per block per forward)."""
    from fused_dit_ops.models import build_flux_transformer, make_flux_inputs
    m = build_flux_transformer("tiny", seed=1, attention_head_dim=32, axes_dims_rope=(8, 12, 12))
    kw = make_flux_inputs(m, seed=1)
    stock = _run(m, kw)
    n_blocks = len(m.transformer_blocks) + len(m.single_transformer_blocks)
    assert len(m.single_transformer_blocks) > 0
    seen = _count_fp8_attention(monkeypatch)
    for prec in ("bf16", "fp8"):
        r = fdo.patch(m, precision=prec, attention_precision="fp8")
        assert _swapped(r) and not any("attention_precision" in k for k in r.stock), r
        assert any("single-stream blocks" in s for s in r.swapped if "FP8 e4m3 attention" in s), r.swapped
        seen["calls"] = 0
        e = rel_err(_run(m, kw), stock)
        assert seen["calls"] == n_blocks, (prec, seen, n_blocks)
        print(f"\ntiny Flux vs fp32, precision={prec} + FP8 attention: {e:.3e}")
        assert 1e-3 < e < (FP8_ATTN_MODEL_REL if prec == "bf16" else FP8_MODEL_REL) and not r.runtime, (prec, e)
    fdo.unpatch(m)
    assert torch.equal(_run(m, kw), stock)


def test_patch_fp8_attention_flux2_double_and_single_stream_blocks(monkeypatch):
    """FLUX.2's double- and single-stream blocks (model-level modulation, SwiGLU) run the same attention
    step."""
    from fused_dit_ops.models import build_flux2_transformer, make_flux2_inputs
    m = build_flux2_transformer("tiny", seed=1, attention_head_dim=32, axes_dims_rope=(8, 8, 8, 8))
    kw = make_flux2_inputs(m, seed=1)
    stock = _run(m, kw)
    seen = _count_fp8_attention(monkeypatch)
    r = fdo.patch(m, attention_precision="fp8")
    assert _swapped(r) and not any("attention_precision" in k for k in r.stock), r
    seen["calls"] = 0
    e = rel_err(_run(m, kw), stock)
    assert seen["calls"] == len(m.transformer_blocks) + len(m.single_transformer_blocks), seen
    print(f"\ntiny FLUX.2 vs fp32, FP8 attention: {e:.3e}")
    assert 1e-3 < e < FP8_ATTN_MODEL_REL and not r.runtime
    fdo.unpatch(m)
    assert torch.equal(_run(m, kw), stock)


def test_patch_fp8_attention_wan_self_attention(monkeypatch):
    """Wan (QK norm across all heads): the self-attention of every block runs on e4m3 q, k, v quantised per
    (batch, head) (one call per block per forward), with bf16 and with FP8 GEMMs; the cross-attention
    keeps the model dtype; unpatch restores the stock output."""
    from fused_dit_ops.integrations import fp8_attention as FA
    from test_fp8_kinds import _inputs as kinds_inputs, tiny_wan
    m = tiny_wan()
    kw = kinds_inputs("wan", m, seed=1)
    stock = _run(m, kw)
    seen = {"calls": 0}
    real = FA.Fp8AttentionState.attention_heads

    def counted(self, *a):
        seen["calls"] += 1
        return real(self, *a)
    monkeypatch.setattr(FA.Fp8AttentionState, "attention_heads", counted)
    for prec in ("bf16", "fp8"):
        base = _run(m, kw) if fdo.patch(m, precision=prec) else None
        r = fdo.patch(m, precision=prec, attention_precision="fp8")
        assert any("FP8 e4m3 self-attention" in s for s in r.swapped), r
        assert not any("attention_precision" in k for k in r.stock), r
        seen["calls"] = 0
        out = _run(m, kw)
        assert seen["calls"] == len(m.blocks) and not r.runtime, (seen, r.runtime)
        e, e_own = rel_err(out, stock), rel_err(out, base)
        print(f"\ntiny Wan, precision={prec} + FP8 self-attention: {e:.3e} vs fp32, {e_own:.3e} vs without")
        assert 1e-3 < e_own and e < (FP8_ATTN_MODEL_REL if prec == "bf16" else FP8_MODEL_REL), (prec, e, e_own)
    fdo.unpatch(m)
    assert torch.equal(_run(m, kw), stock)


def test_patch_fp8_attention_compile_blocks_fullgraph():
    """Regional compile (fullgraph, aot_eager) of blocks with FP8 GEMMs and FP8 attention: no graph break,
    the eager output, no recompile for the next step."""
    m = _tiny(num_layers=2)
    kw = _inputs(m, seed=3)
    fdo.patch(m, precision="fp8", attention_precision="fp8")
    eager = _run(m, kw)
    got, got2 = run_blocks_compiled(m, m.transformer_blocks, kw, _inputs(m, seed=5))
    assert torch.isfinite(got2).all()
    assert rel_err(got, eager) < 1e-5
    fdo.unpatch(m)


def test_patch_fp8_attention_not_applicable_is_reported(monkeypatch):
    m = _tiny(num_layers=1)
    kw = _inputs(m, seed=2)
    stock = _run(m, kw)
    r = fdo.patch(m, ops="modulation,attention", attention_precision="fp8")
    assert "qk_norm_rope" in r.stock["attention_precision"] and not _swapped(r), r
    from fused_dit_ops.integrations.engine import patch_ab
    r = patch_ab(m, attention_precision="fp8", qk_path="cat")
    assert "qk_path='joint'" in r.stock["attention_precision"], r
    r = fdo.patch(m, attention_precision="fp8", attention_backend="math")
    assert "forces a model-dtype backend" in r.stock["attention_precision"], r
    # head_dim 24: FA3's FP8 kernels take multiples of 16
    m24 = _tiny(num_layers=1, attention_head_dim=24, axes_dims_rope=(8, 8, 8))
    r = fdo.patch(m24, attention_precision="fp8")
    assert "head_dim 24" in r.stock["attention_precision"], r
    # CUDA without FA3 FP8 (decided at patch time): the model-dtype attention, reported
    from fused_dit_ops.integrations import fp8_attention as FA
    real = FA.model_reason
    monkeypatch.setattr(FA, "model_reason", lambda st, b, dev, dt, be: real(st, b, torch.device("cuda"), dt, be))
    monkeypatch.setattr(A8, "fp8_attention_unavailable_reason", lambda dev=None, caps=None: "FlashAttention-3 is not "
                        "importable (test)")
    r = fdo.patch(m, attention_precision="fp8")
    assert "FlashAttention-3 is not importable" in r.stock["attention_precision"] and not _swapped(r), r
    assert rel_err(_run(m, kw), stock) < 2e-6  # the fp32 fused path: exact up to fp32 rounding
    fdo.unpatch(m)


def test_patch_fp8_attention_lora_blocks_count_the_fallback():
    """A PEFT adapter added after patching: the projections run as modules (no joint buffer), so those
    blocks keep the model-dtype attention, counted in report.runtime; the adapter takes part."""
    peft = pytest.importorskip("peft")
    m, ref_m = _tiny(num_layers=2), _tiny(num_layers=2)
    kw = _inputs(m, seed=23)
    cfg = dict(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q"])
    torch.manual_seed(5)
    ref_m.add_adapter(peft.LoraConfig(**cfg))
    want = _run(ref_m, kw)
    r = fdo.patch(m, attention_precision="fp8")
    torch.manual_seed(5)
    m.add_adapter(peft.LoraConfig(**cfg))
    out = _run(m, kw)
    assert any("module calls" in k and "model dtype attention" in k for k in r.runtime), r.runtime
    assert rel_err(out, want) < 2e-6


def test_context_parallel_calls_keep_the_model_dtype_attention():
    """Under diffusers' context parallelism (a processor with a context-parallel config) the block runs
    diffusers' attention: FP8 attention steps aside, counted."""
    import types
    from fused_dit_ops.integrations.fp8_attention import Fp8AttentionState
    m = _tiny(num_layers=1)
    r = fdo.patch(m, attention_precision="fp8")
    st = m.__dict__["_fused_dit_state"]
    proc = types.SimpleNamespace(_parallel_config=types.SimpleNamespace(context_parallel_config=object()))
    assert not Fp8AttentionState().usable(st, proc)
    assert any("context parallelism" in k for k in r.runtime), r.runtime
    assert Fp8AttentionState().usable(st, types.SimpleNamespace(_parallel_config=None))
    fdo.unpatch(m)


def test_bench_block_fp8_attention_rows(tmp_path):
    """``bench block --precision fp8 --fp8-attention`` (tiny, CPU): bf16 patched, FP8 GEMMs, FP8 attention
    and both, in one run, each with its patch options."""
    rows = tiny_bench_block_rows(tmp_path, "stock-eager,patched-eager", "--fp8-attention")
    assert set(rows) == {"stock-eager", "patched-eager", "patched-eager+fp8", "patched-eager+fp8attn",
                         "patched-eager+fp8+fp8attn"}
    assert rows["patched-eager+fp8+fp8attn"]["patch_options"] == {"precision": "fp8", "attention_precision": "fp8"}
    assert rows["patched-eager+fp8attn"]["patch_options"] == {"attention_precision": "fp8"}
    for r in rows.values():
        assert "error" not in r, r
    assert 1e-4 < rows["patched-eager+fp8attn"]["max_rel_diff_vs_stock"] < FP8_ATTN_MODEL_REL


def test_bench_attention_fp8_rows_run(monkeypatch):
    """``bench attention --fp8``: its three rows' functions run on their argument sets (CPU here, the
    reference implementations; the bench itself needs CUDA)."""
    from fused_dit_ops.bench import attention as BA
    monkeypatch.setattr(A8, "fp8_attention_unavailable_reason", lambda dev=None, caps=None: None)
    B, N, H, D = 1, 37, 2, 32
    ran = {}

    def add(label, backend, fn, make_args):
        out = fn(*make_args())
        assert out.shape == (B, N, H, D) and torch.isfinite(out.float()).all()
        ran[label] = backend

    BA._fp8_rows(add, lambda: tuple(randn(B, N, H, D, dtype=torch.bfloat16) for _ in range(3)), B, N, H, D, 5,
                 torch.bfloat16, "t", [], dev="cpu")
    assert ran == {"fp8": "fa3-fp8", "step-bf16": "step-bf16", "step-fp8": "step-fp8"}
    skipped = []
    BA._fp8_rows(add, None, B, N, H, D, 5, torch.float16, "t", skipped, dev="cpu")
    assert "bfloat16" in skipped[0]["reason"]


# --- GPU ------------------------------------------------------------------------------------------------

def _e4m3_ulps(a, b):
    ai, bi = a.view(torch.uint8).int(), b.view(torch.uint8).int()
    ao = torch.where(ai >= 128, -(ai - 128), ai)
    bo = torch.where(bi >= 128, -(bi - 128), bi)
    return (ao - bo).abs()


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="needs a CUDA GPU with compute capability 8.9+")
@pytest.mark.parametrize("interleaved", [True, False])
def test_gpu_kernel_matches_reference(interleaved):
    """Real dims (24 heads x 128, 1037 + 208 tokens, bf16 q/k/v views of the joint projection, bf16
    weights): e4m3 codes within one code point of the reference (ties and FMAs), descales equal."""
    q, k, v, ws, tt, ti = joint_inputs(1, 1245, 24, 128, 208, dtype=torch.bfloat16, wdtype=torch.bfloat16,
                                       device="cuda", wstd=0.1)
    got = A8.joint_qk_norm_rope_fp8(q, k, v, 208, *ws, tt, ti, 1e-6, interleaved)
    want = ref.joint_qk_norm_rope_fp8(q, k, v, 208, *ws, tt, ti, 1e-6, interleaved)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        if g.dtype == E4M3:
            # Rare differences: an FMA, or a bf16 rounding of the normalised value that flips, can move a
            # value across an e4m3 rounding point: one code point, or (near zero, where the codes are
            # dense) more codes but at most a bf16 ulp of the head row's largest value.
            d = _e4m3_ulps(g, w)
            gap = (g.float() - w.float()).abs()
            far = (d > 1) & (gap > 2.0 ** -7 * w.float().abs().amax(-1, keepdim=True))
            assert not far.any() and (d > 0).float().mean() < 1e-3, (d.max(), (d > 0).float().mean(), gap[far])
        else:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="needs a CUDA GPU with compute capability 8.9+")
def test_gpu_quantize_fp8_heads_matches_reference():
    """Wan's self-attention shape class (40 heads x 128, 1170 tokens, a bf16 column view of a q|k|v buffer):
    descales equal, e4m3 codes within one code point of the reference (the same fp32 operations)."""
    buf = randn(1, 1170, 3 * 40 * 128, dtype=torch.bfloat16, device="cuda")
    v = buf[..., 2 * 5120:].unflatten(-1, (40, 128))
    got, want = A8.quantize_fp8_heads(v), ref.quantize_fp8_heads(v)
    assert torch.equal(got[1], want[1])
    d = _e4m3_ulps(got[0], want[0])
    assert d.max() <= 1 and (d > 0).float().mean() < 1e-4, (d.max(), (d > 0).float().mean())


@pytest.mark.gpu
@needs_fa3_fp8
def test_gpu_fa3_fp8_attention_n8400():
    """FA3's FP8 forward at the Qwen-Image-Edit attention shape (8192 image + 208 text tokens, 24 x 128):
    against fp32 SDPA of the unquantised (normalised, rotated) q, k and v; against the CPU semantics
    (dequantised inputs, fp32 math: FA3 also rounds P to e4m3); and the bf16 attention for scale. Prints
    the errors."""
    torch.manual_seed(0)
    Lt, N, H, D = 208, 8400, 24, 128
    q, k, v, ws, tt, ti = joint_inputs(1, N, H, D, Lt, dtype=torch.bfloat16, wdtype=torch.bfloat16, device="cuda",
                                       wstd=0.1)
    yq, yk = normed_roped(q, k, Lt, ws, tt, ti)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    truth = sdpa(yq.transpose(1, 2), yk.transpose(1, 2), v.float().transpose(1, 2)).transpose(1, 2)
    o = A8.joint_qk_norm_rope_fp8(q, k, v, Lt, *ws, tt, ti)
    out = A8.attention_fp8(*o)
    assert out.dtype == torch.bfloat16 and out.shape == (1, N, H, D)
    deq = [ref.dequantize_fp8_heads(t, d) for t, d in zip(o[:3], o[3:])]
    semantics = sdpa(*(t.transpose(1, 2) for t in deq)).transpose(1, 2)
    q16, k16 = q.clone(), k.clone()
    fdo.joint_qk_norm_rope_(q16, k16, Lt, *ws, tt, ti)
    bf16 = fdo.attention(q16, k16, v)
    e8, e_sem, e16 = rel_err(out, truth), rel_err(out, semantics), rel_err(bf16, truth)
    print(f"\nN={N}: FA3 FP8 vs fp32 {e8:.3e} (vs dequantised fp32 math {e_sem:.3e}); bf16 attention vs fp32 "
          f"{e16:.3e}")
    assert torch.isfinite(out).all()
    assert e16 < e8 < 0.1 and e_sem < 0.05


@pytest.mark.gpu
@needs_fa3_fp8
def test_gpu_tiny_model_fp8_attention_eager_and_compiled():
    """A small bf16 model (3 heads x 64) on the GPU: FA3 FP8 attention runs (report, no runtime fallback);
    regional compile with inductor (fullgraph) agrees with eager."""
    from fused_dit_ops.models import build_qwen_image_transformer, make_qwen_inputs
    m = build_qwen_image_transformer("tiny", num_layers=2, num_attention_heads=3, attention_head_dim=64,
                                     axes_dims_rope=(16, 24, 24), device="cuda", dtype=torch.bfloat16, seed=3)
    kw = make_qwen_inputs(m, img_tokens=(13, 7), txt_len=5, seed=1)
    stock = _run(m, kw)
    r = fdo.patch(m, precision="fp8", attention_precision="fp8")
    assert _swapped(r) and "FlashAttention-3" in " ".join(r.swapped), r
    eager = _run(m, kw)
    assert not r.runtime, r.runtime
    assert 1e-3 < rel_err(eager, stock) < 0.2
    compiled, _ = run_blocks_compiled(m, m.transformer_blocks, kw, backend="inductor")
    assert rel_err(compiled, eager) < 2e-2
    fdo.unpatch(m)


@pytest.mark.gpu
@needs_fa3_fp8
def test_gpu_qwen_edit_block_fp8_attention():
    """One Qwen-Image-Edit-2511 block at the real dims (3072 = 24 x 128), bf16, 1 x (1024 + 1024) image +
    208 text tokens, against the same block in fp32: bf16 stock, the bf16 patch with FP8 attention, FP8
    GEMMs, FP8 GEMMs + FP8 attention. Prints the four errors; FP8 attention may add at most half of the FP8
    GEMMs' error on top of it."""
    from fused_dit_ops.models import build_qwen_image_transformer, make_qwen_inputs
    m32 = build_qwen_image_transformer("edit-2511", num_layers=1, device="cuda", dtype=torch.float32, seed=0)
    kw32 = make_qwen_inputs(m32, img_tokens=(1024, 1024), txt_len=208, seed=1)
    truth = _run(m32, kw32)
    m = m32.to(torch.bfloat16)
    del m32
    kw = make_qwen_inputs(m, img_tokens=(1024, 1024), txt_len=208, seed=1)
    errs = {"bf16": rel_err(_run(m, kw), truth)}
    for prec, ap in (("bf16", "fp8"), ("fp8", "bf16"), ("fp8", "fp8")):
        r = fdo.patch(m, precision=prec, attention_precision=ap, keep_bf16_weights=True)
        assert (ap == "fp8") == _swapped(r), r
        errs[f"{prec} GEMMs + {ap} attention"] = rel_err(_run(m, kw), truth)
        assert not r.runtime, r.runtime
        fdo.unpatch(m)
    print("\nQwen-Image-Edit block vs fp32: " + ", ".join(f"{k} {v:.3e}" for k, v in errs.items()))
    e8, e88 = errs["fp8 GEMMs + bf16 attention"], errs["fp8 GEMMs + fp8 attention"]
    assert e88 <= 1.5 * e8
    assert errs["bf16 GEMMs + fp8 attention"] <= 1.5 * e8
