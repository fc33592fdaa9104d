"""The ops' eager fast path as the patched block uses it (``fused_dit_ops.ops._eager``): in eager CUDA
inference each op runs its own input check and then its launcher, without ``torch.ops`` dispatch.

CPU: the direct launchers raise the ops' own errors; the decision (autograd, profiler, dispatch
modes); the interpreter tier runs the direct path on CPU tensors (Triton interpreter). GPU: the
direct path is taken, gives bit-identical outputs to ``torch.ops``, and bad inputs still get the
ops' own errors.
"""
from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("diffusers")

import fused_dit_ops as fdo  # noqa: E402
from fused_dit_ops.ops import _eager  # noqa: E402
from fused_dit_ops.models import build_qwen_image_transformer, make_qwen_inputs  # noqa: E402

from helpers import expect_input_error, rel_err, run_no_grad  # noqa: E402

CPU_FP32_REL = 2e-6  # as in test_diffusers_patch


_run = run_no_grad


# --- the ops' eager fast path: the op's own checks, then the launcher -----------------------------

def _streams(B=2, Li=12, Lt=5, C=16, dtype=torch.float32, index=True):
    h = torch.randn(B, Li, C, dtype=dtype)
    e = torch.randn(B, Lt, C, dtype=dtype)
    idx = torch.randint(0, 2, (B, Li)) if index else None
    both = torch.randn(2 * B if index else B, 12 * C, dtype=dtype)
    img_mod, txt_mod = both[:, :6 * C], both[:B, 6 * C:]  # column views, row stride 12C: as the block makes
    return h, e, idx, img_mod, txt_mod


def _dual_norm_args(h, e, idx, im, tm):
    C = e.shape[-1]
    return (h, im[:, :C], im[:, C:2 * C], idx, 1e-6, e, tm[:, :C], tm[:, C:2 * C], None, 1e-6, "layer")


def test_fast_path_functions_are_the_ops():
    """Every function of the fast path has an op of its name and calls it off the fast path."""
    names = [n for n, f in vars(_eager).items() if callable(f) and not n.startswith("_") and f.__module__ == _eager.__name__]
    assert set(names) - {"fast"} == set(_FAST) | {"qk_norm_rope_cat", "attention", "swiglu_linear"} | set(_FAST_FP8)
    for n in names:
        if n != "fast":
            assert hasattr(torch.ops.fused_dit, n.replace("_unchecked", "")), n


@pytest.mark.parametrize("bad", ["h_dtype", "e_dtype", "h_lastdim", "C_not_8", "batch", "index_dtype",
                                 "index_shape", "img_mod_rows", "mod_dtype", "mod_lastdim", "h_2d"])
def test_direct_path_raises_the_ops_own_errors(bad, monkeypatch):
    """What the removed shadow checks caught: the direct launchers run each op's own validator
    first, so a bad input gets the op's FusedDitInputError (same text as through torch.ops) before
    any kernel is touched (metadata only: CPU tensors suffice)."""
    h, e, idx, im, tm = _streams()
    if bad == "h_dtype":
        h = h.double()
    elif bad == "e_dtype":
        e = e.half()
    elif bad == "h_lastdim":
        h = torch.randn(2, 16, 12).transpose(1, 2)
    elif bad == "C_not_8":
        h, e, idx, im, tm = _streams(C=12)
    elif bad == "batch":
        e = e[:1]
    elif bad == "index_dtype":
        idx = idx.float()
    elif bad == "index_shape":
        idx = idx[:, :-1]
    elif bad == "img_mod_rows":
        im = im[:2]
    elif bad == "mod_dtype":
        im = im.double()
    elif bad == "mod_lastdim":
        im = torch.randn(12 * 16, 4).t()
    elif bad == "h_2d":
        h = h[0]
    args = _dual_norm_args(h, e, idx, im, tm)
    with pytest.raises(fdo.FusedDitInputError) as via_op:
        torch.ops.fused_dit.dual_norm_scale_shift.default(*args)
    monkeypatch.setattr(_eager, "fast", lambda x: True)  # the fast path on CPU tensors: checks raise first
    expect_input_error(lambda: _eager.dual_norm_scale_shift(*args), str(via_op.value))


