"""RoPE, table builders, joint_qkv_cat, qk_norm_rope_cat, joint_qk_norm_rope_.

Tiers: plain (CPU reference impls, tables vs diffusers, opcheck, compile, bad inputs);
``interpret`` (the Triton kernel on CPU tensors); ``gpu`` (real shapes, both RoPE backends, the C++
cat, CUDA graphs, compute-sanitizer).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import fused_dit_ops as fdo
from fused_dit_ops import reference as ref

from helpers import expect_input_error, max_ulp_err, poison_, randn, rel_err

OPS = torch.ops.fused_dit


# --- independent oracles -------------------------------------------------------------------------

def rope_complex64(x, cache, positions=None, interleaved=True):
    """float64 complex-multiply RoPE of x [B, L, H, D] (or [L, H, D]) with an fp32 cos|sin table."""
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(0)
        if positions is not None and positions.dim() == 1:
            positions = positions.unsqueeze(0)
    B, L, H, D = x.shape
    R = cache.shape[1]
    pos = torch.arange(L).unsqueeze(0) if positions is None else positions.long()
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    c = cache.double()[pos]                        # [B|1, L, R]
    f = torch.complex(c[..., : R // 2], c[..., R // 2:]).unsqueeze(2)
    xd = x.double()
    rot = xd[..., :R]
    if interleaved:
        z = torch.complex(rot[..., 0::2], rot[..., 1::2]) * f
        y = torch.stack([z.real, z.imag], -1).flatten(-2)
    else:
        z = torch.complex(rot[..., : R // 2], rot[..., R // 2:]) * f
        y = torch.cat([z.real, z.imag], -1)
    out = torch.cat([y, xd[..., R:]], -1)
    return out[0] if squeeze else out


def random_table(P, R, device="cpu"):
    ang = torch.rand(P, R // 2, dtype=torch.float64) * 6.283
    return torch.cat([ang.cos(), ang.sin()], -1).float().to(device)


def check_close(out, oracle, *, ulps=2.0, rel=1e-2):
    assert rel_err(out, oracle) < rel
    if out.dtype != torch.float32:
        assert max_ulp_err(out, oracle) <= ulps + 1e-9 or _abs_small(out, oracle), max_ulp_err(out, oracle)
    else:
        assert (out.double() - oracle).abs().max().item() < 1e-5


def _pair_ulp_err(out, oracle):
    """Error in ulps of each rotated pair's norm (rotation-invariant): a rotated element near zero
    (cancellation in x0*cos - x1*sin) is judged at the scale of its inputs, not of its value."""
    o64, r64 = out.double(), oracle.double()
    pair = r64.unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True).expand(*r64.shape[:-1], r64.shape[-1] // 2, 2)
    pair = pair.flatten(-2).clamp_min(torch.finfo(out.dtype).tiny)
    ulp = torch.ldexp(torch.ones_like(pair), torch.frexp(pair)[1] - 1) * {torch.bfloat16: 2.0**-7,
                                                                          torch.float16: 2.0**-10}[out.dtype]
    return ((o64 - r64).abs() / ulp).max().item()


def _abs_small(out, oracle):
    # ulp measure blows up near zero: accept absolute error within 2 ulp of the tensor's scale
    ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[out.dtype]
    return ((out.double() - oracle).abs() <= 2 * ulp * oracle.abs().clamp_min(2.0**-6)).all().item()


# --- rope: CPU op --------------------------------------------------------------------------------

@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R", [32, 16])
def test_rope_cpu_strided_slices(interleaved, dtype, R):
    B, L, H, D = 2, 7, 3, 32
    # q, k: token-row slices of packed buffers (token stride 3HD, head stride D) and a padded one
    packed = randn(B, L + 2, 3, H, D, dtype=dtype)
    q = packed[:, 1:L + 1, 0]
    k = randn(B, L, H, D + 8, dtype=dtype)[..., :D]
    q0, k0 = q.clone(), k.clone()
    cache = random_table(L + 5, R)
    rest = packed[:, :, 2].clone()
    fdo.rope(q, k, cache, interleaved=interleaved)
    check_close(q, rope_complex64(q0, cache, None, interleaved))
    check_close(k, rope_complex64(k0, cache, None, interleaved))
    assert torch.equal(packed[:, :, 2], rest)  # neighbours untouched


@pytest.mark.parametrize("pos_shape", ["L", "BL"])
def test_rope_cpu_positions_and_3d(pos_shape):
    B, L, H, D = 2, 6, 2, 16
    cache = random_table(20, D)
    pos = torch.randint(0, 20, (L,) if pos_shape == "L" else (B, L), dtype=torch.int32)
    q, k = randn(B, L, H, D), randn(B, L, H, D)
    q0, k0 = q.clone(), k.clone()
    fdo.rope(q, k, cache, pos)
    check_close(q, rope_complex64(q0, cache, pos))
    check_close(k, rope_complex64(k0, cache, pos))
    q3, k3 = randn(L, H, D), randn(L, H, D)
    q30 = q3.clone()
    p1 = torch.randint(0, 20, (L,))
    fdo.rope(q3, k3, cache, p1)
    check_close(q3, rope_complex64(q30, cache, p1))


# --- tables vs diffusers -----------------------------------------------------------------------

def _qwen_embed():
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope
    return QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)


@pytest.mark.parametrize("shapes,txt", [([(1, 6, 8), (1, 6, 8)], 11), ([(1, 5, 3)], 4), ([(1, 4, 7), (1, 2, 2)], 9)])
def test_qwen_tables_equal_diffusers(shapes, txt):
    img_f, txt_f = _qwen_embed()([shapes], device=torch.device("cpu"), max_txt_seq_len=txt)
    img_t, txt_t = fdo.qwen_image_rope_tables([shapes], txt)
    assert img_t.dtype == torch.float32 and img_t.shape == (sum(f * h * w for f, h, w in shapes), 128)
    # way 1: our table == diffusers' complex freqs converted
    torch.testing.assert_close(img_t, fdo.cos_sin_from_complex(img_f), atol=2e-6, rtol=0)
    torch.testing.assert_close(txt_t, fdo.cos_sin_from_complex(txt_f), atol=2e-6, rtol=0)
    # way 2: table -> complex == diffusers freqs
    R2 = img_t.shape[1] // 2
    torch.testing.assert_close(torch.complex(img_t[:, :R2], img_t[:, R2:]), img_f, atol=2e-6, rtol=0)


def test_qwen_table_rope_matches_apply_rotary_emb_qwen():
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
    shapes, txt = [(1, 4, 6), (1, 4, 6)], 5
    img_f, _ = _qwen_embed()([shapes], device=torch.device("cpu"), max_txt_seq_len=txt)
    img_t, _ = fdo.qwen_image_rope_tables([shapes], txt)
    x = randn(1, img_t.shape[0], 2, 128)
    want = apply_rotary_emb_qwen(x, img_f, use_real=False)
    q, k = x.clone(), x.clone()
    fdo.rope(q, k, img_t, interleaved=True)
    torch.testing.assert_close(q, want, atol=1e-5, rtol=1e-5)


def test_flux_table_equals_diffusers():
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed
    ids = fdo.flux_ids(4, 6, 3).float()
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
    t = fdo.flux_rope_table(ids)
    torch.testing.assert_close(t[:, :64], cos[:, 0::2].float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(t[:, 64:], sin[:, 0::2].float(), atol=1e-6, rtol=0)


# --- joint_qkv_cat ------------------------------------------------------------------------------

def _streams(B, Lt, Li, H, D, dtype, device="cpu", packed_v=True):
    def packed(L):
        qkv = randn(B, L, 3 * H * D, dtype=dtype, device=device)
        return [c.unflatten(-1, (H, D)) for c in qkv.chunk(3, dim=-1)]
    tq, tk, tv = packed(Lt)
    iq, ik, iv = packed(Li)
    if not packed_v:
        tq, tk, tv, iq, ik, iv = (t.contiguous() for t in (tq, tk, tv, iq, ik, iv))
    return tq, tk, tv, iq, ik, iv


@pytest.mark.parametrize("packed", [True, False])
def test_joint_qkv_cat_cpu_bit_exact(packed):
    ins = _streams(2, 3, 5, 2, 16, torch.bfloat16, packed_v=packed)
    outs = fdo.joint_qkv_cat(*ins)
    for o, w in zip(outs, ref.joint_qkv_cat(*ins)):
        assert torch.equal(o, w)
    bufs = tuple(poison_(torch.empty(2, 8, 2, 16, dtype=torch.bfloat16)) for _ in range(3))
    fdo.joint_qkv_cat(*ins, out=bufs)
    for o, w in zip(bufs, outs):
        assert torch.equal(o, w)


# --- qk_norm_rope_cat vs the diffusers chain ------------------------------------------------------

def _diffusers_chain(ins, weights, txt_f, img_f, eps):
    from diffusers.models.normalization import RMSNorm
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
    D = ins[0].shape[-1]
    norms = []
    for w in weights:
        n = RMSNorm(D, eps=eps, elementwise_affine=True)
        n.weight.data = w.clone()
        norms.append(n)
    tq, tk, tv, iq, ik, iv = ins
    with torch.no_grad():
        tq = apply_rotary_emb_qwen(norms[0](tq), txt_f, use_real=False)
        tk = apply_rotary_emb_qwen(norms[1](tk), txt_f, use_real=False)
        iq = apply_rotary_emb_qwen(norms[2](iq), img_f, use_real=False)
        ik = apply_rotary_emb_qwen(norms[3](ik), img_f, use_real=False)
    return torch.cat([tq, iq], 1), torch.cat([tk, ik], 1), torch.cat([tv, iv], 1)


def _qwen_case(B, grid, txt, H, dtype, device="cpu", packed=True):
    shapes = [(1, grid, grid), (1, grid, grid)]
    img_f, txt_f = _qwen_embed()([shapes], device=torch.device("cpu"), max_txt_seq_len=txt)
    img_t, txt_t = fdo.qwen_image_rope_tables([shapes], txt, device=device)
    Li = img_t.shape[0]
    ins = _streams(B, txt, Li, H, 128, dtype, device=device, packed_v=packed)
    ws = [(1 + 0.3 * randn(128)).to(dtype).to(device) for _ in range(4)]
    return ins, ws, txt_t, img_t, txt_f.to(device), img_f.to(device)


def test_qk_norm_rope_cat_cpu_vs_diffusers_chain():
    ins, ws, txt_t, img_t, txt_f, img_f = _qwen_case(1, 4, 5, 2, torch.bfloat16)
    want = _diffusers_chain(ins, ws, txt_f, img_f, 1e-6)
    got = fdo.qk_norm_rope_cat(*ins, *ws, txt_t, img_t, eps=1e-6)
    for g, w in zip(got[:2], want[:2]):
        assert rel_err(g, w.double()) < 1e-2
        assert max_ulp_err(g, w) <= 1.0 or _abs_small(g, w.double())
    assert torch.equal(got[2], want[2])
    # out= variant and the in-place joint variant agree
    bufs = tuple(poison_(torch.empty_like(got[0])) for _ in range(3))
    fdo.qk_norm_rope_cat(*ins, *ws, txt_t, img_t, out=bufs)
    for b, g in zip(bufs, got):
        assert torch.equal(b, g)
    jq, jk, _ = fdo.joint_qkv_cat(*ins)
    fdo.joint_qk_norm_rope_(jq, jk, ins[0].shape[1], *ws, txt_t, img_t)
    assert torch.equal(jq, got[0]) and torch.equal(jk, got[1])


# --- opcheck / compile ---------------------------------------------------------------------------

def _opcheck(op, args, kwargs=None):
    torch.library.opcheck(op, args, kwargs or {},
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_opcheck_cpu():
    B, Lt, Li, H, D = 1, 3, 5, 2, 16
    ins = _streams(B, Lt, Li, H, D, torch.float32)
    ws = [randn(D) for _ in range(4)]
    tt, it = random_table(Lt, D), random_table(Li, D)
    q, k = randn(B, Li, H, D), randn(B, Li, H, D)
    _opcheck(OPS.rope.default, (q, k, random_table(Li, D)))
    _opcheck(OPS.rope.default, (q, k, random_table(9, 8), torch.randint(0, 9, (B, Li))), {"interleaved": False})
    _opcheck(OPS.joint_qkv_cat.default, ins)
    outs = tuple(torch.empty(B, Lt + Li, H, D) for _ in range(3))
    _opcheck(OPS.joint_qkv_cat_out.default, (*ins, *outs))
    _opcheck(OPS.qk_norm_rope_cat.default, (*ins, *ws, tt, it))
    _opcheck(OPS.qk_norm_rope_cat_out.default, (*ins, *ws, tt, it, *outs))
    jq, jk = randn(B, Lt + Li, H, D), randn(B, Lt + Li, H, D)
    _opcheck(OPS.joint_qk_norm_rope_.default, (jq, jk, Lt, *ws, tt, it))


def test_compile_fullgraph_cpu():
    B, Lt, Li, H, D = 1, 3, 5, 2, 16
    ins = _streams(B, Lt, Li, H, D, torch.float32)
    ws = [randn(D) for _ in range(4)]
    tt, it = random_table(Lt, D), random_table(Li, D)

    def f(tq, tk, tv, iq, ik, iv):
        q, k = tq.clone(), tk.clone()
        fdo.rope(q, k, tt)
        a = fdo.qk_norm_rope_cat(tq, tk, tv, iq, ik, iv, *ws, tt, it)
        c = fdo.joint_qkv_cat(q, k, tv, iq, ik, iv)
        return a[0] + c[0], q, a[2]

    eager = f(*ins)
    comp = torch.compile(f, fullgraph=True, backend="aot_eager")(*ins)
    for e, c in zip(eager, comp):
        torch.testing.assert_close(c, e)


# --- bad inputs -----------------------------------------------------------------------------------

_bad = expect_input_error


def test_rope_bad_inputs():
    q, k = randn(1, 4, 2, 16, dtype=torch.bfloat16), randn(1, 4, 2, 16, dtype=torch.bfloat16)
    cache = random_table(4, 16)
    _bad(lambda: fdo.rope(q, k, cache.double()), "cos_sin_cache", "float32")
    _bad(lambda: fdo.rope(q, k, random_table(4, 32)), "cos_sin_cache", "R=32", "head_dim")
    _bad(lambda: fdo.rope(q, k, cache[:, :15]), "cos_sin_cache", "even")
    _bad(lambda: fdo.rope(q[..., :15], k[..., :15], cache[:, :14]), "even")
    _bad(lambda: fdo.rope(q, k.float(), cache), "'k'", "dtype")
    _bad(lambda: fdo.rope(q, randn(1, 4, 3, 16, dtype=torch.bfloat16), cache), "'k'", "shape")
    _bad(lambda: fdo.rope(q, k, cache, torch.tensor([0, 1, 2, 4])), "positions", "[0, 4)")
    _bad(lambda: fdo.rope(q, k, cache, torch.tensor([0, -1, 2, 3])), "positions")
    _bad(lambda: fdo.rope(q, k, cache, torch.zeros(5, dtype=torch.long)), "positions", "[L]")
    _bad(lambda: fdo.rope(q, k, cache, torch.zeros(4)), "positions", "dtype")
    _bad(lambda: fdo.rope(q, k, random_table(3, 16)), "rows")
    _bad(lambda: fdo.rope(q.transpose(-1, -2), k.transpose(-1, -2), random_table(4, 2)), "'q'", "contiguous last")
    _bad(lambda: fdo.rope(q, k, cache, backend="cuda"), "backend")


def test_joint_bad_inputs():
    ins = list(_streams(1, 3, 5, 2, 16, torch.bfloat16))
    ws = [randn(16, dtype=torch.bfloat16) for _ in range(4)]
    tt, it = random_table(3, 16), random_table(5, 16)
    bad = ins.copy(); bad[2] = bad[2].float()
    _bad(lambda: fdo.joint_qkv_cat(*bad), "txt_v", "dtype")
    bad = ins.copy(); bad[4] = randn(1, 5, 3, 16, dtype=torch.bfloat16)
    _bad(lambda: fdo.joint_qkv_cat(*bad), "img_k")
    bad = ins.copy(); bad[3] = bad[3].transpose(-1, -2)
    _bad(lambda: fdo.joint_qkv_cat(*bad), "img_q")
    outs = [torch.empty(1, 7, 2, 16, dtype=torch.bfloat16) for _ in range(3)]
    _bad(lambda: fdo.joint_qkv_cat(*ins, out=outs), "q_out", "shape")
    _bad(lambda: fdo.qk_norm_rope_cat(*ins, *ws, random_table(2, 16), it), "txt_cos_sin", "rows")
    _bad(lambda: fdo.qk_norm_rope_cat(*ins, *ws, tt, random_table(5, 8)), "same width")
    _bad(lambda: fdo.qk_norm_rope_cat(*ins, ws[0][:8], *ws[1:], tt, it), "txt_q_weight")
    _bad(lambda: fdo.qk_norm_rope_cat(*ins, *ws, tt, it, eps=0.0), "eps")
    # one rounding for all four norms (diffusers rounds to each weight's dtype): mixed dtypes refused
    _bad(lambda: fdo.qk_norm_rope_cat(*ins, ws[0].float(), *ws[1:], tt, it), "share one dtype", "'txt_q_weight' float32")
    jq, jk = randn(1, 8, 2, 16), randn(1, 8, 2, 16)
    _bad(lambda: fdo.joint_qk_norm_rope_(jq, jk, 9, *[w.float() for w in ws], tt, it), "txt_len")


# --- interpreter: the Triton kernel on CPU tensors ---------------------------------------------------

@pytest.mark.interpret
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("R,pos", [(32, None), (16, "BL"), (32, "L")])
def test_interp_rope_kernel(interleaved, R, pos):
    from fused_dit_ops.kernels import rope as kr
    B, L, H, D = 2, 5, 3, 32
    dtype = torch.float16
    packed = randn(B, L, 3, H, D, dtype=dtype)
    q, k = packed[:, :, 0], randn(B, L, H, D + 8, dtype=dtype)[..., :D]
    cache = random_table(L + 4, R)
    positions = None if pos is None else torch.randint(0, L + 4, (L,) if pos == "L" else (B, L))
    q0, k0, v0 = q.clone(), k.clone(), packed[:, :, 2].clone()
    kr.rope_(q, k, cache, positions, interleaved)
    check_close(q, rope_complex64(q0, cache, positions, interleaved))
    check_close(k, rope_complex64(k0, cache, positions, interleaved))
    assert torch.equal(packed[:, :, 2], v0)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_interp_qk_norm_rope_cat_vs_diffusers(dtype):
    from fused_dit_ops.kernels import rope as kr
    ins, ws, txt_t, img_t, txt_f, img_f = _qwen_case(2, 2, 3, 3, dtype)
    want = _diffusers_chain(ins, ws, txt_f, img_f, 1e-6)
    outs = tuple(poison_(torch.empty_like(w)) for w in want)
    kr.qk_norm_rope_cat_out(ins[:3], ins[3:], outs, ws, (txt_t, img_t), 1e-6, True)
    # interpreter rounds 16-bit casts toward zero: allow one more ulp (the interpreter's bf16 stores truncate)
    # at each of the chain's three bf16 roundings (norm, * weight, rope); RoPE's cancellations then
    # turn those into large ulp counts on small outputs, so bf16 is held to an absolute bound at the
    # values' scale here (the GPU tier holds bf16 to 1 ulp of the diffusers chain)
    for g, w in zip(outs[:2], want[:2]):
        assert rel_err(g, w.double()) < 1e-2
        if dtype == torch.float16:
            assert max_ulp_err(g, w) <= 1.0 or _abs_small(g, w.double()), max_ulp_err(g, w)
        else:
            err = (g.double() - w.double()).abs()
            assert (err <= 3 * 2.0**-7 * w.double().abs().clamp_min(1.0)).all(), err.max().item()
    assert torch.equal(outs[2], want[2])
    # the in-place joint variant gives the same bits as the out-of-place one
    jq, jk, _ = ref.joint_qkv_cat(*ins)
    kr.joint_qk_norm_rope_(jq, jk, ins[0].shape[1], ws, (txt_t, img_t), 1e-6, True)
    assert torch.equal(jq, outs[0]) and torch.equal(jk, outs[1])


@pytest.mark.interpret
def test_interp_qk_norm_rope_fp32_weights_neox_partial():
    """fp32 weights (no intermediate rounding), half-split pairs, R < D, odd H: vs the reference."""
    from fused_dit_ops.kernels import rope as kr
    B, Lt, Li, H, D, R = 1, 3, 4, 3, 32, 16
    ins = _streams(B, Lt, Li, H, D, torch.float32)
    ws = [randn(D) for _ in range(4)]
    tt, it = random_table(Lt + 2, R), random_table(Li, R)
    want = ref.qk_norm_rope_cat(*[t.double() for t in ins], *[w.double() for w in ws], tt, it, 1e-6, False)
    outs = tuple(poison_(torch.empty(B, Lt + Li, H, D)) for _ in range(3))
    kr.qk_norm_rope_cat_out(ins[:3], ins[3:], outs, ws, (tt, it), 1e-6, False)
    for g, w in zip(outs, want):
        assert (g.double() - w).abs().max().item() < 1e-5


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_interp_joint_cat_kernel_bit_exact(dtype):
    from fused_dit_ops.kernels import rope as kr
    ins = _streams(2, 3, 4, 3, 16, dtype)
    outs = tuple(poison_(torch.empty(2, 7, 3, 16, dtype=dtype)) for _ in range(3))
    kr.joint_qkv_cat_out(ins[:3], ins[3:], outs)
    for o, w in zip(outs, ref.joint_qkv_cat(*ins)):
        assert torch.equal(o, w)


# --- GPU ------------------------------------------------------------------------------------------

def _backends():
    out = ["triton"]
    if fdo.ops.rope.flashinfer_status()[0]:
        out.append("flashinfer")
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
@pytest.mark.parametrize("interleaved", [True, False])
def test_gpu_rope_real_shape(backend, interleaved):
    if backend not in _backends():
        pytest.skip("flashinfer not importable")
    L, H, D = 8192, 24, 128
    cache = random_table(L, D, "cuda")
    # q, k as row slices of a joint buffer (token stride H*D) and of packed QKV (3*H*D)
    joint = randn(1, 208 + L, H, D, dtype=torch.bfloat16, device="cuda")
    q = joint[:, 208:]
    k = randn(1, L, 3 * H, D, dtype=torch.bfloat16, device="cuda")[:, :, H:2 * H]
    q0, k0, head = q.clone(), k.clone(), joint[:, :208].clone()
    fdo.rope(q, k, cache, interleaved=interleaved, backend=backend)
    torch.cuda.synchronize()
    for x, x0 in ((q, q0), (k, k0)):
        want = rope_complex64(x0.cpu(), cache.cpu(), None, interleaved)
        assert rel_err(x.cpu(), want) < 1e-2
        assert max_ulp_err(x.cpu(), want) <= 2.0 or _abs_small(x.cpu(), want)
    assert torch.equal(joint[:, :208], head)


@pytest.mark.gpu
def test_gpu_rope_backends_agree_and_positions():
    L, H, D = 1000, 8, 128
    cache = random_table(4096, D, "cuda")
    pos = torch.randint(0, 4096, (2, L), device="cuda")
    res = []
    x = randn(2, L, H, D, dtype=torch.bfloat16, device="cuda")
    for b in _backends():
        q, k = x.clone(), x.clone()
        fdo.rope(q, k, cache, pos, backend=b)
        res.append(q)
    want = rope_complex64(x.cpu(), cache.cpu(), pos.cpu())
    for r in res:
        assert max_ulp_err(r.cpu(), want) <= 2.0 or _abs_small(r.cpu(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [True, False])
def test_gpu_joint_qkv_cat_bit_exact(packed):
    ins = _streams(1, 208, 8192, 24, 128, torch.bfloat16, device="cuda", packed_v=packed)
    outs = fdo.joint_qkv_cat(*ins)
    for o, w in zip(outs, ref.joint_qkv_cat(*ins)):
        assert torch.equal(o, w)
    bufs = tuple(poison_(torch.empty_like(outs[0])) for _ in range(3))
    fdo.joint_qkv_cat(*ins, out=bufs)
    for b, o in zip(bufs, outs):
        assert torch.equal(b, o)
    # misaligned (odd element offset) inputs take the scalar path
    base = randn(1, 9, 2, 17, dtype=torch.float16, device="cuda")[..., 1:]
    o = fdo.joint_qkv_cat(base[:, :4], base[:, :4], base[:, :4], base[:, 4:], base[:, 4:], base[:, 4:])
    assert torch.equal(o[0], base)


@pytest.mark.gpu
def test_gpu_qk_norm_rope_cat_vs_diffusers_real_shape():
    ins, ws, txt_t, img_t, txt_f, img_f = _qwen_case(1, 64, 208, 24, torch.bfloat16, device="cuda")
    want = _diffusers_chain(ins, ws, txt_f, img_f, 1e-6)
    got = fdo.qk_norm_rope_cat(*ins, *ws, txt_t, img_t)
    for g, w in zip(got[:2], want[:2]):
        assert rel_err(g, w.double()) < 1e-2
        # elementwise ulps blow up where the rotation cancels; judge at each pair's norm
        assert _pair_ulp_err(g, w) <= 2.0, (_pair_ulp_err(g, w), max_ulp_err(g, w), rel_err(g, w.double()))
    assert torch.equal(got[2], want[2])
    jq, jk, jv = fdo.joint_qkv_cat(*ins)
    fdo.joint_qk_norm_rope_(jq, jk, 208, *ws, txt_t, img_t)
    assert torch.equal(jq, got[0]) and torch.equal(jk, got[1])


@pytest.mark.gpu
def test_gpu_cuda_graphs():
    fdo.warmup_rope()
    ins, ws, txt_t, img_t, _, _ = _qwen_case(1, 16, 20, 4, torch.bfloat16, device="cuda")
    q, k = ins[3].clone(), ins[4].clone()
    bufs = tuple(torch.empty(1, 20 + img_t.shape[0], 4, 128, dtype=torch.bfloat16, device="cuda") for _ in range(3))

    def step():
        fdo.rope(q, k, img_t)
        fdo.qk_norm_rope_cat(*ins, *ws, txt_t, img_t, out=bufs)
        return fdo.joint_qkv_cat(*ins)

    q0, k0 = q.clone(), k.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm (compiles)
    torch.cuda.current_stream().wait_stream(s)
    q.copy_(q0); k.copy_(k0)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        cat = step()
    q.copy_(q0); k.copy_(k0)
    g.replay()
    torch.cuda.synchronize()
    qe, ke = q0.clone(), k0.clone()
    fdo.rope(qe, ke, img_t)
    assert torch.equal(q, qe)
    assert torch.equal(bufs[0], fdo.qk_norm_rope_cat(*ins, *ws, txt_t, img_t)[0])
    assert torch.equal(cat[2], torch.cat([ins[2], ins[5]], 1))


@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not on PATH")
def test_gpu_compute_sanitizer_joint_cat():
    code = (
        "import torch, fused_dit_ops as f\n"
        "for dt in (torch.bfloat16, torch.float32):\n"
        "  qkv = torch.randn(1, 300, 3 * 4 * 64, device='cuda').to(dt)\n"
        "  t = [c.unflatten(-1, (4, 64)) for c in qkv.chunk(3, -1)]\n"
        "  x = torch.randn(2, 7, 5, 66, device='cuda').to(dt)[..., 1:65]\n"
        "  f.joint_qkv_cat(t[0][:, :13], t[1][:, :13], t[2][:, :13], t[0][:, 13:], t[1][:, 13:], t[2][:, 13:])\n"
        "  f.joint_qkv_cat(x[:, :3], x[:, :3], x[:, :3], x[:, 3:], x[:, 3:], x[:, 3:])\n"
        "torch.cuda.synchronize()\n"
        "print('ok', f._extension.C_LOADED)\n")
    env = dict(os.environ)
    r = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", sys.executable,
                        "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ERROR SUMMARY: 0 errors" in r.stdout + r.stderr
