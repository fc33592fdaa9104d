"""fused_dit_ops.patch / unpatch on a diffusers Flux2Transformer2DModel (FLUX.2): stock vs patched.

CPU (always): a tiny random model (3 heads x 24, C 72, MLP 216, 2 double + 2 single blocks, 15 or
15 + 10 image + 7 text tokens), fp32. Interpreter tier: the eager fast path on CPU tensors (Triton
interpreter, the SwiGLU GEMM included). GPU (@pytest.mark.gpu): real dims (C 6144, 48 x 128,
MLP 18432), bf16, one double and one single block (and a few-layer model) against an fp32 copy:
fused no worse than stock bf16 (both errors printed).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import fused_dit_ops as fdo  # noqa: E402
from fused_dit_ops.integrations import diffusers_flux as dfx  # noqa: E402
from fused_dit_ops.models import build_flux2_transformer, make_flux2_inputs  # noqa: E402
from fused_dit_ops.ops import _eager  # noqa: E402

from helpers import native_diffusers_backend, rel_err, run_no_grad  # noqa: E402,F401

_run = run_no_grad
pytestmark = pytest.mark.usefixtures("native_diffusers_backend")
REL = 1e-5  # measured ~3e-7 (patched vs stock, tiny, fp32)
MODEL_LEVEL_MOD = {"double_stream_modulation_img/double_stream_modulation_txt", "single_stream_modulation"}


def _tiny(seed=1, **kw):
    return build_flux2_transformer("tiny", seed=seed, **kw)


def _allowed_stock():
    return MODEL_LEVEL_MOD | ({"probe"} if torch.cuda.is_available() else set())


def test_tiny_config_is_not_powers_of_two():
    m = _tiny()
    c = m.config
    assert (c.num_attention_heads, c.attention_head_dim, m.inner_dim) == (3, 24, 72)
    assert m.transformer_blocks[0].ff.linear_in.out_features == 2 * 216
    assert m.single_transformer_blocks[0].attn.to_qkv_mlp_proj.out_features == 3 * 72 + 2 * 216


@pytest.mark.parametrize("batch,img", [(1, (15,)), (2, (15, 10))])  # (15, 10): a reference image
def test_tiny_patched_matches_stock(batch, img):
    m = _tiny()
    kw = make_flux2_inputs(m, batch=batch, img_tokens=img, seed=2)
    ref = _run(m, kw)
    report = fdo.patch(m)
    assert set(report.stock) <= _allowed_stock(), report
    text = str(report)
    assert "transformer_blocks[0-1]" in text and "single_transformer_blocks[0-1]" in text, text
    assert "swiglu_linear" in text and "pos_embed" in text, text
    out = _run(m, kw)
    assert rel_err(out, ref) < REL
    assert rel_err(_run(m, kw), ref) < REL  # second forward
    assert not report.runtime, report.runtime  # look-ahead used, nothing fell back
    # the timestep really matters
    assert rel_err(_run(m, make_flux2_inputs(m, batch=batch, img_tokens=img, seed=2, timestep=0.1)), out) > 1e-2


def test_fp16_cpu_matches_stock():
    """fp16 (the ops' CPU references round once; stock rounds per op): within fp16 rounding."""
    m = _tiny(seed=2, dtype=torch.float16)
    kw = make_flux2_inputs(m, seed=3)
    ref = _run(m, kw)
    report = fdo.patch(m)
    assert rel_err(_run(m, kw), ref) < 5e-3 and not report.runtime


def test_two_text_lengths_and_image_sizes():
    m = _tiny(seed=3)
    kws = [make_flux2_inputs(m, img_tokens=n, txt_len=t, seed=4) for n, t in ((15, 7), (21, 13))]
    refs = [_run(m, kw) for kw in kws]
    fdo.patch(m)
    for kw, ref in zip(kws, refs):
        assert rel_err(_run(m, kw), ref) < REL


@pytest.mark.parametrize("ops", ["modulation", "qk_norm_rope", "attention", "mlp", ["modulation", "mlp"],
                                 ["modulation", "attention"]])
def test_op_subsets(ops):
    m = _tiny(seed=4)
    kw = make_flux2_inputs(m, seed=5)
    ref = _run(m, kw)
    report = fdo.patch(m, ops=ops)
    assert rel_err(_run(m, kw), ref) < REL
    if "mlp" not in ops or "modulation" not in ops:
        assert "mlp" in report.stock, report


@pytest.mark.parametrize("switch", [dict(pack_qkv=False), dict(pack_mod=False), dict(lookahead=False),
                                    dict(dual_launch=False)])
def test_ab_switches(switch):
    from fused_dit_ops.integrations.engine import patch_ab
    m = _tiny(seed=6)
    kw = make_flux2_inputs(m, seed=6)
    ref = _run(m, kw)
    patch_ab(m, **switch)
    assert rel_err(_run(m, kw), ref) < REL


def _silu_outside_ops(prof):
    """aten::silu calls not inside a fused_dit op (the CPU reference of swiglu_linear calls it)."""
    n = 0
    for e in prof.events():
        if e.name != "aten::silu":
            continue
        p = e.cpu_parent
        while p is not None and not p.name.startswith("fused_dit::"):
            p = p.cpu_parent
        n += p is None
    return n


def test_fused_ops_are_called():
    m = _tiny()
    kw = make_flux2_inputs(m)
    with torch.profiler.profile() as prof:
        _run(m, kw)
    stock_silu = _silu_outside_ops(prof)
    fdo.patch(m)
    with torch.profiler.profile() as prof:
        _run(m, kw)
    names = [e.name for e in prof.events()]
    for op in ("dual_norm_scale_shift", "dual_gate_residual_norm_scale_shift", "gate_residual",
               "joint_qk_norm_rope_", "attention", "norm_scale_shift", "gate_residual_norm_scale_shift",
               "joint_linear", "swiglu_linear"):
        assert f"fused_dit::{op}" in names, op
    # two double blocks x two streams + two single blocks
    assert names.count("fused_dit::swiglu_linear") == 6, names.count("fused_dit::swiglu_linear")
    # no SwiGLU in torch: the six MLPs' SiLUs are inside the op (the model's own SiLUs remain)
    assert _silu_outside_ops(prof) == stock_silu - 6


def test_model_level_modulation_views_and_rope_once_per_forward():
    """Blocks take column views of the model-level modulation outputs (no per-block GEMV), and the
    stock pos_embed output is converted to one table per forward."""
    m = _tiny(seed=7)
    kw = make_flux2_inputs(m, seed=7)
    ref = _run(m, kw)
    fdo.patch(m)
    calls = {"tables": 0}
    real = dfx.as_rope_tables

    def counting(rot):
        calls["tables"] += 1
        return real(rot)
    import dataclasses
    from fused_dit_ops.integrations import engine
    st = engine.state_of(m)
    fam = st.family
    st.family = dataclasses.replace(fam, rope_tables=counting)
    try:
        seen = []
        hooks = [b.register_forward_pre_hook(lambda mod, a, k: seen.append(1), with_kwargs=True)
                 for b in (m.double_stream_modulation_img, m.single_stream_modulation)]
        assert rel_err(_run(m, kw), ref) < REL
        for h in hooks:
            h.remove()
        assert len(seen) == 2  # once per forward each (the model's own calls)
        assert calls["tables"] == 1, calls
    finally:
        st.family = fam


def test_rope_table_matches_the_pos_embed_semantics():
    """The table the blocks get is FLUX.2's RoPE: 4 axes (t, h, w, l) of 6 here (32 in the real
    model), theta 2000, interleaved pairs; also what ``flux_rope_table`` builds from the ids."""
    m = _tiny(seed=7)
    kw = make_flux2_inputs(m, img_tokens=(15, 10), seed=7)
    ids = torch.cat([kw["txt_ids"], kw["img_ids"]])
    with torch.no_grad():
        tab = dfx.as_rope_tables(m.pos_embed(ids))
    want = fdo.flux_rope_table(ids, axes_dim=(6, 6, 6, 6), theta=2000)
    assert tab.shape == (ids.shape[0], 24) and tab.dtype == torch.float32
    torch.testing.assert_close(tab, want, rtol=0, atol=1e-6)


def test_kv_cache_mode_runs_stock_and_is_reported():
    m = _tiny(seed=8)
    kw = make_flux2_inputs(m, img_tokens=(15, 10), seed=8)
    with torch.no_grad():
        ref = m(**kw, kv_cache_mode="extract", num_ref_tokens=10)
    report = fdo.patch(m)
    with torch.no_grad():
        out = m(**kw, kv_cache_mode="extract", num_ref_tokens=10)
    assert torch.equal(out[0], ref[0])
    assert any("kv_cache_mode" in k for k in report.runtime), report.runtime


def test_single_block_called_with_both_streams_and_split():
    """The single block's other calling convention (text and image separately, split output)."""
    m = _tiny(seed=9)
    D = m.inner_dim
    kw = make_flux2_inputs(m, seed=9)
    Lt, Li = kw["encoder_hidden_states"].shape[1], kw["hidden_states"].shape[1]
    h, e, mod = torch.randn(1, Li, D), torch.randn(1, Lt, D), torch.randn(1, 3 * D)
    with torch.no_grad():
        rot = m.pos_embed(torch.cat([kw["txt_ids"], kw["img_ids"]]))
        blk = m.single_transformer_blocks[0]
        refs = [blk(h, e, mod, rot), blk(h, e, mod, rot, split_hidden_states=True),
                blk(torch.cat([e, h], 1), None, mod, rot, split_hidden_states=True, text_seq_len=Lt)]
        fdo.patch(m)
        outs = [blk(h, e, mod, rot), blk(h, e, mod, rot, split_hidden_states=True),
                blk(torch.cat([e, h], 1), None, mod, rot, split_hidden_states=True, text_seq_len=Lt)]
        d = m.transformer_blocks[0]
        dm = (torch.randn(1, 6 * D), torch.randn(1, 6 * D))
        fdo.unpatch(m)
        dref = d(h, e, *dm, rot)
        fdo.patch(m)
        dout = d(h, e, *dm, dfx.as_rope_tables(rot))
    assert rel_err(outs[0], refs[0]) < REL
    for o, r in zip([*outs[1], *outs[2], *dout], [*refs[1], *refs[2], *dref]):
        assert o.shape == r.shape and rel_err(o, r) < REL


def test_unpatch_restores_bit_exact():
    m = _tiny(seed=10)
    kw = make_flux2_inputs(m, seed=10)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ref = _run(m, kw)
    procs = [blk.attn.processor for blk in [*m.transformer_blocks, *m.single_transformer_blocks]]
    fdo.patch(m)
    _run(m, kw)
    assert fdo.unpatch(m)
    assert torch.equal(_run(m, kw), ref)
    assert [blk.attn.processor for blk in [*m.transformer_blocks, *m.single_transformer_blocks]] == procs
    for mod in [m, m.pos_embed, *m.transformer_blocks, *m.single_transformer_blocks]:
        assert "forward" not in mod.__dict__
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    a = m.transformer_blocks[0].attn
    assert ptr(a.to_q.weight) != ptr(a.to_k.weight)  # q/k/v packing undone
    assert not fdo.unpatch(m)


def test_custom_processor_stays_stock():
    from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor

    class Custom(Flux2AttnProcessor):
        pass

    class CustomSingle(Flux2ParallelSelfAttnProcessor):
        pass

    m = _tiny(seed=11)
    kw = make_flux2_inputs(m, seed=11)
    m.transformer_blocks[1].attn.set_processor(Custom())
    m.single_transformer_blocks[0].attn.set_processor(CustomSingle())
    ref = _run(m, kw)
    report = fdo.patch(m)
    assert {"single_transformer_blocks.0", "transformer_blocks.1"} <= set(report.stock), report
    assert "pos_embed" in report.stock, report
    assert rel_err(_run(m, kw), ref) < REL


def test_peft_lora_added_after_patch():
    peft = pytest.importorskip("peft")
    m, ref_m = _tiny(seed=12), _tiny(seed=12)
    kw = make_flux2_inputs(m, seed=13)
    cfg = dict(r=4, lora_alpha=4, init_lora_weights=False,
               target_modules=(r".*\.(to_q|add_k_proj|linear_in|linear_out|to_qkv_mlp_proj|to_out\.0)$"
                               r"|single_transformer_blocks\.\d+\.attn\.to_out|double_stream_modulation_img\.linear"))
    torch.manual_seed(5)
    ref_m.add_adapter(peft.LoraConfig(**cfg))
    ref = _run(ref_m, kw)
    report = fdo.patch(m)
    torch.manual_seed(5)
    m.add_adapter(peft.LoraConfig(**cfg))
    assert rel_err(_run(m, kw), ref) < REL, report.runtime
    assert any("not packed now" in k for k in report.runtime), report.runtime
    assert rel_err(_run(_tiny(seed=12), kw), ref) > 1e-2  # the adapter matters


def test_peft_lora_added_before_patch():
    peft = pytest.importorskip("peft")
    m = _tiny(seed=14)
    kw = make_flux2_inputs(m, seed=14)
    torch.manual_seed(6)
    m.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                  target_modules=["to_k", "to_qkv_mlp_proj", "linear_in", "single_stream_modulation.linear"]))
    ref = _run(m, kw)
    report = fdo.patch(m)
    assert "pack_qkv" in report.stock, report
    assert rel_err(_run(m, kw), ref) < REL


