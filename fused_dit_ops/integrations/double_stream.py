"""Double-stream blocks (image + text streams with their own weights, one joint attention) on fused ops.

Per block, for the family's two :class:`~.engine.Stream` descriptions (eager and torch.compile):

1. modulation params: with packed weights (eager) one GEMV per block over both streams' modulation
   Linears, on SiLU(temb) computed once per forward (or reused from the previous forward with an
   equal temb); chunked into six column views per stream, in the family's chunk order;
2. norm1 + modulation: ``dual_norm_scale_shift`` (image stream with the per-token set index), or
   nothing when the previous block already did it (look-ahead, step 5);
3. attention (:class:`JointAttnProcessor`): ``joint_linear`` writes each stream's q|k|v projection
   (one GEMM over packed weights) into its rows of one joint [B, N, 3D] buffer whose column views
   are q, k, v; ``joint_qk_norm_rope_`` in place; ``attention``; output row views, out projections.
   Projections that are modules (LoRA) run as modules, then ``qk_norm_rope_cat``; hooked QK norms
   run as modules, RoPE and cat in torch;
4. ``dual_gate_residual_norm_scale_shift``: h + gate1 * attn_out, norm2, modulation;
5. MLP (GELU-tanh in the fc1 GEMM's epilogue on CUDA), then ``gate_residual``, or inside an eager
   model forward ``dual_gate_residual_norm_scale_shift`` with the *next* block's norm1 modulation,
   which that block picks up if it receives exactly these tensors, unmodified (not fp16: the block
   clips its outputs, which the next norm1 must see);
6. fp16: both streams clipped to +-65504, as diffusers does.

The ops are called through :mod:`fused_dit_ops.ops._eager`: eager CUDA inference launches them
without dispatch after each op's own check; torch.compile and CPU go through ``torch.ops``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference as _ref
from ..ops import _eager
from . import engine as E


# --- patch time -----------------------------------------------------------------------------------

# what this block kind implements of a family description (a new value: implement it here first)
KIND_TAKES = dict(mod_source=("block_linear", "model_linear"), norm=("layer", "rms"), qk_norm=("head",),
                  mlp=("gelu_tanh", "swiglu"))


def block_reason(block, fam):
    """Why this block cannot be patched (None: it can)."""
    for f, ok in KIND_TAKES.items():
        if getattr(fam, f) not in ok:
            return f"{fam.name}: {f}={getattr(fam, f)!r} is not implemented for double-stream blocks (takes {ok})"
    reason = E.shared_block_reason(block, fam, "double")
    if reason is not None:
        return reason
    attn = getattr(block, fam.attn, None)
    for s in fam.streams:
        for n in (s.q_norm, s.k_norm):
            nm = getattr(attn, n, None)
            if nm is None or getattr(nm, "weight", None) is None:
                return f"{fam.attn}.{n} is missing or has no weight (fused QK-norm needs RMSNorm weights)"
        for n in (s.q, s.k, s.v, s.out):
            if E.get(attn, n) is None:
                return f"{fam.attn}.{n} is missing"
        for n in (s.norm1, s.norm2):
            nm = E.get(block, n)
            if getattr(nm, "weight", None) is not None or not hasattr(nm, "eps"):
                return f"{n} is not a norm without affine parameters (the fused ops take none)"
    if getattr(attn, "fused_projections", False):
        return "attention projections fused (fuse_qkv_projections): unfuse them before patching"
    if attn.inner_dim % attn.heads or (attn.inner_dim // attn.heads) % 2:
        return f"head_dim {attn.inner_dim}/{attn.heads} is not an even integer"
    return None


def patch_blocks(st, blocks, model, sw, backend):
    """Processors, packed weights and look-ahead pairs of the family's double-stream blocks."""
    fam, report = st.family, st.report
    img, txt = fam.streams
    for block in blocks:
        attn = getattr(block, fam.attn)
        old = attn.processor
        attn.set_processor((fam.processor_class or JointAttnProcessor)(st, old, backend))
        st.procs.append((attn, old))
    if st.qk and st.qk_path == "joint":
        if not sw["pack_qkv"]:
            report.stock["pack_qkv"] = "pack_qkv=False: joint_linear concatenates the q/k/v weights per call"
        else:
            n = 0
            for block in blocks:
                a = getattr(block, fam.attn)
                lt, li = ([E.get(a, p) for p in (s.q, s.k, s.v)] for s in (txt, img))
                if (E.PackedLinears.packable(lt) and E.PackedLinears.packable(li)
                        and li[0].out_features == lt[0].out_features):
                    with torch.no_grad():
                        st.packed_qkv[id(a)] = (E.PackedLinears(a, (txt.q, txt.k, txt.v)),
                                                E.PackedLinears(a, (img.q, img.k, img.v)))
                    n += 1
            if n:
                report.swapped.append(f"q/k/v projections packed: one GEMM per stream ({n} blocks)")
            if n < len(blocks):
                report.stock["pack_qkv"] = (f"{len(blocks) - n} blocks: projections not packable (not plain "
                                            "nn.Linear, hooks, or mixed shapes/dtypes): module calls")
    if not st.modulation:
        return
    if sw["lookahead"]:
        ids = {id(b) for b in blocks}
        for a, b in zip(blocks, blocks[1:]):
            if id(a) in ids and id(b) in ids and _adjacent(model, fam, a, b):
                st.next_block[id(a)] = b
        if st.next_block:
            report.swapped.append(f"block ends fused with the next block's norm1 + modulation "
                                  f"({len(st.next_block)} block pairs, eager model forward, not fp16)")
    else:
        report.stock["lookahead"] = "lookahead=False: each block does its own norm1 + modulation"
    if st.mlp and fam.mlp == "swiglu":
        report.swapped.append(f"{img.mlp}/{txt.mlp}: input projection + SwiGLU as one swiglu_linear op "
                              f"({len(blocks)} blocks)")
    if fam.mod_source == "model_linear":
        report.stock[f"{img.mod}/{txt.mod}"] = ("model-level modulation: the model's own modules, once per "
                                                "forward; the blocks take column views of their outputs")
        return
    if not sw["pack_mod"]:
        report.stock["pack_mod"] = "pack_mod=False: one modulation GEMV per stream and block"
        return
    n = 0
    for block in blocks:
        if _mod_packable(block, fam):
            with torch.no_grad():
                st.packed_mod[id(block)] = E.PackedLinears(block, (img.mod_lin(), txt.mod_lin()))
            n += 1
    if n:
        report.swapped.append(f"{img.mod}/{txt.mod} packed: one modulation GEMV per block, SiLU(temb) "
                              f"once per forward ({n} blocks)")
        if st.reuse_mod:
            report.swapped.append("modulation GEMV outputs reused by the next forward with an equal temb "
                                  "(CFG cond/uncond; eager model forward, one device sync per forward)")
        else:
            report.stock["reuse_mod"] = "reuse_mod=False: every forward runs its modulation GEMVs"
    if n < len(blocks):
        report.stock["pack_mod"] = (f"{len(blocks) - n} blocks: {img.mod}/{txt.mod} not packable "
                                    "(not SiLU + plain nn.Linear, hooks, or mixed shapes/dtypes)")


