"""``patch(model, precision="fp8")`` for single-stream and self + cross attention blocks.

The same principles as the double-stream blocks (:mod:`.fp8`): the block Linears below run as
``fused_dit.fp8_linear`` (``torch._scaled_mm`` with row-wise scales on CUDA), each input quantised by
the op that produces it, weights quantised per output channel at patch time into non-persistent
buffers (``_fused_dit_fp8_*``), bf16 weights offloaded to pinned CPU memory on CUDA while patched;
every GEMM takes ``fast_accum`` from the state (``fp8_fast_accum``).

Single-stream blocks (Flux.1, FLUX.2; ``single_stream.py``), two GEMMs per block:

- q|k|v|MLP input (one packed [3D + F, C] weight, or the model's own q|k|v|MLP Linear) reads
  ``norm_scale_shift_fp8`` (or the previous single block's look-ahead
  ``gate_residual_norm_scale_shift_fp8``);
- the output projection reads [attention | act(MLP)] (width D + F): ``quantize_fp8_cat`` applies the
  activation (GELU-tanh, or SwiGLU) to the MLP columns and quantises each token row once, no cat.

Self + cross attention blocks (Wan; ``self_cross.py``), six GEMMs per block:

- self-attention q|k|v (packed) reads ``norm_scale_shift_fp8`` with the fp32 modulation parameters
  (or the previous block's look-ahead ``gate_residual_norm_scale_shift_fp8``);
- self-attention output projection: ``quantize_fp8`` of the attention output;
- cross-attention q reads ``gate_residual_layer_norm_fp8`` (gated residual + affine norm2, one pass;
  with norm2 = Identity: ``gate_residual`` then ``quantize_fp8``);
- cross-attention output projection: ``quantize_fp8`` of the attention output (I2V: of the sum of the
  text and image-context attentions);
- MLP fc1 reads ``gate_residual_norm_scale_shift_fp8`` (residual + norm3 + modulation); fc2 reads
  ``quantize_fp8(h, fc1.bias, "gelu_tanh")``.

The cross-attention K/V projections of the text (512 tokens) and the I2V image-context K/V stay in
the model dtype. Anything a block cannot take (Linears that are not plain ``nn.Linear`` or have
in/out features that are not multiples of 16, a non-GELU-tanh MLP) leaves that block on the model
dtype fused path with the reason in ``report.stock``.
"""
from __future__ import annotations

import torch

from ..ops import _eager
from . import engine as E
from . import self_cross as SC
from . import single_stream as SS
from .fp8_weights import PREFIX, _buf, _links, ready
from ..ops.fp8 import quantize_weight

SINGLE_KEY = "single_qkvm_w"  # the buffer whose presence marks a single-stream block as quantised
SELF_CROSS_KEY = "self_qkv_w"


# --- patch time -----------------------------------------------------------------------------------

def _check_linears(gemms):
    for name, ms, _ in gemms:
        for m in ms:
            if not E.plain_linear(m):
                return f"{name}: not a plain nn.Linear (LoRA, hooks, quantised weights)"
            if m.in_features % 16 or m.out_features % 16:
                return (f"{name}: in/out features {m.in_features}/{m.out_features} not multiples of 16 "
                        "(torch._scaled_mm)")
        if len({m.weight.dtype for m in ms}) != 1 or len({m.in_features for m in ms}) != 1:
            return f"{name}: mixed dtypes or input sizes"
    return None


def single_plan(block, fam):
    """[(buffer name, [Linears], packed bias?)] of a single-stream block, or a reason string."""
    sg = fam.single
    attn = getattr(block, fam.attn)
    if sg.qkv_mlp is not None:
        gemms = [("single_qkvm", [E.get(block, sg.qkv_mlp)], True), ("single_out", [E.get(block, sg.out)], False)]
    else:
        lins = [E.get(attn, p) for p in (sg.q, sg.k, sg.v)] + [E.get(block, sg.mlp_in)]
        gemms = [("single_qkvm", lins, True), ("single_out", [E.get(block, sg.out)], False)]
    if sg.mlp_act not in ("gelu_tanh", "swiglu"):
        return f"single-stream MLP activation {sg.mlp_act!r} (FP8 takes gelu_tanh, swiglu)"
    return _check_linears(gemms) or gemms


