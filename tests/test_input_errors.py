"""Bad input: the message names the argument that breaks the rule (the odd one out for devices),
the rule, and what came in; edge cases (empty attention, RoPE backends that cannot serve a
device, a wrong-length ``out``, errors raised while tracing)."""
from __future__ import annotations

import pytest
import torch

import fused_dit_ops as fdo
from fused_dit_ops import FusedDitInputError
from helpers import expect_input_error, randn

C, H, D = 16, 2, 8


def _mod(B=2, L=3, index=True):
    x, u = randn(B, L, C), randn(B, L, C)
    rows = 2 * B if index else B
    sh, sc, g = (randn(rows, C) for _ in range(3))
    idx = torch.randint(0, 2, (B, L), dtype=torch.int32) if index else None
    return x, u, sh, sc, g, idx


def _joint(B=1, Lt=3, Li=4):
    t = [randn(B, Lt, H, D) for _ in range(3)]
    i = [randn(B, Li, H, D) for _ in range(3)]
    w = [randn(D) for _ in range(4)]
    return t, i, w, randn(Lt, D), randn(Li, D)


def _cases():
    """(id, callable(args) -> result, args, position of the tensor moved to meta, its name)."""
    x, u, sh, sc, g, idx = _mod()
    yield "scale_shift_gate-x", fdo.scale_shift_gate, [x, sh, sc, g, idx], 0, "x"
    yield "scale_shift_gate-noindex-x", fdo.scale_shift_gate, list(_mod(index=False)[i] for i in (0, 2, 3, 4)) + [None], 0, "x"
    yield "scale_shift_gate-gate", fdo.scale_shift_gate, [x, sh, sc, g, idx], 3, "gate"
    yield "norm_scale_shift-x", fdo.norm_scale_shift, [x, sh, sc, idx], 0, "x"
    yield "gate_residual-residual", fdo.gate_residual, [x, u, g, idx], 0, "residual"
    yield "gate_residual-update", fdo.gate_residual, [x, u, g, idx], 1, "update"
    yield "gate_residual_norm_scale_shift-residual", fdo.gate_residual_norm_scale_shift, [x, u, g, sh, sc, idx], 0, "residual"
    yield "gate_residual_norm_scale_shift-scale", fdo.gate_residual_norm_scale_shift, [x, u, g, sh, sc, idx], 4, "scale"
    xb, ub, shb, scb, gb, _ = _mod(L=5, index=False)
    yield ("dual_norm_scale_shift-x_a", fdo.dual_norm_scale_shift, [x, sh, sc, idx, 1e-6, xb, shb, scb, None, 1e-6],
           0, "x_a")
    yield ("dual_norm_scale_shift-x_b", fdo.dual_norm_scale_shift, [x, sh, sc, idx, 1e-6, xb, shb, scb, None, 1e-6],
           5, "x_b")
    yield ("dual_gate_residual_norm_scale_shift-residual_a", fdo.dual_gate_residual_norm_scale_shift,
           [x, u, g, sh, sc, idx, 1e-6, xb, ub, gb, shb, scb, None, 1e-6], 0, "residual_a")
    q, k = randn(1, 4, H, D), randn(1, 4, H, D)
    yield "rope-q", fdo.rope, [q, k, randn(4, D)], 0, "q"
    yield "rope-k", fdo.rope, [q, k, randn(4, D)], 1, "k"
    t, i, w, tt, ti = _joint()
    yield "qk_norm_rope_cat-txt_q", fdo.qk_norm_rope_cat, [*t, *i, *w, tt, ti], 0, "txt_q"
    yield "qk_norm_rope_cat-txt_k", fdo.qk_norm_rope_cat, [*t, *i, *w, tt, ti], 1, "txt_k"
    yield "qk_norm_rope_cat-img_cos_sin", fdo.qk_norm_rope_cat, [*t, *i, *w, tt, ti], 11, "img_cos_sin"
    qj, kj = randn(1, 7, H, D), randn(1, 7, H, D)
    yield "joint_qk_norm_rope_-q", fdo.joint_qk_norm_rope_, [qj, kj, 3, *w, tt, ti], 0, "q"
    yield "joint_qk_norm_rope_-k", fdo.joint_qk_norm_rope_, [qj, kj, 3, *w, tt, ti], 1, "k"
    yield "joint_qkv_cat-txt_q", fdo.joint_qkv_cat, [*t, *i], 0, "txt_q"
    yield "joint_qkv_cat-img_v", fdo.joint_qkv_cat, [*t, *i], 5, "img_v"
    outs = [randn(1, 7, H, D) for _ in range(3)]
    cat_out = lambda *a: fdo.joint_qkv_cat(*a[:6], out=a[6:])  # noqa: E731
    yield "joint_qkv_cat_out-txt_q", cat_out, [*t, *i, *outs], 0, "txt_q"
    yield "joint_qkv_cat_out-k_out", cat_out, [*t, *i, *outs], 7, "k_out"
    qa, ka, va = randn(1, 5, H, D), randn(1, 5, H, D), randn(1, 5, H, D)
    yield "attention-q", fdo.attention, [qa, ka, va], 0, "q"
    yield "attention-k", fdo.attention, [qa, ka, va], 1, "k"