def _adjacent(model, fam, a, b):
    """b directly follows a in one of the family's block lists."""
    for attr, _ in fam.block_lists:
        lst = list(getattr(model, attr))
        for x, y in zip(lst, lst[1:]):
            if x is a:
                return y is b
    return False


# --- modulation -------------------------------------------------------------------------------------

def _mod_containers_ok(block, fam) -> bool:
    """The streams' modulation modules are still Sequential(SiLU, Linear) (or, with ``mod_linear``,
    a module whose SiLU and Linear we apply) without hooks (the packed GEMV replaces the whole module
    call; the Linears are checked by the pack)."""
    for s in fam.streams:
        m = getattr(block, s.mod)
        if s.mod_linear is not None:
            if not E.no_hooks(m) or not isinstance(E.get(block, s.mod_linear), torch.nn.Module):
                return False
            continue
        if type(m) is not torch.nn.Sequential:
            return False
        c = E.children(m)
        if len(c) != 2 or type(c[0]) is not torch.nn.SiLU or not E.no_hooks(m, c[0]):
            return False
    return True


def _mod_packable(block, fam) -> bool:
    return (_mod_containers_ok(block, fam)
            and E.PackedLinears.packable([E.get(block, s.mod_lin()) for s in fam.streams]))


def modulation_params(block, st, temb):
    """(img_mod [B or 2B, 6C], txt_mod [B, 6C]). Packed (eager): one GEMV over both streams' weights
    on SiLU(temb), both results column views of its output; with the per-token index (two parameter
    sets: temb has 2B rows) the text half is computed for all rows (same weight bytes, same time)
    and the text stream takes the first B. ``mod_source="model_linear"``: ``temb`` is already the
    pair of model-level modulation outputs."""
    fam = st.family
    if fam.mod_source == "model_linear":
        return temb
    two_sets = fam.index_flag is not None and getattr(block, fam.index_flag)
    # is_compiling first: a dict lookup on id(block) would make dynamo specialise per block
    img, txt = fam.streams
    pk = None if torch.compiler.is_compiling() else st.packed_mod.get(id(block))
    wb = pk.get(st, f"{img.mod}/{txt.mod}") if pk is not None and _mod_containers_ok(block, fam) else None
    if wb is not None:
        both = st.cached_mod(block, pk, temb)
        if both is None:
            both = F.linear(st.silu(temb), *wb)
            st.store_mod(block, pk, temb, both)
        txt_rows = temb.shape[0] // 2 if two_sets else temb.shape[0]
        return both[:, :pk.n], both[:txt_rows, pk.n:]
    if img.mod_linear is not None:  # Linear(SiLU(temb)) of an adaLN module: the Linears as modules
        x = st.silu(temb) if not torch.compiler.is_compiling() else F.silu(temb)
        return E.get(block, img.mod_linear)(x), E.get(block, txt.mod_linear)(x)
    img_mod = getattr(block, img.mod)(temb)
    if two_sets:
        temb = torch.chunk(temb, 2, dim=0)[0]
    return img_mod, getattr(block, txt.mod)(temb)


