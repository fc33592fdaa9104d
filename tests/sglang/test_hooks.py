"""Each hook, on the real SGLang 0.5.23 classes, against SGLang's own forward_native (CPU tensors).

The hooked ``forward_cuda`` is called directly (on a CUDA platform SGLang binds it at construction);
our ops run their CPU implementations. Tolerances (SPEC section 6): fp32 1e-5, bf16 1e-2 relative.
"""
import pytest

pytest.importorskip("sglang.multimodal_gen", reason="sglang not installed: run `bash tools/sglang_env.sh && make test-sglang`")

import torch  # noqa: E402

from tests.helpers import rel_err  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
B, L, C = 2, 24, 64


def _rand(*shape, dtype):
    return (torch.randn(*shape) * 0.7 + 0.1).to(dtype)


def _params(dtype, rows=B):
    return [_rand(rows, C, dtype=dtype) for _ in range(6)]  # scale0 shift0 gate0 scale1 shift1 gate1


def _index():
    idx = torch.zeros(B, L, dtype=torch.int32)
    idx[:, L // 2:] = 1
    idx[1, 3] = 1  # not a clean split either
    return idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [False, True])
def test_ln_select01_matches_native(sglang_rt, plugin, dtype, affine):
    op = sglang_rt.fsg.FusedLayerNormScaleShiftGateSelect01()
    x = _rand(B, L, C, dtype=dtype)
    w = _rand(C, dtype=dtype) if affine else None
    b = _rand(C, dtype=dtype) if affine else None
    args = (x, w, b, *_params(dtype), _index(), 1e-6)
    y, g = op.forward_cuda(*args)
    y_ref, g_ref = op.forward_native(*args)
    assert plugin.stats()["ln_select01"] == {"handled": 1, "declined": {}, "paths": {}}
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype == dtype
    assert rel_err(y, y_ref) < TOL[dtype]
    assert torch.equal(g, g_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_res_ln_select01_fused_and_split_paths(sglang_rt, plugin, dtype):
    ln = sglang_rt.fsg.FusedLayerNormScaleShiftGateSelect01()
    res = sglang_rt.fsg.FusedResidualLayerNormScaleShiftGateSelect01()
    idx = _index()
    x0 = _rand(B, L, C, dtype=dtype)
    _, gate = ln.forward_cuda(x0, None, None, *_params(dtype), idx, 1e-6)  # our gate: fused path next
    x, residual = _rand(B, L, C, dtype=dtype), _rand(B, L, C, dtype=dtype)
    p2 = _params(dtype)
    for residual_gate, path in ((gate, "fused"), (gate.clone(), "split")):
        args = (x, residual, residual_gate, None, None, *p2, idx, 1e-6)
        y, r, g = res.forward_cuda(*args)
        y_ref, r_ref, g_ref = res.forward_native(*args)
        # residual_out: SGLang rounds gate*x then the sum, we round once: <= 1 ulp apart.
        assert rel_err(r, r_ref) < TOL[dtype]
        assert rel_err(y, y_ref) < (TOL[dtype] if dtype == torch.float32 else 2e-2)
        assert torch.equal(g, g_ref)
    s = plugin.stats()["res_ln_select01"]
    assert s == {"handled": 2, "declined": {}, "paths": {"fused": 1, "split": 1}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("param_shape", ["B1C", "BC"])
def test_norm_scale_shift_matches_native(sglang_rt, plugin, dtype, param_shape):
    m = sglang_rt.layernorm.LayerNormScaleShift(C, eps=1e-6, elementwise_affine=False)
    x = _rand(B, L, C, dtype=dtype)
    shape = (B, 1, C) if param_shape == "B1C" else (B, C)
    shift, scale = _rand(*shape, dtype=dtype), _rand(*shape, dtype=dtype)
    y = m.forward_cuda(x, shift, scale)
    y_ref = m.forward_native(x, shift, scale)
    assert plugin.stats()["norm_scale_shift"]["handled"] == 1
    assert y.dtype == y_ref.dtype and rel_err(y, y_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_res_norm_scale_shift_matches_native(sglang_rt, plugin, dtype):
    m = sglang_rt.layernorm.ScaleResidualLayerNormScaleShift(C, eps=1e-6, elementwise_affine=False)
    residual, x = _rand(B, L, C, dtype=dtype), _rand(B, L, C, dtype=dtype)
    gate, shift, scale = (_rand(B, 1, C, dtype=dtype) for _ in range(3))
    y, r = m.forward_cuda(residual, x, gate, shift, scale)
    y_ref, r_ref = m.forward_native(residual, x, gate, shift, scale)
    assert plugin.stats()["res_norm_scale_shift"] == {"handled": 1, "declined": {}, "paths": {}}
    assert rel_err(r, r_ref) < TOL[dtype]
    assert rel_err(y, y_ref) < (TOL[dtype] if dtype == torch.float32 else 2e-2)


# --- declines: SGLang's own code runs, with the original arguments ----------------------------------

def test_norm_scale_shift_declines_to_sglang(sglang_rt, plugin):
    # C = 36: not a multiple of 8 (our op refuses). SGLang's forward_cuda then takes its own
    # native fallback (C % 256 != 0), so the call still succeeds on CPU.
    m = sglang_rt.layernorm.LayerNormScaleShift(36, eps=1e-6)
    x, shift, scale = _rand(B, L, 36, dtype=torch.float32), _rand(B, 1, 36, dtype=torch.float32), _rand(B, 1, 36, dtype=torch.float32)
    with pytest.warns(UserWarning, match="FusedNormScaleShift cuda not available"):
        y = m.forward_cuda(x, shift, scale)
    assert torch.allclose(y, m.forward_native(x, shift, scale))
    s = plugin.stats()["norm_scale_shift"]
    assert s["handled"] == 0 and sum(s["declined"].values()) == 1
    assert "multiple of 8" in next(iter(s["declined"]))


def test_res_norm_scale_shift_declines_int_gate(sglang_rt, plugin):
    m = sglang_rt.layernorm.ScaleResidualLayerNormScaleShift(36, eps=1e-6)
    r, x = _rand(B, L, 36, dtype=torch.float32), _rand(B, L, 36, dtype=torch.float32)
    shift, scale = _rand(B, 1, 36, dtype=torch.float32), _rand(B, 1, 36, dtype=torch.float32)
    with pytest.warns(UserWarning):
        y, ro = m.forward_cuda(r, x, 1, shift, scale)
    y_ref, ro_ref = m.forward_native(r, x, 1, shift, scale)
    assert torch.allclose(y, y_ref) and torch.equal(ro, ro_ref)
    assert list(plugin.stats()["res_norm_scale_shift"]["declined"]) == [
        "unsupported input: fused_dit.gate_residual_norm_scale_shift: int gate 1"]


def test_select01_declines_call_sglang_kernel(sglang_rt, plugin, monkeypatch):
    # Unsupported for us: C not a multiple of 8. SGLang's forward_cuda must then get the call;
    # its Triton kernel is absent on CPU, so record what reaches that module global instead.
    calls = []

    def kernel(x, **kw):
        calls.append((x, kw))
        return "sglang-result"
    monkeypatch.setattr(sglang_rt.fsg, "fuse_layernorm_scale_shift_gate_select01_kernel", kernel, raising=False)
    op = sglang_rt.fsg.FusedLayerNormScaleShiftGateSelect01()
    x = _rand(B, L, 36, dtype=torch.float32)
    params = [_rand(B, 36, dtype=torch.float32) for _ in range(6)]
    out = op.forward_cuda(x, None, None, *params, _index(), 1e-6)
    assert out == "sglang-result" and len(calls) == 1 and calls[0][0] is x
    assert torch.equal(calls[0][1]["gate1"], params[5]) and calls[0][1]["eps"] == 1e-6
    s = plugin.stats()["ln_select01"]
    assert s["handled"] == 0 and sum(s["declined"].values()) == 1


def test_disable_passes_through(sglang_rt, plugin):
    C2 = 256  # SGLang's stock CUDA path (C % 256 == 0): its kernel cannot run on CPU
    m = sglang_rt.layernorm.LayerNormScaleShift(C2, eps=1e-6)
    x, sh, sc = (_rand(B, L, C2, dtype=torch.float32), _rand(B, 1, C2, dtype=torch.float32),
                 _rand(B, 1, C2, dtype=torch.float32))
    plugin.disable()
    with pytest.raises(Exception):  # SGLang's CUDA kernel path: not runnable on CPU
        m.forward_cuda(x, sh, sc)
    assert plugin.stats()["norm_scale_shift"] == {"handled": 0, "declined": {}, "paths": {}}


# --- QK-norm + RoPE (+ joint concat) ----------------------------------------------------------------

def _qk_norm(head_dim, dtype):
    from sglang.multimodal_gen.runtime.layers.layernorm import RMSNorm
    n = RMSNorm(head_dim, eps=1e-6)
    with torch.no_grad():
        n.weight.copy_(torch.randn(head_dim) * 0.3 + 1)
    return n.to(dtype)


def _cache(P, R):
    freqs = torch.randn(P, R // 2) * 3
    return torch.cat([freqs.cos(), freqs.sin()], -1).float().contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_matches_sglang(sglang_rt, plugin, our_ops, dtype):
    ln = sglang_rt.layernorm
    D, H, Lq = 32, 2, 20
    q, k = _rand(B, Lq, H, D, dtype=dtype), _rand(B, Lq, H, D, dtype=dtype)
    qn, kn = _qk_norm(D, dtype), _qk_norm(D, dtype)
    cache = _cache(Lq, D)
    q_ref, k_ref = ln.apply_qk_norm_with_optional_rope.__wrapped__(
        q.clone(), k.clone(), qn, kn, D, cache, is_neox=False)
    q_out, k_out = ln.apply_qk_norm_with_optional_rope(q.clone(), k.clone(), qn, kn, D, cache, is_neox=False)
    assert plugin.stats()["qk_norm_rope"]["handled"] == 1, our_ops
    assert rel_err(q_out, q_ref) < TOL[dtype] and rel_err(k_out, k_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_epilogue_matches_sglang_unfused_path(sglang_rt, plugin, our_ops, dtype):
    """Our epilogue vs SGLang's fallback: per-stream QK-norm+RoPE, then cat([txt, img])."""
    ln = sglang_rt.layernorm
    D, H, Li, Lt = 32, 2, 24, 8
    img = [_rand(1, Li, H, D, dtype=dtype) for _ in range(3)]
    txt = [_rand(1, Lt, H, D, dtype=dtype) for _ in range(3)]
    norms = [_qk_norm(D, dtype) for _ in range(4)]  # img q, img k, txt q, txt k
    img_cache, txt_cache = _cache(Li + 4, D), _cache(Lt + 2, D)
    jq, jk, jv = sglang_rt.qwen_image.try_fused_qwen_qkv_epilogue(
        *img, *txt, *(n.weight for n in norms), img_cache, txt_cache, 1e-6, 1e-6)
    assert plugin.stats()["qkv_epilogue"] == {"handled": 1, "declined": {}, "paths": {}}, our_ops
    plain = ln.apply_qk_norm_with_optional_rope.__wrapped__
    iq, ik = plain(img[0].clone(), img[1].clone(), norms[0], norms[1], D, img_cache, is_neox=False)
    tq, tk = plain(txt[0].clone(), txt[1].clone(), norms[2], norms[3], D, txt_cache, is_neox=False)
    assert rel_err(jq, torch.cat([tq, iq], 1)) < TOL[dtype]
    assert rel_err(jk, torch.cat([tk, ik], 1)) < TOL[dtype]
    assert torch.equal(jv, torch.cat([txt[2], img[2]], 1))


def test_rope_hooks_decline_while_op_missing(sglang_rt, plugin, no_new_ops):
    ln = sglang_rt.layernorm
    D = 32
    q, k = _rand(B, 8, 2, D, dtype=torch.float32), _rand(B, 8, 2, D, dtype=torch.float32)
    qn, kn = _qk_norm(D, torch.float32), _qk_norm(D, torch.float32)
    cache = _cache(8, D)
    out = ln.apply_qk_norm_with_optional_rope(q.clone(), k.clone(), qn, kn, D, cache)
    ref = ln.apply_qk_norm_with_optional_rope.__wrapped__(q.clone(), k.clone(), qn, kn, D, cache)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    # On CPU SGLang's own epilogue returns None (its caller then takes the unfused path).
    w = torch.ones(D)
    assert sglang_rt.qwen_image.try_fused_qwen_qkv_epilogue(
        q[:1], k[:1], k[:1], q[:1], k[:1], k[:1], w, w, w, w, cache, cache, 1e-6, 1e-6) is None
    st = plugin.stats()
    assert st["qk_norm_rope"]["declined"] == {"op unavailable": 1}
    assert st["qkv_epilogue"]["declined"] == {"op unavailable": 1}


# --- attention (FlashAttention backend impl) ----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_fa_attention_matches_sdpa_impl(sglang_rt, plugin, our_ops, dtype, causal):
    H, D, S = 2, 32, 40
    fa = sglang_rt.flash_attn.FlashAttentionImpl(num_heads=H, head_size=D, causal=causal, softmax_scale=D ** -0.5)
    sd = sglang_rt.sdpa.SDPAImpl(num_heads=H, head_size=D, causal=causal, softmax_scale=D ** -0.5)
    q, k, v = (_rand(B, S, H, D, dtype=dtype) for _ in range(3))
    from sglang.multimodal_gen.runtime.managers.forward_context import set_forward_context
    with set_forward_context(current_timestep=0, attn_metadata=None):
        out = fa.forward(q, k, v, None)
        ref = sd.forward(q.float(), k.float(), v.float(), None)
    assert plugin.stats()["attention"] == {"handled": 1, "declined": {}, "paths": {}}, our_ops
    assert out.shape == (B, S, H, D) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


def test_fa_attention_declines_lse_and_missing_op(sglang_rt, plugin, monkeypatch, no_new_ops):
    calls = []

    def fa_kernel(**kw):
        calls.append(kw)
        return "sglang-fa"
    monkeypatch.setattr(sglang_rt.flash_attn, "flash_attn_varlen_func", fa_kernel)
    fa = sglang_rt.flash_attn.FlashAttentionImpl(num_heads=2, head_size=32, causal=False, softmax_scale=0.2)
    q = _rand(1, 8, 2, 32, dtype=torch.float32)
    from sglang.multimodal_gen.runtime.managers.forward_context import set_forward_context
    with set_forward_context(current_timestep=0, attn_metadata=None):
        assert fa.forward(q, q, q, None) == "sglang-fa"
    assert calls[0]["softmax_scale"] == 0.2 and calls[0]["q"] is q
    assert plugin.stats()["attention"]["declined"] == {"op unavailable": 1}
