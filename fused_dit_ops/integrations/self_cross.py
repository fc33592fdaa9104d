"""Self-attention + cross-attention blocks (one token stream; text enters through cross-attention) on fused ops.

The modulation is a learned per-block table plus the model's projected timestep, summed in fp32
(``table + temb.float()``: [B, 6, C], or [2B, 6, C] with a per-token set index), and the block's
arithmetic around it is fp32 with one rounding per step. Per block, for the family's :class:`SelfCross`
description (eager and torch.compile):

1. the six fp32 parameters: column views of the [rows, 6, C] sum (no copies);
2. norm1 + modulation: ``norm_scale_shift`` with the fp32 parameters (or nothing: the previous
   block did it, look-ahead);
3. self-attention: q|k|v as one GEMM over packed weights (eager), ``qk_norm_rope_across_heads``
   (RMSNorm over all heads + RoPE, q and k in one launch), ``attention`` on the heads views (v a
   column view of the q|k|v output), output projection;
4. ``gate_residual_layer_norm``: x + gate * attn with the fp32 gate (one rounding), and norm2 (an
   affine LayerNorm in fp32) of the result in the same pass (``gate_residual`` alone when norm2 is
   the identity);
5. cross-attention: q from the normed stream, k/v from the text (and, with added K/V projections,
   a second attention over the image context whose output is added); ``qk_norm_rope_across_heads``
   without a table normalises q and the text k in one launch; output projection;
6. the plain residual add fused with norm3 + modulation: ``gate_residual_norm_scale_shift`` with a
   gate of ones (x + 1 * update is the add, one rounding);
7. MLP (GELU-tanh in the fc1 GEMM's epilogue on CUDA), then ``gate_residual`` with the fp32 gate, or
   inside an eager model forward ``gate_residual_norm_scale_shift`` with the *next* block's norm1
   modulation (look-ahead).

Modules that are not bare (hooked or LoRA-wrapped Linears, hooked attention modules or norms, a
non-stock processor set after patching) run as modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import reference as _ref
from ..ops import _eager
from . import engine as E
from .double_stream import fused_mlp


@dataclass(frozen=True)
class SelfCross:
    """Paths inside a self + cross attention block (and inside its attention modules)."""
    self_attn: str = "attn1"
    cross_attn: str = "attn2"
    norm1: str = "norm1"  # LayerNorm, no affine (fp32)
    norm2: str = "norm2"  # before cross-attention: LayerNorm (affine or not) or Identity
    norm3: str = "norm3"  # LayerNorm, no affine (fp32)
    mlp: str = "ffn"
    table: str = "scale_shift_table"  # learned [1, 6, C] added to temb [B, 6, C]
    q: str = "to_q"
    k: str = "to_k"
    v: str = "to_v"
    out: str = "to_out"  # ModuleList(Linear, Dropout)
    q_norm: str = "norm_q"  # RMSNorm over all heads
    k_norm: str = "norm_k"
    added_k: str = "add_k_proj"  # image-context K/V of the cross-attention (None where absent)
    added_v: str = "add_v_proj"
    added_k_norm: str = "norm_added_k"
    text_len: int = 512  # the cross-attention context is [image context | text_len text tokens]


KIND_TAKES = dict(mlp=("gelu_tanh",))


# --- patch time -----------------------------------------------------------------------------------

def _is_layer_norm(m, affine_ok, C):
    return (isinstance(m, torch.nn.LayerNorm) and tuple(m.normalized_shape) == (C,)
            and (affine_ok or getattr(m, "weight", None) is None))


def block_reason(block, fam):
    sc = fam.self_cross
    if sc is None:
        return f"{fam.name}: no self + cross attention description (Family.self_cross)"
    if fam.mlp not in KIND_TAKES["mlp"]:
        return f"{fam.name}: mlp={fam.mlp!r} is not implemented for self + cross attention blocks"
    reason = E.shared_block_reason(block, fam, "self_cross")
    if reason is not None:
        return reason
    a1, a2 = E.get(block, sc.self_attn), E.get(block, sc.cross_attn)
    if a1 is None or a2 is None:
        return f"{sc.self_attn} or {sc.cross_attn} is missing"
    if type(getattr(a2, "processor", None)) not in fam.stock_processors():
        return f"{sc.cross_attn} processor is {type(a2.processor).__name__}, not the stock one"
    for a, n in ((a1, sc.self_attn), (a2, sc.cross_attn)):
        if getattr(a, "fused_projections", False):
            return f"{n} projections fused (fuse_qkv_projections): unfuse them before patching"
        for p in (sc.q_norm, sc.k_norm):
            nm = E.get(a, p)
            if not isinstance(nm, torch.nn.RMSNorm) or nm.weight is None or nm.eps is None:
                return (f"{n}.{p} is not an RMSNorm with a weight and an eps (the fused QK norm is RMSNorm "
                        "over all heads)")
        for p in (sc.q, sc.k, sc.v):
            if not hasattr(E.get(a, p), "out_features"):
                return f"{n}.{p} is missing or not Linear-like"
        if a.inner_dim % a.heads or (a.inner_dim // a.heads) % 2:
            return f"{n}: head_dim {a.inner_dim}/{a.heads} is not an even integer"
    C = a1.inner_dim
    if not (_is_layer_norm(E.get(block, sc.norm1), False, C) and _is_layer_norm(E.get(block, sc.norm3), False, C)):
        return f"{sc.norm1}/{sc.norm3} are not LayerNorms over C without affine parameters"
    n2 = E.get(block, sc.norm2)
    if not (type(n2) is torch.nn.Identity or _is_layer_norm(n2, True, C)):
        return f"{sc.norm2} is neither a LayerNorm over C nor Identity"
    t = getattr(block, sc.table, None)
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (1, 6, C):
        return f"{sc.table} is not a [1, 6, {C}] tensor"
    return None


def patch_blocks(st, blocks, model, sw, backend):
    """Packed self-attention q/k/v weights and look-ahead pairs."""
    fam, report, sc = st.family, st.report, st.family.self_cross
    n = 0
    if sw["pack_qkv"]:
        for block in blocks:
            a = E.get(block, sc.self_attn)
            paths = (sc.q, sc.k, sc.v)
            if E.PackedLinears.packable([E.get(a, p) for p in paths]):
                with torch.no_grad():
                    st.packed_qkv[id(a)] = (E.PackedLinears(a, paths),)
                n += 1
        if n:
            report.swapped.append(f"self-attention q/k/v packed: one GEMM per block ({n} blocks)")
    if n < len(blocks):
        report.stock["pack_qkv"] = (f"{len(blocks) - n} blocks: self-attention q/k/v as module calls"
                                    + ("" if sw["pack_qkv"] else " (pack_qkv=False)"))
    n_img = sum(E.get(E.get(b, sc.cross_attn), sc.added_k) is not None for b in blocks)
    if n_img:
        report.swapped.append(f"cross-attention image context (added K/V): second attention op ({n_img} blocks)")
    if not st.modulation:
        return
    if sw["lookahead"]:
        pairs = 0
        for a, b in zip(blocks, blocks[1:]):
            if _adjacent(model, fam, a, b):
                st.next_block[id(a)] = b
                pairs += 1
        if pairs:
            report.swapped.append(f"block ends fused with the next block's norm1 + modulation ({pairs} block "
                                  "pairs, eager model forward)")
    else:
        report.stock["lookahead"] = "lookahead=False: each block does its own norm1 + modulation"


def _adjacent(model, fam, a, b):
    for attr, _ in fam.block_lists:
        lst = list(getattr(model, attr))
        for x, y in zip(lst, lst[1:]):
            if x is a:
                return y is b
    return False


# --- pieces ---------------------------------------------------------------------------------------

def mod_params(block, sc, temb):
    """[rows, 6, C] fp32: the block's table + temb, as the stock block sums them."""
    return getattr(block, sc.table) + temb.float()


