"""fused_dit_ops.patch on CPU: edge cases.

- diffusers tensor parallelism (``_parallel_config`` on the model): the model runs stock, before or
  after patching; the config ``enable_parallelism`` writes on the processors reaches the stock
  processors (context parallelism itself: tests/test_context_parallel.py);
- a probe failure other than ``FusedDitInputError`` leaves the model unpatched;
- ``reuse_mod`` never returns outputs of replaced modulation weights;
- ``verify`` runs the fused path that later forwards run (look-ahead included);
- block-level stock fallbacks are counted in ``report.runtime``;
- a forward that autograd records runs stock (the fused ops have no backward), with the right
  gradients.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import fused_dit_ops as fdo  # noqa: E402
from fused_dit_ops.integrations import diffusers_qwen as dq  # noqa: E402
from fused_dit_ops.integrations import double_stream, engine  # noqa: E402
from fused_dit_ops.integrations.engine import patch_ab  # noqa: E402
from fused_dit_ops.models import build_qwen_image_transformer, make_qwen_inputs  # noqa: E402

from helpers import QWEN_CPU_FP32_REL as CPU_FP32_REL, native_diffusers_backend, rel_err, run_no_grad, tiny  # noqa: E402,F401

_run = run_no_grad
pytestmark = pytest.mark.usefixtures("native_diffusers_backend")


class _FakeParallelConfig:  # stands for diffusers' ParallelConfig with tensor parallelism
    tensor_parallel_config = object()
    context_parallel_config = None


def _set_cp_like_enable_parallelism(model, cfg):
    """What ``ModelMixin.enable_parallelism`` does to the processors for context parallelism."""
    for mod in model.modules():
        p = getattr(mod, "processor", None)
        if p is not None and hasattr(p, "_parallel_config"):
            p._parallel_config = cfg


def test_parallel_config_set_after_patch_reaches_the_stock_processor(tiny):
    """enable_parallelism after patch writes the config on our processors: it lands on the stock
    processors they wrap (the stock fallback reads it; tests/test_context_parallel.py runs it)."""
    fdo.patch(tiny)
    cfg = object()
    _set_cp_like_enable_parallelism(tiny, cfg)
    assert all(b.attn.processor.stock._parallel_config is cfg for b in tiny.transformer_blocks)
    assert all(b.attn.processor._parallel_config is cfg for b in tiny.transformer_blocks)


def test_tensor_parallel_enabled_after_patch_runs_stock(tiny):
    kw = make_qwen_inputs(tiny, seed=40)
    ref = _run(tiny, kw)
    report = fdo.patch(tiny)
    tiny._parallel_config = _FakeParallelConfig()
    out = _run(tiny, kw)
    assert any("tensor parallelism" in k for k in report.runtime), report.runtime
    assert rel_err(out, ref) < CPU_FP32_REL


def test_tensor_parallelism_enabled_before_patch_leaves_model_stock(tiny):
    tiny._parallel_config = _FakeParallelConfig()
    report = fdo.patch(tiny)  # no probe forward
    assert not engine.is_patched(tiny)
    assert "tensor parallelism" in report.stock.get("model", ""), report
    assert not report.swapped


def test_processor_fallback_with_tables_gets_complex_freqs(tiny):
    """A patched block called directly with a text mask and RoPE tables falls back to the stock
    processor, which needs diffusers' complex freqs: the tables are converted back (exactly)."""
    kw = make_qwen_inputs(tiny, seed=41, text_mask=True)
    blk = tiny.transformer_blocks[0]
    h = tiny.img_in(kw["hidden_states"])
    e = tiny.txt_in(tiny.txt_norm(kw["encoder_hidden_states"]))
    temb = tiny.time_text_embed(kw["timestep"], h)
    if tiny.zero_cond_t:
        temb = torch.cat([temb, tiny.time_text_embed(kw["timestep"] * 0, h)], dim=0)
    freqs = tiny.pos_embed(kw["img_shapes"], max_txt_seq_len=e.shape[1], device=h.device)
    mask = kw["encoder_hidden_states_mask"].clone()
    mask[:, -1] = False
    idx = None
    if tiny.zero_cond_t:
        n = h.shape[1]
        idx = torch.zeros(1, n, dtype=torch.int64)
        idx[:, n // 2:] = 1
    with torch.no_grad():
        ref = blk(h, e, mask, temb, freqs, None, idx)
        report = fdo.patch(tiny)
        tables = tiny.pos_embed(kw["img_shapes"], max_txt_seq_len=e.shape[1], device=h.device)
        assert not torch.is_complex(tables[0])
        out = blk(h, e, mask, temb, tables, None, idx)
    for a, b in zip(out, ref):
        assert rel_err(a, b) < CPU_FP32_REL
    assert any("encoder_hidden_states_mask" in k for k in report.runtime), report.runtime


def test_complex_from_cos_sin_inverts():
    from fused_dit_ops.rope_tables import complex_from_cos_sin, cos_sin_from_complex
    f = torch.polar(torch.ones(5, 8), torch.randn(5, 8))
    assert torch.equal(complex_from_cos_sin(cos_sin_from_complex(f)), f)
    with pytest.raises(TypeError, match="table"):
        complex_from_cos_sin(torch.zeros(3, 5))


def test_probe_error_leaves_model_unpatched(tiny, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("probe exploded")
    monkeypatch.setattr(engine, "_probe", boom)
    with pytest.raises(RuntimeError, match="probe exploded"):
        fdo.patch(tiny)
    assert not engine.is_patched(tiny)
    blk = tiny.transformer_blocks[0]
    assert "forward" not in blk.__dict__
    assert type(blk.attn.processor).__name__ == "QwenDoubleStreamAttnProcessor2_0"
    assert blk.attn.to_q.weight.untyped_storage().data_ptr() != blk.attn.to_k.weight.untyped_storage().data_ptr()


def test_reuse_mod_never_returns_outputs_of_replaced_weights():
    a = build_qwen_image_transformer("tiny", seed=7)
    b = build_qwen_image_transformer("tiny", seed=7)
    with torch.no_grad():  # b: a fine-tune of a that differs in the modulation weights only
        for blk in b.transformer_blocks:
            blk.img_mod[1].weight.mul_(1.5)
            blk.txt_mod[1].bias.add_(0.1)

    def fresh(m):  # new tensors, version counters 0: as a checkpoint loader assigns them
        return {k: v.clone() for k, v in m.transformer_blocks.state_dict().items()}
    a.transformer_blocks.load_state_dict(fresh(a), assign=True)
    kw = make_qwen_inputs(a, seed=42)
    ref_b = _run(b, kw)
    fdo.patch(a)
    _run(a, kw)  # fills the modulation cache for this temb
    a.transformer_blocks.load_state_dict(fresh(b), assign=True)  # new objects, equal version counters
    out = _run(a, kw)  # same temb: the cached outputs are the old weights'
    assert rel_err(out, ref_b) < CPU_FP32_REL


def test_verify_runs_the_lookahead_path(tiny, monkeypatch):
    made = []
    orig = engine.Prenorm.__init__

    def counting(self, *a, **k):
        made.append(1)
        orig(self, *a, **k)
    monkeypatch.setattr(engine.Prenorm, "__init__", counting)
    kw = make_qwen_inputs(tiny, seed=43)
    report = fdo.patch(tiny, verify=True)
    _run(tiny, kw)
    assert report.verify is not None and report.verify["rel_fro"] < CPU_FP32_REL
    n_verify = len(made)
    assert n_verify == len(tiny.transformer_blocks) - 1  # every block end fused with the next norm1
    _run(tiny, kw)
    assert len(made) == 2 * n_verify
    assert tiny._fused_dit_state.prenorm is None and not tiny._fused_dit_state.in_forward


def test_block_stock_fallbacks_are_counted(tiny):
    kw = make_qwen_inputs(tiny, seed=44)
    ref = _run(tiny, kw)
    report = fdo.patch(tiny)
    out = _run(tiny, dict(kw, attention_kwargs={"foo": 1}))
    assert rel_err(out, ref) < CPU_FP32_REL
    key = [k for k in report.runtime if "attention_kwargs" in k]
    assert key and report.runtime[key[0]] == len(tiny.transformer_blocks), report.runtime
    assert "foo" in key[0]
    # "scale" is consumed by diffusers before the blocks: fused, nothing counted
    report.runtime.clear()
    _run(tiny, dict(kw, attention_kwargs={"scale": 1.0}))
    assert not report.runtime


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_autograd_forward_runs_stock_with_right_gradients(device):
    kw = make_qwen_inputs(build_qwen_image_transformer("tiny", seed=8, device=device), seed=45)
    grads = []
    for patched in (False, True):
        m = build_qwen_image_transformer("tiny", seed=8, device=device).requires_grad_(True)
        report = fdo.patch(m) if patched else None
        out = m(**kw)[0]
        out.square().mean().backward()
        grads.append((out.detach(), m.transformer_blocks[0].img_mod[1].weight.grad.clone(),
                      m.transformer_blocks[0].attn.to_q.weight.grad.clone()))
        if patched:
            assert any("autograd" in k for k in report.runtime), report.runtime
            # inference (no grad) on the same model runs fused again, nothing more counted
            n = sum(report.runtime.values())
            _run(m, kw)
            assert sum(report.runtime.values()) == n
    for s, p in zip(*grads):
        torch.testing.assert_close(p, s, rtol=1e-5, atol=1e-6)



class _SubclassWeight(torch.Tensor):
    """Stands for a tensor-subclass weight (torchao's quantized tensors, a DTensor shard): an
    ``nn.Linear`` holding one must be called as a module, never packed or used raw."""


def _subclass_weights(lin):
    lin.weight = torch.nn.Parameter(torch.Tensor._make_subclass(_SubclassWeight, lin.weight.detach()),
                                    requires_grad=False)


@pytest.mark.parametrize("when", ["before_patch", "after_patch"])
def test_tensor_subclass_weights_are_called_as_modules(tiny, when):
    kw = make_qwen_inputs(tiny, seed=46)
    blk = tiny.transformer_blocks[1]
    lins = [blk.attn.to_q, blk.attn.add_k_proj, blk.img_mod[1]]
    if when == "before_patch":
        for lin in lins:
            _subclass_weights(lin)
    ref = _run(tiny, kw)
    report = fdo.patch(tiny)
    if when == "after_patch":
        for lin in lins:
            _subclass_weights(lin)
        ref = None
    assert all(not engine.plain_linear(lin) for lin in lins)
    assert all(type(lin.weight) is _SubclassWeight for lin in lins)  # never re-packed into plain storage
    out = _run(tiny, kw)
    if ref is None:
        fdo.unpatch(tiny)
        ref = _run(tiny, kw)
    assert rel_err(out, ref) < CPU_FP32_REL
    if when == "before_patch":
        assert "pack_qkv" in report.stock and "pack_mod" in report.stock, report
    else:
        assert any("not packed now" in k for k in report.runtime), report.runtime


def test_mixed_dtype_qk_norm_weights_use_the_module_path(tiny):
    kw = make_qwen_inputs(tiny, seed=47)
    with torch.no_grad():
        tiny.transformer_blocks[0].attn.norm_added_q.weight.data = tiny.transformer_blocks[0].attn.norm_added_q.weight.bfloat16()
    ref = _run(tiny, kw)
    report = fdo.patch(tiny)
    out = _run(tiny, kw)
    assert rel_err(out, ref) < CPU_FP32_REL
    assert any("mixed dtypes" in k for k in report.runtime), report.runtime


def test_integrations_reach_kernels_only_through_the_ops_layer():
    """No integration module imports ``fused_dit_ops.kernels``; the engine and the block kinds name no
    model (a family's names live in its own module)."""
    import ast
    from pathlib import Path
    pkg = Path(engine.__file__).parent
    for f in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [f"{node.module}"] if isinstance(node, ast.ImportFrom) and node.module else [])
            assert not any("kernels" in n.split(".") for n in names), (f.name, names)
    for f in ("engine.py", "double_stream.py", "self_cross.py"):
        text = (pkg / f).read_text()
        for name in ("qwen", "zero_cond", "transformer_blocks", "pos_embed", "modulate_index", "wan", "ti2v"):
            assert name not in text.lower(), (f, name)
