"""fused_dit_ops.patch / unpatch on a diffusers FluxTransformer2DModel (Flux.1): stock vs patched.

CPU (always): a tiny random model (3 heads x 24, D 72, 2 double + 2 single blocks, 15 or 25 image
+ 7 text tokens), fp32. Interpreter tier: the eager fast path on CPU tensors (Triton interpreter).
GPU (@pytest.mark.gpu): real dims (D 3072, 24 x 128), bf16, one double and one single block (and a
several-layer model) against an fp32 copy: fused no worse than stock bf16.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import fused_dit_ops as fdo  # noqa: E402
from fused_dit_ops.integrations import diffusers_flux as dfx  # noqa: E402
from fused_dit_ops.integrations import single_stream  # noqa: E402
from fused_dit_ops.models import build_flux_transformer, make_flux_inputs  # noqa: E402
from fused_dit_ops.ops import _eager  # noqa: E402

from helpers import native_diffusers_backend, rel_err, run_no_grad  # noqa: E402,F401

_run = run_no_grad
pytestmark = pytest.mark.usefixtures("native_diffusers_backend")
REL = 2e-6  # measured ~2.6e-7 (patched vs stock, tiny, fp32)


def _tiny(seed=1, **kw):
    return build_flux_transformer("tiny", seed=seed, **kw)


def _allowed_stock():
    return {"mlp", "probe"} if torch.cuda.is_available() else {"mlp"}


@pytest.mark.parametrize("batch,img", [(1, (15,)), (2, (15, 10))])  # (15, 10): Kontext (a reference image)
def test_tiny_patched_matches_stock(batch, img):
    m = _tiny()
    kw = make_flux_inputs(m, batch=batch, img_tokens=img, seed=2)
    ref = _run(m, kw)
    report = fdo.patch(m)
    assert set(report.stock) <= _allowed_stock(), report
    text = str(report)
    assert "transformer_blocks[0-1]" in text and "single_transformer_blocks[0-1]" in text, text
    out = _run(m, kw)
    assert rel_err(out, ref) < REL
    assert rel_err(_run(m, kw), ref) < REL  # second forward: reused modulation
    assert not report.runtime, report.runtime  # look-ahead used, nothing fell back
    # the timestep really matters
    assert rel_err(_run(m, make_flux_inputs(m, batch=batch, img_tokens=img, seed=2, timestep=0.1)), out) > 1e-2


@pytest.mark.parametrize("ops", ["modulation", "qk_norm_rope", "attention", ["modulation", "attention"]])
def test_op_subsets(ops):
    m = _tiny(seed=4)
    kw = make_flux_inputs(m, seed=5)
    ref = _run(m, kw)
    fdo.patch(m, ops=ops)
    assert rel_err(_run(m, kw), ref) < REL


@pytest.mark.parametrize("switch", [dict(pack_qkv=False), dict(pack_mod=False), dict(lookahead=False),
                                    dict(dual_launch=False)])
def test_ab_switches(switch):
    from fused_dit_ops.integrations.engine import patch_ab
    m = _tiny(seed=6)
    kw = make_flux_inputs(m, seed=6)
    ref = _run(m, kw)
    patch_ab(m, **switch)
    assert rel_err(_run(m, kw), ref) < REL


def test_fused_ops_are_called():
    m = _tiny()
    kw = make_flux_inputs(m)
    fdo.patch(m)
    with torch.profiler.profile() as prof:
        _run(m, kw)
    names = {e.name for e in prof.events()}
    for op in ("dual_norm_scale_shift", "dual_gate_residual_norm_scale_shift", "gate_residual",
               "joint_qk_norm_rope_", "attention", "norm_scale_shift", "gate_residual_norm_scale_shift"):
        assert f"fused_dit::{op}" in names, op


def test_single_blocks_take_the_joint_output_without_cat():
    x = torch.randn(2, 9, 6)
    e, h = x[:, :4], x[:, 4:]
    assert single_stream.joint_of(e, h) is x
    assert single_stream.joint_of(h, e) is None
    assert single_stream.joint_of(x[:, :4].clone(), h) is None
    assert single_stream.joint_of(x[:, :3], x[:, 4:]) is None


def test_packed_weights_share_storage_and_unpack():
    m = _tiny(seed=7)
    kw = make_flux_inputs(m, seed=7)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ref = _run(m, kw)
    fdo.patch(m)
    b = m.single_transformer_blocks[0]
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert ptr(b.attn.to_q.weight) == ptr(b.attn.to_k.weight) == ptr(b.proj_mlp.weight)
    d = m.transformer_blocks[0]
    assert ptr(d.norm1.linear.weight) == ptr(d.norm1_context.linear.weight)
    assert rel_err(_run(m, kw), ref) < REL
    fdo.unpatch(m)
    assert ptr(b.attn.to_q.weight) != ptr(b.proj_mlp.weight)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unpatch_restores_bit_exact():
    m = _tiny(seed=8)
    kw = make_flux_inputs(m, seed=8)
    ref = _run(m, kw)
    procs = [blk.attn.processor for blk in m.transformer_blocks]
    fdo.patch(m)
    _run(m, kw)
    assert fdo.unpatch(m)
    assert torch.equal(_run(m, kw), ref)
    assert [blk.attn.processor for blk in m.transformer_blocks] == procs
    for mod in [m, m.pos_embed, *m.transformer_blocks, *m.single_transformer_blocks]:
        assert "forward" not in mod.__dict__
    assert not fdo.unpatch(m)


def test_block_called_alone_with_stock_rope():
    """A patched block called with the stock (cos, sin) RoPE output (block benchmarks) converts it."""
    m = _tiny(seed=9)
    kw = make_flux_inputs(m, seed=9)
    D = m.inner_dim
    Lt, Li = kw["encoder_hidden_states"].shape[1], kw["hidden_states"].shape[1]
    h, e, temb = torch.randn(1, Li, D), torch.randn(1, Lt, D), torch.randn(1, D)
    rot = m.pos_embed(torch.cat([kw["txt_ids"], kw["img_ids"]]))
    blocks = (m.transformer_blocks[0], m.single_transformer_blocks[0])
    with torch.no_grad():
        refs = [blk(h, e, temb, rot) for blk in blocks]
        fdo.patch(m)
        outs = [blk(h, e, temb, rot) for blk in blocks]
        outs2 = [blk(h, e, temb, dfx.as_rope_tables(rot)) for blk in blocks]
    for o, r in zip([t for x in outs + outs2 for t in x], [t for x in refs + refs for t in x]):
        assert rel_err(o, r) < REL
    # the conversion is exact both ways
    back = dfx.rope_stock(dfx.as_rope_tables(rot))
    assert torch.equal(back[0], rot[0]) and torch.equal(back[1], rot[1])


def test_custom_processor_and_attention_kwargs_stay_stock():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    class Custom(FluxAttnProcessor):
        pass

    m = _tiny(seed=10)
    kw = make_flux_inputs(m, seed=10)
    m.single_transformer_blocks[1].attn.set_processor(Custom())
    m.transformer_blocks[1].attn.set_processor(Custom())
    ref = _run(m, kw)
    report = fdo.patch(m)
    assert {"single_transformer_blocks.1", "transformer_blocks.1"} <= set(report.stock), report
    assert rel_err(_run(m, kw), ref) < REL


def test_peft_lora_added_after_patch():
    peft = pytest.importorskip("peft")
    m, ref_m = _tiny(seed=11), _tiny(seed=11)
    kw = make_flux_inputs(m, seed=12)
    cfg = dict(r=4, lora_alpha=4, init_lora_weights=False,
               target_modules=["to_q", "add_k_proj", "norm1.linear", "norm.linear", "net.0.proj", "proj_mlp",
                               "proj_out", "to_out.0"])
    torch.manual_seed(5)
    ref_m.add_adapter(peft.LoraConfig(**cfg))
    ref = _run(ref_m, kw)
    report = fdo.patch(m)
    torch.manual_seed(5)
    m.add_adapter(peft.LoraConfig(**cfg))
    assert rel_err(_run(m, kw), ref) < REL, report.runtime
    assert any("not packed now" in k for k in report.runtime), report.runtime
    assert rel_err(_run(_tiny(seed=11), kw), ref) > 1e-2  # the adapter matters


def test_peft_lora_added_before_patch():
    peft = pytest.importorskip("peft")
    m = _tiny(seed=13)
    kw = make_flux_inputs(m, seed=13)
    torch.manual_seed(6)
    m.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                  target_modules=["to_k", "proj_mlp", "norm.linear", "norm1_context.linear"]))
    ref = _run(m, kw)
    report = fdo.patch(m)
    assert "pack_qkv (single)" in report.stock
    assert rel_err(_run(m, kw), ref) < REL


@pytest.mark.parametrize("when", ["after_patch", "before_patch"])
def test_first_block_cache_composes(when):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    m, ref_m = _tiny(seed=3), _tiny(seed=3)
    kws = [make_flux_inputs(m, seed=40, timestep=t) for t in (0.9, 0.89, 0.5)]
    if when == "before_patch":
        apply_first_block_cache(m, FirstBlockCacheConfig(threshold=0.05))
    report = fdo.patch(m)
    if when == "after_patch":
        apply_first_block_cache(m, FirstBlockCacheConfig(threshold=0.05))
    assert "transformer_blocks.0" not in report.stock, report
    apply_first_block_cache(ref_m, FirstBlockCacheConfig(threshold=0.05))
    for kw in kws:
        with torch.no_grad(), m.cache_context("c"), ref_m.cache_context("c"):
            assert rel_err(m(**kw)[0], ref_m(**kw)[0]) < REL


def test_torch_hook_on_a_single_block_is_called():
    m = _tiny(seed=14)
    kw = make_flux_inputs(m, seed=14)
    ref = _run(m, kw)
    fdo.patch(m)
    seen = []
    hk = m.single_transformer_blocks[1].register_forward_hook(lambda mod, i, o: seen.append(1))
    assert rel_err(_run(m, kw), ref) < REL and seen
    hk.remove()


def _compile_blocks(model):
    for b in [*model.transformer_blocks, *model.single_transformer_blocks]:
        b.compile(fullgraph=True, backend="aot_eager")


def test_compile_blocks_fullgraph_no_recompile():
    """Regional compile (fullgraph, aot_eager): no graph break; the graphs the stock model compiles
    (one double-stream, two single-stream: diffusers hands the first single block a contiguous image
    stream and the others views of the joint output, a stride guard), and no recompile on the next step."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters
    m = _tiny(seed=15)
    kw = make_flux_inputs(m, seed=15)
    kw2 = make_flux_inputs(m, timestep=0.3, seed=16)
    ref = _run(m, kw)
    graphs = {}
    for patched in (False, True):
        dynamo.reset()
        counters.clear()
        if patched:
            fdo.patch(m)
        _compile_blocks(m)
        try:
            out = _run(m, kw)
            with dynamo.config.patch(error_on_recompile=True):
                out2 = _run(m, kw2)
            assert not counters["graph_break"], dict(counters["graph_break"])
            graphs[patched] = counters["stats"]["unique_graphs"]
        finally:
            dynamo.reset()
            from fused_dit_ops.demo import uncompile_blocks
            uncompile_blocks(m)
        assert rel_err(out, ref) < REL
        if not patched:
            ref2 = out2
    assert rel_err(out2, ref2) < REL
    assert graphs[True] == graphs[False], graphs


