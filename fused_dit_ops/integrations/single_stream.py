"""Single-stream blocks (text and image tokens concatenated, one set of weights) on fused ops.

Per block, for the family's :class:`~.engine.Single` description (eager and torch.compile):

1. the joint sequence [text, image]: the previous single block's output when the block gets its two
   halves as views (no cat), else ``torch.cat``;
2. modulation params: one GEMV on SiLU(temb) (computed once per forward, reused by an equal temb
   as for double-stream blocks), three column views (shift, scale, gate);
3. ``norm_scale_shift`` (or nothing: the previous block did it, look-ahead);
4. q|k|v and the MLP input projection read the same normed input: their weights are packed into
   one [3D + F, C] matrix (rows k, v, q, MLP are row views of one storage). On CUDA (eager) q|k|v is
   one GEMM and the MLP one GEMM with GELU-tanh in its epilogue (cuBLASLt); elsewhere one GEMM over
   all rows and the GELU in torch;
5. ``joint_qk_norm_rope_`` in place on the q, k column views (text rows with the text table, image
   rows with the image table), ``attention``;
6. the output projection over [attention | MLP] without the cat: its weight's two column blocks
   as two GEMMs accumulating into one output;
7. ``gate_residual``, or inside an eager model forward ``gate_residual_norm_scale_shift`` with the
   next single block's norm + modulation (look-ahead); fp16 clipped as diffusers does. The block
   returns (text, image) as views of the joint output, which the next block takes as is.

Projections that are not bare Linears (LoRA, hooks) run as modules; a hooked or non-stock attention
module runs as a module call with the stock RoPE format.

Described variants: modulation outputs handed in by the model (``mod_source="model_linear"``: step 2
takes column views of them); the model's own q|k|v|MLP Linear (``Single.qkv_mlp``: step 4 uses its
row blocks, no packing); a SwiGLU MLP (``Single.mlp_act="swiglu"``: the MLP rows through
``swiglu_linear``, the SwiGLU in the GEMM's epilogue on CUDA); blocks that get and return the joint
sequence (:func:`run_joint`).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .. import reference as _ref
from ..ops import _eager
from . import engine as E

KIND_TAKES = dict(norm=("layer",), mlp_act=("gelu_tanh", "swiglu"), mod_source=("block_linear", "model_linear"))


# --- patch time -----------------------------------------------------------------------------------

def block_reason(block, fam):
    sg = fam.single
    if sg is None:
        return f"{fam.name}: no single-stream description (Family.single)"
    for f, v in (("norm", fam.norm), ("mlp_act", sg.mlp_act), ("mod_source", fam.mod_source)):
        if v not in KIND_TAKES[f]:
            return f"{fam.name}: {f}={v!r} is not implemented for single-stream blocks (takes {KIND_TAKES[f]})"
    reason = E.shared_block_reason(block, fam, "single")
    if reason is not None:
        return reason
    attn = getattr(block, fam.attn, None)
    if getattr(attn, "fused_projections", False):
        return "attention projections fused (fuse_qkv_projections): unfuse them before patching"
    for n in (sg.q_norm, sg.k_norm):
        if getattr(getattr(attn, n, None), "weight", None) is None:
            return f"{fam.attn}.{n} is missing or has no weight (fused QK-norm needs RMSNorm weights)"
    D = attn.inner_dim
    if sg.qkv_mlp is not None:
        lins = [E.get(block, n) for n in (sg.qkv_mlp, sg.out)]
    else:
        lins = ([E.get(attn, n) for n in (sg.q, sg.k, sg.v)]
                + [E.get(block, n) for n in (sg.mlp_in, sg.out)])
    if fam.mod_source == "block_linear":
        lins.append(E.get(block, sg.mod_linear))
    if any(m is None or not hasattr(m, "out_features") or not hasattr(m, "in_features") for m in lins):
        return "q/k/v, MLP input, output or modulation projection missing (or not Linear-like)"
    nm = E.get(block, sg.norm)
    if getattr(nm, "weight", None) is not None or not hasattr(nm, "eps"):
        return f"{sg.norm} is not a norm without affine parameters (the fused ops take none)"
    out = lins[1] if sg.qkv_mlp is not None else lins[4]
    mlp_rows = lins[0].out_features - 3 * D if sg.qkv_mlp is not None else lins[3].out_features
    F_ = mlp_rows // 2 if sg.mlp_act == "swiglu" else mlp_rows
    if (mlp_rows <= 0 or out.in_features != D + F_ or (sg.mlp_act == "swiglu" and mlp_rows % 2)
            or (sg.qkv_mlp is None and any(m.out_features != D for m in lins[:3]))):
        return f"{sg.out} does not take [attention ({D}) | MLP ({F_})]"
    if D % attn.heads or (D // attn.heads) % 2:
        return f"head_dim {D}/{attn.heads} is not an even integer"
    return None


def patch_blocks(st, blocks, model, sw, backend):
    """Packed q|k|v|MLP-input weights, packed modulation Linears, look-ahead pairs."""
    fam, report, sg = st.family, st.report, st.family.single
    n = 0
    if sg.qkv_mlp is not None:
        report.swapped.append(f"single-stream {sg.qkv_mlp} (the model's own q|k|v|MLP weight): q|k|v GEMM, "
                              f"MLP rows through {'swiglu_linear' if sg.mlp_act == 'swiglu' else 'their GEMM'}, "
                              f"{sg.out} as two GEMMs without the cat ({len(blocks)} blocks)")
    elif sw["pack_qkv"]:
        for block in blocks:
            a = getattr(block, fam.attn)
            paths = (f"{fam.attn}.{sg.k}", f"{fam.attn}.{sg.v}", f"{fam.attn}.{sg.q}", sg.mlp_in)
            if E.PackedLinears.packable([E.get(block, p) for p in paths], mixed=True) and a is not None:
                with torch.no_grad():
                    st.packed_qkv[id(block)] = (E.PackedLinears(block, paths, mixed=True),)
                n += 1
        if n:
            report.swapped.append(f"single-stream q/k/v + {sg.mlp_in} packed: one weight matrix ({n} blocks)")
    if n < len(blocks) and sg.qkv_mlp is None:
        report.stock["pack_qkv (single)"] = f"{len(blocks) - n} single-stream blocks: projections as module calls"
    if not st.modulation:
        return
    if sw["lookahead"]:
        pairs = 0
        for a, b in zip(blocks, blocks[1:]):
            if _adjacent(model, fam, a, b):
                st.next_block[id(a)] = b
                pairs += 1
        if pairs:
            report.swapped.append(f"single-stream block ends fused with the next block's norm + modulation "
                                  f"({pairs} block pairs, eager model forward, not fp16)")
    if fam.mod_source == "model_linear":
        report.stock[sg.mod] = ("model-level modulation: the model's own module, once per forward; the blocks "
                                "take column views of its output")
    elif sw["pack_mod"]:
        k = 0
        for block in blocks:
            if E.PackedLinears.packable([E.get(block, sg.mod_linear)]):
                with torch.no_grad():
                    st.packed_mod[id(block)] = E.PackedLinears(block, (sg.mod_linear,))
                k += 1
        if k:
            report.swapped.append(f"single-stream {sg.mod_linear}: one GEMV per block on SiLU(temb) once per "
                                  f"forward ({k} blocks)")


def _adjacent(model, fam, a, b):
    for attr, kind in fam.block_lists:
        lst = list(getattr(model, attr))
        for x, y in zip(lst, lst[1:]):
            if x is a:
                return y is b
    return False


# --- block forward ----------------------------------------------------------------------------------

def joint_of(e, h, hint=None):
    """The [B, Lt + Li, C] tensor whose row halves ``e`` and ``h`` are (the previous single block's
    output), or None: then the block concatenates. ``hint``: the previous single block's joint output,
    for views that carry no ``_base`` (inference tensors); it must share their storage."""
    b = e._base
    if b is None and hint is not None and e.is_inference() and h._base is None:
        if e.untyped_storage().data_ptr() != hint.untyped_storage().data_ptr() or \
                h.untyped_storage().data_ptr() != hint.untyped_storage().data_ptr():
            return None
        b = hint
    elif b is None or h._base is not b:
        return None
    if b.dim() != 3 or not b.is_contiguous():
        return None
    if (e.shape[0] != b.shape[0] or e.shape[2] != b.shape[2] or e.shape[1] + h.shape[1] != b.shape[1]
            or e.stride() != b.stride() or h.stride() != b.stride()
            or e.storage_offset() != b.storage_offset()
            or h.storage_offset() != b.storage_offset() + e.shape[1] * b.stride(1)):
        return None
    return b


def _mod_params(block, st, temb):
    """[B, 3C] modulation output: packed GEMV (cached across forwards with an equal temb) or the
    Linear module on SiLU(temb); with ``mod_source="model_linear"`` ``temb`` is that output."""
    sg = st.family.single
    if st.family.mod_source == "model_linear":
        return temb
    compiling = torch.compiler.is_compiling()
    pk = None if compiling else st.packed_mod.get(id(block))
    wb = pk.get(st, sg.mod_linear) if pk is not None and E.no_hooks(getattr(block, sg.mod)) else None
    if wb is not None:
        out = st.cached_mod(block, pk, temb)
        if out is None:
            out = F.linear(st.silu(temb), *wb)
            st.store_mod(block, pk, temb, out)
        return out
    return E.get(block, sg.mod_linear)(F.silu(temb) if compiling else st.silu(temb))


def _params(mod, order):
    c = mod.chunk(3, dim=-1)
    return [c[j] for j in order]


def _lookahead_target(st, block, x):
    nxt = st.next_block.get(id(block))
    if nxt is None or getattr(nxt.__dict__.get("forward"), "__func__", None) is not st.family.forward_for("single"):
        return None
    if nxt._forward_pre_hooks or nxt._forward_hooks or hasattr(nxt, "_hf_hook") or hasattr(nxt, "_diffusers_hook"):
        return None
    if st.family.mod_source == "model_linear":
        return nxt
    w = getattr(E.get(nxt, st.family.single.mod_linear), "weight", None)
    return nxt if isinstance(w, torch.Tensor) and w.device == x.device else None


def _act(y, sg):
    """The MLP activation in torch (stock math)."""
    if sg.mlp_act == "swiglu":
        g, u = y.chunk(2, dim=-1)
        return F.silu(g) * u
    return F.gelu(y, approximate="tanh")


def _own_projection(block, st, xn, D):
    """q, k, v, activated MLP from the model's one q|k|v|MLP Linear (``Single.qkv_mlp``)."""
    sg = st.family.single
    lin = E.get(block, sg.qkv_mlp)
    if E.plain_linear(lin) and E.no_global_hooks():
        W, b = lin.weight, lin.bias
        if st.mlp and sg.mlp_act == "swiglu":
            # q|k|v one GEMM; the MLP rows one swiglu_linear (the SwiGLU in the GEMM's epilogue on CUDA)
            y = F.linear(xn, W[:3 * D], None if b is None else b[:3 * D])
            mlp = _eager.swiglu_linear(xn, W[3 * D:], None if b is None else b[3 * D:])
        else:
            y = F.linear(xn, W, b)
            mlp = _act(y[..., 3 * D:], sg)
    else:  # LoRA, hooks: the module
        y = lin(xn)
        mlp = _act(y[..., 3 * D:], sg)
    q, k, v = (y[..., j * D:(j + 1) * D] for j in range(3))
    return q, k, v, mlp


