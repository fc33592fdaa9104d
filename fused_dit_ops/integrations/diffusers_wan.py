"""The Wan family (Wan2.1 T2V / I2V, Wan2.2 A14B and TI2V-5B): diffusers' ``WanTransformer3DModel``.

A description for the engine (``engine.Family``) and the hooks a description cannot express. The
model: ``blocks`` of ``WanTransformerBlock`` (kind "self_cross", ``self_cross.py``): ``norm1`` (fp32
LayerNorm, no affine) + modulation, self-attention ``attn1`` (q/k ``RMSNorm`` over all heads, 3D RoPE,
no mask), fp32 gated residual, ``norm2`` (affine fp32 LayerNorm when ``cross_attn_norm``),
cross-attention ``attn2`` to the text (I2V: an image context with added K/V projections, a second
attention whose output is added), plain residual, ``norm3`` + modulation, GELU-tanh ``ffn``, fp32
gated residual. Modulation: the block's ``scale_shift_table`` [1, 6, C] plus the model's
``time_proj(SiLU(temb))`` [B, 6, C], summed in fp32, chunks (shift, scale, gate, c_shift, c_scale,
c_gate). RoPE: ``rope(hidden_states)`` returns (cos, sin) [1, L, 1, head_dim] (frequencies of the
frame, height and width axes, each repeated for its interleaved pair); the patched one returns one
fp32 cos|sin table [L, head_dim], cached per latent shape.

Wan2.2 TI2V-5B passes a per-token timestep [B, L] (0 on the conditioning frame's tokens, t
elsewhere): the stock forward projects it for every token ([B, L, 6C] GEMM outputs and a [B, L, 6, C]
fp32 sum per block). The fused model forward collapses it to the two distinct timesteps per batch
row ([2B] timesteps, [2B, 6, C] parameters) and a per-token set index [B, L], which the modulation
ops select from (exact, once every token's timestep is one of the two; checked per forward with
one device sync, or by a device-side assert while a CUDA graph is captured).

Without the collapse (:func:`set_timestep_collapse` ``(model, False)``, for measuring what it saves): the
stock model forward projects the per-token timestep and the blocks get the per-token temb [B, L, 6, C];
each block then runs its q|k|v GEMM, QK norm + RoPE, attention and MLP fused and its modulation per
token in torch, as the stock block does (the fused modulation ops take at most two parameter sets).

Wan2.2 A14B has two experts (``pipeline.transformer`` and ``pipeline.transformer_2``): two models,
each patched by its own ``fused_dit_ops.patch`` call.
"""
from __future__ import annotations

import inspect

import torch

from . import engine, self_cross


def is_tables(rot) -> bool:
    """The fused format is one real tensor; the stock one a (cos, sin) tuple."""
    return isinstance(rot, torch.Tensor)


def as_rope_tables(rot):
    """fp32 cos|sin [L, D] from the stock (cos, sin) [1, L, 1, D] (each frequency repeated for its
    pair); a table passes."""
    if is_tables(rot):
        return rot
    cos, sin = rot
    return torch.cat([cos[0, :, 0, 0::2], sin[0, :, 0, 1::2]], dim=-1).float().contiguous()


def rope_stock(table):
    """The inverse of :func:`as_rope_tables` (exact for fp32 stock tables)."""
    c, s = table.chunk(2, dim=-1)
    return c.repeat_interleave(2, dim=-1)[None, :, None], s.repeat_interleave(2, dim=-1)[None, :, None]


def _rope_key(args, kwargs):
    x = args[0] if args else kwargs.get("hidden_states")
    return (tuple(x.shape[2:]), x.device) if isinstance(x, torch.Tensor) else None


def _classes():
    from diffusers.models.transformers import transformer_wan as tw
    return tw


def _stock_block_forward(block=None):
    return _classes().WanTransformerBlock.forward


def _stock_processors():
    return (_classes().WanAttnProcessor,)