def _chunks(mod, order):
    """The six [rows, C] column views (shift1, scale1, gate1, shift2, scale2, gate2) of a modulation output."""
    c = mod.chunk(6, dim=-1)
    return [c[j] for j in order]


def _modulate(x, shift, scale, gate, index=None):
    """diffusers' modulation math in torch (x * (1 + scale) + shift, and the gate), per token from
    the index's parameter set (rows [:B] for index 0, [B:] otherwise)."""
    if index is not None:
        B, sel = shift.shape[0] // 2, index.unsqueeze(-1) == 0
        shift, scale, gate = (torch.where(sel, p[:B].unsqueeze(1), p[B:].unsqueeze(1)) for p in (shift, scale, gate))
    else:
        shift, scale, gate = (p.unsqueeze(1) for p in (shift, scale, gate))
    return x * (1 + scale) + shift, gate


# --- attention ----------------------------------------------------------------------------------------

def _on_stock(name):
    """A processor attribute that lives on the wrapped stock processor (diffusers sets these:
    set_attention_backend, enable_parallelism; the stock fallback reads them)."""
    return property(lambda self: getattr(self.stock, name, None), lambda self, v: setattr(self.stock, name, v))


class JointAttnProcessor:
    """The processor of a patched double-stream block. With real RoPE tables and no mask it runs the
    fused path (under diffusers' context parallelism with its attention: ``engine.cp_attention``);
    otherwise (stock mode, a mask, the stock RoPE format) the original processor it replaced, unchanged."""

    _attention_backend = _on_stock("_attention_backend")
    _parallel_config = _on_stock("_parallel_config")

    def __init__(self, state, stock, backend=None):
        self.state = state
        self.stock = stock
        self.backend = backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        st = self.state
        if (st.mode_stock or encoder_hidden_states_mask is not None or attention_mask is not None
                or not E.is_tables(image_rotary_emb)):
            if E.is_tables(image_rotary_emb):
                image_rotary_emb = st.family.rope_stock(image_rotary_emb)
            return self.stock(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                              attention_mask, image_rotary_emb)
        return self.fused(attn, hidden_states, encoder_hidden_states, image_rotary_emb)

    def fused(self, attn, img, txt, tables):
        st = self.state
        si, stx = st.family.streams
        Lt = txt.shape[1]
        img_tab, txt_tab = (tables[Lt:], tables[:Lt]) if st.family.rope_joint else tables
        hd = attn.inner_dim // attn.heads
        eps = getattr(attn, si.q_norm).eps
        norms = [getattr(attn, n) for n in (stx.q_norm, stx.k_norm, si.q_norm, si.k_norm)]
        weights = [n.weight for n in norms]
        projs = [(E.get(attn, a), E.get(attn, b)) for a, b in ((stx.q, si.q), (stx.k, si.k), (stx.v, si.v))]
        compiling = torch.compiler.is_compiling()
        # the fused QK paths read the RMSNorm weights: hooked norms (layerwise casting, offloading)
        # run as modules; so do norms of mixed dtypes (the kernels round once, to one weight dtype)
        fused_qk = st.qk and E.no_hooks(*norms)
        if st.qk and not fused_qk:
            st.count("QK RMSNorm modules hooked: module calls, RoPE and cat in torch")
        elif fused_qk and len({w.dtype for w in weights}) != 1:
            fused_qk = False
            st.count("QK RMSNorm weights of mixed dtypes: module calls, RoPE and cat in torch")
        lists = None
        out = None
        if fused_qk and st.qk_path == "joint":
            packs = None if compiling else st.packed_qkv.get(id(attn))
            if packs is not None:  # checks the modules are still plain, re-packs replaced parameters
                wt, wi = packs[0].get(st, "text q/k/v"), packs[1].get(st, "image q/k/v")
                if wt is not None and wi is not None:
                    lists = ([wt[0]], [wt[1]], [wi[0]], [wi[1]])
            if lists is None and all(E.plain_linear(m) for pr in projs for m in pr):
                # not packed: joint_linear concatenates them (its own fallback)
                lists = tuple([getattr(m, n) for m in col] for n, col in
                              (("weight", [t for t, _ in projs]), ("bias", [t for t, _ in projs]),
                               ("weight", [i for _, i in projs]), ("bias", [i for _, i in projs])))
        if lists is not None:
            # each stream's q|k|v projection into its rows of one joint [B, N, 3D] buffer (one GEMM per
            # stream), whose column views are q, k, v; then QK-norm + RoPE in place
            buf = _eager.joint_linear_unchecked(txt, img, *lists)
            c = [0]
            for _, m in projs:
                c.append(c[-1] + m.out_features)
            q, k, v = (buf[..., c[j]:c[j + 1]].unflatten(-1, (-1, hd)) for j in range(3))
            if st.attn_fp8 is not None and st.attn_fp8.usable(st, self):  # attention_precision="fp8"
                out = st.attn_fp8.attention(q, k, v, Lt, weights, txt_tab, img_tab, eps, st.family.rope_interleaved)
            else:
                _eager.joint_qk_norm_rope_(q, k, Lt, *weights, txt_tab, img_tab, eps, st.family.rope_interleaved)
        else:
            if st.attn_fp8 is not None:
                st.attn_fp8.not_joint(st)
            t = [p[0](txt).unflatten(-1, (-1, hd)) for p in projs]
            i = [p[1](img).unflatten(-1, (-1, hd)) for p in projs]
            if fused_qk:
                q, k, v = _eager.qk_norm_rope_cat(*t, *i, *weights, txt_tab, img_tab, eps, st.family.rope_interleaved)
            else:  # stock RMSNorm modules, RoPE from the tables in torch (fp32 math), torch.cat
                rq = [_ref.apply_rope(n(x), tab).to(x.dtype)
                      for n, x, tab in zip(norms, (t[0], t[1], i[0], i[1]), (txt_tab, txt_tab, img_tab, img_tab))]
                q, k, v = torch.cat([rq[0], rq[2]], 1), torch.cat([rq[1], rq[3]], 1), torch.cat([t[2], i[2]], 1)
        if out is None:  # context parallelism: diffusers' all-to-all / ring, or None
            out = E.cp_attention(q, k, v, self)
        if out is not None:
            pass  # (FP8 attention, or this rank's tokens against every rank's keys)
        elif st.attention:
            # on the fast path, q, k, v of the joint buffer skip the op's checks (built just above)
            attend = _eager.attention_unchecked if lists is not None else _eager.attention
            out = attend(q, k, v, None, False, self.backend)
        else:
            from diffusers.models.attention_dispatch import dispatch_attention_fn
            out = dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend, parallel_config=None)
        out = out.flatten(2, 3).to(q.dtype)
        # row views (contiguous when B == 1): no split copies
        head, _, idx = si.out.partition(".")
        to_out = E.children(getattr(attn, head)) if idx else [getattr(attn, head)]
        img_out = E.call_linear(to_out[int(idx or 0)], out[:, Lt:])
        for m in to_out[int(idx or 0) + 1:]:
            if not E.skippable_dropout(m):
                img_out = m(img_out)
        txt_out = E.call_linear(E.get(attn, stx.out), out[:, :Lt])
        return img_out, txt_out


