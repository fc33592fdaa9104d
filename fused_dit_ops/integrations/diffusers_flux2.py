"""The FLUX.2 family (FLUX.2-dev and its fine-tunes): diffusers' ``Flux2Transformer2DModel``.

A description for the engine (``engine.Family``) and the hooks a description cannot express. The
model (diffusers 0.42): ``transformer_blocks`` (double-stream ``Flux2TransformerBlock``: image modules
``norm1``, ``norm2``, ``ff``, ``attn.to_q/k/v``, ``attn.to_out.0``; text modules ``norm1_context``,
``norm2_context``, ``ff_context``, ``attn.add_q/k/v_proj``, ``attn.to_add_out``; no biases) then
``single_transformer_blocks`` (``Flux2SingleTransformerBlock``: ``norm``, and in ``attn`` one Linear
``to_qkv_mlp_proj`` whose rows are q | k | v | MLP gate | MLP linear, and ``to_out`` over
[attention | SwiGLU(MLP)]).

What differs from FLUX.1, and how it is described:

- modulation is model-level: ``double_stream_modulation_img/_txt`` and ``single_stream_modulation``
  (SiLU + Linear without bias) run once per model forward, and every block receives their outputs
  ([B, 6C] / [B, 3C]; chunks shift, scale, gate of the attention half, then of the MLP half):
  ``mod_source="model_linear"``; the blocks take column views;
- MLP: ``Flux2FeedForward`` (``linear_in`` C -> 2F with the gate rows first, ``Flux2SwiGLU``,
  ``linear_out``): ``mlp="swiglu"``, one ``swiglu_linear`` op; the single block's MLP rows of
  ``to_qkv_mlp_proj`` likewise (``Single.qkv_mlp``, ``mlp_act="swiglu"``);
- the single blocks get the joint [text, image] sequence and return it (no text length is passed:
  text and image share the QK norms, and one RoPE table covers the sequence);
- RoPE: ``pos_embed`` (4 axes of 32, theta 2000) is called for the image and the text ids and the
  model concatenates the (cos, sin) halves; it stays stock (``rope_in_module=False``) and the first
  fused block converts the concatenated output to one fp32 cos|sin table [L, 128] per forward;
- fp16: the double block clips the text stream only (``fp16_clip``).

The reference-image KV-cache mode (``kv_cache_mode``, Python-side caches of reference K/V) runs the
stock forward, counted in ``report.runtime``.
"""
from __future__ import annotations

import torch

from . import double_stream, engine, single_stream
from .diffusers_flux import FluxJointProcessor, as_rope_tables, is_tables, rope_stock


def _classes():
    from diffusers.models.transformers import transformer_flux2 as tf
    return tf


def _stock_block_forward(block=None):
    tf = _classes()
    return (tf.Flux2SingleTransformerBlock if isinstance(block, tf.Flux2SingleTransformerBlock)
            else tf.Flux2TransformerBlock).forward


def _stock_processors():
    tf = _classes()
    return (tf.Flux2AttnProcessor, tf.Flux2ParallelSelfAttnProcessor)


def _mlp_act():
    return (_classes().Flux2SwiGLU,)


def _forward_reason(args, kwargs):
    """The KV-cache mode (reference K/V kept between steps, a per-token modulation blend) runs stock."""
    mode = kwargs.get("kv_cache_mode", args[9] if len(args) > 9 else None)
    if mode is not None:
        return f"kv_cache_mode={mode!r} (reference-image KV cache): stock forward"
    return None


def _stock_fallback(self, st, why, args, rot_pos):
    """The stock block forward on ``args`` (its positional arguments), with the stock RoPE format."""
    if not st.mode_stock and not torch.compiler.is_compiling():
        st.count(f"block called with {why} (stock block forward)")
    args = list(args)
    rot = args[rot_pos]
    if rot is not None and is_tables(rot):
        args[rot_pos] = rope_stock(rot)
    return _stock_block_forward(self)(self, *args)


def _why_stock(st, rot, kwargs, *mods):
    if st.mode_stock:
        return "stock mode"
    if rot is None:
        return "no image_rotary_emb"
    if kwargs:
        return f"attention_kwargs {sorted(kwargs)}"
    if any(m.dim() != 2 for m in mods):
        return "per-token modulation"
    return None