def _diffusers_hook(block, seen):
    """A diffusers ModelHook (HookRegistry) on ``block`` that records its calls and scales the image
    stream of its output (a hook whose effect the result shows)."""
    from diffusers.hooks import HookRegistry, ModelHook

    class Scale(ModelHook):
        def post_forward(self, module, output):
            seen.append(type(module).__name__)
            if isinstance(output, tuple):
                return output[0], output[1] * 0.5
            return output * 0.5
    HookRegistry.check_if_exists_or_initialize(block).register_hook(Scale(), "scale")


@pytest.mark.parametrize("when", ["after_patch", "before_patch"])
def test_diffusers_hook_composes(when):
    """diffusers' hook registry on a double and a single block, added before or after patching."""
    m, ref_m = _tiny(seed=3), _tiny(seed=3)
    kw = make_flux2_inputs(m, seed=40)
    seen, ref_seen = [], []
    for mm, sn in ((ref_m, ref_seen),):
        _diffusers_hook(mm.transformer_blocks[1], sn)
        _diffusers_hook(mm.single_transformer_blocks[0], sn)
    ref = _run(ref_m, kw)
    if when == "before_patch":
        _diffusers_hook(m.transformer_blocks[1], seen)
        _diffusers_hook(m.single_transformer_blocks[0], seen)
    report = fdo.patch(m)
    if when == "after_patch":
        _diffusers_hook(m.transformer_blocks[1], seen)
        _diffusers_hook(m.single_transformer_blocks[0], seen)
    assert "transformer_blocks.1" not in report.stock, report
    assert rel_err(_run(m, kw), ref) < REL
    assert seen == ref_seen == ["Flux2TransformerBlock", "Flux2SingleTransformerBlock"], seen
    assert rel_err(_run(_tiny(seed=3), kw), ref) > 1e-2  # the hook matters
    fdo.unpatch(m)
    assert rel_err(_run(m, kw), ref) < REL