def test_direct_joint_qk_checks(monkeypatch):
    D, H, Lt, Li = 8, 2, 3, 5
    q, k = torch.randn(1, Lt + Li, H, D), torch.randn(1, Lt + Li, H, D)
    ws = [torch.randn(D) for _ in range(4)]
    tabs = (torch.randn(Lt, D), torch.randn(Li, D))
    for bad_ws, bad_tabs in ((ws[:3] + [torch.randn(D + 1)], tabs), (ws, (tabs[0], tabs[1][:-1])),
                             (ws, (tabs[0].double(), tabs[1])), (ws, (torch.randn(Lt, 6), tabs[1])),
                             (ws, (torch.randn(Lt, D + 2), torch.randn(Li, D + 2)))):
        args = (q, k, Lt, *bad_ws, *bad_tabs, 1e-6, True)
        with pytest.raises(fdo.FusedDitInputError) as via_op:
            torch.ops.fused_dit.joint_qk_norm_rope_.default(*args)
        with monkeypatch.context() as mp:
            mp.setattr(_eager, "fast", lambda x: True)
            expect_input_error(lambda: _eager.joint_qk_norm_rope_(*args), str(via_op.value))


def test_direct_never_on_cpu():
    x = torch.randn(2, 3)
    with torch.no_grad():
        assert not _eager.fast(x)  # CPU tensors: the ops' CPU references through torch.ops


def test_compile_before_any_eager_call():
    """Compiling the patched blocks before any eager forward of the fused block (on the GPU the
    eager calls take the direct launchers, so a compiled block can be the first to use the torch.ops
    namespace; building it lazily there broke fullgraph tracing, seen in `bench block`)."""
    from torch._dynamo.utils import counters
    from fused_dit_ops.demo import compile_blocks, uncompile_blocks
    assert isinstance(_eager._DNSS, torch._ops.OpOverload)  # resolved from import on
    m = build_qwen_image_transformer("tiny", seed=1)
    kw = make_qwen_inputs(m, seed=2)
    ref = _run(m, kw)
    fdo.patch(m)
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(m, fullgraph=True, backend="aot_eager")
    try:
        out = _run(m, kw)
    finally:
        uncompile_blocks(m)
        torch._dynamo.reset()
        fdo.unpatch(m)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert rel_err(out, ref) < CPU_FP32_REL


# --- the direct path on CPU tensors: Triton kernels in the interpreter ---------------------------

# the fast-path functions (the others always call the op)
_FAST = ("norm_scale_shift", "dual_norm_scale_shift", "gate_residual_norm_scale_shift",
         "dual_gate_residual_norm_scale_shift", "gate_residual", "joint_qk_norm_rope_", "joint_linear_unchecked",
         "attention_unchecked", "gate_residual_layer_norm", "qk_norm_rope_across_heads")
# the FP8 block path's (precision="fp8"; tests/test_fp8.py)
_FAST_FP8 = ("dual_norm_scale_shift_fp8", "dual_gate_residual_norm_scale_shift_fp8", "quantize_fp8",
             "fp8_linear_unchecked", "joint_fp8_linear_unchecked", "norm_scale_shift_fp8",
             "gate_residual_norm_scale_shift_fp8", "quantize_fp8_cat", "gate_residual_layer_norm_fp8",
             "joint_qk_norm_rope_fp8", "attention_fp8_unchecked", "quantize_fp8_heads")
_DIRECT_CALLS = {"dual_norm_scale_shift": 1, "joint_qk_norm_rope_": 2, "dual_gate_residual_norm_scale_shift": 3,
                 "gate_residual": 2, "joint_linear_unchecked": 2, "attention_unchecked": 2}


def _spy_direct(monkeypatch):
    """Counts the calls of the fast-path functions that take the fast path (``_eager.fast``)."""
    calls = {}

    def wrap(name, fn):
        def call(*a, **k):
            if _eager.fast(a[0]):
                calls[name] = calls.get(name, 0) + 1
            return fn(*a, **k)
        return call

    for name in _FAST:
        monkeypatch.setattr(_eager, name, wrap(name, getattr(_eager, name)))
    return types.SimpleNamespace(calls=calls)


