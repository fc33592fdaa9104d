"""The eager fast path's checks (``fused_dit_ops.ops._eager._check``): each op's own validator,
remembered per metadata signature (shapes, strides, dtypes, devices, scalar arguments) once it
passed. A bad input, even right after a good one that differs only in one stride, dtype, device,
shape or scalar, still raises the op's own FusedDitInputError (the text ``torch.ops`` gives) before
any launch, every time. CPU tensors with the launchers stubbed out (the checks read metadata only).
"""
from __future__ import annotations

import pytest
import torch

from fused_dit_ops import FusedDitInputError
from fused_dit_ops.ops import _eager
from fused_dit_ops.ops import modulation as _mod
from fused_dit_ops.ops import rope as _rope

B, Li, Lt, C, H, D = 2, 12, 5, 16, 2, 8


def _args():
    """(op, good args) of every checked fast-path function, laid out as the patched block has them."""
    h, e = torch.randn(B, Li, C), torch.randn(B, Lt, C)
    uh, ue = torch.randn(B, Li, C), torch.randn(B, Lt, C)
    idx = torch.randint(0, 2, (B, Li))
    both = torch.randn(2 * B, 12 * C)
    im, tm = both[:, :6 * C].chunk(6, -1), both[:B, 6 * C:].chunk(6, -1)  # column views, row stride 12C
    buf = torch.randn(B, Lt + Li, 3 * H * D)
    q, k = (buf[..., j * H * D:(j + 1) * H * D].unflatten(-1, (H, D)) for j in range(2))
    w = [torch.nn.Parameter(torch.randn(D)) for _ in range(4)]
    return {
        "norm_scale_shift": [h, im[0], im[1], idx, None, None, 1e-6, "layer"],
        "dual_norm_scale_shift": [h, im[0], im[1], idx, 1e-6, e, tm[0], tm[1], None, 1e-6, "layer"],
        "gate_residual_norm_scale_shift": [h, uh, im[2], im[3], im[4], idx, 1e-6],
        "dual_gate_residual_norm_scale_shift": [h, uh, im[2], im[3], im[4], idx, 1e-6,
                                                e, ue, tm[2], tm[3], tm[4], None, 1e-6],
        "gate_residual": [h, uh, im[5], idx],
        "joint_qk_norm_rope_": [q, k, Lt, *w, torch.randn(Lt, D), torch.randn(Li, D), 1e-6, True],
    }


def _bad(op, args):
    """(what, args) that break one rule each, differing from the good call only in metadata or a scalar."""
    a = list(args)
    if op == "joint_qk_norm_rope_":
        yield "weight stride", [*a[:3], torch.randn(D, 2)[:, 0], *a[4:]]
        yield "table dtype", [*a[:7], a[7].double(), *a[8:]]
        yield "table on meta", [*a[:8], a[8].to("meta"), *a[9:]]
        yield "txt_len", [a[0], a[1], Lt + Li + 1, *a[3:]]
        yield "eps", [*a[:9], 0.0, a[10]]
        return
    x, p, i = a[0], _PARAM[op], _INDEX[op]
    yield "activation last-dim stride", [torch.randn(B, C, Li).transpose(1, 2), *a[1:]]
    yield "activation dtype", [x.double(), *a[1:]]
    yield "activation on meta", [x.to("meta"), *a[1:]]
    yield "parameter rows", [*a[:p], a[p][:B], *a[p + 1:]]
    yield "index dropped", [*a[:i], None, *a[i + 1:]]
    if op in ("norm_scale_shift", "dual_norm_scale_shift"):
        yield "norm", [*a[:-1], "batch"]
    if op.startswith("dual_"):
        j = len(a) // 2
        yield "second stream batch", [*a[:j], a[j][:1], *a[j + 1:]]


# where the first modulation parameter and the index sit
_PARAM = {"norm_scale_shift": 1, "dual_norm_scale_shift": 1, "gate_residual_norm_scale_shift": 2,
          "dual_gate_residual_norm_scale_shift": 2, "gate_residual": 2}
