"""Each hook, on the real SGLang 0.5.23 classes, against SGLang's own forward_native, on CPU and CUDA tensors.

The hooked ``forward_cuda`` is called directly (on a CUDA platform SGLang binds it at construction).
For ``cpu`` our ops run their CPU implementations on small shapes; for ``cuda`` (marked ``gpu``) our
Triton kernels run at Qwen-Image sizes (hidden 3072, 1024 tokens with a zero_cond_t index, 24 heads
of 128) in fp32, bf16 and fp16. The reference is always SGLang's pure-torch path of the same layer
on the same tensors (``forward_native``; for QK-norm/RoPE its unfused native path; for attention its
``SDPAImpl`` in fp32). Every handled call is checked twice: the plugin's counter, and a dispatcher
record showing that ``torch.ops.fused_dit.<op>`` ran on the tensors' device.

Not exercised on CUDA: SGLang's stock CUDA kernels that need ``sgl_kernel`` (sglang-kernel), the
CuTe DSL (nvidia-cutlass-dsl) or FA3/FA4; the decline tests keep to SGLang fall-backs that need none.
Tolerances: relative Frobenius error, ``TOL`` / ``TOL_AFTER_RESIDUAL`` in conftest.
"""
import pytest

from tests.sglang.conftest import (TOL, TOL_AFTER_RESIDUAL, DEVICES, device_dtype_params,
                                   record_fused_dit_ops, sglang_native_qk_norm_rope, skip_without_sglang)

skip_without_sglang()

import torch  # noqa: E402

from tests.helpers import rel_err  # noqa: E402

# (B, L, C): small on CPU; Qwen-Image sizes on CUDA (C = 24 heads x 128).
SIZES = {"cpu": (2, 24, 64), "cuda": (2, 1024, 3072)}
# (H, D, L) for QK-norm / RoPE and attention; (H, D, L_img, L_txt) for the QKV epilogue.
QK = {"cpu": (2, 32, 20), "cuda": (24, 128, 1024)}
ATTN = {"cpu": (2, 32, 40), "cuda": (24, 128, 1024)}
EPI = {"cpu": (2, 32, 24, 8), "cuda": (24, 128, 1024, 256)}
DD = device_dtype_params()


def _rand(*shape, dtype, device="cpu"):
    return (torch.randn(*shape, device=device) * 0.7 + 0.1).to(dtype)


def _params(dtype, B, C, device="cpu"):
    return [_rand(B, C, dtype=dtype, device=device) for _ in range(6)]  # scale0 shift0 gate0 scale1 shift1 gate1


