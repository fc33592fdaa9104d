"""fused_dit_ops.patch / unpatch on a diffusers WanTransformer3DModel (Wan2.1 / 2.2): stock vs patched.

CPU (always): tiny random models (3 heads x 24, C 72, MLP 104, 2 blocks; a 3 x 6 x 10 latent = 45
tokens, 7 text tokens), fp32: T2V, I2V (image context through added K/V, 3 image tokens) and TI2V
(per-token timestep: 0 on the first latent frame). Interpreter tier: the eager fast path on CPU
tensors. GPU (@pytest.mark.gpu): real 14B dims (C 5120, 40 x 128), bf16, one block and a few-layer
model against an fp32 copy: fused no worse than stock bf16 (both printed).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import fused_dit_ops as fdo  # noqa: E402
from fused_dit_ops.integrations import diffusers_wan as dw  # noqa: E402
from fused_dit_ops.integrations import engine  # noqa: E402
from fused_dit_ops.models import build_wan_transformer, make_wan_inputs  # noqa: E402
from fused_dit_ops.ops import _eager  # noqa: E402

from helpers import native_diffusers_backend, rel_err, run_no_grad  # noqa: E402,F401

_run = run_no_grad
pytestmark = pytest.mark.usefixtures("native_diffusers_backend")
REL = 1e-5  # measured ~3e-7 (patched vs stock, tiny, fp32)
CONFIGS = ["tiny", "tiny-i2v", "tiny-ti2v"]


def _tiny(config="tiny", seed=1, **kw):
    return build_wan_transformer(config, seed=seed, **kw)


def _inputs(m, config="tiny", **kw):
    return make_wan_inputs(m, per_token=config == "tiny-ti2v", **kw)


def _allowed_stock():
    return {"mlp", "probe"} if torch.cuda.is_available() else {"mlp"}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("batch", [1, 2])
def test_tiny_patched_matches_stock(config, batch):
    m = _tiny(config)
    kw = _inputs(m, config, batch=batch, seed=2)
    ref = _run(m, kw)
    report = fdo.patch(m)
    assert set(report.stock) <= _allowed_stock(), report
    assert "blocks[0-1]" in str(report)
    out = _run(m, kw)
    assert rel_err(out, ref) < REL
    assert rel_err(_run(m, kw), ref) < REL  # second forward: cached RoPE tables
    assert not report.runtime, report.runtime  # nothing fell back (TI2V: the collapsed forward ran)
    # the timestep really matters
    assert rel_err(_run(m, _inputs(m, config, batch=batch, seed=2, timestep=100.0)), out) > 1e-2


def test_ti2v_collapse_is_two_sets_and_an_index(monkeypatch):
    """The per-token timestep [B, L] runs as [2B] timesteps and a [B, L] index: time_proj sees 2B rows,
    every block gets a [2B, 6, C] temb and the index (0 on the first frame's tokens)."""
    m = _tiny("tiny-ti2v", seed=3)
    kw = _inputs(m, "tiny-ti2v", batch=2, seed=3)
    ref = _run(m, kw)
    fdo.patch(m)
    rows, seen = [], []
    m.condition_embedder.time_proj.register_forward_hook(lambda mod, i, o: rows.append(o.shape[:-1]))
    real = dw.self_cross.run_block

    def spy(block, st, x, ctx, temb, rot, index):
        seen.append((tuple(temb.shape), None if index is None else index.clone()))
        return real(block, st, x, ctx, temb, rot, index)
    monkeypatch.setattr(dw.self_cross, "run_block", spy)
    out = _run(m, kw)
    assert rel_err(out, ref) < REL
    assert rows == [torch.Size([4])]
    C, first = m.config.num_attention_heads * m.config.attention_head_dim, 3 * 5
    assert [s for s, _ in seen] == [(4, 6, C)] * 2
    idx = seen[0][1]
    assert idx.shape == (2, 45) and not idx[:, :first].any() and idx[:, first:].all()


def test_ti2v_three_timestep_values_fall_back_to_stock():
    m = _tiny("tiny-ti2v", seed=4)
    kw = _inputs(m, "tiny-ti2v", seed=4)
    ts = kw["timestep"].clone()
    ts[:, -5:] = 300.0
    kw["timestep"] = ts
    ref = _run(m, kw)
    report = fdo.patch(m)
    assert rel_err(_run(m, kw), ref) < REL
    assert any("more than two values" in k for k in report.runtime), report.runtime


def test_ti2v_equal_timesteps_t2v_mode():
    """TI2V without a conditioning image: the per-token timestep is t everywhere (one set)."""
    m = _tiny("tiny-ti2v", seed=5)
    kw = _inputs(m, "tiny-ti2v", seed=5)
    kw["timestep"] = torch.full_like(kw["timestep"], 500.0)
    ref = _run(m, kw)
    report = fdo.patch(m)
    assert rel_err(_run(m, kw), ref) < REL and not report.runtime


@pytest.mark.parametrize("ops", ["modulation", "qk_norm_rope", "attention", ["modulation", "attention"]])
@pytest.mark.parametrize("config", ["tiny", "tiny-ti2v"])
def test_op_subsets(ops, config):
    m = _tiny(config, seed=6)
    kw = _inputs(m, config, seed=6)
    ref = _run(m, kw)
    fdo.patch(m, ops=ops)
    assert rel_err(_run(m, kw), ref) < REL


@pytest.mark.parametrize("switch", [dict(pack_qkv=False), dict(lookahead=False)])
def test_ab_switches(switch):
    m = _tiny(seed=7)
    kw = _inputs(m, seed=7)
    ref = _run(m, kw)
    engine.patch_ab(m, **switch)
    assert rel_err(_run(m, kw), ref) < REL


def test_fused_ops_are_called():
    m = _tiny("tiny-i2v")
    kw = _inputs(m, "tiny-i2v")
    fdo.patch(m)
    with torch.profiler.profile() as prof:
        _run(m, kw)
    names = {e.name for e in prof.events()}
    for op in ("norm_scale_shift", "gate_residual", "gate_residual_norm_scale_shift", "qk_norm_rope_across_heads",
               "attention", "gate_residual_layer_norm"):
        assert f"fused_dit::{op}" in names, op


def test_packed_weights_share_storage_and_unpatch_exact():
    m = _tiny(seed=8)
    kw = _inputs(m, seed=8)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ref = _run(m, kw)
    fdo.patch(m)
    a = m.blocks[0].attn1
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert ptr(a.to_q.weight) == ptr(a.to_k.weight) == ptr(a.to_v.weight)
    _run(m, kw)
    assert fdo.unpatch(m)
    assert ptr(a.to_q.weight) != ptr(a.to_v.weight)
    assert torch.equal(_run(m, kw), ref)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for mod in [m, m.rope, *m.blocks]:
        assert "forward" not in mod.__dict__
    assert not fdo.unpatch(m)


def test_block_called_alone_with_stock_rope():
    """A patched block called with the stock (cos, sin) (block benchmarks) converts it; tables too."""
    m = _tiny(seed=9)
    kw = _inputs(m, seed=9)
    rot = m.rope(kw["hidden_states"])
    L, C = rot[0].shape[1], 72
    x, ctx, temb = torch.randn(1, L, C), torch.randn(1, 7, C), torch.randn(1, 6, C)
    blk = m.blocks[0]
    with torch.no_grad():
        ref = blk(x, ctx, temb, rot)
        fdo.patch(m)
        out = blk(x, ctx, temb, rot)
        out2 = blk(x, ctx, temb, dw.as_rope_tables(rot))
    assert rel_err(out, ref) < REL and rel_err(out2, ref) < REL
    back = dw.rope_stock(dw.as_rope_tables(rot))
    assert torch.equal(back[0], rot[0]) and torch.equal(back[1], rot[1])


def test_custom_processor_keeps_block_stock():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class Custom(WanAttnProcessor):
        pass

    for config in ("tiny", "tiny-ti2v"):
        m = _tiny(config, seed=10)
        kw = _inputs(m, config, seed=10)
        m.blocks[1].attn2.set_processor(Custom())
        ref = _run(m, kw)
        report = fdo.patch(m)
        assert "blocks.1" in report.stock, report
        assert rel_err(_run(m, kw), ref) < REL
        if config == "tiny-ti2v":  # a stock block needs the per-token temb: stock model forward
            assert any("some blocks stock" in k for k in report.runtime), report.runtime


def test_peft_lora_added_after_patch():
    peft = pytest.importorskip("peft")
    m, ref_m = _tiny(seed=11), _tiny(seed=11)
    kw = _inputs(m, seed=12)
    cfg = dict(r=4, lora_alpha=4, init_lora_weights=False,
               target_modules=["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2"])
    torch.manual_seed(5)
    ref_m.add_adapter(peft.LoraConfig(**cfg))
    ref = _run(ref_m, kw)
    report = fdo.patch(m)
    torch.manual_seed(5)
    m.add_adapter(peft.LoraConfig(**cfg))
    assert rel_err(_run(m, kw), ref) < REL, report.runtime
    assert any("not packed now" in k for k in report.runtime), report.runtime
    assert rel_err(_run(_tiny(seed=11), kw), ref) > 1e-2  # the adapter matters


@pytest.mark.parametrize("when", ["after_patch", "before_patch"])
def test_first_block_cache_composes(when):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    m, ref_m = _tiny(seed=3), _tiny(seed=3)
    kws = [_inputs(m, seed=40, timestep=t) for t in (900.0, 890.0, 500.0)]
    if when == "before_patch":
        apply_first_block_cache(m, FirstBlockCacheConfig(threshold=0.05))
    report = fdo.patch(m)
    if when == "after_patch":
        apply_first_block_cache(m, FirstBlockCacheConfig(threshold=0.05))
    assert "blocks.0" not in report.stock, report
    apply_first_block_cache(ref_m, FirstBlockCacheConfig(threshold=0.05))
    for kw in kws:
        with torch.no_grad(), m.cache_context("c"), ref_m.cache_context("c"):
            assert rel_err(m(**kw)[0], ref_m(**kw)[0]) < REL


def test_torch_hook_on_a_block_is_called():
    m = _tiny(seed=14)
    kw = _inputs(m, seed=14)
    ref = _run(m, kw)
    fdo.patch(m)
    seen = []
    hk = m.blocks[1].register_forward_hook(lambda mod, i, o: seen.append(1))
    assert rel_err(_run(m, kw), ref) < REL and seen
    hk.remove()


def test_two_experts_patched_independently():
    """Wan2.2 A14B: two transformers (high- and low-noise experts), each patched on its own."""
    hi, lo = _tiny(seed=20), _tiny(seed=21)
    kw_hi, kw_lo = _inputs(hi, seed=22, timestep=950.0), _inputs(lo, seed=22, timestep=200.0)
    refs = _run(hi, kw_hi), _run(lo, kw_lo)
    r_hi, r_lo = fdo.patch(hi), fdo.patch(lo)
    assert engine.state_of(hi) is not engine.state_of(lo)
    for _ in range(2):  # alternate as the pipeline does around the boundary
        assert rel_err(_run(hi, kw_hi), refs[0]) < REL and rel_err(_run(lo, kw_lo), refs[1]) < REL
    assert not r_hi.runtime and not r_lo.runtime
    fdo.unpatch(hi)
    assert rel_err(_run(lo, kw_lo), refs[1]) < REL and engine.ATTR in lo.__dict__


@pytest.mark.parametrize("config", ["tiny", "tiny-ti2v"])
def test_compile_blocks_fullgraph_no_recompile(config):
    """Regional compile (fullgraph, aot_eager): no graph break, the stock model's graph count, no
    recompile on the next step (another timestep) or at another latent size (dynamic)."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters
    from fused_dit_ops.demo import uncompile_blocks
    m = _tiny(config, seed=15)
    kw = _inputs(m, config, seed=15)
    kw2 = _inputs(m, config, timestep=300.0, seed=16)
    ref = _run(m, kw)
    fdo.patch(m)
    dynamo.reset()
    counters.clear()
    for b in m.blocks:
        b.compile(fullgraph=True, backend="aot_eager")
    try:
        out = _run(m, kw)
        with dynamo.config.patch(error_on_recompile=True):
            out2 = _run(m, kw2)
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
        # another latent size: dynamic shapes, at most one recompile, then none
        kw3 = _inputs(m, config, latent=(2, 6, 14), seed=17)
        out3 = _run(m, kw3)
        with dynamo.config.patch(error_on_recompile=True):
            _run(m, _inputs(m, config, latent=(4, 4, 10), seed=18))
    finally:
        dynamo.reset()
        uncompile_blocks(m)
    assert rel_err(out, ref) < REL
    fdo.unpatch(m)
    assert rel_err(out2, _run(m, kw2)) < REL and rel_err(out3, _run(m, kw3)) < REL


# --- the eager fast path on CPU tensors: Triton kernels in the interpreter ------------------------

@pytest.mark.interpret
@pytest.mark.parametrize("config", CONFIGS)
def test_interpreted_direct_path_matches_stock(monkeypatch, config):
    m = _tiny(config, seed=17)
    kw = _inputs(m, config, batch=2, seed=18)
    ref = _run(m, kw)
    fdo.patch(m)
    calls = {}
    for name in ("norm_scale_shift", "gate_residual_norm_scale_shift", "qk_norm_rope_across_heads", "gate_residual",
                 "gate_residual_layer_norm"):
        real = getattr(_eager, name)
        monkeypatch.setattr(_eager, name, lambda *a, _n=name, _f=real, **k: calls.update({_n: calls.get(_n, 0) + 1})
                            or _f(*a, **k))
    monkeypatch.setattr(_eager, "fast", lambda x: not torch.is_grad_enabled())  # CPU tensors allowed here
    assert rel_err(_run(m, kw), ref) < 1e-5
    # norm1 once (block 0; block 1's by look-ahead) + the TI2V output norm, residual+norm3 per block
    assert calls["norm_scale_shift"] == (2 if config == "tiny-ti2v" else 1), calls
    assert calls["gate_residual_norm_scale_shift"] == 3 and calls["qk_norm_rope_across_heads"] == 4, calls
    assert calls["gate_residual_layer_norm"] == 2 and calls["gate_residual"] == 1, calls


# --- GPU: real dims, bf16 vs an fp32 copy ----------------------------------------------------------

def _gpu_pair(config, layers, latent):
    m = build_wan_transformer(config, num_layers=layers, device="cuda", dtype=torch.bfloat16)
    m32 = build_wan_transformer(config, num_layers=layers, device="cuda", dtype=torch.float32)
    m32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    kw = make_wan_inputs(m, latent=latent, txt_len=512)
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
          f"{e_pair:.3e}; runtime fallbacks {report.runtime}")
    assert not report.runtime, report.runtime
    assert e_fused < max(1.5 * e_stock, 1e-3), (e_fused, e_stock)
    assert e_pair < ceiling


@pytest.mark.gpu
@pytest.mark.parametrize("config,latent", [("t2v-14b", (3, 30, 52)), ("i2v-14b", (3, 30, 52)),
                                           ("ti2v-5b", (3, 22, 40))])
def test_gpu_one_block_real_dims(config, latent):
    m, m32, kw, kw32 = _gpu_pair(config, 1, latent)
    _check_vs_fp32(m, m32, kw, kw32, ceiling=2e-2, label=f"{config}, 1 block, latent {latent}")


@pytest.mark.gpu
def test_gpu_several_layers_real_dims():
    m, m32, kw, kw32 = _gpu_pair("t2v-14b", 4, (3, 30, 52))
    _check_vs_fp32(m, m32, kw, kw32, ceiling=3e-2, label="t2v-14b, 4 blocks, 1170 + 512 tokens")


@pytest.mark.gpu
def test_gpu_several_layers_ti2v():
    m, m32, kw, kw32 = _gpu_pair("ti2v-5b", 3, (3, 22, 40))
    _check_vs_fp32(m, m32, kw, kw32, ceiling=3e-2, label="ti2v-5b, 3 blocks, 660 tokens, per-token timestep")


@pytest.mark.parametrize("config", ["tiny", "tiny-ti2v"])
def test_verify_mode(config):
    m = _tiny(config, seed=30)
    kw = _inputs(m, config, seed=30)
    ref = _run(m, kw)
    report = fdo.patch(m, verify=True)
    out = _run(m, kw)
    assert report.verify is not None and report.verify["rel_fro"] < REL and report.verify["finite"]
    assert rel_err(out, ref) < REL and not report.runtime


def test_i2v_image_context_is_attended():
    """I2V: the last 512 context tokens are text, the rest image context (its own K/V): patched matches
    stock for two image contexts, and the image context changes the output."""
    m = _tiny("tiny-i2v", seed=31)
    kw = _inputs(m, "tiny-i2v", seed=31)
    assert kw["encoder_hidden_states"].shape[1] == 512
    kw2 = dict(kw, encoder_hidden_states_image=torch.randn_like(kw["encoder_hidden_states_image"]))
    refs = _run(m, kw), _run(m, kw2)
    fdo.patch(m)
    outs = _run(m, kw), _run(m, kw2)
    assert rel_err(outs[0], refs[0]) < REL and rel_err(outs[1], refs[1]) < REL
    assert rel_err(outs[0], outs[1]) > 1e-2


@pytest.mark.parametrize("config", CONFIGS)
def test_bf16_model_with_fp32_tables_and_norms(config):
    """A bf16 model whose tables, norms and time embedder stay fp32 (``_keep_in_fp32_modules``, as
    ``from_pretrained(torch_dtype=torch.bfloat16)`` loads it): patch, probe and forward work; the
    output is as close to an fp32 copy as stock bf16's (CPU: the ops' references)."""
    m = _tiny(config, seed=32, dtype=torch.bfloat16)
    assert m.scale_shift_table.dtype == torch.float32 and m.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    m32 = _tiny(config, seed=32)
    m32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    kw = _inputs(m, config, seed=32)
    assert kw["hidden_states"].dtype == torch.bfloat16
    kw32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    ref32, stock = _run(m32, kw32), _run(m, kw)
    report = fdo.patch(m)
    assert set(report.stock) <= _allowed_stock(), report
    fused = _run(m, kw)
    assert not report.runtime, report.runtime
    e_stock, e_fused = rel_err(stock, ref32), rel_err(fused, ref32)
    assert e_fused < max(1.5 * e_stock, 1e-3), (e_fused, e_stock)


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS)
def test_gpu_tiny_fast_path(config):
    """The eager CUDA fast path (launchers without dispatch) on the tiny configs, fp32 and bf16."""
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        m = _tiny(config, seed=33, device="cuda", dtype=dtype)
        kw = _inputs(m, config, batch=2, seed=33)
        ref = _run(m, kw)
        report = fdo.patch(m)
        assert not report.stock, report
        out, out2 = _run(m, kw), _run(m, kw)
        assert rel_err(out, ref) < tol and torch.equal(out, out2), (config, dtype, rel_err(out, ref))
        assert not report.runtime, report.runtime


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_ti2v():
    """A patched TI2V forward (per-token timestep collapsed, index) captured in a CUDA graph replays
    the eager result (the two-value check is a device-side assert while capturing)."""
    m = _tiny("tiny-ti2v", seed=34, device="cuda", dtype=torch.bfloat16)
    kw = _inputs(m, "tiny-ti2v", seed=34)
    fdo.patch(m, reuse_mod=False)
    eager = _run(m, kw)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(2):
            m(**kw)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        out = m(**kw)[0]
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
