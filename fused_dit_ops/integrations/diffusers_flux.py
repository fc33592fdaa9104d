"""The Flux.1 family (FLUX.1-dev, -schnell, Kontext and fine-tunes): diffusers' ``FluxTransformer2DModel``.

A description for the engine (``engine.Family``) and the hooks a description cannot express. The
model: ``transformer_blocks`` (double-stream ``FluxTransformerBlock``: image modules ``norm1``,
``norm2``, ``ff``, ``attn.to_q/k/v``, ``attn.to_out.0``; text modules ``norm1_context``,
``norm2_context``, ``ff_context``, ``attn.add_q/k/v_proj``, ``attn.to_add_out``) then
``single_transformer_blocks`` (``FluxSingleTransformerBlock``: ``norm``, ``proj_mlp``, ``attn.to_q/k/v``,
``proj_out`` over [attention | GELU(MLP)]). Modulation: adaLN-Zero modules, Linear(SiLU(temb)) at
``norm1.linear`` (6 chunks: shift, scale, gate of the attention half, then of the MLP half) and
``norm.linear`` (3 chunks), non-affine LayerNorm eps 1e-6. QK norm: ``torch.nn.RMSNorm`` per head.
RoPE: ``pos_embed(ids)`` returns (cos, sin) [L, head_dim] over the joint sequence [text, image]
(each frequency repeated for its interleaved pair); the patched one returns one fp32 cos|sin table
[L, head_dim], which each block splits at its text length. No text mask. MLP: GELU-tanh.
"""
from __future__ import annotations

import torch

from . import double_stream, engine, single_stream


def is_tables(rot) -> bool:
    """The fused format is one real tensor; the stock one a (cos, sin) tuple."""
    return isinstance(rot, torch.Tensor)


def as_rope_tables(rot):
    """fp32 cos|sin [L, R] from the stock (cos, sin) [L, R] (pairs repeated); a table passes."""
    if is_tables(rot):
        return rot
    cos, sin = rot
    return torch.cat([cos[:, 0::2], sin[:, 0::2]], dim=-1).float().contiguous()


def rope_stock(table):
    """The inverse of :func:`as_rope_tables` (exact)."""
    c, s = table.chunk(2, dim=-1)
    return c.repeat_interleave(2, dim=-1), s.repeat_interleave(2, dim=-1)


def _classes():
    from diffusers.models.transformers import transformer_flux as tf
    return tf


def _stock_block_forward(block=None):
    tf = _classes()
    return (tf.FluxSingleTransformerBlock if isinstance(block, tf.FluxSingleTransformerBlock)
            else tf.FluxTransformerBlock).forward


def _stock_processors():
    return (_classes().FluxAttnProcessor,)


class FluxJointProcessor(double_stream.JointAttnProcessor):
    """The double-stream processor with ``FluxAttnProcessor``'s call signature (``FluxAttention``
    passes its arguments by position)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        st = self.state
        tab = image_rotary_emb is not None and is_tables(image_rotary_emb)
        if st.mode_stock or attention_mask is not None or not tab or encoder_hidden_states is None:
            if tab:
                image_rotary_emb = rope_stock(image_rotary_emb)
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return self.fused(attn, hidden_states, encoder_hidden_states, image_rotary_emb)


def _stock_fallback(self, st, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs):
    """The stock block forward, with the stock RoPE format (stock mode, no RoPE, attention kwargs)."""
    if not st.mode_stock and not torch.compiler.is_compiling():
        st.count("block called with " + ("no image_rotary_emb" if image_rotary_emb is None
                                         else f"attention_kwargs {sorted(joint_attention_kwargs)}")
                 + " (stock block forward)")
    if image_rotary_emb is not None and is_tables(image_rotary_emb):
        image_rotary_emb = rope_stock(image_rotary_emb)
    return _stock_block_forward(self)(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                      joint_attention_kwargs)


def fused_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                        joint_attention_kwargs=None):
    """``FluxTransformerBlock.forward`` (same signature and return: (encoder_hidden_states,
    hidden_states)) on fused ops; bound per instance by ``patch``."""
    st = engine.state_of(self)
    if st.mode_stock or image_rotary_emb is None or joint_attention_kwargs:
        return _stock_fallback(self, st, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                               joint_attention_kwargs)
    h, e = double_stream.run_block(self, st, hidden_states, encoder_hidden_states, temb, image_rotary_emb, None)
    return e, h


def fused_single_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                               joint_attention_kwargs=None):
    """``FluxSingleTransformerBlock.forward`` (same signature and return) on fused ops."""
    st = engine.state_of(self)
    if st.mode_stock or image_rotary_emb is None or joint_attention_kwargs:
        return _stock_fallback(self, st, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                               joint_attention_kwargs)
    h, e = single_stream.run_block(self, st, hidden_states, encoder_hidden_states, temb, image_rotary_emb)
    return e, h


def _probe_call(model, block):
    """A tiny block call (1 x 4 image + 2 text tokens) in the model's dtype and device."""
    p = next(model.parameters())
    D = model.inner_dim
    hd = block.attn.inner_dim // block.attn.heads
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(1, 4, D, generator=g).to(p.device, p.dtype)
    e = torch.randn(1, 2, D, generator=g).to(p.device, p.dtype)
    temb = torch.randn(1, D, generator=g).to(p.device, p.dtype)
    return (h, e, temb, torch.randn(6, hd, generator=g).to(p.device)), {}


_S = engine.Stream
FAMILY = engine.Family(
    name="Flux.1",
    model_classes=("FluxTransformer2DModel",),
    block_lists=(("transformer_blocks", "double"), ("single_transformer_blocks", "single")),
    streams=(_S("image", mod="norm1", mod_linear="norm1.linear", norm1="norm1.norm", norm2="norm2", mlp="ff",
                q="to_q", k="to_k", v="to_v", q_norm="norm_q", k_norm="norm_k", out="to_out.0"),
             _S("text", mod="norm1_context", mod_linear="norm1_context.linear", norm1="norm1_context.norm",
                norm2="norm2_context", mlp="ff_context", q="add_q_proj", k="add_k_proj", v="add_v_proj",
                q_norm="norm_added_q", k_norm="norm_added_k", out="to_add_out")),
    single=engine.Single(mod="norm", mod_linear="norm.linear", norm="norm.norm", mlp_in="proj_mlp",
                         out="proj_out"),
    mod_source="block_linear",
    mod_chunks=("shift1", "scale1", "gate1", "shift2", "scale2", "gate2"),
    norm="layer",
    qk_norm="head",
    rope_module="pos_embed",
    rope_interleaved=True,
    rope_joint=True,
    is_tables=is_tables,
    rope_tables=as_rope_tables,
    rope_stock=rope_stock,
    rope_key=None,  # the tables depend on the ids' values (not only shapes): computed once per forward
    mask_kwarg=None,
    mlp="gelu_tanh",
    fp16_clip=("text",),  # FluxTransformerBlock clips the text stream only
    block_forward=fused_block_forward,
    single_block_forward=fused_single_block_forward,
    stock_block_forward=_stock_block_forward,
    stock_processors=_stock_processors,
    processor_class=FluxJointProcessor,
    probe_call=_probe_call,
    describe=lambda model: f"single_layers={len(model.single_transformer_blocks)}, ",
)