CASES = list(_cases())


@pytest.mark.parametrize("fn,args,pos,name", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_wrong_device_names_the_odd_one_out(fn, args, pos, name):
    args = list(args)
    args[pos] = args[pos].to("meta")
    with pytest.raises(FusedDitInputError) as e:
        fn(*args)
    msg = str(e.value)
    assert f"'{name}' is on meta but " in msg and "are on cpu" in msg and "one device" in msg, msg
    assert msg.count("meta") == 1, msg  # nobody else is said to be on meta


def test_two_tensors_on_two_devices_names_both():
    q = randn(1, 4, H, D)
    k = randn(1, 4, H, D).to("meta")
    expect_input_error(lambda: fdo.rope(q, k, randn(4, D).to("meta")), "'q' is on cpu but 'k' and 'cos_sin_cache'")
    # no majority: the message lists every tensor with its device instead of blaming one
    from fused_dit_ops._validation import check_one_device
    expect_input_error(lambda: check_one_device("op", ("a", q), ("b", k)), "got 'a' on cpu, 'b' on meta")


# --- which argument breaks which rule ---------------------------------------------------------------

def test_attention_wrong_k_head_dim_blames_k():
    q, v = randn(1, 5, H, D), randn(1, 5, H, D)
    expect_input_error(lambda: fdo.attention(q, randn(1, 5, H, 2 * D), v), "'k' head_dim must equal q's D=8")
    expect_input_error(lambda: fdo.attention(q, randn(2, 5, H, D), v), "'k' batch size must equal q's B=1")
    expect_input_error(lambda: fdo.attention(q, randn(1, 5, H, D), randn(1, 5, H, 2 * D)),
                       "'v' must have the shape of 'k' [1, 5, 2, 8]", "got [1, 5, 2, 16]")


def test_rope_q_and_k_of_different_ranks():
    expect_input_error(lambda: fdo.rope(randn(4, H, D), randn(1, 4, H, D), randn(4, D)),
                       "'q' is 3-D [4, 2, 8] but 'k' is 4-D [1, 4, 2, 8]", "both be [B, L, H, D] or both [L, H, D]")
    expect_input_error(lambda: fdo.rope(randn(1, 4, H, D), randn(4, H, D), randn(4, D)),
                       "'q' is 4-D", "'k' is 3-D")
    expect_input_error(lambda: fdo.rope(randn(1, 4, H, D), randn(H, D), randn(4, D)), "'k' must be 3-D or 4-D")


@pytest.mark.parametrize("out", [(), "ab", None])
def test_qk_norm_rope_cat_out_of_wrong_length(out):
    t, i, w, tt, ti = _joint()
    buf = randn(1, 7, H, D)
    out = {(): (buf, buf.clone()), "ab": [buf], None: buf}[out]
    expect_input_error(lambda: fdo.qk_norm_rope_cat(*t, *i, *w, tt, ti, out=out),
                       "fused_dit.qk_norm_rope_cat: 'out' must be a (q_out, k_out, v_out) triple, got a")
    # and a right one still works
    outs = tuple(randn(1, 7, H, D) for _ in range(3))
    assert fdo.qk_norm_rope_cat(*t, *i, *w, tt, ti, out=outs) == outs


@pytest.mark.parametrize("out", [(), "ab", None, "abcd"])
def test_joint_qkv_cat_out_of_wrong_length(out):
    t, i, _, _, _ = _joint()
    buf = randn(1, 7, H, D)
    out = {(): (buf, buf.clone()), "ab": [buf], None: buf, "abcd": (buf,) * 4}[out]
    expect_input_error(lambda: fdo.joint_qkv_cat(*t, *i, out=out),
                       "fused_dit.joint_qkv_cat: 'out' must be a (q_out, k_out, v_out) triple, got a")
    outs = tuple(randn(1, 7, H, D) for _ in range(3))
    assert fdo.joint_qkv_cat(*t, *i, out=outs) == outs
    for o, a, b in zip(outs, t, i):
        assert torch.equal(o, torch.cat([a, b], 1))


# --- empty attention ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape_q,shape_k", [((0, 5, H, D), (0, 5, H, D)), ((1, 0, H, D), (1, 4, H, D)),
                                             ((1, 0, H, D), (1, 0, H, D)), ((2, 3, 0, D), (2, 3, 0, D)),
                                             ((1, 3, H, 0), (1, 3, H, 0)), ((1, 3, H, D), (1, 0, H, D)),
                                             ((1, 3, 4, D), (1, 0, 2, D))])