def _sel(p, index):
    """[rows, C] parameter -> per token [B, L or 1, C] (set ``index != 0`` with an index)."""
    return _ref.select_params(p, index)


def _attn_ok(st, attn):
    return E.no_hooks(attn) and E.no_global_hooks() and type(attn.processor) in st.family.stock_processors()


def _attend(st, attn, q, k, v, parallel=False):
    """``parallel``: self-attention over the sequence, which diffusers' context parallelism shards
    (the cross-attention's context is not sharded: each rank attends its own queries to all of it).
    FP8 attention (attention_precision="fp8") is the self-attention's, not under context parallelism
    (``usable`` counts that call: model-dtype attention through diffusers' all-to-all / ring)."""
    if parallel and st.attn_fp8 is not None and st.attn_fp8.usable(st, attn.processor):
        return st.attn_fp8.attention_heads(q, k, v)
    out = E.cp_attention(q, k, v, attn.processor) if parallel else None
    if out is not None:
        return out
    if st.attention:
        return _eager.attention(q, k, v, None, False, None)
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    return dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 backend=getattr(attn.processor, "_attention_backend", None), parallel_config=None)


def _out_proj(attn, sc, o):
    mods = E.children(E.get(attn, sc.out))
    y = E.call_linear(mods[0], o)
    for m in mods[1:]:
        if not E.skippable_dropout(m):
            y = m(y)
    return y