def self_cross_plan(block, fam):
    """[(buffer name, [Linears], packed bias?)] of a self + cross attention block, or a reason string."""
    sc = fam.self_cross
    a1, a2 = E.get(block, sc.self_attn), E.get(block, sc.cross_attn)
    outs = []
    for a, n in ((a1, sc.self_attn), (a2, sc.cross_attn)):
        mods = E.children(E.get(a, sc.out))
        if not mods or not all(E.skippable_dropout(m) for m in mods[1:]):
            return f"{n}.{sc.out}: modules after the output projection that are not inactive Dropout"
        outs.append(mods[0])
    ff = E.get(block, sc.mlp)
    net = getattr(ff, "_modules", {}).get("net")
    mods = E.children(net) if net is not None else []
    from diffusers.models.activations import GELU
    if (len(mods) not in (3, 4) or type(mods[0]) is not GELU or mods[0].approximate != "tanh"
            or not E.skippable_dropout(mods[1]) or (len(mods) == 4 and not E.skippable_dropout(mods[3]))):
        return f"{sc.mlp} is not FeedForward(GELU-tanh proj, Dropout, Linear[, Dropout])"
    fc1, fc2 = mods[0]._modules.get("proj"), mods[2]
    if fc1 is None or fc1.bias is None:
        return f"{sc.mlp}: the GELU projection has no bias (the fused GELU + quantisation adds it)"
    gemms = [("self_qkv", [E.get(a1, p) for p in (sc.q, sc.k, sc.v)], True), ("self_out", [outs[0]], False),
             ("cross_q", [E.get(a2, sc.q)], False), ("cross_out", [outs[1]], False),
             ("fc1", [fc1], False), ("fc2", [fc2], False)]
    return _check_linears(gemms) or gemms


_PLANS = {"single": (single_plan, "single-stream blocks: q|k|v|MLP input and output projection ([attention | "
                                  "activated MLP] quantised in one pass)"),
          "self_cross": (self_cross_plan, "self + cross attention blocks: self-attention q|k|v and output, "
                                          "cross-attention q and output, MLP fc1/fc2 (text K/V in the model "
                                          "dtype)")}


@torch.no_grad()
def patch_blocks(st, f8, by_kind, report):
    """Quantise the planned Linears of each block of ``by_kind`` ({kind: blocks}) into ``f8``."""
    for kind, blocks in by_kind.items():
        plan, what = _PLANS[kind]
        skipped, n = {}, 0
        for block in blocks:
            gemms = plan(block, st.family)
            if isinstance(gemms, str):
                skipped[gemms] = skipped.get(gemms, 0) + 1
                continue
            rec = []
            for name, ms, packed_bias in gemms:
                w = torch.cat([m.weight.detach() for m in ms], 0) if len(ms) > 1 else ms[0].weight.detach()
                wq, ws = quantize_weight(w)
                block.register_buffer(f"{PREFIX}{name}_w", wq, persistent=False)
                block.register_buffer(f"{PREFIX}{name}_s", ws, persistent=False)
                if packed_bias:
                    has = any(m.bias is not None for m in ms)
                    bs = [m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in ms]
                    block.register_buffer(f"{PREFIX}{name}_b", torch.cat(bs, 0) if has else None, persistent=False)
                rec += [(m, m.weight, E.version_of(m.weight), m.bias,
                         E.version_of(m.bias) if m.bias is not None else 0) for m in ms]
            f8.blocks[id(block)] = (_links(block, [r[0] for r in rec]), rec)
            n += 1
        for why, k in skipped.items():
            report.stock[f"fp8 {kind} ({k} blocks)"] = f"{why}: model dtype GEMMs"
        if n:
            report.swapped.append(f"FP8 e4m3 GEMMs of the {what} ({n} blocks)")


# --- single-stream forward --------------------------------------------------------------------------

def _as_fp8(out):
    """A look-ahead output: an FP8 pair as is; a model-dtype tensor (left by a block on the bf16 path)
    quantised here."""
    return out if isinstance(out, tuple) else _eager.quantize_fp8(out)


def single_usable(block, st, x) -> bool:
    fam = st.family
    attn = getattr(block, fam.attn)
    return (not st.mode_stock and st.modulation and E.no_hooks(attn) and E.no_global_hooks()
            and type(attn.processor) in fam.stock_processors() and ready(block, st, x, SINGLE_KEY))


