"""The patched block's direct launches: in eager CUDA inference it calls the kernels' launchers
itself instead of ``torch.ops`` (no dispatch, no per-op checks), after checking what comes from
outside the block once (``_streams_ok`` / ``_joint_qk_ok``).

CPU: the checks themselves; the decision (autograd, profiler, dispatch modes); the interpreter
tier runs the direct path on CPU tensors (Triton interpreter). GPU: the direct path is taken,
gives bit-identical outputs to ``torch.ops``, and bad inputs still get the ops' own errors.
"""
from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("diffusers")

import fused_dit_ops as fdo  # noqa: E402
from fused_dit_ops.integrations import diffusers_qwen as dq  # noqa: E402
from fused_dit_ops.models import build_qwen_image_transformer, make_qwen_inputs  # noqa: E402

from helpers import expect_input_error, rel_err  # noqa: E402

CPU_FP32_REL = 2e-6  # as in test_diffusers_patch


def _run(model, kw):
    with torch.no_grad():
        return model(**kw)[0]


# --- the block's input checks (metadata only: any device) ---------------------------------------

def _streams(B=2, Li=12, Lt=5, C=16, dtype=torch.float32, index=True):
    h = torch.randn(B, Li, C, dtype=dtype)
    e = torch.randn(B, Lt, C, dtype=dtype)
    idx = torch.randint(0, 2, (B, Li)) if index else None
    both = torch.randn(2 * B if index else B, 12 * C, dtype=dtype)
    img_mod, txt_mod = both[:, :6 * C], both[:B, 6 * C:]  # column views, row stride 12C: as the block makes
    return h, e, idx, img_mod, txt_mod


@pytest.mark.parametrize("index", [True, False])
def test_streams_ok_accepts_the_blocks_own_layout(index):
    assert dq._streams_ok(*_streams(index=index))


@pytest.mark.parametrize("bad", ["h_dtype", "e_dtype", "h_lastdim", "C_not_8", "batch", "index_dtype",
                                 "index_shape", "img_mod_rows", "txt_mod_cols", "mod_dtype", "mod_lastdim",
                                 "h_2d"])
def test_streams_ok_rejects(bad):
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
    elif bad == "txt_mod_cols":
        tm = tm[:, :-8]
    elif bad == "mod_dtype":
        im = im.double()
    elif bad == "mod_lastdim":
        im = torch.randn(6 * 16, 4).t()
    elif bad == "h_2d":
        h = h[0]
    assert not dq._streams_ok(h, e, idx, im, tm)


def test_joint_qk_ok():
    D, Lt, Li = 8, 3, 5
    ws = [torch.randn(D) for _ in range(4)]
    tabs = (torch.randn(Lt, D), torch.randn(Li, D))
    assert dq._joint_qk_ok(ws, tabs, D, Lt, Li, torch.device("cpu"))
    assert not dq._joint_qk_ok(ws[:3] + [None], tabs, D, Lt, Li, torch.device("cpu"))
    assert not dq._joint_qk_ok(ws[:3] + [torch.randn(D + 1)], tabs, D, Lt, Li, torch.device("cpu"))
    assert not dq._joint_qk_ok(ws, (tabs[0], tabs[1][:-1]), D, Lt, Li, torch.device("cpu"))  # a row short
    assert not dq._joint_qk_ok(ws, (tabs[0].double(), tabs[1]), D, Lt, Li, torch.device("cpu"))
    assert not dq._joint_qk_ok(ws, (torch.randn(Lt, 6), tabs[1]), D, Lt, Li, torch.device("cpu"))  # widths
    assert not dq._joint_qk_ok(ws, (torch.randn(Lt, D + 2), torch.randn(Li, D + 2)), D, Lt, Li,
                               torch.device("cpu"))  # R > D


def test_direct_never_on_cpu():
    x = torch.randn(2, 3)
    with torch.no_grad():
        assert not dq._direct(x)  # CPU tensors: the ops' CPU references through torch.ops