def _qk_norm(st, attn, sc, q, k, table, what):
    """(q, k) [B, L, C]: RMSNorm over all heads (+ RoPE with a table): the fused op, or the norm
    modules (hooked) with RoPE in torch."""
    nq, nk = E.get(attn, sc.q_norm), E.get(attn, sc.k_norm)
    H = attn.heads
    if st.qk and E.no_hooks(nq, nk) and nq.eps == nk.eps:
        return _eager.qk_norm_rope_across_heads(q, k, nq.weight, nk.weight, table, H, nq.eps, True)
    if st.qk and not torch.compiler.is_compiling():
        st.count(f"{what} QK RMSNorm modules hooked or of different eps: module calls, RoPE in torch")
    q, k = nq(q), nk(k)
    if table is not None:
        q, k = (_ref.apply_rope(t.unflatten(-1, (H, -1)), table).flatten(-2) for t in (q, k))
    return q, k


def self_attention(block, st, xn, tables):
    sc = st.family.self_cross
    attn = E.get(block, sc.self_attn)
    if not _attn_ok(st, attn):
        return attn(xn, None, None, st.family.rope_stock(tables))
    C, H = attn.inner_dim, attn.heads
    pk = None if torch.compiler.is_compiling() else st.packed_qkv.get(id(attn))
    wb = pk[0].get(st, "self-attention q/k/v") if pk is not None else None
    if wb is not None:
        qkv = F.linear(xn, *wb)
        q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    else:
        q, k, v = (E.call_linear(E.get(attn, n), xn) for n in (sc.q, sc.k, sc.v))
    q, k = _qk_norm(st, attn, sc, q, k, tables, "self-attention")
    o = _attend(st, attn, q.unflatten(-1, (H, -1)), k.unflatten(-1, (H, -1)), v.unflatten(-1, (H, -1)),
                parallel=True)
    return _out_proj(attn, sc, o.flatten(2, 3).to(q.dtype))


def cross_attention(block, st, xn, ctx):
    sc = st.family.self_cross
    attn = E.get(block, sc.cross_attn)
    if not _attn_ok(st, attn):
        return attn(xn, ctx, None, None)
    H = attn.heads
    add_k = E.get(attn, sc.added_k) if sc.added_k else None
    img = None
    if add_k is not None:
        n_img = ctx.shape[1] - sc.text_len
        img, ctx = ctx[:, :n_img], ctx[:, n_img:]
    q = E.call_linear(E.get(attn, sc.q), xn)
    k = E.call_linear(E.get(attn, sc.k), ctx)
    v = E.call_linear(E.get(attn, sc.v), ctx)
    q, k = _qk_norm(st, attn, sc, q, k, None, "cross-attention")
    q4 = q.unflatten(-1, (H, -1))
    o_img = None
    if img is not None:
        ki = E.get(attn, sc.added_k_norm)(E.call_linear(add_k, img))
        vi = E.call_linear(E.get(attn, sc.added_v), img)
        o_img = _attend(st, attn, q4, ki.unflatten(-1, (H, -1)), vi.unflatten(-1, (H, -1))).flatten(2, 3).to(q.dtype)
    o = _attend(st, attn, q4, k.unflatten(-1, (H, -1)), v.unflatten(-1, (H, -1))).flatten(2, 3).to(q.dtype)
    if o_img is not None:
        o = o + o_img
    return _out_proj(attn, sc, o)