def run_single(block, st, x, Lt, temb, rot):
    """:func:`.single_stream.run_joint` with FP8 GEMMs: the joint [B, L, C] sequence -> its output."""
    fam, sg = st.family, st.family.single
    compiling = torch.compiler.is_compiling()
    tables = st.rope_tables(rot)
    E.cp_check_rows(st, tables, x.shape[1])
    order = sg.chunk_order()
    pre = st.take_prenorm(block, x, temb) if not compiling and st.prenorm is not None else None
    mod = pre.mods[0] if pre is not None else SS._mod_params(block, st, temb)
    shift, scale, gate = SS._params(mod, order)
    dtype = x.dtype
    if pre is not None:
        xq, xs = _as_fp8(pre.outs[0])
    else:
        xq, xs = _eager.norm_scale_shift_fp8(x, shift, scale, None, E.get(block, sg.norm).eps, fam.norm)
    attn = getattr(block, fam.attn)
    D = attn.inner_dim
    hd = D // attn.heads
    fa = st.fp8.fast_accum
    y = _eager.fp8_linear_unchecked(xq, xs, _buf(block, "single_qkvm_w"), _buf(block, "single_qkvm_s"),
                                    _buf(block, "single_qkvm_b"), dtype, fast_accum=fa)
    q, k, v = (y[..., j * D:(j + 1) * D].unflatten(-1, (-1, hd)) for j in range(3))
    o = SS.attend(st, attn, q, k, v, Lt, tables)
    # [attention | act(MLP)]: one row per token over both, the activation on the MLP columns
    oq, osc = _eager.quantize_fp8_cat(o, y[..., 3 * D:], sg.mlp_act)
    out = _eager.fp8_linear_unchecked(oq, osc, _buf(block, "single_out_w"), _buf(block, "single_out_s"),
                                      E.get(block, sg.out).bias, dtype, fast_accum=fa)
    nxt = None
    if not compiling and st.lookahead and dtype != torch.float16 and fam.norm == "layer":
        nxt = SS._lookahead_target(st, block, x)
        if nxt is not None and not single_usable(nxt, st, x):
            nxt = None
    if nxt is not None:
        n_mod = SS._mod_params(nxt, st, temb)
        n_sh, n_sc, _ = SS._params(n_mod, order)
        x, nq, ns = _eager.gate_residual_norm_scale_shift_fp8(x, out, gate, n_sh, n_sc, None,
                                                              E.get(nxt, sg.norm).eps)
        st.prenorm = E.Prenorm(nxt, (x, temb), (n_mod,), ((nq, ns),))
    else:
        x = _eager.gate_residual(x, out, gate, None)
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return x


# --- self + cross attention forward -----------------------------------------------------------------

def _norm2_ok(n2) -> bool:
    return type(n2) is torch.nn.Identity or (E.no_hooks(n2) and type(n2).forward in SC._LN_FORWARDS)


def self_cross_usable(block, st, x) -> bool:
    sc = st.family.self_cross
    return (not st.mode_stock and st.modulation and SC._attn_ok(st, E.get(block, sc.self_attn))
            and SC._attn_ok(st, E.get(block, sc.cross_attn)) and _norm2_ok(E.get(block, sc.norm2))
            and ready(block, st, x, SELF_CROSS_KEY))


def _proj(block, st, name, q, s, bias, dtype):
    return _eager.fp8_linear_unchecked(q, s, _buf(block, f"{name}_w"), _buf(block, f"{name}_s"), bias, dtype,
                                       fast_accum=st.fp8.fast_accum)


def _out_linear(attn, sc):
    return E.children(E.get(attn, sc.out))[0]


