"""The Triton fast-launch path (fused_dit_ops.kernels._launch): same kernels, same results, and
a specialization change never reuses a kernel compiled for other arguments."""
import pytest
import torch
import triton
import triton.language as tl

from fused_dit_ops.kernels import _launch
from fused_dit_ops.kernels import modulation as km
from fused_dit_ops.kernels import rope as kr

from helpers import randn


def test_constexpr_names_are_trailing_for_every_kernel():
    for fn, first in [(km._scale_shift_gate_kernel, "HAS_INDEX"), (km._norm_scale_shift_kernel, "HAS_INDEX"),
                      (km._gate_residual_norm_scale_shift_kernel, "HAS_INDEX"),
                      (km._gate_residual_kernel, "HAS_INDEX"), (kr._joint_qk_kernel, "D")]:
        names = _launch._constexpr_names(fn)
        assert names[0] == first and len(names) >= 4


@triton.jit
def _bad_order(x_ptr, N: tl.constexpr, y_ptr):
    pass


def test_non_trailing_constexpr_is_rejected():
    _launch._names.pop(_bad_order, None)
    if not hasattr(_bad_order, "params"):
        pytest.skip("interpreter function: signature check applies to compiled kernels only")
    with pytest.raises(TypeError, match="constexpr parameters must come last"):
        _launch._constexpr_names(_bad_order)


def test_arg_key_distinguishes_alignment_and_exact_ints():
    buf = torch.empty(64, dtype=torch.bfloat16)
    assert _launch._arg_key(buf) != _launch._arg_key(buf[1:])  # 2-byte offset: not 16-byte aligned
    assert _launch._arg_key(buf) == _launch._arg_key(buf[8:])  # 16 bytes further: same specialization
    assert _launch._arg_key(16) != _launch._arg_key(32)
    assert _launch._arg_key(1.0) == _launch._arg_key(2.5)  # floats are not specialized by Triton


def test_set_enabled_round_trip():
    prev = _launch.set_enabled(False)
    try:
        assert _launch.enabled() is False
    finally:
        _launch.set_enabled(prev)
    assert _launch.enabled() == prev


def _mod_inputs(B, L, C, dtype, device, offset=0):
    x = randn(B, L, C + offset, dtype=dtype, device=device)[..., offset:]
    u = randn(B, L, C, dtype=dtype, device=device)
    mod = randn(2 * B, 6 * C, dtype=dtype, device=device, std=0.3)
    idx = (torch.arange(L, device=device) >= L // 2).to(torch.int32).repeat(B, 1)
    return x, u, mod.chunk(6, dim=-1), idx


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0, 8])
def test_fast_path_equals_triton_path_bitwise(offset):
    dev, dt = "cuda", torch.bfloat16
    x, u, (sh, sc, g, sh2, sc2, _), idx = _mod_inputs(2, 300, 3072, dt, dev, offset)
    calls = [lambda: km.scale_shift_gate(x, sh, sc, g, idx),
             lambda: km.norm_scale_shift(x, sh, sc, idx),
             lambda: km.gate_residual_norm_scale_shift(x, u, g, sh2, sc2, idx),
             lambda: km.gate_residual(x, u, g, idx)]
    prev = _launch.set_enabled(False)
    try:
        slow = [c() for c in calls]
    finally:
        _launch.set_enabled(prev)
    _launch.set_enabled(True)
    try:
        for c in calls:
            c()  # first call per signature: Triton's path, fills the cache
        before = _launch.stats["fast"]
        fast = [c() for c in calls]
        assert _launch.stats["fast"] - before == len(calls)
    finally:
        _launch.set_enabled(prev)
    torch.cuda.synchronize()
    flat = lambda r: list(r) if isinstance(r, tuple) else [r]  # noqa: E731
    for s, f in zip(slow, fast):
        for a, b in zip(flat(s), flat(f)):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_fast_path_respecializes_on_misalignment():
    # A kernel compiled for 16-byte-aligned pointers must not serve a misaligned view: the
    # misaligned call takes Triton's path (new key), and both results match the reference.
    dev = "cuda"
    q = randn(1, 40, 4, 64, dtype=torch.float32, device=dev)
    k = randn(1, 40, 4, 64, dtype=torch.float32, device=dev)
    cache = randn(40, 64, dtype=torch.float32, device=dev)
    _launch.set_enabled(True)
    q1, k1 = q.clone(), k.clone()
    kr.rope_(q1, k1, cache)
    kr.rope_(q.clone(), k.clone(), cache)  # cached now
    # misaligned storage: same values, data_ptr offset by 4 bytes
    big_q = torch.empty(q.numel() + 1, device=dev)
    big_k = torch.empty(k.numel() + 1, device=dev)
    q2 = big_q[1:].view_as(q).copy_(q)
    k2 = big_k[1:].view_as(k).copy_(k)
    slow_before = _launch.stats["slow"]
    kr.rope_(q2, k2, cache)
    assert _launch.stats["slow"] == slow_before + 1
    torch.testing.assert_close(q2, q1, rtol=0, atol=0)
    torch.testing.assert_close(k2, k1, rtol=0, atol=0)


@pytest.mark.gpu
def test_fast_path_under_cuda_graph_capture():
    dev, dt = "cuda", torch.bfloat16
    x, u, (sh, sc, g, _, _, _), idx = _mod_inputs(1, 256, 3072, dt, dev)
    _launch.set_enabled(True)
    ref = km.gate_residual(x, u, g, idx)
    km.gate_residual(x, u, g, idx)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = km.gate_residual(x, u, g, idx)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref)


def test_launch_hooks_disable_fast_path():
    # an installed launch hook (e.g. proton's) must see every launch: Triton's own path then
    from triton import knobs
    assert not _launch._hooks_active()
    hook = lambda *a, **k: None  # noqa: E731
    chain = knobs.runtime.launch_enter_hook
    if not hasattr(chain, "add"):
        pytest.skip("this triton has no HookChain")
    chain.add(hook)
    try:
        assert _launch._hooks_active()
    finally:
        chain.remove(hook)
    assert not _launch._hooks_active()