_INDEX = {"norm_scale_shift": 3, "dual_norm_scale_shift": 3, "gate_residual_norm_scale_shift": 5,
          "dual_gate_residual_norm_scale_shift": 5, "gate_residual": 3}


@pytest.fixture
def stubbed(monkeypatch):
    """The fast path on CPU tensors (under no_grad), the launchers recording their calls instead of
    launching, and the validators counting theirs."""
    from fused_dit_ops.kernels import modulation as km
    from fused_dit_ops.kernels import rope as kr
    launches, checks = [], []
    for name in ("norm_scale_shift", "dual_norm_scale_shift", "gate_residual_norm_scale_shift",
                 "dual_gate_residual_norm_scale_shift", "gate_residual"):
        monkeypatch.setattr(km, name, lambda *a, _n=name, **k: launches.append(_n))
    monkeypatch.setattr(kr, "joint_qk_norm_rope_", lambda *a, **k: launches.append("joint_qk_norm_rope_"))
    monkeypatch.setattr(_mod, "_GATE_RESIDUAL_CPP", None)
    monkeypatch.setattr(_eager, "fast", lambda x: not torch.is_grad_enabled())
    monkeypatch.setattr(_eager, "_PASSED", set())
    for owner, name in ((_mod, "_check_norm_scale_shift"), (_mod, "_check_dual_norm_scale_shift"),
                        (_mod, "_check_gate_residual_norm_scale_shift"),
                        (_mod, "_check_dual_gate_residual_norm_scale_shift"), (_mod, "_check_gate_residual"),
                        (_rope, "_check_joint_qk_norm_rope")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _f=real, _n=name, **k: checks.append(_n) or _f(*a, **k))
    return launches, checks


OPS = list(_args())


@pytest.mark.parametrize("op", OPS)
def test_remembered_signature_skips_the_check_and_bad_inputs_still_raise(op, stubbed):
    launches, checks = stubbed
    good = _args()[op]
    fn = getattr(_eager, op)
    with torch.no_grad():
        fn(*good)
        n = len(checks)
        fn(*good)
        assert launches == [op] * 2 and n >= 1 and len(checks) == n  # the second call: signature remembered
        bad = list(_bad(op, good))
        assert len(bad) >= 4
        for what, args in bad:
            with pytest.raises(FusedDitInputError) as via_op:
                getattr(torch.ops.fused_dit, op).default(*args)
            for _ in range(2):  # never remembered: raises every time
                with pytest.raises(FusedDitInputError) as e:
                    fn(*args)
                assert str(e.value) == str(via_op.value), what
        assert launches == [op] * 2  # no bad input reached a launcher
        fn(*good)
    assert launches == [op] * 3


def test_signature_covers_what_the_checks_read():
    x = torch.randn(2, 3, 16)
    sig = _eager._signature
    assert sig((x, 1e-6, "layer", None)) == sig((x.clone(), 1e-6, "layer", None))
    for other in (x.double(), x.transpose(0, 1).contiguous().transpose(0, 1), x[:1], x.to("meta"), x[..., :8]):
        assert sig((other,)) != sig((x,))
    assert sig((x, 1e-6)) != sig((x, 1e-5)) and sig((x, 1)) != sig((x, 1.0)) and sig((x, True)) != sig((x, 1))
    # kinds whose check may read more than metadata, or that behave otherwise: no signature (checked every call)
    assert sig((x, torch.tensor(1e-6))) is None  # a number in a 0-dim tensor
    assert sig((x, [x])) is None and sig((x, torch.float32)) is None

    class Sub(torch.Tensor):
        pass
    assert sig((x.as_subclass(Sub),)) is None


def test_grad_mode_on_always_checks(stubbed):
    """With grad mode on (only when ``fast`` is forced, as in tests) the validator runs every call: its
    rules on tensors that require grad read more than the signature."""
    launches, checks = stubbed
    _eager.fast = lambda x: True
    q = _args()["joint_qk_norm_rope_"]
    for _ in range(2):
        _eager.joint_qk_norm_rope_(*q)
    assert checks == ["_check_joint_qk_norm_rope"] * 2
    q[1] = torch.randn(B, Lt + Li, H, D, requires_grad=True)
    with pytest.raises(FusedDitInputError, match="'k' is a leaf tensor that requires grad"):
        _eager.joint_qk_norm_rope_(*q)


