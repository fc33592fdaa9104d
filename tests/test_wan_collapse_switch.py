"""The Wan per-token timestep collapse switched off (``diffusers_wan.set_timestep_collapse``): the patched
model without the two-set collapse gives the same output as with it and as stock (tiny TI2V, fp32), runs
the per-token time projection and the per-token block path (fused attention, no modulation ops), and the
``+nocollapse`` provider modifier of the benchmarks applies it."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import fused_dit_ops as fdo  # noqa: E402
from fused_dit_ops.bench import _configs  # noqa: E402
from fused_dit_ops.integrations import diffusers_wan as dw  # noqa: E402
from fused_dit_ops.integrations import engine  # noqa: E402
from fused_dit_ops.models import build_qwen_image_transformer, build_wan_transformer, make_wan_inputs  # noqa: E402

from helpers import native_diffusers_backend, rel_err, run_no_grad  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("native_diffusers_backend")
REL = 1e-5


def _ti2v(seed=11, batch=1):
    m = build_wan_transformer("tiny-ti2v", seed=seed)
    return m, make_wan_inputs(m, per_token=True, batch=batch, seed=seed)


def _ops(m, kw):
    with torch.profiler.profile() as prof:
        out = run_no_grad(m, kw)
    return out, [e.name for e in prof.events()]


@pytest.mark.parametrize("batch", [1, 2])
def test_without_collapse_equals_with_collapse_and_stock(batch):
    m, kw = _ti2v(batch=batch)
    stock = run_no_grad(m, kw)
    report = fdo.patch(m)
    collapsed = run_no_grad(m, kw)
    rows = []
    h = m.condition_embedder.time_proj.register_forward_hook(lambda mod, i, o: rows.append(tuple(o.shape[:-1])))
    dw.set_timestep_collapse(m, False)
    assert report.options["timestep_collapse"] is False and "timestep_collapse=False" in str(report)
    plain, names = _ops(m, kw)
    h.remove()
    assert rows == [(batch, 45)]  # the time projection ran per token: no collapse
    assert rel_err(plain, collapsed) < REL and rel_err(plain, stock) < REL
    assert not report.runtime, report.runtime  # no stock fallback of a block
    # fused attention and QK norm + RoPE ran, the (two-set) modulation ops did not
    assert "fused_dit::attention" in names and "fused_dit::qk_norm_rope_across_heads" in names
    assert not any(n in names for n in ("fused_dit::norm_scale_shift", "fused_dit::gate_residual",
                                        "fused_dit::gate_residual_norm_scale_shift"))
    # back on: the collapsed path again
    dw.set_timestep_collapse(m, True)
    assert "timestep_collapse" not in report.options
    again, names = _ops(m, kw)
    assert rel_err(again, collapsed) < REL and "fused_dit::norm_scale_shift" in names
    fdo.unpatch(m)
    assert rel_err(run_no_grad(m, kw), stock) == 0.0


def test_without_collapse_the_timestep_still_matters():
    m, kw = _ti2v(seed=12)
    fdo.patch(m)
    dw.set_timestep_collapse(m, False)
    a = run_no_grad(m, kw)
    b = run_no_grad(m, dict(kw, timestep=kw["timestep"] * 0.25))
    assert rel_err(a, b) > 1e-2


def test_switch_off_leaves_one_timestep_models_alone():
    m = build_wan_transformer("tiny", seed=13)
    kw = make_wan_inputs(m, seed=13)
    ref = run_no_grad(m, kw)
    fdo.patch(m)
    dw.set_timestep_collapse(m, False)
    out, names = _ops(m, kw)
    assert rel_err(out, ref) < REL and "fused_dit::norm_scale_shift" in names  # [B] timestep: fused as before


def test_switch_needs_a_patched_wan_model():
    m = build_wan_transformer("tiny", seed=14)
    with pytest.raises(ValueError, match="patched"):
        dw.set_timestep_collapse(m, False)
    q = build_qwen_image_transformer("tiny", num_layers=1)
    fdo.patch(q)
    with pytest.raises(ValueError, match="Wan"):
        dw.set_timestep_collapse(q, False)


def test_nocollapse_provider_modifier():
    base, opts = _configs.split_modifiers("patched-eager+nocollapse")
    assert base == "patched-eager" and opts == {"timestep_collapse": False}
    m, kw = _ti2v(seed=15)
    ref = run_no_grad(m, kw)
    info = _configs.apply(m, base, **opts)
    try:
        assert "timestep_collapse=False" in info["patch"]
        out, names = _ops(m, kw)
        assert rel_err(out, ref) < REL and "fused_dit::norm_scale_shift" not in names
    finally:
        _configs.reset(m, base)
    assert not engine.is_patched(m)
    q = build_qwen_image_transformer("tiny", num_layers=1)
    with pytest.raises(ValueError, match="Wan"):
        _configs.apply(q, base, **opts)
    assert not engine.is_patched(q)  # unpatched again after the refusal


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_ti2v_real_dims_without_collapse():
    """TI2V-5B dims (24 x 128 heads), 2 blocks, bf16, 660 tokens: without the collapse the patched model
    stays as close to stock as with it (the same fused attention / MLP; per-token modulation in torch)."""
    m = build_wan_transformer("ti2v-5b", num_layers=2, device="cuda", dtype=torch.bfloat16)
    kw = make_wan_inputs(m, latent=(3, 22, 40), per_token=True)
    stock = run_no_grad(m, kw)
    report = fdo.patch(m)
    collapsed = run_no_grad(m, kw)
    dw.set_timestep_collapse(m, False)
    plain = run_no_grad(m, kw)
    assert not report.runtime, report.runtime
    e_plain, e_coll, e_pair = rel_err(plain, stock), rel_err(collapsed, stock), rel_err(plain, collapsed)
    print(f"\nti2v-5b bf16: vs stock: no collapse {e_plain:.3e}, collapsed {e_coll:.3e}; between {e_pair:.3e}")
    assert e_plain < 2e-2 and e_pair < 2e-2