# --- the eager fast path on CPU tensors: Triton kernels in the interpreter ------------------------

@pytest.mark.interpret
@pytest.mark.parametrize("batch", [1, 2])
def test_interpreted_direct_path_matches_stock(monkeypatch, batch):
    m = _tiny(seed=17)
    kw = make_flux_inputs(m, batch=batch, seed=18)
    ref = _run(m, kw)
    fdo.patch(m)
    calls = {}
    for name in ("norm_scale_shift", "gate_residual_norm_scale_shift", "joint_qk_norm_rope_", "gate_residual",
                 "attention"):
        real = getattr(_eager, name)
        monkeypatch.setattr(_eager, name, lambda *a, _n=name, _f=real, **k: calls.update({_n: calls.get(_n, 0) + 1})
                            or _f(*a, **k))
    monkeypatch.setattr(_eager, "fast", lambda x: not torch.is_grad_enabled())  # CPU tensors allowed here
    assert rel_err(_run(m, kw), ref) < 1e-5
    # single blocks: norm once (block 0), look-ahead into block 1, gate_residual at the end
    assert calls["norm_scale_shift"] == 1 and calls["gate_residual_norm_scale_shift"] == 1, calls
    # the single blocks' attention: the checked fast path (q, k, v views of the block's projection)
    assert calls["attention"] == len(m.single_transformer_blocks), calls


