"""The ops have no backward (inference only). With grad enabled and an input that requires grad:
an op that returns new tensors runs, and ``.backward()`` through its outputs raises, naming the op
and saying to run under no_grad; an op that writes its inputs in place raises before it writes;
while torch.compile traces, every op refuses such inputs (a compiled graph cannot raise at
backward). Under no_grad / inference_mode nothing changes."""
from __future__ import annotations

import warnings

import pytest
import torch

import fused_dit_ops as fdo
from fused_dit_ops import FusedDitInputError
from helpers import randn

C, H, D = 16, 2, 8


def _functional():
    """(op name, callable, args): ops returning new tensors; args[0] is the tensor made to require grad."""
    x, u = randn(2, 3, C), randn(2, 3, C)
    p = [randn(4, C) for _ in range(3)]
    idx = torch.randint(0, 2, (2, 3), dtype=torch.int32)
    xb = randn(2, 5, C)
    pb = [randn(2, C) for _ in range(3)]
    yield "scale_shift_gate", fdo.scale_shift_gate, [x, p[0], p[1], p[2], idx]
    yield "norm_scale_shift", fdo.norm_scale_shift, [x, p[0], p[1], idx]
    yield "gate_residual", fdo.gate_residual, [x, u, p[2], idx]
    yield "gate_residual_norm_scale_shift", fdo.gate_residual_norm_scale_shift, [x, u, p[2], p[0], p[1], idx]
    yield "dual_norm_scale_shift", fdo.dual_norm_scale_shift, [x, p[0], p[1], idx, 1e-6, xb, pb[0], pb[1], None, 1e-6]
    yield ("dual_gate_residual_norm_scale_shift", fdo.dual_gate_residual_norm_scale_shift,
           [x, u, p[2], p[0], p[1], idx, 1e-6, xb, randn(2, 5, C), pb[2], pb[0], pb[1], None, 1e-6])
    t = [randn(1, 3, H, D) for _ in range(3)]
    i = [randn(1, 4, H, D) for _ in range(3)]
    w = [randn(D) for _ in range(4)]
    yield "qk_norm_rope_cat", fdo.qk_norm_rope_cat, [*t, *i, *w, randn(3, D), randn(4, D)]
    yield "attention", fdo.attention, [randn(1, 5, H, D), randn(1, 5, H, D), randn(1, 5, H, D)]
    yield "joint_qkv_cat", fdo.joint_qkv_cat, [*t, *i]
    yield "joint_linear", fdo.joint_linear, [randn(2, 3, C), randn(2, 5, C), [randn(8, C), randn(4, C)],
                                             [randn(8), None], [randn(8, C), randn(4, C)], [randn(8), randn(4)]]
    yield "swiglu_linear", fdo.swiglu_linear, [randn(2, 3, C), randn(24, C), randn(24)]


def _inplace():
    q, k = randn(1, 7, H, D), randn(1, 7, H, D)
    w = [randn(D) for _ in range(4)]
    yield "rope", fdo.rope, [q, k, randn(7, D)]
    yield "joint_qk_norm_rope_", fdo.joint_qk_norm_rope_, [q, k, 3, *w, randn(3, D), randn(4, D)]
    t = [randn(1, 3, H, D) for _ in range(3)]
    i = [randn(1, 4, H, D) for _ in range(3)]
    outs = tuple(randn(1, 7, H, D) for _ in range(3))
    yield ("qk_norm_rope_cat_out", lambda *a: fdo.qk_norm_rope_cat(*a, out=outs),
           [*t, *i, *w, randn(3, D), randn(4, D)])
    cat_outs = tuple(randn(1, 7, H, D) for _ in range(3))
    yield "joint_qkv_cat_out", lambda *a: fdo.joint_qkv_cat(*a, out=cat_outs), [*t, *i]


# the out= ops: their public function (the outputs go in ``out``)
OUT_FNS = {"qk_norm_rope_cat_out": fdo.qk_norm_rope_cat, "joint_qkv_cat_out": fdo.joint_qkv_cat}


FUNCTIONAL = list(_functional())
INPLACE = list(_inplace())


def _outs(out):
    return [out] if isinstance(out, torch.Tensor) else list(out)


@pytest.mark.parametrize("name,fn,args", FUNCTIONAL, ids=[c[0] for c in FUNCTIONAL])
def test_backward_through_an_op_raises_naming_it(name, fn, args):
    args = list(args)
    args[0] = args[0].clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no autograd-fallback warning on the way
        outs = _outs(fn(*args))
    assert all(o.requires_grad for o in outs)
    loss = sum(o.float().sum() for o in outs)
    with pytest.raises(RuntimeError) as e:
        loss.backward()
    op = "qk_norm_rope_cat" if name == "qk_norm_rope_cat" else name
    assert f"fused_dit.{op} has no backward" in str(e.value) and "torch.no_grad()" in str(e.value)
    assert args[0].grad is None
    # the same call under no_grad: plain outputs, equal values
    with torch.no_grad():
        ref = _outs(fn(*args))
    for o, r in zip(outs, ref):
        assert not r.requires_grad and torch.equal(o.detach(), r)


@pytest.mark.parametrize("name,fn,args", FUNCTIONAL, ids=[c[0] for c in FUNCTIONAL])
def test_no_grad_and_inference_mode_unchanged(name, fn, args):
    args = list(args)
    args[0] = args[0].clone().requires_grad_(True)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            for o in _outs(fn(*args)):
                assert not o.requires_grad and o.grad_fn is None