def _projections(block, st, attn, xn, D):
    """(q|k|v as [B, L, 3D]-strided views q, k, v; the activated MLP [B, L, F])."""
    sg = st.family.single
    if sg.qkv_mlp is not None:
        return _own_projection(block, st, xn, D)
    compiling = torch.compiler.is_compiling()
    pk = None if compiling else st.packed_qkv.get(id(block))
    wb = pk[0].get(st, "single-stream q/k/v/MLP") if pk is not None else None
    if wb is not None:
        W, b = wb
        if st.mlp and b is not None and xn.is_cuda:  # eager CUDA, profiled or not (no compile: pk is None)
            # q|k|v GEMM, and the MLP GEMM with GELU-tanh in cuBLASLt's epilogue
            y = F.linear(xn, W[:3 * D], b[:3 * D])
            x2 = xn.reshape(-1, xn.shape[-1])
            mlp = torch._addmm_activation(b[3 * D:], x2, W[3 * D:].t(), use_gelu=True).view(*xn.shape[:-1], -1)
        else:
            y = F.linear(xn, W, b)
            mlp = _act(y[..., 3 * D:], sg)
        k, v, q = (y[..., j * D:(j + 1) * D] for j in range(3))
        return q, k, v, mlp
    q, k, v = (E.call_linear(E.get(attn, n), xn) for n in (sg.q, sg.k, sg.v))
    return q, k, v, _act(E.call_linear(E.get(block, sg.mlp_in), xn), sg)


