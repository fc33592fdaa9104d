"""The Qwen-Image family (Qwen-Image, -Edit, -Edit-2509, -Edit-2511): diffusers' ``QwenImageTransformer2DModel``.

A description for the engine (``engine.Family``) and the hooks a description cannot express. The
model: 60 ``QwenImageTransformerBlock`` in ``transformer_blocks``, double-stream (image ``img_*`` and
text ``txt_*`` modules, one joint attention, text first). Modulation: per block ``img_mod`` /
``txt_mod`` = Sequential(SiLU, Linear(D, 6D)) on temb, chunks (shift, scale, gate) for the attention
half, then for the MLP half. Norms: LayerNorm without affine, eps 1e-6, fp32 math. QK norm: RMSNorm
per head (``norm_q``, ``norm_k``, ``norm_added_q``, ``norm_added_k``). RoPE: ``pos_embed`` returns
complex (img_freqs, txt_freqs) once per forward, interleaved pairs; the patched one returns fp32
cos|sin tables. Mask: ``encoder_hidden_states_mask`` (padded text runs stock). MLP: FeedForward,
GELU-tanh. Per-token parameter sets: with ``zero_cond_t`` (Edit-2511) temb has 2B rows ([t, 0]) and
the stock model forward builds ``modulate_index`` (0: target tokens, 1: reference tokens), which the
image stream's ops take; the text stream uses the first B rows.
"""
from __future__ import annotations

import torch

from ..rope_tables import complex_from_cos_sin, cos_sin_from_complex
from . import double_stream, engine


def as_rope_tables(rot):
    """(img_table, txt_table) fp32 cos|sin from diffusers' complex (img_freqs, txt_freqs); tables pass."""
    if engine.is_tables(rot):
        return rot
    return tuple(cos_sin_from_complex(f) for f in rot)


def _rope_stock(tables):
    return tuple(complex_from_cos_sin(t) for t in tables)


def _rope_key(args, kwargs):
    """``pos_embed(video_fhw, device=None, max_txt_seq_len=None)``: the tables depend on these only."""
    fhw = args[0] if args else kwargs.get("video_fhw")
    txt = args[2] if len(args) > 2 else kwargs.get("max_txt_seq_len")
    dev = args[1] if len(args) > 1 else kwargs.get("device")
    return repr(fhw), int(txt), str(dev)


def _stock_block_forward(block=None):
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
    return QwenImageTransformerBlock.forward


def _stock_processors():
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0
    return (QwenDoubleStreamAttnProcessor2_0,)


def fused_block_forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask=None,
                        temb=None, image_rotary_emb=None, joint_attention_kwargs=None, modulate_index=None):
    """``QwenImageTransformerBlock.forward`` (same signature and return: (encoder_hidden_states,
    hidden_states)) on fused ops; bound per instance by ``patch``."""
    st = engine.state_of(self)
    if (st.mode_stock or encoder_hidden_states_mask is not None or image_rotary_emb is None
            or joint_attention_kwargs):
        if not st.mode_stock and not torch.compiler.is_compiling():
            st.count("block called with " + ("encoder_hidden_states_mask" if encoder_hidden_states_mask is not None
                                             else "no image_rotary_emb" if image_rotary_emb is None
                                             else f"attention_kwargs {sorted(joint_attention_kwargs)}")
                     + " (stock block forward)")
        return _stock_block_forward()(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                      temb, image_rotary_emb, joint_attention_kwargs, modulate_index)
    h, e = double_stream.run_block(self, st, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                 modulate_index)
    return e, h


def _probe_call(model, block):
    """A tiny block call (1 x 4 image + 2 text tokens) in the model's dtype and device."""
    p = next(model.parameters())
    D = model.inner_dim
    hd = block.attn.inner_dim // block.attn.heads
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(1, 4, D, generator=g).to(p.device, p.dtype)
    e = torch.randn(1, 2, D, generator=g).to(p.device, p.dtype)
    temb = torch.randn(2 if block.zero_cond_t else 1, D, generator=g).to(p.device, p.dtype)
    idx = torch.tensor([[0, 0, 1, 1]], dtype=torch.int32, device=p.device) if block.zero_cond_t else None
    tab = (torch.randn(4, hd, generator=g).to(p.device), torch.randn(2, hd, generator=g).to(p.device))
    return (h, e, None, temb, tab, None, idx), {}


FAMILY = engine.Family(
    name="Qwen-Image",
    model_classes=("QwenImageTransformer2DModel",),
    block_lists=(("transformer_blocks", "double"),),
    streams=(engine.Stream("image", mod="img_mod", norm1="img_norm1", norm2="img_norm2", mlp="img_mlp",
                           q="to_q", k="to_k", v="to_v", q_norm="norm_q", k_norm="norm_k", out="to_out.0"),
             engine.Stream("text", mod="txt_mod", norm1="txt_norm1", norm2="txt_norm2", mlp="txt_mlp",
                           q="add_q_proj", k="add_k_proj", v="add_v_proj", q_norm="norm_added_q",
                           k_norm="norm_added_k", out="to_add_out")),
    mod_source="block_linear",
    mod_chunks=("shift1", "scale1", "gate1", "shift2", "scale2", "gate2"),
    norm="layer",
    qk_norm="head",
    rope_module="pos_embed",
    rope_interleaved=True,
    rope_tables=as_rope_tables,
    rope_stock=_rope_stock,
    rope_key=_rope_key,
    mask_kwarg="encoder_hidden_states_mask",
    mask_pos=2,
    mlp="gelu_tanh",
    index_flag="zero_cond_t",
    block_forward=fused_block_forward,
    stock_block_forward=_stock_block_forward,
    stock_processors=_stock_processors,
    probe_call=_probe_call,
    describe=lambda model: f"zero_cond_t={bool(model.zero_cond_t)}, ",
)