def _call_attn(attn, img_m, txt_m, tables):
    """The processor's fused path directly when the Attention module has no hooks and still has our
    processor (diffusers' ``Attention.forward`` inspects the processor's signature on every call);
    else the module call."""
    proc = attn.processor
    if (isinstance(proc, JointAttnProcessor) and E.no_hooks(attn) and E.no_global_hooks()
            and not proc.state.mode_stock):
        return proc.fused(attn, img_m, txt_m, tables)
    return attn(hidden_states=img_m, encoder_hidden_states=txt_m, image_rotary_emb=tables)


# --- MLP --------------------------------------------------------------------------------------------

def fused_mlp(ff, x: torch.Tensor) -> torch.Tensor:
    """diffusers ``FeedForward`` (GELU-tanh) with the GELU in the fc1 GEMM's epilogue on CUDA
    (``torch._addmm_activation(..., use_gelu=True)``: cuBLASLt's bias+GELU-tanh epilogue; one read
    and write of the [L, 4C] hidden activation less). On CPU that op applies the erf GELU, so CPU
    keeps the stock module; so does any FeedForward that is not (GELU-tanh proj with bias, Dropout,
    Linear[, Dropout])."""
    from diffusers.models.activations import GELU
    net = ff._modules.get("net")
    mods = E.children(net) if net is not None else ()
    if (not x.is_cuda or len(mods) < 3 or len(mods) > 4 or type(mods[0]) is not GELU
            or mods[0].approximate != "tanh" or not E.no_hooks(ff, net, mods[0]) or not E.no_global_hooks()):
        return ff(x)
    proj = mods[0]._modules.get("proj")
    if (not E.plain_linear(proj) or proj.bias is None or not E.skippable_dropout(mods[1])
            or len(mods) == 4 and not E.skippable_dropout(mods[3])):
        return ff(x)
    h = torch._addmm_activation(proj.bias, x.reshape(-1, x.shape[-1]), proj.weight.t(), use_gelu=True)
    return E.call_linear(mods[2], h).view(*x.shape[:-1], -1)