def _attention(block, st, attn, xn, tables, Lt):
    """(attention output [B, L, D], activated MLP) of the normed joint input; a module call instead
    returns one tensor: the attention output, or with ``Single.attn_module_mlp`` the block's update."""
    fam = st.family
    if not E.no_hooks(attn) or not E.no_global_hooks() or type(attn.processor) not in fam.stock_processors():
        return attn(hidden_states=xn, image_rotary_emb=fam.rope_stock(tables))
    D = attn.inner_dim
    hd = D // attn.heads
    q, k, v, mlp = _projections(block, st, attn, xn, D)
    q, k, v = (t.unflatten(-1, (-1, hd)) for t in (q, k, v))
    return attend(st, attn, q, k, v, Lt, tables), mlp


def attend(st, attn, q, k, v, Lt, tables):
    """[B, L, D] attention of the q, k, v head views [B, L, H, hd] of a single-stream block's projections:
    the QK RMSNorm + RoPE (the fused op; FP8 attention with attention_precision="fp8"; the norm modules,
    hooked, with RoPE in torch), then the attention (diffusers' all-to-all / ring under context
    parallelism). ``Lt`` 0 with a joint table: one table over the whole sequence (text and image share
    the norms). The bf16 and the FP8-GEMM forwards both call it."""
    fam, sg = st.family, st.family.single
    if fam.rope_joint:
        img_tab, txt_tab = (tables[Lt:], tables[:Lt]) if Lt else (tables, tables)
    else:
        img_tab, txt_tab = tables
    norms = [getattr(attn, sg.q_norm), getattr(attn, sg.k_norm)]
    if st.qk and E.no_hooks(*norms) and norms[0].weight.dtype == norms[1].weight.dtype:
        wq, wk = norms[0].weight, norms[1].weight
        if st.attn_fp8 is not None and st.attn_fp8.usable(st, attn.processor):  # attention_precision="fp8"
            out = st.attn_fp8.attention(q, k, v, Lt, (wq, wk, wq, wk), txt_tab, img_tab, norms[0].eps,
                                        fam.rope_interleaved)
            return out.flatten(2, 3)
        _eager.joint_qk_norm_rope_(q, k, Lt, wq, wk, wq, wk, txt_tab, img_tab, norms[0].eps, fam.rope_interleaved)
    else:
        if st.qk:
            st.count("single-stream QK RMSNorm modules hooked or of mixed dtypes: module calls, RoPE in torch")

        def norm_rope(t, n):  # stock RMSNorm module, RoPE from the tables in torch (fp32 math)
            t = n(t)
            return torch.cat([_ref.apply_rope(t[:, :Lt], txt_tab, None, fam.rope_interleaved),
                              _ref.apply_rope(t[:, Lt:], img_tab, None, fam.rope_interleaved)], 1)
        q, k = norm_rope(q, norms[0]), norm_rope(k, norms[1])
    out = E.cp_attention(q, k, v, attn.processor)  # context parallelism: diffusers' all-to-all / ring
    if out is not None:
        pass
    elif st.attention:
        out = _eager.attention(q, k, v, None, False, None)
    else:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        out = dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                    backend=getattr(attn.processor, "_attention_backend", None), parallel_config=None)
    return out.flatten(2, 3).to(q.dtype)