def test_compile_before_any_eager_call():
    """Compiling the patched blocks before any eager forward of the fused block (on the GPU the
    eager calls take the direct launchers, so a compiled block can be the first to use the torch.ops
    namespace; building it lazily there broke fullgraph tracing, seen in `bench block`)."""
    from torch._dynamo.utils import counters
    from fused_dit_ops.demo import compile_blocks, uncompile_blocks
    assert isinstance(dq._dispatch_ops(), types.SimpleNamespace)  # exists from import on
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

class _Spy:
    """A namespace with the direct launchers, counting calls."""

    def __init__(self, ops):
        self.calls = {}
        for name in ("norm_scale_shift", "dual_norm_scale_shift", "gate_residual_norm_scale_shift",
                     "dual_gate_residual_norm_scale_shift", "joint_qk_norm_rope_"):
            setattr(self, name, self._wrap(name, getattr(ops, name)))

    def _wrap(self, name, fn):
        def call(*a, **k):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*a, **k)
        return call


def _spy_direct(monkeypatch):
    spy = _Spy(dq._direct_ops())
    monkeypatch.setattr(dq, "_DIRECT", spy)
    return spy


@pytest.mark.interpret
@pytest.mark.parametrize("zero_cond_t", [True, False])
def test_interpreted_direct_path_matches_stock(monkeypatch, zero_cond_t):
    m = build_qwen_image_transformer("tiny", zero_cond_t=zero_cond_t, num_layers=2, seed=1)
    kw = make_qwen_inputs(m, batch=2, seed=2)
    ref = _run(m, kw)
    fdo.patch(m)
    spy = _spy_direct(monkeypatch)
    monkeypatch.setattr(dq, "_direct", lambda x: not torch.is_grad_enabled())  # CPU tensors allowed here
    out = _run(m, kw)
    assert rel_err(out, ref) < 1e-5
    # block 0: dual norm, QK, dual grns into block 1's norm1 (look-ahead); block 1: QK, dual grns
    assert spy.calls == {"dual_norm_scale_shift": 1, "joint_qk_norm_rope_": 2,
                         "dual_gate_residual_norm_scale_shift": 3}, spy.calls


@pytest.mark.interpret
def test_interpreted_direct_attention_only_on_the_blocks_own_buffers(monkeypatch):
    """The attention launch skips the op's checks only where q, k, v are the joint buffers the block
    wrote itself; with hooked QK-norm modules (stock-norm path: q, k, v from module calls) the
    block calls ``fused_dit.attention`` and its checks."""
    m = build_qwen_image_transformer("tiny", num_layers=2, seed=3)
    kw = make_qwen_inputs(m, batch=1, seed=4)
    ref = _run(m, kw)
    fdo.patch(m)
    monkeypatch.setattr(dq, "_direct", lambda x: not torch.is_grad_enabled())  # CPU tensors allowed here
    calls = {"direct": 0, "op": 0}
    real_direct, real_op = dq._attention_direct, torch.ops.fused_dit.attention.default

    def direct(*a):
        calls["direct"] += 1
        return real_direct(*a)

    def op(*a):
        calls["op"] += 1
        return real_op(*a)

    monkeypatch.setattr(dq, "_attention_direct", direct)
    monkeypatch.setattr(torch.ops.fused_dit.attention, "default", op)
    assert rel_err(_run(m, kw), ref) < 1e-5
    assert calls == {"direct": 2, "op": 0}, calls  # joint path: both blocks launch directly
    hooks = [blk.attn.norm_q.register_forward_hook(lambda mod, i, o: o) for blk in m.transformer_blocks]
    calls.update(direct=0, op=0)
    assert rel_err(_run(m, kw), ref) < 1e-5
    assert calls == {"direct": 0, "op": 2}, calls  # stock-norm path: through the op
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
    assert spy.calls == {"dual_norm_scale_shift": 1, "joint_qk_norm_rope_": 2,
                         "dual_gate_residual_norm_scale_shift": 3}, spy.calls
    monkeypatch.setattr(dq, "_direct", lambda x: False)
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