def swiglu_mlp(ff, x: torch.Tensor, acts=()) -> torch.Tensor:
    """A SwiGLU feed-forward (children ``linear_in`` [2F, C] with the gate rows first, ``act_fn`` of a
    class in ``acts``, ``linear_out``) with the input projection and the SwiGLU as one ``swiglu_linear``
    (on CUDA a GEMM with the SwiGLU in its epilogue: the [L, 2F] pre-activation is never written).
    A module with hooks, or whose projections are not bare Linears (LoRA), runs as a module call."""
    lin_in, lin_out = ff._modules.get("linear_in"), ff._modules.get("linear_out")
    if (lin_in is None or lin_out is None or not E.no_hooks(ff) or not E.plain_linear(lin_in)
            or not E.no_global_hooks() or len(ff._modules) != 3):
        return ff(x)
    act = ff._modules.get("act_fn")
    if type(act) not in acts or not E.no_hooks(act):
        return ff(x)
    return E.call_linear(lin_out, _eager.swiglu_linear(x, lin_in.weight, lin_in.bias))


# --- block forward ----------------------------------------------------------------------------------

def _grns_pair(dual, h, upd, g, sh, sc, index, eps, e, t_upd, t_g, t_sh, t_sc, t_eps):
    """gate_residual_norm_scale_shift of both streams: one launch (dual op) or two."""
    if dual:
        return _eager.dual_gate_residual_norm_scale_shift(h, upd, g, sh, sc, index, eps, e, t_upd, t_g, t_sh, t_sc,
                                                          None, t_eps)
    h, m = _eager.gate_residual_norm_scale_shift(h, upd, g, sh, sc, index, eps)
    e, tm = _eager.gate_residual_norm_scale_shift(e, t_upd, t_g, t_sh, t_sc, None, t_eps)
    return h, m, e, tm