def test_remembered_signatures_are_bounded(stubbed, monkeypatch):
    monkeypatch.setattr(_eager, "_PASSED_MAX", 8)
    with torch.no_grad():
        for L in range(1, 30):
            _eager.gate_residual(torch.randn(1, L, 16), torch.randn(1, L, 16), torch.randn(1, 16))
            assert len(_eager._PASSED) <= 8


def test_gate_residual_fast_path_cpp_kernel_only_for_cuda(stubbed, monkeypatch):
    """With the C++ kernel built, the fast path calls it (after the op's check) for CUDA tensors of one
    dtype; CPU tensors (the fast path forced, as in the interpreter tests) and a gate of another dtype
    take the Triton launcher."""
    launches, checks = stubbed
    cpp = []
    monkeypatch.setattr(_mod, "_GATE_RESIDUAL_CPP", lambda *a: cpp.append(len(a)) or a[0])
    args = _args()["gate_residual"]
    with torch.no_grad():
        for _ in range(2):
            _eager.gate_residual(*args)
        assert cpp == [] and launches == ["gate_residual"] * 2 and checks == ["_check_gate_residual"]
        with pytest.raises(FusedDitInputError):
            _eager.gate_residual(args[0].double(), *args[1:])
    assert launches == ["gate_residual"] * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_gate_residual_fast_path_calls_the_cpp_kernel(monkeypatch):
    """On CUDA with _C built: the fast path calls the C++ kernel directly (no dispatcher), with the
    op's result."""
    real = _mod._GATE_RESIDUAL_CPP
    if real is None:
        pytest.skip("fused_dit_ops._C not built")
    calls = []
    monkeypatch.setattr(_mod, "_GATE_RESIDUAL_CPP", lambda *a: calls.append(1) or real(*a))
    x, u = (torch.randn(2, 300, 3072, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    g = torch.randn(2, 6 * 3072, device="cuda", dtype=torch.bfloat16)[:, 3072:2 * 3072]
    with torch.no_grad():
        got = _eager.gate_residual(x, u, g, None)
        want = torch.ops.fused_dit.gate_residual.default(x, u, g, None)
    assert calls == [1, 1] and torch.equal(got, want)  # the op calls the same kernel


def test_attention_fast_path_checks_once_then_selects(monkeypatch):
    """``_eager.attention`` on the fast path: the op's own check (remembered per signature, bad input
    raises the op's error every time), then the backend ``attention_dispatch.select`` picks, the same
    output as the op; empty inputs go to the op."""
    from fused_dit_ops.ops import attention as _attn_op
    monkeypatch.setattr(_eager, "fast", lambda x: not torch.is_grad_enabled())
    monkeypatch.setattr(_eager, "_PASSED", set())
    n = []
    real = _attn_op._check_attention
    monkeypatch.setattr(_attn_op, "_check_attention", lambda *a: n.append(1) or real(*a))
    qkv = torch.randn(2, 7, 3 * 2 * 8)
    q, k, v = (qkv[..., j * 16:(j + 1) * 16].unflatten(-1, (2, 8)) for j in range(3))
    with torch.no_grad():
        want = torch.ops.fused_dit.attention.default(q, k, v, None, False, None)
        n.clear()
        for _ in range(2):
            torch.testing.assert_close(_eager.attention(q, k, v, None, False, None), want)
        assert len(n) == 1
        for bad in ((q, k[:1], v), (q, k, v, -1.0), (q.double(), k, v)):
            for _ in range(2):
                with pytest.raises(FusedDitInputError) as e:
                    _eager.attention(*bad)
                with pytest.raises(FusedDitInputError) as via_op:
                    torch.ops.fused_dit.attention.default(*bad)
                assert str(e.value) == str(via_op.value)
        empty = _eager.attention(q[:, :0], k, v)
        assert empty.shape == (2, 0, 2, 8)
