"""Ops of Wan-style blocks: modulation with fp32 parameters on bf16/fp16/fp32 activations (strided
views of the [B, 6, C] fp32 table + temb sum, no copies), and qk_norm_rope_across_heads (RMSNorm over
all heads + RoPE, q and k in one launch). CPU reference through the dispatcher, float64 oracle,
diffusers' own expressions, Triton under the interpreter, opcheck, compile, bad inputs, GPU."""
from __future__ import annotations

import pytest
import torch

import fused_dit_ops as fdo
from fused_dit_ops import reference as ref
from helpers import max_ulp_err, max_ulp_err_rowwise, randn, rel_err

ACT = [torch.bfloat16, torch.float16, torch.float32]


def f64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def wan_params(B, C, index, device="cpu"):
    """Six [rows, C] fp32 column views of a [rows, 6, C] sum (rows 2B with an index), as a Wan block
    chunks ``scale_shift_table + temb.float()``."""
    rows = 2 * B if index else B
    table = randn(1, 6, C, device=device) / C ** 0.5
    temb = randn(rows, 6, C, device=device, std=0.3)
    e = table + temb
    return [e[:, j] for j in range(6)]


def token_index(B, L, first, device="cpu"):
    """0 on the first ``first`` tokens (Wan2.2 TI2V: the conditioning frame), 1 elsewhere."""
    return (torch.arange(L, device=device) >= first).to(torch.int32).repeat(B, 1)


def check(out, want, dtype, ulps=None, interpret=False):
    assert out.dtype == dtype and out.shape == want.shape and torch.isfinite(out).all()
    err = rel_err(out, want)
    assert err < (1e-2 if dtype != torch.float32 else 1e-5), err
    if ulps is not None and dtype != torch.float32:
        assert max_ulp_err(out, want) <= ulps + (1 if interpret else 0)


# --- modulation ops with fp32 parameters ------------------------------------------------------------

def _mod_case(op, dtype, B=2, L=13, C=72, index=True, device="cpu"):
    sh, sc, g, csh, csc, cg = wan_params(B, C, index, device)
    x = randn(B, L, C, dtype=dtype, device=device)
    u = randn(B, L, C, dtype=dtype, device=device)
    idx = token_index(B, L, 5, device) if index else None
    if op == "norm_scale_shift":
        return (x, sh, sc, idx, None, None, 1e-6, "layer")
    if op == "gate_residual":
        return (x, u, g, idx)
    if op == "gate_residual_norm_scale_shift":
        return (x, u, g, csh, csc, idx, 1e-6)
    return (x, sh, sc, g, idx)


MOD_OPS = ["norm_scale_shift", "gate_residual", "gate_residual_norm_scale_shift", "scale_shift_gate"]