def _lookahead_target(st, block, h):
    """The next block, if this block may do its norm1 + modulation: it still runs the fused forward
    unwrapped and without hooks (an offloading or caching hook must see its own call first), and
    its modulation weights are on h's device."""
    nxt = st.next_block.get(id(block))
    if nxt is None:
        return None
    if getattr(nxt.__dict__.get("forward"), "__func__", None) is not st.family.forward_for("double"):
        return None
    if (nxt._forward_pre_hooks or nxt._forward_hooks or hasattr(nxt, "_hf_hook")
            or hasattr(nxt, "_diffusers_hook")):
        return None
    if st.family.mod_source == "model_linear":  # the modulation outputs are the block's own inputs
        return nxt
    if st.family.streams[0].mod_linear is not None:
        if not _mod_containers_ok(nxt, st.family):
            return None
        ws = [getattr(E.get(nxt, s.mod_linear), "weight", None) for s in st.family.streams]
    else:
        mods = [getattr(nxt, s.mod) for s in st.family.streams]
        if not all(isinstance(m, torch.nn.Sequential) and len(m) == 2 for m in mods):
            return None
        ws = [getattr(m[1], "weight", None) for m in mods]
    if not all(isinstance(x, torch.Tensor) for x in ws) or ws[0].device != ws[1].device:
        return None
    return nxt if ws[0].device == h.device else None


def _mlp_fn(st):
    if not st.mlp:
        return lambda ff, x: ff(x)
    if st.family.mlp == "swiglu":
        acts = tuple(st.family.mlp_act()) if st.family.mlp_act is not None else ()
        return lambda ff, x: swiglu_mlp(ff, x, acts)
    return fused_mlp