# --- GPU: real dims, bf16 vs an fp32 copy ----------------------------------------------------------

def _gpu_pair(layers, single_layers, img_tokens=(4096,)):
    m = build_flux_transformer("dev", num_layers=layers, num_single_layers=single_layers, device="cuda",
                               dtype=torch.bfloat16)
    m32 = build_flux_transformer("dev", num_layers=layers, num_single_layers=single_layers, device="cuda",
                                 dtype=torch.float32)
    m32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    kw = make_flux_inputs(m, img_tokens=img_tokens, txt_len=512)
    kw32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    return m, m32, kw, kw32


def _check_vs_fp32(m, m32, kw, kw32, ceiling, label):
    ref32 = _run(m32, kw32)
    stock = _run(m, kw)
    report = fdo.patch(m)
    assert not report.stock, report
    fused = _run(m, kw)
    e_stock, e_fused, e_pair = rel_err(stock, ref32), rel_err(fused, ref32), rel_err(fused, stock)
    print(f"\n{label}: rel_fro vs fp32: stock bf16 {e_stock:.3e}, fused bf16 {e_fused:.3e}; fused vs stock "
          f"{e_pair:.3e}")
    assert e_fused < max(1.5 * e_stock, 1e-3), (e_fused, e_stock)
    assert e_pair < ceiling


@pytest.mark.gpu
@pytest.mark.parametrize("layers,single", [(1, 0), (0, 1)])
def test_gpu_one_block_real_dims(layers, single):
    m, m32, kw, kw32 = _gpu_pair(layers, single)
    _check_vs_fp32(m, m32, kw, kw32, ceiling=2e-2, label=f"{layers} double + {single} single, 4096 + 512 tokens")


@pytest.mark.gpu
def test_gpu_several_layers_real_dims():
    m, m32, kw, kw32 = _gpu_pair(2, 4)
    _check_vs_fp32(m, m32, kw, kw32, ceiling=3e-2, label="2 double + 4 single, 4096 + 512 tokens")