def _index(B, L, device="cpu"):
    """zero_cond_t: first half of the tokens use parameter set 0, the rest set 1 (plus a stray)."""
    idx = torch.zeros(B, L, dtype=torch.int32)
    idx[:, L // 2:] = 1
    idx[1, 3] = 1  # not a clean split either
    return idx.to(device)


def _ran(calls, op, device, n=1):
    """The dispatcher saw torch.ops.fused_dit.<op> n times, on the tensors' device."""
    assert calls.count((op, device)) == n, calls


@pytest.mark.parametrize("device,dtype", DD)
@pytest.mark.parametrize("affine", [False, True])
def test_ln_select01_matches_native(sglang_rt, plugin, device, dtype, affine, record_property):
    B, L, C = SIZES[device]
    op = sglang_rt.fsg.FusedLayerNormScaleShiftGateSelect01()
    x = _rand(B, L, C, dtype=dtype, device=device)
    w = _rand(C, dtype=dtype, device=device) if affine else None
    b = _rand(C, dtype=dtype, device=device) if affine else None
    args = (x, w, b, *_params(dtype, B, C, device), _index(B, L, device), 1e-6)
    with record_fused_dit_ops() as calls:
        y, g = op.forward_cuda(*args)
    y_ref, g_ref = op.forward_native(*args)
    assert plugin.stats()["ln_select01"] == {"handled": 1, "declined": {}, "paths": {}}
    _ran(calls, "norm_scale_shift", device)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype == dtype and y.device == x.device
    err = rel_err(y, y_ref)
    record_property("rel_err", err)
    assert err < TOL[dtype]
    assert torch.equal(g, g_ref)


@pytest.mark.parametrize("device,dtype", DD)
def test_res_ln_select01_fused_and_split_paths(sglang_rt, plugin, device, dtype, record_property):
    B, L, C = SIZES[device]
    ln = sglang_rt.fsg.FusedLayerNormScaleShiftGateSelect01()
    res = sglang_rt.fsg.FusedResidualLayerNormScaleShiftGateSelect01()
    idx = _index(B, L, device)
    x0 = _rand(B, L, C, dtype=dtype, device=device)
    # our gate: the fused path next
    _, gate = ln.forward_cuda(x0, None, None, *_params(dtype, B, C, device), idx, 1e-6)
    x, residual = _rand(B, L, C, dtype=dtype, device=device), _rand(B, L, C, dtype=dtype, device=device)
    p2 = _params(dtype, B, C, device)
    for residual_gate, path, our_op in ((gate, "fused", "gate_residual_norm_scale_shift"),
                                        (gate.clone(), "split", "norm_scale_shift")):
        args = (x, residual, residual_gate, None, None, *p2, idx, 1e-6)
        with record_fused_dit_ops() as calls:
            y, r, g = res.forward_cuda(*args)
        _ran(calls, our_op, device)
        y_ref, r_ref, g_ref = res.forward_native(*args)
        # residual_out: SGLang rounds gate*x then the sum, we round once: <= 1 ulp apart.
        e_r, e_y = rel_err(r, r_ref), rel_err(y, y_ref)
        record_property(f"rel_err_residual_{path}", e_r)
        record_property(f"rel_err_y_{path}", e_y)
        assert e_r < TOL[dtype]
        assert e_y < TOL_AFTER_RESIDUAL[dtype]
        assert torch.equal(g, g_ref)
    s = plugin.stats()["res_ln_select01"]
    assert s == {"handled": 2, "declined": {}, "paths": {"fused": 1, "split": 1}}


@pytest.mark.parametrize("device,dtype", DD)
@pytest.mark.parametrize("param_shape", ["B1C", "BC"])
def test_norm_scale_shift_matches_native(sglang_rt, plugin, device, dtype, param_shape, record_property):
    B, L, C = SIZES[device]
    m = sglang_rt.layernorm.LayerNormScaleShift(C, eps=1e-6, elementwise_affine=False).to(device)
    x = _rand(B, L, C, dtype=dtype, device=device)
    shape = (B, 1, C) if param_shape == "B1C" else (B, C)
    shift, scale = _rand(*shape, dtype=dtype, device=device), _rand(*shape, dtype=dtype, device=device)
    with record_fused_dit_ops() as calls:
        y = m.forward_cuda(x, shift, scale)
    y_ref = m.forward_native(x, shift, scale)
    assert plugin.stats()["norm_scale_shift"]["handled"] == 1
    _ran(calls, "norm_scale_shift", device)
    err = rel_err(y, y_ref)
    record_property("rel_err", err)
    assert y.dtype == y_ref.dtype and err < TOL[dtype]


@pytest.mark.parametrize("device,dtype", DD)
def test_res_norm_scale_shift_matches_native(sglang_rt, plugin, device, dtype, record_property):
    B, L, C = SIZES[device]
    m = sglang_rt.layernorm.ScaleResidualLayerNormScaleShift(C, eps=1e-6, elementwise_affine=False).to(device)
    residual, x = _rand(B, L, C, dtype=dtype, device=device), _rand(B, L, C, dtype=dtype, device=device)
    gate, shift, scale = (_rand(B, 1, C, dtype=dtype, device=device) for _ in range(3))
    with record_fused_dit_ops() as calls:
        y, r = m.forward_cuda(residual, x, gate, shift, scale)
    y_ref, r_ref = m.forward_native(residual, x, gate, shift, scale)
    assert plugin.stats()["res_norm_scale_shift"] == {"handled": 1, "declined": {}, "paths": {}}
    _ran(calls, "gate_residual_norm_scale_shift", device)
    e_r, e_y = rel_err(r, r_ref), rel_err(y, y_ref)
    record_property("rel_err_residual", e_r)
    record_property("rel_err_y", e_y)
    assert e_r < TOL[dtype]
    assert e_y < TOL_AFTER_RESIDUAL[dtype]


# --- declines: SGLang's own code runs, with the original arguments ----------------------------------
# On CUDA these reach only SGLang fall-backs that need no sgl_kernel: its forward_native (C = 36 is
# below its fused kernels' C % 256 == 0 rule) or a kernel name replaced by a recorder.

@pytest.mark.parametrize("device", DEVICES)
def test_norm_scale_shift_declines_to_sglang(sglang_rt, plugin, device):
    # C = 36: not a multiple of 8 (our op refuses). SGLang's forward_cuda then takes its own
    # native fallback (C % 256 != 0), so the call still succeeds, on CPU or CUDA tensors.
    m = sglang_rt.layernorm.LayerNormScaleShift(36, eps=1e-6).to(device)
    B, L = 2, 24
    x, shift, scale = (_rand(B, L, 36, dtype=torch.float32, device=device),
                       _rand(B, 1, 36, dtype=torch.float32, device=device),
                       _rand(B, 1, 36, dtype=torch.float32, device=device))
    with pytest.warns(UserWarning, match="FusedNormScaleShift cuda not available"):
        y = m.forward_cuda(x, shift, scale)
    assert torch.allclose(y, m.forward_native(x, shift, scale))
    s = plugin.stats()["norm_scale_shift"]
    assert s["handled"] == 0 and sum(s["declined"].values()) == 1
    assert "multiple of 8" in next(iter(s["declined"]))


@pytest.mark.parametrize("device", DEVICES)
def test_res_norm_scale_shift_declines_int_gate(sglang_rt, plugin, device):
    m = sglang_rt.layernorm.ScaleResidualLayerNormScaleShift(36, eps=1e-6).to(device)
    B, L = 2, 24
    r, x = _rand(B, L, 36, dtype=torch.float32, device=device), _rand(B, L, 36, dtype=torch.float32, device=device)
    shift, scale = (_rand(B, 1, 36, dtype=torch.float32, device=device),
                    _rand(B, 1, 36, dtype=torch.float32, device=device))
    with pytest.warns(UserWarning):
        y, ro = m.forward_cuda(r, x, 1, shift, scale)
    y_ref, ro_ref = m.forward_native(r, x, 1, shift, scale)
    assert torch.allclose(y, y_ref) and torch.equal(ro, ro_ref)
    assert list(plugin.stats()["res_norm_scale_shift"]["declined"]) == [
        "unsupported input: fused_dit.gate_residual_norm_scale_shift: int gate 1"]


@pytest.mark.parametrize("device", DEVICES)
def test_select01_declines_call_sglang_kernel(sglang_rt, plugin, monkeypatch, device):
    # Unsupported for us: C not a multiple of 8. SGLang's forward_cuda must then get the call;
    # record what reaches its kernel's module global (on CPU the kernel is not even imported).
    calls = []

    def kernel(x, **kw):
        calls.append((x, kw))
        return "sglang-result"
    monkeypatch.setattr(sglang_rt.fsg, "fuse_layernorm_scale_shift_gate_select01_kernel", kernel, raising=False)
    op = sglang_rt.fsg.FusedLayerNormScaleShiftGateSelect01()
    B, L = 2, 24
    x = _rand(B, L, 36, dtype=torch.float32, device=device)
    params = [_rand(B, 36, dtype=torch.float32, device=device) for _ in range(6)]
    out = op.forward_cuda(x, None, None, *params, _index(B, L, device), 1e-6)
    assert out == "sglang-result" and len(calls) == 1 and calls[0][0] is x
    assert torch.equal(calls[0][1]["gate1"], params[5]) and calls[0][1]["eps"] == 1e-6
    s = plugin.stats()["ln_select01"]
    assert s["handled"] == 0 and sum(s["declined"].values()) == 1


def test_disable_passes_through(sglang_rt, plugin):
    C2 = 256  # SGLang's stock CUDA path (C % 256 == 0): its kernel cannot run on CPU
    m = sglang_rt.layernorm.LayerNormScaleShift(C2, eps=1e-6)
    x, sh, sc = (_rand(2, 24, C2, dtype=torch.float32), _rand(2, 1, C2, dtype=torch.float32),
                 _rand(2, 1, C2, dtype=torch.float32))
    plugin.disable()
    with pytest.raises(Exception):  # SGLang's CUDA kernel path: not runnable on CPU
        m.forward_cuda(x, sh, sc)
    assert plugin.stats()["norm_scale_shift"] == {"handled": 0, "declined": {}, "paths": {}}


@pytest.mark.parametrize("device", DEVICES)
def test_disable_passes_through_to_sglang_fallback(sglang_rt, plugin, device):
    """Disabled: SGLang's own forward_cuda runs (its warning proves it), on either device."""
    m = sglang_rt.layernorm.LayerNormScaleShift(72, eps=1e-6).to(device)  # C = 72: we would take it
    x, sh, sc = (_rand(2, 24, 72, dtype=torch.float32, device=device),
                 _rand(2, 1, 72, dtype=torch.float32, device=device),
                 _rand(2, 1, 72, dtype=torch.float32, device=device))
    plugin.disable()
    with record_fused_dit_ops() as calls, pytest.warns(UserWarning, match="FusedNormScaleShift cuda not available"):
        y = m.forward_cuda(x, sh, sc)
    assert calls == [] and torch.allclose(y, m.forward_native(x, sh, sc))
    assert plugin.stats()["norm_scale_shift"] == {"handled": 0, "declined": {}, "paths": {}}


# --- QK-norm + RoPE (+ joint concat) ----------------------------------------------------------------

def _qk_norm(head_dim, dtype, device="cpu"):
    from sglang.multimodal_gen.runtime.layers.layernorm import RMSNorm
    n = RMSNorm(head_dim, eps=1e-6)
    with torch.no_grad():
        n.weight.copy_(torch.randn(head_dim) * 0.3 + 1)
    n = n.to(device=device, dtype=dtype)
    n._forward_method = n.forward_native  # SGLang's reference path (on CUDA: no sgl_kernel rmsnorm)
    return n


def _cache(P, R, device="cpu"):
    freqs = torch.randn(P, R // 2) * 3
    return torch.cat([freqs.cos(), freqs.sin()], -1).float().contiguous().to(device)


@pytest.mark.parametrize("device,dtype", DD)
def test_qk_norm_rope_matches_sglang(sglang_rt, plugin, our_ops, monkeypatch, device, dtype, record_property):
    ln = sglang_rt.layernorm
    H, D, Lq = QK[device]
    B = 2
    q, k = _rand(B, Lq, H, D, dtype=dtype, device=device), _rand(B, Lq, H, D, dtype=dtype, device=device)
    qn, kn = _qk_norm(D, dtype, device), _qk_norm(D, dtype, device)
    cache = _cache(Lq, D, device)
    with record_fused_dit_ops() as calls:
        q_out, k_out = ln.apply_qk_norm_with_optional_rope(q.clone(), k.clone(), qn, kn, D, cache, is_neox=False)
    assert plugin.stats()["qk_norm_rope"]["handled"] == 1, our_ops
    _ran(calls, "rope", device)
    q_ref, k_ref = sglang_native_qk_norm_rope(sglang_rt, monkeypatch, q.clone(), k.clone(), qn, kn, D, cache,
                                              is_neox=False)
    e_q, e_k = rel_err(q_out, q_ref), rel_err(k_out, k_ref)
    record_property("rel_err_q", e_q)
    record_property("rel_err_k", e_k)
    assert e_q < TOL[dtype] and e_k < TOL[dtype]


@pytest.mark.parametrize("device,dtype", DD)
def test_qkv_epilogue_matches_sglang_unfused_path(sglang_rt, plugin, our_ops, monkeypatch, device, dtype,
                                                  record_property):
    """Our epilogue vs SGLang's fallback: per-stream QK-norm+RoPE, then cat([txt, img])."""
    H, D, Li, Lt = EPI[device]
    img = [_rand(1, Li, H, D, dtype=dtype, device=device) for _ in range(3)]
    txt = [_rand(1, Lt, H, D, dtype=dtype, device=device) for _ in range(3)]
    norms = [_qk_norm(D, dtype, device) for _ in range(4)]  # img q, img k, txt q, txt k
    img_cache, txt_cache = _cache(Li + 4, D, device), _cache(Lt + 2, D, device)
    with record_fused_dit_ops() as calls:
        jq, jk, jv = sglang_rt.qwen_image.try_fused_qwen_qkv_epilogue(
            *img, *txt, *(n.weight for n in norms), img_cache, txt_cache, 1e-6, 1e-6)
    assert plugin.stats()["qkv_epilogue"] == {"handled": 1, "declined": {}, "paths": {}}, our_ops
    _ran(calls, "rope", device, n=2)
    iq, ik = sglang_native_qk_norm_rope(sglang_rt, monkeypatch, img[0].clone(), img[1].clone(), norms[0],
                                        norms[1], D, img_cache, is_neox=False)
    tq, tk = sglang_native_qk_norm_rope(sglang_rt, monkeypatch, txt[0].clone(), txt[1].clone(), norms[2],
                                        norms[3], D, txt_cache, is_neox=False)
    e_q, e_k = rel_err(jq, torch.cat([tq, iq], 1)), rel_err(jk, torch.cat([tk, ik], 1))
    record_property("rel_err_q", e_q)
    record_property("rel_err_k", e_k)
    assert e_q < TOL[dtype] and e_k < TOL[dtype]
    assert torch.equal(jv, torch.cat([txt[2], img[2]], 1))


@pytest.mark.parametrize("device", DEVICES)
def test_rope_hooks_decline_while_op_missing(sglang_rt, plugin, no_new_ops, device):
    ln = sglang_rt.layernorm
    D = 32
    q, k = _rand(2, 8, 2, D, dtype=torch.float32, device=device), _rand(2, 8, 2, D, dtype=torch.float32, device=device)
    qn, kn = _qk_norm(D, torch.float32, device), _qk_norm(D, torch.float32, device)
    cache = _cache(8, D, device)
    # fp32: SGLang's own path is its unfused torch one on either device (no fused kernel for fp32).
    out = ln.apply_qk_norm_with_optional_rope(q.clone(), k.clone(), qn, kn, D, cache)
    ref = ln.apply_qk_norm_with_optional_rope.__wrapped__(q.clone(), k.clone(), qn, kn, D, cache)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    # SGLang's own epilogue returns None for these inputs (CPU tensors; on CUDA: not bf16 / D != 128),
    # its caller then takes the unfused path.
    w = torch.ones(D, device=device)
    assert sglang_rt.qwen_image.try_fused_qwen_qkv_epilogue(
        q[:1], k[:1], k[:1], q[:1], k[:1], k[:1], w, w, w, w, cache, cache, 1e-6, 1e-6) is None
    st = plugin.stats()
    assert st["qk_norm_rope"]["declined"] == {"op unavailable": 1}
    assert st["qkv_epilogue"]["declined"] == {"op unavailable": 1}


# --- attention (FlashAttention backend impl) ----------------------------------------------------------

@pytest.mark.parametrize("device,dtype", DD)
@pytest.mark.parametrize("causal", [False, True])
def test_fa_attention_matches_sdpa_impl(sglang_rt, plugin, our_ops, device, dtype, causal, record_property):
    H, D, S = ATTN[device]
    B = 2
    fa = sglang_rt.flash_attn.FlashAttentionImpl(num_heads=H, head_size=D, causal=causal, softmax_scale=D ** -0.5)
    sd = sglang_rt.sdpa.SDPAImpl(num_heads=H, head_size=D, causal=causal, softmax_scale=D ** -0.5)
    q, k, v = (_rand(B, S, H, D, dtype=dtype, device=device) for _ in range(3))
    from sglang.multimodal_gen.runtime.managers.forward_context import set_forward_context
    with set_forward_context(current_timestep=0, attn_metadata=None):
        with record_fused_dit_ops() as calls:
            out = fa.forward(q, k, v, None)
        ref = sd.forward(q.float(), k.float(), v.float(), None)
    assert plugin.stats()["attention"] == {"handled": 1, "declined": {}, "paths": {}}, our_ops
    _ran(calls, "attention", device)
    assert out.shape == (B, S, H, D) and out.dtype == dtype and out.device == q.device
    err = rel_err(out, ref)
    record_property("rel_err", err)
    if device == "cuda":
        from fused_dit_ops import attention_dispatch
        record_property("backend", attention_dispatch.select(q, k, v, causal))
    assert err < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_fa_attention_declines_lse_and_missing_op(sglang_rt, plugin, monkeypatch, no_new_ops, device):
    calls = []

    def fa_kernel(**kw):
        calls.append(kw)
        return "sglang-fa"
    monkeypatch.setattr(sglang_rt.flash_attn, "flash_attn_varlen_func", fa_kernel)
    fa = sglang_rt.flash_attn.FlashAttentionImpl(num_heads=2, head_size=32, causal=False, softmax_scale=0.2)
    q = _rand(1, 8, 2, 32, dtype=torch.float32, device=device)
    from sglang.multimodal_gen.runtime.managers.forward_context import set_forward_context
    with set_forward_context(current_timestep=0, attn_metadata=None):
        assert fa.forward(q, q, q, None) == "sglang-fa"
    assert calls[0]["softmax_scale"] == 0.2 and calls[0]["q"] is q
    assert plugin.stats()["attention"]["declined"] == {"op unavailable": 1}


# --- CUDA only: our hooks vs SGLang's own CUDA kernels that need no sgl_kernel ------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_select01_matches_sglang_triton_kernels(sglang_rt, plugin, dtype, record_property):
    """SGLang's stock forward_cuda of both select01 layers is a Triton kernel of its own
    (kernels/ops/diffusion/modulate/scale_shift_triton.py): compare our hooks with it directly."""
    device = "cuda"
    B, L, C = SIZES[device]
    fsg = sglang_rt.fsg
    ln, res = fsg.FusedLayerNormScaleShiftGateSelect01(), fsg.FusedResidualLayerNormScaleShiftGateSelect01()
    idx = _index(B, L, device)
    x = _rand(B, L, C, dtype=dtype, device=device)
    p1, p2 = _params(dtype, B, C, device), _params(dtype, B, C, device)
    stock_ln = fsg.FusedLayerNormScaleShiftGateSelect01.forward_cuda.__wrapped__
    stock_res = fsg.FusedResidualLayerNormScaleShiftGateSelect01.forward_cuda.__wrapped__
    try:
        y_s, g_s = stock_ln(ln, x, None, None, *p1, idx, 1e-6)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"SGLang's own select01 Triton kernel did not run here: {type(e).__name__}: {e}"[:300])
    y, g = ln.forward_cuda(x, None, None, *p1, idx, 1e-6)
    assert plugin.stats()["ln_select01"]["handled"] == 1
    e1 = rel_err(y, y_s)
    record_property("rel_err_ln_vs_sglang_triton", e1)
    assert e1 < TOL[dtype] and torch.equal(g, g_s)
    xr, resid = _rand(B, L, C, dtype=dtype, device=device), _rand(B, L, C, dtype=dtype, device=device)
    try:
        y2_s, r2_s, _ = stock_res(res, xr, resid, g, None, None, *p2, idx, 1e-6)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"SGLang's own residual select01 Triton kernel did not run here: {type(e).__name__}: {e}"[:300])
    y2, r2, _ = res.forward_cuda(xr, resid, g, None, None, *p2, idx, 1e-6)
    assert plugin.stats()["res_ln_select01"]["paths"] == {"fused": 1}
    e_r, e_y = rel_err(r2, r2_s), rel_err(y2, y2_s)
    record_property("rel_err_res_residual_vs_sglang_triton", e_r)
    record_property("rel_err_res_y_vs_sglang_triton", e_y)
    assert e_r < TOL[dtype] and e_y < TOL_AFTER_RESIDUAL[dtype]