def run_block(block, st, h, e, temb, rot, index):
    """The fused double-stream block: (h, e) -> (h, e) (image, text). ``temb``: the timestep embedding,
    or with ``mod_source="model_linear"`` the (image, text) modulation outputs."""
    if st.fp8 is not None:  # precision="fp8": integrations/fp8.py's state
        if st.fp8.usable(block, st, h, e):
            return st.fp8.run_block(block, st, h, e, temb, rot, index)
        st.fp8.check_bf16_path(block, st)
        if st.prenorm is not None and isinstance(st.prenorm.outs[0], tuple):
            st.prenorm = None  # FP8 look-ahead outputs are for the FP8 path
    fam = st.family
    si, stx = fam.streams
    tables = st.rope_tables(rot)
    E.cp_check_rows(st, tables, h.shape[1] + e.shape[1])
    compiling = torch.compiler.is_compiling()
    keys = (h, e, *temb, index) if isinstance(temb, tuple) else (h, e, temb, index)  # what look-ahead matches
    pre = (st.take_prenorm(block, *keys)
           if st.modulation and not compiling and st.prenorm is not None else None)
    img_mod, txt_mod = pre.mods if pre is not None else modulation_params(block, st, temb)
    eps_i1, eps_t1 = E.get(block, si.norm1).eps, E.get(block, stx.norm1).eps
    attn = getattr(block, fam.attn)
    order = st.order
    if st.modulation:
        i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = _chunks(img_mod, order)
        t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = _chunks(txt_mod, order)
        dual = (st.dual_launch and h.shape[0] == e.shape[0] and h.shape[-1] == e.shape[-1]
                and h.dtype == e.dtype and h.device == e.device)
        if pre is not None:
            img_m, txt_m = pre.outs
        elif dual:
            img_m, txt_m = _eager.dual_norm_scale_shift(h, i_sh1, i_sc1, index, eps_i1, e, t_sh1, t_sc1, None,
                                                        eps_t1, fam.norm)
        else:
            img_m = _eager.norm_scale_shift(h, i_sh1, i_sc1, index, None, None, eps_i1, fam.norm)
            txt_m = _eager.norm_scale_shift(e, t_sh1, t_sc1, None, None, None, eps_t1, fam.norm)
        img_attn, txt_attn = _call_attn(attn, img_m, txt_m, tables)
        h, img_m2, e, txt_m2 = _grns_pair(dual, h, img_attn, i_g1, i_sh2, i_sc2, index,
                                          E.get(block, si.norm2).eps, e, txt_attn, t_g1, t_sh2, t_sc2,
                                          E.get(block, stx.norm2).eps)
        mlp = _mlp_fn(st)
        img_y, txt_y = mlp(getattr(block, si.mlp), img_m2), mlp(getattr(block, stx.mlp), txt_m2)
        nxt = None
        if not compiling and st.lookahead and h.dtype != torch.float16:
            nxt = _lookahead_target(st, block, h)
        if nxt is not None:
            # the final gated residual + the next block's norm1 + modulation in one pass
            n_img_mod, n_txt_mod = modulation_params(nxt, st, temb)
            n_i = _chunks(n_img_mod, order)
            n_t = _chunks(n_txt_mod, order)
            h, n_img_m, e, n_txt_m = _grns_pair(dual, h, img_y, i_g2, n_i[0], n_i[1], index,
                                                E.get(nxt, si.norm1).eps, e, txt_y, t_g2, n_t[0], n_t[1],
                                                E.get(nxt, stx.norm1).eps)
            keys = (h, e, *temb, index) if isinstance(temb, tuple) else (h, e, temb, index)
            st.prenorm = E.Prenorm(nxt, keys, (n_img_mod, n_txt_mod), (n_img_m, n_txt_m))
        else:
            h = _eager.gate_residual(h, img_y, i_g2, index)
            e = _eager.gate_residual(e, txt_y, t_g2, None)
    else:  # stock norm modules, modulation math in torch, fused attention only
        i, t = _chunks(img_mod, order), _chunks(txt_mod, order)
        img_m, img_g1 = _modulate(E.get(block, si.norm1)(h), *i[:3], index)
        txt_m, txt_g1 = _modulate(E.get(block, stx.norm1)(e), *t[:3])
        img_attn, txt_attn = _call_attn(attn, img_m, txt_m, tables)
        h = h + img_g1 * img_attn
        e = e + txt_g1 * txt_attn
        img_m2, img_g2 = _modulate(E.get(block, si.norm2)(h), *i[3:], index)
        h = h + img_g2 * getattr(block, si.mlp)(img_m2)
        txt_m2, txt_g2 = _modulate(E.get(block, stx.norm2)(e), *t[3:])
        e = e + txt_g2 * getattr(block, stx.mlp)(txt_m2)
    if e.dtype == torch.float16 and stx.name in fam.fp16_clip:
        e = e.clip(-65504, 65504)
    if h.dtype == torch.float16 and si.name in fam.fp16_clip:
        h = h.clip(-65504, 65504)
    return h, e