def run_self_cross(block, st, x, ctx, temb, rot, index):
    """:func:`.self_cross.run_block` with FP8 GEMMs: x [B, L, C] -> x."""
    sc = st.family.self_cross
    tables = st.rope_tables(rot)
    E.cp_check_rows(st, tables, x.shape[1])
    compiling = torch.compiler.is_compiling()
    pre = st.take_prenorm(block, x, temb, index) if not compiling and st.prenorm is not None else None
    e = pre.mods[0] if pre is not None else SC.mod_params(block, sc, temb)
    sh1, sc1, g1, sh2, sc2, g2 = (e[:, j] for j in st.order)
    n1, n2, n3 = E.get(block, sc.norm1), E.get(block, sc.norm2), E.get(block, sc.norm3)
    dtype = x.dtype
    if pre is not None:
        xq, xs = _as_fp8(pre.outs[0])
    else:
        xq, xs = _eager.norm_scale_shift_fp8(x, sh1, sc1, index, n1.eps, "layer")
    # self-attention
    a1 = E.get(block, sc.self_attn)
    C, H = a1.inner_dim, a1.heads
    qkv = _proj(block, st, "self_qkv", xq, xs, _buf(block, "self_qkv_b"), dtype)
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    q, k = SC._qk_norm(st, a1, sc, q, k, tables, "self-attention")
    o = SC._attend(st, a1, q.unflatten(-1, (H, -1)), k.unflatten(-1, (H, -1)), v.unflatten(-1, (H, -1)),
                   parallel=True).flatten(2, 3).to(dtype)
    a = _proj(block, st, "self_out", *_eager.quantize_fp8(o), _out_linear(a1, sc).bias, dtype)
    # gated residual + norm2, quantised for the cross-attention q
    if type(n2) is torch.nn.Identity:
        x = _eager.gate_residual(x, a, g1, index)
        xq2, xs2 = _eager.quantize_fp8(x)
    else:
        x, xq2, xs2 = _eager.gate_residual_layer_norm_fp8(x, a, g1, index, n2.weight, n2.bias, n2.eps)
    # cross-attention: q in FP8, the context's K/V in the model dtype
    a2 = E.get(block, sc.cross_attn)
    Hc = a2.heads
    add_k = E.get(a2, sc.added_k) if sc.added_k else None
    img = None
    if add_k is not None:
        n_img = ctx.shape[1] - sc.text_len
        img, ctx = ctx[:, :n_img], ctx[:, n_img:]
    q = _proj(block, st, "cross_q", xq2, xs2, E.get(a2, sc.q).bias, dtype)
    k = E.call_linear(E.get(a2, sc.k), ctx)
    v = E.call_linear(E.get(a2, sc.v), ctx)
    q, k = SC._qk_norm(st, a2, sc, q, k, None, "cross-attention")
    q4 = q.unflatten(-1, (Hc, -1))
    o = SC._attend(st, a2, q4, k.unflatten(-1, (Hc, -1)), v.unflatten(-1, (Hc, -1))).flatten(2, 3).to(dtype)
    if img is not None:
        ki = E.get(a2, sc.added_k_norm)(E.call_linear(add_k, img))
        vi = E.call_linear(E.get(a2, sc.added_v), img)
        o = o + SC._attend(st, a2, q4, ki.unflatten(-1, (Hc, -1)), vi.unflatten(-1, (Hc, -1))).flatten(2, 3).to(dtype)
    a = _proj(block, st, "cross_out", *_eager.quantize_fp8(o), _out_linear(a2, sc).bias, dtype)
    # plain residual + norm3 + modulation, quantised for fc1
    x, xq3, xs3 = _eager.gate_residual_norm_scale_shift_fp8(x, a, SC._ones_gate(x, sh2.shape[0]), sh2, sc2, index,
                                                            n3.eps)
    fc1 = E.children(E.get(block, sc.mlp).net)[0].proj
    h = _proj(block, st, "fc1", xq3, xs3, None, dtype)
    hq, hs = _eager.quantize_fp8(h, fc1.bias, "gelu_tanh")
    y = _proj(block, st, "fc2", hq, hs, E.children(E.get(block, sc.mlp).net)[2].bias, dtype)
    nxt = SC._lookahead_target(st, block, x) if not compiling and st.lookahead else None
    if nxt is not None and not self_cross_usable(nxt, st, x):
        nxt = None
    if nxt is None:
        return _eager.gate_residual(x, y, g2, index)
    ne = SC.mod_params(nxt, sc, temb)
    o_ = st.order
    x, nq, ns = _eager.gate_residual_norm_scale_shift_fp8(x, y, g2, ne[:, o_[0]], ne[:, o_[1]], index,
                                                          E.get(nxt, sc.norm1).eps)
    st.prenorm = E.Prenorm(nxt, (x, temb, index), (ne,), ((nq, ns),))
    return x