def test_torch_hooks_on_blocks_and_mlp_are_called():
    m = _tiny(seed=15)
    kw = make_flux2_inputs(m, seed=15)
    ref = _run(m, kw)
    fdo.patch(m)
    seen = []
    hks = [m.single_transformer_blocks[1].register_forward_hook(lambda mod, i, o: seen.append("single")),
           m.transformer_blocks[0].ff.register_forward_hook(lambda mod, i, o: seen.append("ff"))]
    assert rel_err(_run(m, kw), ref) < REL
    assert sorted(seen) == ["ff", "single"], seen
    for h in hks:
        h.remove()


def _compile_blocks(model):
    for b in [*model.transformer_blocks, *model.single_transformer_blocks]:
        b.compile(fullgraph=True, backend="aot_eager", dynamic=True)


def test_compile_blocks_fullgraph_no_recompile_across_text_lengths():
    """Regional compile (fullgraph, aot_eager, dynamic shapes): no graph break, no recompile on a
    second text length and image size, the same graph count as the stock model."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters
    m = _tiny(seed=16)
    kw = make_flux2_inputs(m, txt_len=7, img_tokens=15, seed=16)
    kw2 = make_flux2_inputs(m, txt_len=13, img_tokens=21, timestep=0.3, seed=17)
    refs = (_run(m, kw), _run(m, kw2))
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
        assert rel_err(out, refs[0]) < REL and rel_err(out2, refs[1]) < REL
    assert graphs[True] == graphs[False], graphs


def test_engine_has_no_model_names():
    import inspect
    from fused_dit_ops.integrations import engine
    src = inspect.getsource(engine).lower()
    for name in ("flux2", "flux.2", "swiglu("):
        assert name not in src


# --- the eager fast path on CPU tensors: Triton kernels in the interpreter ------------------------

@pytest.mark.interpret
@pytest.mark.parametrize("batch", [1, 2])
def test_interpreted_direct_path_matches_stock(monkeypatch, batch):
    m = _tiny(seed=17)
    kw = make_flux2_inputs(m, batch=batch, seed=18)
    ref = _run(m, kw)
    fdo.patch(m)
    calls = {}
    for name in ("norm_scale_shift", "gate_residual_norm_scale_shift", "joint_qk_norm_rope_", "gate_residual",
                 "swiglu_linear", "dual_norm_scale_shift"):
        real = getattr(_eager, name)
        monkeypatch.setattr(_eager, name, lambda *a, _n=name, _f=real, **k: calls.update({_n: calls.get(_n, 0) + 1})
                            or _f(*a, **k))
    monkeypatch.setattr(_eager, "fast", lambda x: not torch.is_grad_enabled())  # CPU tensors allowed here
    assert rel_err(_run(m, kw), ref) < 1e-5
    # single blocks: norm once (block 0), look-ahead into block 1; the SwiGLU GEMM in every MLP
    assert calls["norm_scale_shift"] == 1 and calls["gate_residual_norm_scale_shift"] == 1, calls
    assert calls["swiglu_linear"] == 6 and calls["dual_norm_scale_shift"] == 1, calls


# --- GPU: real dims, bf16 vs an fp32 copy ----------------------------------------------------------

def _gpu_pair(layers, single_layers, img_tokens=(4096,)):
    m = build_flux2_transformer("dev", num_layers=layers, num_single_layers=single_layers, device="cuda",
                                dtype=torch.bfloat16)
    m32 = build_flux2_transformer("dev", num_layers=layers, num_single_layers=single_layers, device="cuda",
                                  dtype=torch.float32)
    m32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    kw = make_flux2_inputs(m, img_tokens=img_tokens, txt_len=512)
    kw32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    return m, m32, kw, kw32


def _check_vs_fp32(m, m32, kw, kw32, ceiling, label):
    ref32 = _run(m32, kw32)
    del m32
    torch.cuda.empty_cache()
    stock = _run(m, kw)
    report = fdo.patch(m)
    assert set(report.stock) <= MODEL_LEVEL_MOD, report
    fused = _run(m, kw)
    e_stock, e_fused, e_pair = rel_err(stock, ref32), rel_err(fused, ref32), rel_err(fused, stock)
    print(f"\n{label}: rel_fro vs fp32: stock bf16 {e_stock:.3e}, fused bf16 {e_fused:.3e}; fused vs stock "
          f"{e_pair:.3e}")
    assert e_fused <= max(1.05 * e_stock, 1e-3), (e_fused, e_stock)
    assert e_pair < ceiling


@pytest.mark.gpu
@pytest.mark.parametrize("layers,single", [(1, 0), (0, 1)])
def test_gpu_one_block_real_dims(layers, single):
    m, m32, kw, kw32 = _gpu_pair(layers, single)
    _check_vs_fp32(m, m32, kw, kw32, ceiling=2e-2, label=f"FLUX.2 {layers} double + {single} single, 4096 + 512")


@pytest.mark.gpu
def test_gpu_several_layers_real_dims():
    m, m32, kw, kw32 = _gpu_pair(1, 3)
    _check_vs_fp32(m, m32, kw, kw32, ceiling=3e-2, label="FLUX.2 1 double + 3 single, 4096 + 512")


@pytest.mark.gpu
def test_gpu_swiglu_mlp_matches_stock_feedforward():
    """A real-dims Flux2FeedForward (6144 -> 2 x 18432 -> 6144, bf16): swiglu_mlp vs the module."""
    from diffusers.models.transformers.transformer_flux2 import Flux2FeedForward, Flux2SwiGLU
    from fused_dit_ops.integrations.double_stream import swiglu_mlp
    torch.manual_seed(0)
    ff = Flux2FeedForward(6144, 6144, mult=3.0).to("cuda", torch.bfloat16).eval()
    for p in ff.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, 4608, 6144, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = ff.float()(x.float())
        ff.to(torch.bfloat16)
        stock = ff(x)
        fused = swiglu_mlp(ff, x, (Flux2SwiGLU,))
    e, e_stock = rel_err(fused, want), rel_err(stock, want)
    print(f"\nFlux2FeedForward real dims: rel vs fp32 fused {e:.3e}, stock bf16 {e_stock:.3e}")
    assert e <= 1.05 * e_stock + 1e-4