@pytest.mark.parametrize("name,fn,args", INPLACE, ids=[c[0] for c in INPLACE])
@pytest.mark.parametrize("which", ["written", "weight"])
def test_inplace_op_runs_and_backward_through_what_it_wrote_raises(name, fn, args, which):
    """The tensors it wrote get a history ending in a node that raises (as an in-place torch op
    rebases history): either a written tensor that required grad (a non-leaf), or a plain one written
    from a weight that requires grad."""
    args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    if which == "written":
        leaf = args[0].clone().requires_grad_(True)
        args[0] = leaf * 1  # a non-leaf that requires grad
    elif name == "rope":
        args[2] = args[2].requires_grad_(True)  # the cos|sin table
    elif name == "joint_qkv_cat_out":
        args[3] = args[3].requires_grad_(True)  # an input (img_q): the written tensors are plain
    else:
        pos = next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dim() == 1)
        args[pos] = args[pos].requires_grad_(True)  # the first RMSNorm weight
    written = [args[0], args[1]] if name not in OUT_FNS else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fn(*args)
    if written is None:
        written = list(out)
    op = name
    for t in written:
        assert t.requires_grad and t.grad_fn is not None
        with pytest.raises(RuntimeError) as e:
            t.float().sum().backward(retain_graph=True)
        assert f"fused_dit.{op} has no backward" in str(e.value) and "torch.no_grad()" in str(e.value)


def test_inplace_op_on_views_of_a_joint_buffer():
    """q and k column views of one packed buffer (as the patched block has them): the buffer's
    history ends in the raising node too."""
    buf = randn(1, 7, 2 * H * D)
    q, k = (buf[..., j * H * D:(j + 1) * H * D].unflatten(-1, (H, D)) for j in range(2))
    w = [randn(D).requires_grad_(True) for _ in range(4)]
    fdo.joint_qk_norm_rope_(q, k, 3, *w, randn(3, D), randn(4, D))
    with pytest.raises(RuntimeError, match="fused_dit.joint_qk_norm_rope_ has no backward"):
        buf.sum().backward()


@pytest.mark.parametrize("name,fn,args", INPLACE, ids=[c[0] for c in INPLACE])
def test_inplace_op_on_a_leaf_that_requires_grad_raises_before_writing(name, fn, args):
    args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    if name in OUT_FNS:
        outs = tuple(randn(1, 7, H, D) for _ in range(3))
        outs[1].requires_grad_(True)
        before = outs[1].detach().clone()
        with pytest.raises(FusedDitInputError) as e:
            OUT_FNS[name](*args, out=outs)
        target, arg = outs[1], "k_out"
    else:
        args[1] = args[1].requires_grad_(True)
        before = args[1].detach().clone()
        with pytest.raises(FusedDitInputError) as e:
            fn(*args)
        target, arg = args[1], "k"
    msg = str(e.value)
    assert msg.startswith(f"fused_dit.{name}: '{arg}' is a leaf tensor that requires grad"), msg
    assert "torch.no_grad()" in msg
    assert torch.equal(target.detach(), before)
    with torch.no_grad():
        fn(*args) if name not in OUT_FNS else OUT_FNS[name](*args, out=outs)


COMPILED = [c for c in FUNCTIONAL + INPLACE
            if c[0] in ("scale_shift_gate", "norm_scale_shift", "gate_residual", "qk_norm_rope_cat", "attention",
                        "joint_qkv_cat", "joint_linear", "rope", "joint_qkv_cat_out", "swiglu_linear")]


@pytest.mark.parametrize("name,fn,args", COMPILED, ids=[c[0] for c in COMPILED])
def test_compiled_op_refuses_inputs_that_require_grad(name, fn, args):
    args = list(args)
    args[0] = args[0].clone().requires_grad_(True)
    torch._dynamo.reset()
    try:
        f = torch.compile(lambda *a: fn(*a), fullgraph=True, backend="aot_eager")
        with pytest.raises(Exception) as e:
            f(*args)
        err = FusedDitInputError.find(e.value)
        assert err is not None and "requires grad" in str(err) and "torch.no_grad()" in str(err), e.value
        torch._dynamo.reset()
        with torch.no_grad():
            f(*args)  # compiled under no_grad: fine
    finally:
        torch._dynamo.reset()


def test_joint_linear_with_weights_that_require_grad():
    """Parameters of Linears (requires_grad=True) with grad enabled: the output comes out behind the
    raising node; the CUDA implementation's GEMMs (addmm into row slices, run here on CPU tensors)
    take such inputs too."""
    from fused_dit_ops.ops import linear
    txt, img = randn(2, 3, C), randn(2, 5, C)
    tw, iw = [torch.nn.Parameter(randn(8, C)) for _ in range(2)]
    tb, ib = torch.nn.Parameter(randn(8)), None
    for fn in (fdo.joint_linear, linear._joint_linear_cuda):
        out = fn(txt, img, [tw], [tb], [iw], [ib])
        assert out.requires_grad
        with pytest.raises(RuntimeError, match="fused_dit.joint_linear has no backward"):
            out.sum().backward()
        with torch.no_grad():
            assert torch.allclose(out.detach(), fn(txt, img, [tw], [tb], [iw], [ib]), atol=1e-5)