def _lookahead_target(st, block, x):
    nxt = st.next_block.get(id(block))
    if nxt is None or getattr(nxt.__dict__.get("forward"), "__func__", None) is not st.family.forward_for("self_cross"):
        return None
    if nxt._forward_pre_hooks or nxt._forward_hooks or hasattr(nxt, "_hf_hook") or hasattr(nxt, "_diffusers_hook"):
        return None
    t = getattr(nxt, st.family.self_cross.table, None)
    return nxt if isinstance(t, torch.Tensor) and t.device == x.device else None


def _ln_forwards():
    """LayerNorm forwards that compute F.layer_norm over the last dim in fp32 for an fp32 input."""
    fs = {torch.nn.LayerNorm.forward}
    try:
        from diffusers.models.normalization import FP32LayerNorm
        fs.add(FP32LayerNorm.forward)
    except ImportError:  # pragma: no cover
        pass
    return fs


_LN_FORWARDS = _ln_forwards()


def _ones_gate(x, rows):
    """A gate of ones [rows, C] (fp32, a stride-0 row view): x + 1 * update is the plain add."""
    return torch.ones(1, x.shape[-1], dtype=torch.float32, device=x.device).expand(rows, x.shape[-1])


# --- block forward ----------------------------------------------------------------------------------

def run_block(block, st, x, ctx, temb, rot, index):
    """The fused self + cross attention block: x [B, L, C] -> x. ``temb`` [rows, 6, C] (rows = B, or
    2B with ``index`` [B, L]: token l of batch b uses set ``index[b, l] != 0``)."""
    if st.fp8 is not None:  # precision="fp8": integrations/fp8_kinds.py
        out = st.fp8.run_self_cross(block, st, x, ctx, temb, rot, index)
        if out is not None:
            return out
    sc = st.family.self_cross
    tables = st.rope_tables(rot)
    E.cp_check_rows(st, tables, x.shape[1])
    compiling = torch.compiler.is_compiling()
    pre = (st.take_prenorm(block, x, temb, index) if st.modulation and not compiling and st.prenorm is not None
           else None)
    e = pre.mods[0] if pre is not None else mod_params(block, sc, temb)
    sh1, sc1, g1, sh2, sc2, g2 = (e[:, j] for j in st.order)
    n1, n2, n3 = E.get(block, sc.norm1), E.get(block, sc.norm2), E.get(block, sc.norm3)
    if st.modulation:
        xn = pre.outs[0] if pre is not None else _eager.norm_scale_shift(x, sh1, sc1, index, None, None, n1.eps)
    else:
        xn = (n1(x.float()) * (1 + _sel(sc1, index)) + _sel(sh1, index)).type_as(x)
    a = self_attention(block, st, xn, tables)
    if not st.modulation:
        x = (x.float() + a * _sel(g1, index)).type_as(x)
        xn2 = n2(x.float()).type_as(x)
    elif type(n2) is torch.nn.Identity:
        x = _eager.gate_residual(x, a, g1, index)
        xn2 = x
    elif E.no_hooks(n2) and type(n2).forward in _LN_FORWARDS:
        x, xn2 = _eager.gate_residual_layer_norm(x, a, g1, index, n2.weight, n2.bias, n2.eps)
    else:
        x = _eager.gate_residual(x, a, g1, index)
        xn2 = n2(x.float()).type_as(x)
    a = cross_attention(block, st, xn2, ctx)
    if st.modulation:
        x, xn3 = _eager.gate_residual_norm_scale_shift(x, a, _ones_gate(x, sh2.shape[0]), sh2, sc2, index, n3.eps)
    else:
        x = x + a
        xn3 = (n3(x.float()) * (1 + _sel(sc2, index)) + _sel(sh2, index)).type_as(x)
    ff = E.get(block, sc.mlp)
    y = fused_mlp(ff, xn3) if st.mlp and st.modulation else ff(xn3)
    if not st.modulation:
        return (x.float() + y.float() * _sel(g2, index)).type_as(x)
    nxt = _lookahead_target(st, block, x) if not compiling and st.lookahead else None
    if nxt is None:
        return _eager.gate_residual(x, y, g2, index)
    ne = mod_params(nxt, sc, temb)
    o = st.order
    x, nxn = _eager.gate_residual_norm_scale_shift(x, y, g2, ne[:, o[0]], ne[:, o[1]], index,
                                                   E.get(nxt, sc.norm1).eps)
    st.prenorm = E.Prenorm(nxt, (x, temb, index), (ne,), (nxn,))
    return x
