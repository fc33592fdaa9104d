"""Tiny Qwen-Image-Edit-2511 DiT (2 blocks, zero_cond_t): plugin on vs off, exact call counts.

``cpu``: both runs on CPU tensors. ``cuda`` (marked ``gpu``): the plugin-on run is on CUDA tensors
(our Triton kernels behind every hook, SGLang's FlashAttention impl routed to our attention), and
the reference is stock SGLang on CPU tensors in fp32 with the plugin passing through (every
CustomOp on forward_native, SDPA): SGLang's stock CUDA run cannot be the reference on the GPU
machine, since its fused CUDA paths need sgl_kernel / FA3 / JIT kernels that are not there.
"""
import pytest

from tests.sglang.conftest import (DEVICES, build_tiny, device_dtype_params, record_fused_dit_ops, run_tiny,
                                   set_dispatch, skip_without_sglang, tiny_inputs)

skip_without_sglang()

import torch  # noqa: E402

from tests.helpers import rel_err  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}
# CUDA vs an fp32 CPU reference: fp32 GEMMs / reductions in another order (cuBLAS, our kernels).
TOL_CUDA_FP32 = 1e-4


def _baseline(rt, dtype, device="cpu"):
    """Stock SGLang: every CustomOp on forward_native, SDPA attention, plugin passing through."""
    rt.plugin.disable()
    try:
        m = build_tiny(rt, dtype, sdpa_attention=True, device=device)
        set_dispatch(m, rt, hooked_to_cuda=False)
        return run_tiny(m, tiny_inputs(m, rt, dtype, device=device))
    finally:
        rt.plugin._active = True


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_tiny_model_plugin_on_vs_off(sglang_rt, plugin, our_ops, device, dtype, record_property):
    if device == "cpu":
        ref = _baseline(sglang_rt, dtype)
        tol = TOL[dtype]
    else:
        ref = _baseline(sglang_rt, torch.float32)  # stock SGLang, CPU, fp32
        tol = TOL_CUDA_FP32 if dtype == torch.float32 else TOL[dtype]
    plugin.reset_stats()
    m = build_tiny(sglang_rt, dtype, fa_attention=True, device=device)  # FA backend impl (what H100 picks)
    set_dispatch(m, sglang_rt, hooked_to_cuda=True)
    for blk in m.transformer_blocks:
        blk.attn.use_fused_qkv_epilogue = True  # H100 default; False on CPU
    with record_fused_dit_ops() as calls:
        out = run_tiny(m, tiny_inputs(m, sglang_rt, dtype, device=device))
    assert out.shape == ref.shape and out.device.type == device and torch.isfinite(out).all()
    err = rel_err(out.cpu(), ref)
    record_property("rel_err", err)
    if device == "cuda":
        record_property("tf32_matmul", torch.backends.cuda.matmul.allow_tf32)
    assert err < tol, our_ops
    s = plugin.stats()
    handled = {k: v["handled"] for k, v in s.items()}
    assert handled == {"ln_select01": 2, "res_ln_select01": 2, "norm_scale_shift": 2,
                       "res_norm_scale_shift": 2, "qkv_epilogue": 2, "qk_norm_rope": 0,
                       "attention": 2}, (s, our_ops)
    assert s["res_ln_select01"]["paths"] == {"fused": 2}
    assert all(not v["declined"] for v in s.values()), s
    # what reached the dispatcher, per op, all on the model's device
    ran = {}
    for op, dev in calls:
        assert dev == device, calls
        ran[op] = ran.get(op, 0) + 1
    assert ran == {"norm_scale_shift": 2 + 2, "gate_residual_norm_scale_shift": 2 + 2, "rope": 4,
                   "attention": 2}, ran


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_model_declines_while_ops_missing(sglang_rt, plugin, no_new_ops, device):
    """Without RoPE/attention ops: those hooks decline, output unchanged."""
    dtype = torch.float32
    ref = _baseline(sglang_rt, dtype)
    plugin.reset_stats()
    m = build_tiny(sglang_rt, dtype, sdpa_attention=True, device=device)  # SGLang's FA kernel: not here
    set_dispatch(m, sglang_rt, hooked_to_cuda=True)
    for blk in m.transformer_blocks:
        blk.attn.use_fused_qkv_epilogue = True
    out = run_tiny(m, tiny_inputs(m, sglang_rt, dtype, device=device))
    assert rel_err(out.cpu(), ref) < (TOL[dtype] if device == "cpu" else TOL_CUDA_FP32)
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