def _stock_fallback(self, st, hidden_states, encoder_hidden_states, temb, rotary_emb, why=None):
    if why and not st.mode_stock and not torch.compiler.is_compiling():
        st.count(why)
    if rotary_emb is not None and is_tables(rotary_emb):
        rotary_emb = rope_stock(rotary_emb)
    return _stock_block_forward(self)(self, hidden_states, encoder_hidden_states, temb, rotary_emb)


def fused_block_forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
    """``WanTransformerBlock.forward`` (same signature and return) on fused ops; bound per instance
    by ``patch``."""
    st = engine.state_of(self)
    if st.mode_stock:
        return _stock_fallback(self, st, hidden_states, encoder_hidden_states, temb, rotary_emb)
    if rotary_emb is None:
        return _stock_fallback(self, st, hidden_states, encoder_hidden_states, temb, rotary_emb,
                               "block called without rotary_emb (stock block forward)")
    if temb.dim() == 4 and not collapses(st):
        return _per_token_block(self, st, hidden_states, encoder_hidden_states, temb, rotary_emb)
    if temb.dim() != 3:
        return _stock_fallback(self, st, hidden_states, encoder_hidden_states, temb, rotary_emb,
                               "per-token temb [B, L, 6, C] not collapsed to two sets (stock block forward)")
    index = st.token_index
    if index is not None and temb.shape[0] != 2 * hidden_states.shape[0]:
        index = None
    if index is None and temb.shape[0] != hidden_states.shape[0]:
        # two parameter sets without the index that goes with them (a block called outside the patched
        # model forward with a collapsed temb): nothing to select with
        raise ValueError(f"temb has {temb.shape[0]} rows for a batch of {hidden_states.shape[0]}: a collapsed "
                         "(two-set) temb needs the per-token index of the patched model forward")
    return self_cross.run_block(self, st, hidden_states, encoder_hidden_states, temb, rotary_emb, index)


def _per_token_block(self, st, x, ctx, temb, rot):
    """The block with an uncollapsed per-token temb [B, L, 6, C] (collapse switched off): the six
    fp32 parameters per token and the modulation arithmetic in torch, as the stock block computes
    them; q|k|v, QK norm + RoPE, attention and the MLP as in the fused block."""
    from .double_stream import fused_mlp
    sc = st.family.self_cross
    tables = st.rope_tables(rot)
    engine.cp_check_rows(st, tables, x.shape[1])
    e = getattr(self, sc.table).unsqueeze(0) + temb.float()  # [B, L, 6, C]
    sh1, sc1, g1, sh2, sc2, g2 = (e[:, :, j] for j in st.order)
    n1, n2, n3 = (engine.get(self, n) for n in (sc.norm1, sc.norm2, sc.norm3))
    xn = (n1(x.float()) * (1 + sc1) + sh1).type_as(x)
    x = (x.float() + self_cross.self_attention(self, st, xn, tables) * g1).type_as(x)
    x = x + self_cross.cross_attention(self, st, n2(x.float()).type_as(x), ctx)
    xn = (n3(x.float()) * (1 + sc2) + sh2).type_as(x)
    ff = engine.get(self, sc.mlp)
    y = fused_mlp(ff, xn) if st.mlp and st.modulation else ff(xn)
    return (x.float() + y.float() * g2).type_as(x)


def collapses(st) -> bool:
    """Whether the patched model forward collapses per-token timesteps to two sets (default)."""
    return st.__dict__.get("wan_collapse", True)


def set_timestep_collapse(model_or_pipeline, enabled: bool = True) -> None:
    """Switch the per-token timestep collapse (two parameter sets + a per-token index) of a patched
    Wan model off (``False``) or back on. Off, a per-token timestep runs the stock model forward
    (the timestep projected for every token) into blocks that keep their fused attention, QK norm +
    RoPE and MLP but modulate per token in torch: the difference to the default is what the collapse
    saves. Applies until the model is patched again; shown in the patch report's options."""
    model, _ = engine.resolve(model_or_pipeline)
    st = model.__dict__.get(engine.ATTR)
    if st is None or st.detached or st.family is not FAMILY:
        raise ValueError("set_timestep_collapse needs a Wan model patched by fused_dit_ops.patch")
    st.wan_collapse = bool(enabled)
    if enabled:
        st.report.options.pop("timestep_collapse", None)
    else:
        st.report.options["timestep_collapse"] = False


