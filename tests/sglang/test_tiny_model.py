"""Tiny Qwen-Image-Edit-2511 DiT (2 blocks, zero_cond_t) on CPU: plugin on vs off, exact call counts."""
import pytest

pytest.importorskip("sglang.multimodal_gen", reason="sglang not installed: run `bash tools/sglang_env.sh && make test-sglang`")

import torch  # noqa: E402

from tests.helpers import rel_err  # noqa: E402
from tests.sglang.conftest import build_tiny, run_tiny, set_dispatch, tiny_inputs  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def _baseline(rt, dtype):
    """Stock SGLang: every CustomOp on forward_native, SDPA attention, plugin passing through."""
    rt.plugin.disable()
    try:
        m = build_tiny(rt, dtype)
        set_dispatch(m, rt, hooked_to_cuda=False)
        return run_tiny(m, tiny_inputs(m, rt, dtype))
    finally:
        rt.plugin._active = True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_model_plugin_on_vs_off(sglang_rt, plugin, our_ops, dtype):
    ref = _baseline(sglang_rt, dtype)
    plugin.reset_stats()
    m = build_tiny(sglang_rt, dtype, fa_attention=True)  # FA backend impl (what H100 picks)
    set_dispatch(m, sglang_rt, hooked_to_cuda=True)
    for blk in m.transformer_blocks:
        blk.attn.use_fused_qkv_epilogue = True  # H100 default; False on CPU
    out = run_tiny(m, tiny_inputs(m, sglang_rt, dtype))
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype], our_ops
    s = plugin.stats()
    handled = {k: v["handled"] for k, v in s.items()}
    assert handled == {"ln_select01": 2, "res_ln_select01": 2, "norm_scale_shift": 2,
                       "res_norm_scale_shift": 2, "qkv_epilogue": 2, "qk_norm_rope": 0,
                       "attention": 2}, (s, our_ops)
    assert s["res_ln_select01"]["paths"] == {"fused": 2}
    assert all(not v["declined"] for v in s.values()), s


def test_tiny_model_declines_while_ops_missing(sglang_rt, plugin, no_new_ops):
    """This branch before the RoPE/attention merge: those hooks decline, output unchanged."""
    dtype = torch.float32
    ref = _baseline(sglang_rt, dtype)
    plugin.reset_stats()
    m = build_tiny(sglang_rt, dtype)  # SDPA attention (FA's own kernel cannot run on CPU)
    set_dispatch(m, sglang_rt, hooked_to_cuda=True)
    for blk in m.transformer_blocks:
        blk.attn.use_fused_qkv_epilogue = True
    out = run_tiny(m, tiny_inputs(m, sglang_rt, dtype))
    assert rel_err(out, ref) < TOL[dtype]
    s = plugin.stats()
    assert {k: v["handled"] for k, v in s.items()} == {
        "ln_select01": 2, "res_ln_select01": 2, "norm_scale_shift": 2, "res_norm_scale_shift": 2,
        "qkv_epilogue": 0, "qk_norm_rope": 0, "attention": 0}, s
    assert s["qkv_epilogue"]["declined"] == {"op unavailable": 2}
    assert s["qk_norm_rope"]["declined"] == {"op unavailable": 4}  # img + txt per block


def test_rebind_modules_built_before(sglang_rt, plugin):
    """Modules bound to the stock forward_cuda before the hooks: rebind() points them at ours."""
    fsg = sglang_rt.fsg
    op = fsg.FusedLayerNormScaleShiftGateSelect01()
    stock = fsg.FusedLayerNormScaleShiftGateSelect01.forward_cuda.__wrapped__
    op._forward_method = stock.__get__(op)  # as if built before the hooks, on CUDA
    holder = torch.nn.ModuleList([op])
    assert plugin.rebind(holder) == 1
    x = torch.randn(1, 8, 64)
    p = [torch.randn(1, 64) for _ in range(6)]
    idx = torch.zeros(1, 8, dtype=torch.int32)
    y, g = op(x, None, None, *p, idx, 1e-6)
    assert plugin.stats()["ln_select01"]["handled"] == 1
    assert rel_err(y, op.forward_native(x, None, None, *p, idx, 1e-6)[0]) < 1e-5