def _out_proj(block, st, a, mlp):
    """The output projection over [attention | MLP]: two GEMMs on its weight's column blocks (no cat)."""
    lin = E.get(block, st.family.single.out)
    if not (E.plain_linear(lin) and E.no_global_hooks()):
        return lin(torch.cat([a, mlp], dim=-1))
    D = a.shape[-1]
    W, b = lin.weight, lin.bias
    a2, m2 = a.reshape(-1, D), mlp.reshape(-1, mlp.shape[-1])
    o = torch.addmm(b, a2, W[:, :D].t()) if b is not None else a2 @ W[:, :D].t()
    o = o.addmm(m2, W[:, D:].t()) if torch.compiler.is_compiling() else o.addmm_(m2, W[:, D:].t())
    return o.view(*a.shape[:-1], -1)


def run_block(block, st, h, e, temb, rot):
    """The fused single-stream block: (h, e) -> (h, e) (image, text), views of one joint output."""
    Lt = e.shape[1]
    x = None
    if not torch.compiler.is_compiling():
        last = st.last_joint() if st.last_joint is not None else None
        x = joint_of(e, h, last)
    if x is None:
        x = torch.cat([e, h], dim=1)
    x = run_joint(block, st, x, Lt, temb, rot)
    if not torch.compiler.is_compiling() and x.is_inference():
        st.last_joint = weakref.ref(x)
    return x[:, Lt:], x[:, :Lt]