def test_attention_empty_inputs(shape_q, shape_k):
    q, k, v = randn(*shape_q), randn(*shape_k), randn(*shape_k)
    out = fdo.attention(q, k, v)
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == q.dtype
    from fused_dit_ops import reference as ref
    if out.numel():  # keys empty, queries not: softmax over no keys is 0 (SDPA says the same)
        assert torch.equal(out, torch.zeros_like(q))
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True).transpose(1, 2))
        torch.testing.assert_close(out, ref.attention(q, k, v))
    torch.library.opcheck(torch.ops.fused_dit.attention.default, (q, k, v, None, False, None))
    torch._dynamo.reset()
    got = torch.compile(fdo.attention, fullgraph=True, backend="aot_eager")(q, k, v)
    assert got.shape == q.shape
    torch._dynamo.reset()


def test_attention_empty_still_checks_the_rules():
    expect_input_error(lambda: fdo.attention(randn(1, 0, H, D), randn(1, 3, H, D), randn(1, 3, H, D), causal=True),
                       "'causal'=True needs Sq == Sk")
    expect_input_error(lambda: fdo.attention(randn(0, 3, H, D), randn(0, 3, H, 4), randn(0, 3, H, 4)), "'k' head_dim")


# --- RoPE backends that cannot serve a device -----------------------------------------------------

@pytest.mark.parametrize("backend", ["flashinfer", "triton"])
def test_rope_forced_backend_on_cpu_tensors_says_so(backend, monkeypatch):
    monkeypatch.delenv("FUSED_DIT_ROPE_BACKEND", raising=False)
    q, k, cache = randn(1, 4, H, D), randn(1, 4, H, D), randn(4, D)
    expect_input_error(lambda: fdo.rope(q, k, cache, backend=backend),
                       f"backend '{backend}' (from the argument) cannot serve cpu tensors", "backend=None or 'auto'")
    monkeypatch.setenv("FUSED_DIT_ROPE_BACKEND", backend)
    expect_input_error(lambda: fdo.rope(q, k, cache),
                       f"backend '{backend}' (from $FUSED_DIT_ROPE_BACKEND) cannot serve cpu tensors")
    ref = fdo.rope(q, k, cache, backend="auto")  # the argument beats the environment
    assert ref[0].shape == q.shape and ref[1].shape == k.shape


def test_rope_unknown_env_backend_is_an_error(monkeypatch):
    q, k, cache = randn(1, 4, H, D), randn(1, 4, H, D), randn(4, D)
    monkeypatch.setenv("FUSED_DIT_ROPE_BACKEND", "cuda-graph")
    expect_input_error(lambda: fdo.rope(q, k, cache),
                       "backend 'cuda-graph' (from $FUSED_DIT_ROPE_BACKEND) must be one of")
    for ok in ("auto", ""):
        monkeypatch.setenv("FUSED_DIT_ROPE_BACKEND", ok)
        qo, ko = fdo.rope(q, k, cache)
        assert qo.shape == q.shape and ko.shape == k.shape


def test_rope_auto_on_cpu_and_meta_shapes(monkeypatch):
    monkeypatch.setenv("FUSED_DIT_ROPE_BACKEND", "triton")
    q = randn(1, 4, H, D).to("meta")
    qo, ko = fdo.rope(q, q.clone(), randn(4, D).to("meta"))  # meta: shapes only, any backend passes
    assert qo.device.type == ko.device.type == "meta"
    assert qo.shape == ko.shape == q.shape and qo.dtype == q.dtype


# --- errors raised while tracing ------------------------------------------------------------------

def test_input_error_under_compile_is_found_in_the_chain():
    x, u, sh, sc, g, idx = _mod(index=False)
    torch._dynamo.reset()
    f = torch.compile(fdo.gate_residual, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception) as e:
        f(x, u, g[:1])
    # torch wraps it (TorchRuntimeError): the original is in the chain, the text in the message
    assert "'gate' has shape [1, 16]" in str(e.value)
    orig = FusedDitInputError.find(e.value)
    assert isinstance(orig, FusedDitInputError) and str(orig).startswith("fused_dit.gate_residual: 'gate'")
    assert FusedDitInputError.find(ValueError("x")) is None and FusedDitInputError.find(None) is None
    torch._dynamo.reset()