# --- the model forward with per-token timesteps ------------------------------------------------------

_SIG = None


def _bind(model, args, kwargs):
    global _SIG
    if _SIG is None:
        _SIG = inspect.signature(_classes().WanTransformer3DModel.forward)
    b = _SIG.bind(model, *args, **kwargs)
    b.apply_defaults()
    return b.arguments


def _cp_split_only(model):
    """The ``pre_forward`` of diffusers' context-parallel split hook when it is the only hook on the
    model, else None."""
    reg = getattr(model, "_diffusers_hook", None)
    hooks = getattr(reg, "hooks", None)
    if not hooks or len(hooks) != 1 or len(getattr(reg, "_fn_refs", ())) != 1:
        return None
    hook = next(iter(hooks.values()))
    if type(hook).__name__ != "ContextParallelSplitHook" or model._forward_hooks or model._forward_pre_hooks:
        return None
    return hook.pre_forward


def _collapse(st, ts):
    """(timesteps [2B]: each row's first token's value, then its last token's; index [B, L] int32:
    1 where a token's timestep differs from its row's first), or None when a row has a third value."""
    first, last = ts[:, :1], ts[:, -1:]
    index = (ts != first).to(torch.int32)
    capturing = ts.is_cuda and torch.cuda.is_current_stream_capturing()
    ok = ((ts == first) | (ts == last)).all()
    if capturing:
        torch._assert_async(ok, "per-token timesteps take more than two values per batch row")
    elif not bool(ok):
        return None
    return torch.cat([first[:, 0], last[:, 0]]), index


def model_forward(st, args, kwargs):
    """The eager fused model forward: the stock forward, except with a per-token timestep [B, L]
    (Wan2.2 TI2V), which runs on two parameter sets per batch row and a per-token index."""
    orig = st.orig_model_forward
    stock_args = args, kwargs  # what the stock forward (with its hooks) gets
    model = getattr(orig, "__self__", None)
    if model is None and st.cp:
        # enable_parallelism after patch: diffusers' split hook on the model is under this forward; it
        # shards the inputs here (when it is the model's only hook), as it would before the stock forward
        split = _cp_split_only(st.model)
        if split is not None:
            args, kwargs = split(st.model, *args, **kwargs)
            model = st.model
    if model is None or not isinstance(model, _classes().WanTransformer3DModel):
        ts = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if st.cp and isinstance(ts, torch.Tensor) and ts.dim() == 2:
            st.count("per-token timestep under context parallelism with other hooks on the model (stock model "
                     "forward)")
        return orig(*stock_args[0], **stock_args[1])
    a = _bind(model, args, kwargs)
    ts = a["timestep"]
    if not (isinstance(ts, torch.Tensor) and ts.dim() == 2) or not collapses(st):
        return orig(*stock_args[0], **stock_args[1])
    why = None
    if a.get("attention_kwargs"):
        why = "attention_kwargs with a per-token timestep (stock forward)"
    elif any(b.__dict__.get(engine.ATTR) is not st for b in model.blocks) or not st.tables_from_rope:
        why = "per-token timestep with some blocks stock (stock forward)"
    elif not (engine.no_hooks(model.condition_embedder, model.norm_out) and engine.cp_hooks_only(model.proj_out)):
        why = "per-token timestep with hooked embedder or output modules (stock forward)"
    col = None if why else _collapse(st, ts)
    if col is None:
        st.count(why or "per-token timestep with more than two values per batch row (stock forward)")
        return orig(*stock_args[0], **stock_args[1])
    return _collapsed_forward(model, st, a, *col)