def run_joint(block, st, x, Lt, temb, rot):
    """The fused single-stream block on the joint [B, Lt + Li, C] sequence -> the joint output.
    ``Lt`` 0: the text length is not known (the block got the joint sequence; the RoPE table covers it)."""
    if st.fp8 is not None:  # precision="fp8": integrations/fp8_kinds.py
        out = st.fp8.run_single(block, st, x, Lt, temb, rot)
        if out is not None:
            return out
    fam, sg = st.family, st.family.single
    compiling = torch.compiler.is_compiling()
    tables = st.rope_tables(rot)
    E.cp_check_rows(st, tables, x.shape[1])
    order = sg.chunk_order()
    pre = (st.take_prenorm(block, x, temb) if st.modulation and not compiling and st.prenorm is not None
           else None)
    mod = pre.mods[0] if pre is not None else _mod_params(block, st, temb)
    shift, scale, gate = _params(mod, order)
    norm = E.get(block, sg.norm)
    attn = getattr(block, fam.attn)
    if st.modulation:
        xn = pre.outs[0] if pre is not None else _eager.norm_scale_shift(x, shift, scale, None, None, None,
                                                                        norm.eps, fam.norm)
    else:
        xn = norm(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    res = _attention(block, st, attn, xn, tables, Lt)
    if isinstance(res, tuple):
        o = _out_proj(block, st, *res)
    elif sg.attn_module_mlp:  # attention module call that computed the whole update
        o = res
    else:  # attention module call: the MLP as modules
        o = _out_proj(block, st, res, _act(E.call_linear(E.get(block, sg.mlp_in), xn), sg))
    if st.modulation:
        nxt = None
        if not compiling and st.lookahead and x.dtype != torch.float16:
            nxt = _lookahead_target(st, block, x)
        if nxt is not None:
            n_mod = _mod_params(nxt, st, temb)
            n_sh, n_sc, _ = _params(n_mod, order)
            x, n_xn = _eager.gate_residual_norm_scale_shift(x, o, gate, n_sh, n_sc, None, E.get(nxt, sg.norm).eps)
            st.prenorm = E.Prenorm(nxt, (x, temb), (n_mod,), (n_xn,))
        else:
            x = _eager.gate_residual(x, o, gate, None)
    else:
        x = x + gate.unsqueeze(1) * o
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return x