@pytest.mark.parametrize("op", MOD_OPS)
@pytest.mark.parametrize("dtype", ACT)
@pytest.mark.parametrize("index", [True, False])
def test_fp32_params_cpu_match_oracle(op, dtype, index):
    args = _mod_case(op, dtype, index=index)
    assert args[1 if op != "gate_residual" and op != "gate_residual_norm_scale_shift" else 2].dtype == torch.float32
    outs = getattr(fdo, op)(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if op == "gate_residual_norm_scale_shift":
        wants = ref.gate_residual_norm_scale_shift(*f64(args), residual_dtype=dtype)
    else:
        wants = getattr(ref, op)(*f64(args))
    wants = wants if isinstance(wants, tuple) else (wants,)
    for o, w in zip(outs, wants):
        check(o, w, dtype)


def test_params_are_views_of_the_sum():
    """The parameters the ops take are the [B, 6, C] sum's own column views (row stride 6C)."""
    sh, sc, *_ = wan_params(2, 48, False)
    assert sh.stride() == (6 * 48, 1) and sh.data_ptr() + 48 * 4 == sc.data_ptr()


@pytest.mark.parametrize("dtype", ACT)
def test_equals_wan_block_expressions(dtype):
    """fp32 parameters: the ops compute what WanTransformerBlock writes (fp32 LayerNorm, fp32
    modulation, one cast; fp32 gated residual, one cast)."""
    from diffusers.models.normalization import FP32LayerNorm
    B, L, C = 2, 7, 48
    sh, sc, g, *_ = wan_params(B, C, False)
    x, u = randn(B, L, C, dtype=dtype), randn(B, L, C, dtype=dtype)
    norm1 = FP32LayerNorm(C, 1e-6, elementwise_affine=False)
    want = (norm1(x.float()) * (1 + sc.unsqueeze(1)) + sh.unsqueeze(1)).type_as(x)
    got = fdo.norm_scale_shift(x, sh, sc, None, None, None, 1e-6)
    assert (got.float() - want.float()).abs().max() <= (1e-5 if dtype == torch.float32 else
                                                         2 * torch.finfo(dtype).eps * want.float().abs().max())
    want_r = (x.float() + u * g.unsqueeze(1)).type_as(x)
    got_r = fdo.gate_residual(x, u, g)
    assert torch.equal(got_r, want_r) if dtype == torch.float32 else max_ulp_err(got_r, want_r) <= 1


def test_param_dtype_rule_message():
    x = randn(1, 4, 16, dtype=torch.bfloat16)
    with pytest.raises(fdo.FusedDitInputError, match="parameters must have the activation's dtype or float32"):
        fdo.gate_residual(x, x, randn(1, 16, dtype=torch.float16))


@pytest.mark.parametrize("op", MOD_OPS)
def test_fp32_params_opcheck(op):
    args = _mod_case(op, torch.bfloat16, B=2, L=7, C=48)
    torch.library.opcheck(getattr(torch.ops.fused_dit, op).default, args)


@pytest.mark.interpret
@pytest.mark.parametrize("op", MOD_OPS)
@pytest.mark.parametrize("dtype", ACT)
def test_fp32_params_triton_interpreted(op, dtype):
    from fused_dit_ops.kernels import modulation as k
    args = _mod_case(op, dtype)
    outs = getattr(k, op)(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    wants = (ref.gate_residual_norm_scale_shift(*f64(args), residual_dtype=dtype)
             if op == "gate_residual_norm_scale_shift" else getattr(ref, op)(*f64(args)))
    wants = wants if isinstance(wants, tuple) else (wants,)
    for o, w in zip(outs, wants):
        check(o, w, dtype, interpret=True)


# --- gate_residual_layer_norm ------------------------------------------------------------------------

def _grln_case(dtype, B=2, L=13, C=72, index=True, affine=True, wdtype=torch.float32, device="cpu"):
    _, _, g, *_ = wan_params(B, C, index, device)
    x, u = randn(B, L, 2 * C, dtype=dtype, device=device)[..., :C], randn(B, L, C, dtype=dtype, device=device)
    idx = token_index(B, L, 5, device) if index else None
    w = (1 + 0.2 * randn(C, device=device)).to(wdtype) if affine else None
    b = (0.1 * randn(C, device=device)).to(wdtype) if affine else None
    return (x, u, g, idx, w, b, 1e-6)


@pytest.mark.parametrize("dtype", ACT)
@pytest.mark.parametrize("index,affine", [(True, True), (False, True), (False, False)])
def test_grln_cpu_match_oracle(dtype, index, affine):
    args = _grln_case(dtype, index=index, affine=affine)
    outs = fdo.gate_residual_layer_norm(*args)
    wants = ref.gate_residual_layer_norm(*f64(args), residual_dtype=dtype)
    for o, w in zip(outs, wants):
        check(o, w, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grln_equals_wan_block_expressions(dtype):
    from diffusers.models.normalization import FP32LayerNorm
    x, u, g, _, w, b, eps = _grln_case(dtype, index=False)
    norm2 = FP32LayerNorm(72, eps, elementwise_affine=True)
    with torch.no_grad():
        norm2.weight.copy_(w)
        norm2.bias.copy_(b)
        want_r = (x.float() + u * g.unsqueeze(1)).type_as(x)
        want_y = norm2(want_r.float()).type_as(want_r)
    r, y = fdo.gate_residual_layer_norm(x, u, g, None, norm2.weight, norm2.bias, eps)
    assert torch.equal(r, want_r) if dtype == torch.float32 else max_ulp_err(r, want_r) <= 1
    assert rel_err(y, want_y) < (1e-6 if dtype == torch.float32 else 4e-3)


def test_grln_opcheck_and_bad_inputs():
    torch.library.opcheck(torch.ops.fused_dit.gate_residual_layer_norm.default, _grln_case(torch.bfloat16, L=7))
    args = list(_grln_case(torch.float32))
    args[4] = args[4][:40]
    with pytest.raises(fdo.FusedDitInputError, match="'weight' must have shape \\[C\\] = \\[72\\]"):
        fdo.gate_residual_layer_norm(*args)
    args = list(_grln_case(torch.float32))
    args[2] = args[2][:2]
    with pytest.raises(fdo.FusedDitInputError, match="'gate' has shape"):
        fdo.gate_residual_layer_norm(*args)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", ACT)
@pytest.mark.parametrize("index,affine", [(True, True), (False, False)])
def test_grln_triton_interpreted(dtype, index, affine):
    from fused_dit_ops.kernels import gate_residual_norm as kg
    args = _grln_case(dtype, index=index, affine=affine, wdtype=dtype if not index else torch.float32)
    outs = kg.gate_residual_layer_norm(*args)
    wants = ref.gate_residual_layer_norm(*f64(args), residual_dtype=dtype)
    for o, w in zip(outs, wants):
        check(o, w, dtype, interpret=True)


@pytest.mark.gpu
def test_gpu_grln_real_shape():
    args = _grln_case(torch.bfloat16, B=1, L=2049, C=5120, device="cuda")
    with torch.no_grad():
        outs = fdo.gate_residual_layer_norm(*args)
    cpu = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    wants = ref.gate_residual_layer_norm(*f64(cpu), residual_dtype=torch.bfloat16)
    for o, w in zip(outs, wants):
        check(o.cpu(), w, torch.bfloat16)


# --- qk_norm_rope_across_heads ------------------------------------------------------------------------

def wan_table(L, D):
    """A Wan-like 3D RoPE table [L, D] (cos of D/2 frequencies, then sin) with random angles."""
    ang = torch.rand(L, D // 2, dtype=torch.float64) * 6.28
    return torch.cat([ang.cos(), ang.sin()], -1).float()


def _qk_case(dtype, B=2, L=13, Lk=None, heads=3, D=16, rope=True, packed=True, wdtype=None, device="cpu"):
    C = heads * D
    Lk = L if Lk is None else Lk
    if packed:  # column views of a packed q|k|v projection (token stride 3C)
        q = randn(B, L, 3 * C, dtype=dtype, device=device)[..., :C]
        k = randn(B, Lk, 3 * C, dtype=dtype, device=device)[..., C:2 * C]
    else:
        q, k = randn(B, L, C, dtype=dtype, device=device), randn(B, Lk, C, dtype=dtype, device=device)
    wq = (1 + 0.3 * randn(C, device=device)).to(wdtype or dtype)
    wk = (1 + 0.3 * randn(C, device=device)).to(wdtype or dtype)
    tab = wan_table(max(L, Lk), D).to(device) if rope else None
    return (q, k, wq, wk, tab, heads, 1e-6, True)


@pytest.mark.parametrize("dtype", ACT)
@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("heads,D", [(3, 16), (2, 24)])
def test_qk_cpu_match_oracle(dtype, rope, heads, D):
    args = _qk_case(dtype, heads=heads, D=D, rope=rope, Lk=13 if rope else 7)
    qo, ko = fdo.qk_norm_rope_across_heads(*args)
    wq, wk = ref.qk_norm_rope_across_heads(*f64(args))
    check(qo, wq, dtype)
    check(ko, wk, dtype)
    assert qo.is_contiguous() and ko.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_qk_equals_wan_processor(dtype):
    """Same as WanAttnProcessor's norm_q / norm_k (torch RMSNorm over all heads) and apply_rotary_emb
    with the stock (freqs_cos, freqs_sin) of WanRotaryPosEmbed."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
    from fused_dit_ops.integrations.diffusers_wan import as_rope_tables
    heads, D, B = 3, 24, 1
    C = heads * D
    rope = WanRotaryPosEmbed(D, (1, 2, 2), 32)
    cos, sin = rope(torch.zeros(B, 4, 3, 6, 10))  # 3 x 3 x 5 = 45 tokens
    L = cos.shape[1]
    nq = torch.nn.RMSNorm(C, eps=1e-6).to(dtype)
    nk = torch.nn.RMSNorm(C, eps=1e-6).to(dtype)
    with torch.no_grad():
        nq.weight.copy_(1 + 0.3 * randn(C))
        nk.weight.copy_(1 + 0.3 * randn(C))
    q, k = randn(B, L, C, dtype=dtype), randn(B, L, C, dtype=dtype)

    def stock(x, n):
        x = n(x).unflatten(2, (heads, -1))
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos[..., 0::2], sin[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x1 * c - x2 * s
        out[..., 1::2] = x1 * s + x2 * c
        return out.type_as(x).flatten(2)

    with torch.no_grad():
        qo, ko = fdo.qk_norm_rope_across_heads(q, k, nq.weight, nk.weight, as_rope_tables((cos, sin)), heads, 1e-6)
        wq, wk = stock(q, nq), stock(k, nk)
    for o, w in ((qo, wq), (ko, wk)):
        if dtype == torch.float32:
            assert (o - w).abs().max() < 1e-5
        else:
            assert max_ulp_err(o, w) <= 1


def test_qk_opcheck():
    for rope in (True, False):
        args = _qk_case(torch.bfloat16, L=7, Lk=7 if rope else 5, rope=rope)
        torch.library.opcheck(torch.ops.fused_dit.qk_norm_rope_across_heads.default, args)


def test_qk_compile_dynamic_no_recompile():
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(q, k, wq, wk, tab):
        a, b = fdo.qk_norm_rope_across_heads(q, k, wq, wk, tab, 3, 1e-6)
        return a + 1, b * 2

    cf = torch.compile(f, fullgraph=True, dynamic=True, backend=backend)
    for L in (9, 13, 21):
        args = _qk_case(torch.float32, L=L, packed=False)
        a, b = cf(*args[:5])
        wa, wb = ref.qk_norm_rope_across_heads(*args)
        assert rel_err(a, wa + 1) < 1e-5 and rel_err(b, wb * 2) < 1e-5
    assert len(graphs) == 1  # one graph for three token counts


QK_BAD = [
    (5, lambda a: 5, "'heads' must be a positive divisor of C=48, got 5"),
    (5, lambda a: 16, "head_dim C / heads = 48 / 16 = 3 must be even"),
    (2, lambda a: a[2][:40], "'q_weight' must have shape [C] = [48]"),
    (1, lambda a: randn(2, 13, 24), "'k' [2, 13, 24] must have the batch B and channels C of 'q'"),
    (1, lambda a: a[1].half(), "'k' has dtype float16 but 'q' has float32"),
    (4, lambda a: a[4].double(), "'cos_sin' must be float32"),
    (4, lambda a: a[4][:5], "'cos_sin' has 5 rows but the stream has 13 tokens"),
    (0, lambda a: randn(2, 13, 96)[..., ::2], "'q' must have a contiguous last dimension"),
    (6, lambda a: 0.0, "'eps' must be > 0"),
]


@pytest.mark.parametrize("pos,make,msg", QK_BAD, ids=[str(i) for i in range(len(QK_BAD))])
def test_qk_bad_inputs(pos, make, msg):
    args = list(_qk_case(torch.float32))
    args[pos] = make(args)
    with pytest.raises(fdo.FusedDitInputError) as e:
        fdo.qk_norm_rope_across_heads(*args)
    assert msg in str(e.value) and str(e.value).startswith("fused_dit.qk_norm_rope_across_heads:")


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", ACT)
@pytest.mark.parametrize("rope,Lk", [(True, 13), (False, 6)])
@pytest.mark.parametrize("heads,D,wdtype", [(3, 16, None), (2, 24, torch.float32)])
def test_qk_triton_interpreted(dtype, rope, Lk, heads, D, wdtype):
    from fused_dit_ops.kernels import qk_norm_across_heads as kq
    args = _qk_case(dtype, Lk=Lk, heads=heads, D=D, rope=rope, wdtype=wdtype)
    qo, ko = kq.qk_norm_rope_across_heads(*args)
    wq, wk = ref.qk_norm_rope_across_heads(*f64(args))
    check(qo, wq, dtype, interpret=True)
    check(ko, wk, dtype, interpret=True)


@pytest.mark.interpret
@pytest.mark.parametrize("heads,D,split", [(5, 8, None), (5, 16, None), (11, 8, None), (3, 16, True),
                                           (5, 8, False)])
@pytest.mark.parametrize("rope", [True, False])
def test_qk_triton_interpreted_two_segments(heads, D, split, rope):
    """Rows held as two power-of-two segments (C 40 = 32 + 8, 80 = 64 + 16, 88 = 64 + 24 masked;
    forced at C 48 = 32 + 16), as C 5120 = 4096 + 1024 is on the GPU, and forced off at C 40."""
    from fused_dit_ops.kernels import qk_norm_across_heads as kq
    C = heads * D
    auto = kq.segments(C)
    assert (auto is not None) == (C in (40, 80, 88)), (C, auto)
    assert kq.segments(5120) == (4096, 1024, False) and kq.segments(3072) is None and kq.segments(1536) is None
    args = _qk_case(torch.bfloat16, Lk=11, heads=heads, D=D, rope=rope)
    qo, ko = kq.qk_norm_rope_across_heads(*args, split=split)
    wq, wk = ref.qk_norm_rope_across_heads(*f64(args))
    check(qo, wq, torch.bfloat16, interpret=True)
    check(ko, wk, torch.bfloat16, interpret=True)
    one_q, one_k = kq.qk_norm_rope_across_heads(*args, split=False)  # the one-tile kernel
    assert max_ulp_err(qo, one_q) <= 1 and max_ulp_err(ko, one_k) <= 1


@pytest.mark.interpret
def test_qk_triton_interpreted_half_split():
    from fused_dit_ops.kernels import qk_norm_across_heads as kq
    C, D = 48, 16
    q, k = randn(1, 9, C), randn(1, 9, C)
    w = 1 + 0.2 * randn(C)
    tab = wan_table(9, 8)  # R = 8 < D: the last 8 dims of each head pass through (normalised)
    qo, ko = kq.qk_norm_rope_across_heads(q, k, w, w, tab, 3, 1e-6, False)
    wq, wk = ref.qk_norm_rope_across_heads(q, k, w, w, tab, 3, 1e-6, False)
    assert rel_err(qo, wq) < 1e-6 and rel_err(ko, wk) < 1e-6


# --- GPU ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("rope", [True, False])
def test_gpu_qk_two_segments_match_one_tile(rope):
    """C 5120 (Wan 14B): the two-segment row (the default there) against the one-tile kernel."""
    from fused_dit_ops.kernels import qk_norm_across_heads as kq
    args = _qk_case(torch.bfloat16, B=2, L=777, Lk=512, heads=40, D=128, rope=rope, device="cuda")
    assert kq.segments(5120) == (4096, 1024, False)
    two = kq.qk_norm_rope_across_heads(*args)
    one = kq.qk_norm_rope_across_heads(*args, split=False)
    for a, b in zip(two, one):  # the mean square summed in another order: an ulp of the norm at most
        assert (max_ulp_err_rowwise(a, b, 128) <= 2) if rope else (max_ulp_err(a, b) <= 1)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [40, 12, 24])
def test_gpu_qk_real_shapes(heads):
    args = _qk_case(torch.bfloat16, B=1, L=1560, heads=heads, D=128, device="cuda")
    qo, ko = fdo.qk_norm_rope_across_heads(*args)
    cpu = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    wq, wk = ref.qk_norm_rope_across_heads(*f64(cpu))
    # RoPE cancels (x1 cos - x2 sin): last places at the head row's magnitude (max_ulp_err_rowwise)
    for out, want in ((qo, wq), (ko, wk)):
        check(out.cpu(), want, torch.bfloat16)
        assert max_ulp_err_rowwise(out.cpu(), want, 128) <= 2
    # cross-attention shape: q over the video tokens, k over 512 text tokens, no RoPE
    args = _qk_case(torch.bfloat16, B=2, L=1031, Lk=512, heads=heads, D=128, rope=False, device="cuda")
    qo, ko = fdo.qk_norm_rope_across_heads(*args)
    cpu = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    wq, wk = ref.qk_norm_rope_across_heads(*f64(cpu))
    for out, want in ((qo, wq), (ko, wk)):
        check(out.cpu(), want, torch.bfloat16)
        assert max_ulp_err_rowwise(out.cpu(), want, 128) <= 2


@pytest.mark.gpu
@pytest.mark.parametrize("op", MOD_OPS)
def test_gpu_fp32_params_bf16(op):
    args = _mod_case(op, torch.bfloat16, B=2, L=1031, C=5120, device="cuda")
    with torch.no_grad():
        outs = getattr(fdo, op)(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    cpu = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    wants = (ref.gate_residual_norm_scale_shift(*f64(cpu), residual_dtype=torch.bfloat16)
             if op == "gate_residual_norm_scale_shift" else getattr(ref, op)(*f64(cpu)))
    wants = wants if isinstance(wants, tuple) else (wants,)
    for o, w in zip(outs, wants):
        check(o.cpu(), w, torch.bfloat16)