def _collapsed_forward(model, st, a, ts2, index):
    """WanTransformer3DModel.forward with the per-token timestep given as two sets + index."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    x = a["hidden_states"]
    ctx, ctx_img = a["encoder_hidden_states"], a["encoder_hidden_states_image"]
    B, _, F_, H, W = x.shape
    p_t, p_h, p_w = model.config.patch_size
    pf, ph, pw = F_ // p_t, H // p_h, W // p_w
    rot = model.rope(x)
    h = model.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
    temb, tproj, ctx, ctx_img = model.condition_embedder(ts2, ctx, ctx_img, timestep_seq_len=None)
    tproj = tproj.unflatten(1, (6, -1))  # [2B, 6, C]
    if ctx_img is not None:
        ctx = torch.concat([ctx_img, ctx], dim=1)
    # (under context parallelism the index is this rank's shard; the first block's hook shards h)
    if not st.cp and index.shape[1] != h.shape[1]:
        raise ValueError(f"timestep has {index.shape[1]} tokens per row, the latent {h.shape[1]}")
    st.token_index = index
    for block in model.blocks:
        h = block(h, ctx, tproj, rot)
    st.token_index = None
    shift, scale = (model.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)  # [2B, 1, C]
    from ..ops import _eager
    h = _eager.norm_scale_shift(h, shift[:, 0].float().to(h.device), scale[:, 0].float().to(h.device), index, None,
                                None, model.norm_out.eps) if st.modulation else _stock_out_norm(model, h, shift, scale,
                                                                                                index)
    h = model.proj_out(h)
    h = h.reshape(B, pf, ph, pw, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    out = h.flatten(6, 7).flatten(4, 5).flatten(2, 3)
    return Transformer2DModelOutput(sample=out) if a["return_dict"] else (out,)


def _stock_out_norm(model, h, shift, scale, index):
    from .. import reference as ref
    sh, sc = ref.select_params(shift[:, 0], index), ref.select_params(scale[:, 0], index)
    return (model.norm_out(h.float()) * (1 + sc) + sh).type_as(h)


# --- probe, description -----------------------------------------------------------------------------

def _probe_call(model, block):
    """A tiny block call (1 x 4 tokens, 3 text tokens; I2V: 2 image-context tokens + 512 text tokens)."""
    p = block.attn1.to_q.weight  # (the model's first parameters are fp32 tables)
    C = block.attn1.inner_dim
    hd = C // block.attn1.heads
    g = torch.Generator(device="cpu").manual_seed(0)
    n_ctx = 3 if block.attn2.add_k_proj is None else 2 + FAMILY.self_cross.text_len
    h = torch.randn(1, 4, C, generator=g).to(p.device, p.dtype)
    ctx = torch.randn(1, n_ctx, C, generator=g).to(p.device, p.dtype)
    temb = torch.randn(1, 6, C, generator=g).to(p.device, p.dtype)
    ang = torch.rand(4, hd // 2, generator=g)
    return (h, ctx, temb, torch.cat([ang.cos(), ang.sin()], -1).to(p.device)), {}


def _describe(model):
    b = model.blocks[0] if len(model.blocks) else None
    if b is None:
        return ""
    kind = "i2v, " if b.attn2.add_k_proj is not None else ""
    # the block weights' dtype: the model's first parameters are its fp32 tables (_keep_in_fp32_modules)
    wdt = str(b.attn1.to_q.weight.dtype).replace("torch.", "")
    return f"heads={b.attn1.heads}, dim={b.attn1.inner_dim}, {kind}block_weights={wdt}, "


FAMILY = engine.Family(
    name="Wan",
    model_classes=("WanTransformer3DModel",),
    block_lists=(("blocks", "self_cross"),),
    streams=(),
    attn="attn1",
    mod_source="table_plus_temb",
    mod_chunks=("shift1", "scale1", "gate1", "shift2", "scale2", "gate2"),
    norm="layer",
    qk_norm="across_heads",
    rope_module="rope",
    rope_interleaved=True,
    is_tables=is_tables,
    rope_tables=as_rope_tables,
    rope_stock=rope_stock,
    rope_key=_rope_key,
    mask_kwarg=None,
    mlp="gelu_tanh",
    self_cross=self_cross.SelfCross(),
    block_forward=fused_block_forward,
    stock_block_forward=_stock_block_forward,
    stock_processors=_stock_processors,
    probe_call=_probe_call,
    describe=_describe,
    model_forward=model_forward,
)