@pytest.mark.interpret
@pytest.mark.parametrize("zero_cond_t", [True, False])
def test_interpreted_direct_path_matches_stock(monkeypatch, zero_cond_t):
    m = build_qwen_image_transformer("tiny", zero_cond_t=zero_cond_t, num_layers=2, seed=1)
    kw = make_qwen_inputs(m, batch=2, seed=2)
    ref = _run(m, kw)
    fdo.patch(m)
    spy = _spy_direct(monkeypatch)
    monkeypatch.setattr(_eager, "fast", lambda x: not torch.is_grad_enabled())  # CPU tensors allowed here
    out = _run(m, kw)
    assert rel_err(out, ref) < 1e-5
    # block 0: dual norm, QK, dual grns into block 1's norm1 (look-ahead); block 1: QK, dual grns,
    # gate_residual per stream; each block one joint_linear and one attention on its own buffer
    assert spy.calls == _DIRECT_CALLS, spy.calls


@pytest.mark.interpret
def test_interpreted_direct_attention_only_on_the_blocks_own_buffers(monkeypatch):
    """The attention launch skips the op's checks only where q, k, v are the joint buffers the block
    wrote itself; with hooked QK-norm modules (stock-norm path: q, k, v from module calls) the
    block calls ``fused_dit.attention`` and its checks."""
    m = build_qwen_image_transformer("tiny", num_layers=2, seed=3)
    kw = make_qwen_inputs(m, batch=1, seed=4)
    ref = _run(m, kw)
    fdo.patch(m)
    monkeypatch.setattr(_eager, "fast", lambda x: not torch.is_grad_enabled())  # CPU tensors allowed here
    calls = {}
    for name in ("attention", "attention_unchecked"):
        real = getattr(_eager, name)
        monkeypatch.setattr(_eager, name, lambda *a, _n=name, _f=real, **k: calls.update({_n: calls.get(_n, 0) + 1})
                            or _f(*a, **k))
    assert rel_err(_run(m, kw), ref) < 1e-5
    assert calls["attention_unchecked"] == 2 and "attention" not in calls, calls  # joint path: both blocks unchecked
    hooks = [blk.attn.norm_q.register_forward_hook(lambda mod, i, o: o) for blk in m.transformer_blocks]
    calls.clear()
    assert rel_err(_run(m, kw), ref) < 1e-5
    assert calls["attention"] == 2 and "attention_unchecked" not in calls, calls  # stock-norm path: checked op
    for h in hooks:
        h.remove()


# --- GPU ------------------------------------------------------------------------------------------

@pytest.fixture
def gpu_model():
    fdo.warmup_rope()
    m = build_qwen_image_transformer("edit-2511", num_layers=2, device="cuda", dtype=torch.bfloat16)
    kw = make_qwen_inputs(m, img_tokens=(1024, 1024), txt_len=208)
    fdo.warmup_attention(seq_lens=(2048 + 208,), dtype=torch.bfloat16)
    yield m, kw
    fdo.unpatch(m)


@pytest.mark.gpu
def test_gpu_direct_path_taken_and_bit_identical(monkeypatch, gpu_model):
    m, kw = gpu_model
    fdo.patch(m)
    spy = _spy_direct(monkeypatch)
    direct = _run(m, kw)
    assert spy.calls == _DIRECT_CALLS, spy.calls
    monkeypatch.setattr(_eager, "fast", lambda x: False)
    via_ops = _run(m, kw)
    assert spy.calls["joint_qk_norm_rope_"] == 2  # the torch.ops run did not touch the launchers
    assert torch.equal(direct, via_ops)  # the same kernels with the same arguments


@pytest.mark.gpu
def test_gpu_direct_path_off_under_autograd_profiler_and_modes(monkeypatch, gpu_model):
    from torch.utils.flop_counter import FlopCounterMode
    m, kw = gpu_model
    fdo.patch(m)
    spy = _spy_direct(monkeypatch)
    with torch.enable_grad():
        m(**kw)
    with torch.no_grad(), torch.profiler.profile() as prof:
        m(**kw)
    assert "fused_dit::dual_gate_residual_norm_scale_shift" in {e.name for e in prof.events()}
    with torch.no_grad(), FlopCounterMode(display=False):
        m(**kw)
    assert spy.calls == {}, spy.calls


@pytest.mark.gpu
def test_gpu_bad_block_input_gets_the_ops_error(gpu_model):
    m, kw = gpu_model
    fdo.patch(m)
    from fused_dit_ops.bench.block import capture_block_call
    block, a, k = capture_block_call(m, kw)
    bad = dict(k, modulate_index=k["modulate_index"].float())
    with torch.no_grad():
        expect_input_error(lambda: block(*a, **bad), "index")