def fused_block_forward(self, hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt,
                        image_rotary_emb=None, joint_attention_kwargs=None):
    """``Flux2TransformerBlock.forward`` (same signature and return: (encoder_hidden_states,
    hidden_states)) on fused ops; bound per instance by ``patch``."""
    st = engine.state_of(self)
    why = _why_stock(st, image_rotary_emb, joint_attention_kwargs, temb_mod_img, temb_mod_txt)
    if why is not None:
        return _stock_fallback(self, st, why, (hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt,
                                               image_rotary_emb, joint_attention_kwargs), 4)
    h, e = double_stream.run_block(self, st, hidden_states, encoder_hidden_states, (temb_mod_img, temb_mod_txt),
                                   image_rotary_emb, None)
    return e, h


def fused_single_block_forward(self, hidden_states, encoder_hidden_states, temb_mod, image_rotary_emb=None,
                               joint_attention_kwargs=None, split_hidden_states=False, text_seq_len=None):
    """``Flux2SingleTransformerBlock.forward`` (same signature and returns) on fused ops. The model
    passes the joint [text, image] sequence (``encoder_hidden_states`` None) and gets it back."""
    st = engine.state_of(self)
    why = _why_stock(st, image_rotary_emb, joint_attention_kwargs, temb_mod)
    if why is not None:
        return _stock_fallback(self, st, why, (hidden_states, encoder_hidden_states, temb_mod, image_rotary_emb,
                                               joint_attention_kwargs, split_hidden_states, text_seq_len), 3)
    x = hidden_states
    if encoder_hidden_states is not None:
        text_seq_len = encoder_hidden_states.shape[1]
        x = None if torch.compiler.is_compiling() else single_stream.joint_of(encoder_hidden_states, hidden_states)
        if x is None:
            x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    # text length 0: one RoPE table over the joint sequence (text and image share the QK norms)
    x = single_stream.run_joint(self, st, x, 0, temb_mod, image_rotary_emb)
    if split_hidden_states:
        return x[:, :text_seq_len], x[:, text_seq_len:]
    return x


def _probe_call(model, block):
    """A tiny block call (1 x 4 image + 2 text tokens) in the model's dtype and device."""
    p = next(model.parameters())
    D = model.inner_dim
    hd = block.attn.head_dim
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(p.device, p.dtype)  # noqa: E731
    rot = torch.randn(6, hd, generator=g).to(p.device)
    if isinstance(block, _classes().Flux2SingleTransformerBlock):
        return (rnd(1, 6, D), None, rnd(1, 3 * D), rot), {}
    return (rnd(1, 4, D), rnd(1, 2, D), rnd(1, 6 * D), rnd(1, 6 * D), rot), {}


_S = engine.Stream
FAMILY = engine.Family(
    name="FLUX.2",
    model_classes=("Flux2Transformer2DModel",),
    block_lists=(("transformer_blocks", "double"), ("single_transformer_blocks", "single")),
    streams=(_S("image", mod="double_stream_modulation_img", norm1="norm1", norm2="norm2", mlp="ff",
                q="to_q", k="to_k", v="to_v", q_norm="norm_q", k_norm="norm_k", out="to_out.0"),
             _S("text", mod="double_stream_modulation_txt", norm1="norm1_context", norm2="norm2_context",
                mlp="ff_context", q="add_q_proj", k="add_k_proj", v="add_v_proj", q_norm="norm_added_q",
                k_norm="norm_added_k", out="to_add_out")),
    single=engine.Single(mod="single_stream_modulation", mod_linear="single_stream_modulation.linear", norm="norm",
                         qkv_mlp="attn.to_qkv_mlp_proj", mlp_act="swiglu", out="attn.to_out", attn_module_mlp=True),
    mod_source="model_linear",
    mod_chunks=("shift1", "scale1", "gate1", "shift2", "scale2", "gate2"),
    norm="layer",
    qk_norm="head",
    rope_module="pos_embed",
    rope_interleaved=True,
    rope_joint=True,
    rope_in_module=False,
    is_tables=is_tables,
    rope_tables=as_rope_tables,
    rope_stock=rope_stock,
    rope_key=None,
    mask_kwarg=None,
    mlp="swiglu",
    mlp_act=_mlp_act,
    fp16_clip=("text",),
    forward_reason=_forward_reason,
    block_forward=fused_block_forward,
    single_block_forward=fused_single_block_forward,
    stock_block_forward=_stock_block_forward,
    stock_processors=_stock_processors,
    processor_class=FluxJointProcessor,
    probe_call=_probe_call,
    describe=lambda model: f"single_layers={len(model.single_transformer_blocks)}, ",
)
