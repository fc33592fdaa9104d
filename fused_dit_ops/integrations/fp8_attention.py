"""``patch(model, attention_precision="fp8")``: the joint attention of double- and single-stream blocks on
FP8 inputs.

In a patched double-stream block (``precision="bf16"`` or ``"fp8"``) the q|k|v projections write one
joint buffer, in a single-stream block one q|k|v|MLP buffer; the bf16 attention step is
``joint_qk_norm_rope_`` in place on the q, k views, then ``attention``. With FP8 attention it is:

1. ``joint_qk_norm_rope_fp8``: the same QK RMSNorm + RoPE, written as e4m3 q and k with a static
   scale per tensor (sqrt(head_dim) * max|RMSNorm weight| * margin / 448: a bound no normalised and
   rotated value can exceed, so no pass over the data is needed), and v quantised with its amax over
   the tokens of each (batch, head) (one reduction pass over v, the cast in the same kernel as q, k);
2. ``attention_fp8``: FlashAttention-3's FP8 forward with those descales (bfloat16 output), which
   also rounds the softmax probabilities to e4m3 for the PV product.

Where it applies (else the model-dtype attention, with the reason in ``report.stock`` at patch time or
counted in ``report.runtime`` per call): CUDA with FlashAttention-3 FP8 kernels (fa3-fwd or
flash_attn_3, sm90) and a bfloat16 model, or the CPU (the reference implementations: dequantise, fp32
math; for tests); the fused QK norm + RoPE and attention ops selected (``qk_path="joint"``); head_dim
a multiple of 16 and at most 256; ``attention_backend`` unset or "fa3". Per call: double-stream blocks
whose projections run as modules (LoRA, hooks), single-stream blocks whose QK norms are hooked, and
context parallelism keep the model-dtype attention. A single-stream block passes its one pair of QK
norm weights for both streams.

Self + cross attention blocks (Wan) normalise q and k across all heads, where no static bound per head
holds: their self-attention runs the model-dtype QK norm + RoPE, then ``quantize_fp8_heads`` on q, k
and v (per (batch, head) amax; a reduction and a cast pass each), then ``attention_fp8``. Their
cross-attention (512 text tokens) keeps the model dtype.
"""
from __future__ import annotations

import torch

from ..ops import _eager
from . import engine as E


class Fp8AttentionState:
    """What attention_precision="fp8" added to a patched model (``State.attn_fp8``); the block kinds
    call it through the state."""

    def usable(self, st, proc) -> bool:
        """FP8 attention for this call (the projections already wrote the joint buffer)? Context
        parallelism runs diffusers' attention (counted)."""
        if E.cp_config(proc) is not None:
            if not torch.compiler.is_compiling():
                st.count("fp8 attention under context parallelism: model dtype attention (diffusers' all-to-all "
                         "/ ring)")
            return False
        return True

    def not_joint(self, st):
        """Count a call whose projections ran as modules (no joint buffer): model-dtype attention."""
        if not torch.compiler.is_compiling():
            st.count("fp8 attention: q/k/v projections as module calls (LoRA, hooks): model dtype attention")

    def attention_heads(self, q, k, v):
        """[B, N, H, D] in q's dtype: FP8 attention of q, k already normalised and rotated (Wan's QK norm
        across all heads), each quantised with its per-(batch, head) amax."""
        (q8, qd), (k8, kd), (v8, vd) = (_eager.quantize_fp8_heads(t) for t in (q, k, v))
        return _eager.attention_fp8_unchecked(q8, k8, v8, qd, kd, vd, None, False, q.dtype)

    def attention(self, q, k, v, txt_len, weights, txt_tab, img_tab, eps, interleaved):
        """[B, N, H, D] in q's dtype: FP8 attention of the joint q, k, v views (before the QK norm)."""
        q8, k8, v8, qd, kd, vd = _eager.joint_qk_norm_rope_fp8(q, k, v, txt_len, *weights, txt_tab, img_tab, eps,
                                                               interleaved)
        return _eager.attention_fp8_unchecked(q8, k8, v8, qd, kd, vd, None, False, q.dtype)


def model_reason(st, blocks, dev, dtype, backend) -> str | None:
    """Why the model's double- and single-stream blocks cannot take FP8 attention (None: they can)."""
    missing = [o for o, on in (("qk_norm_rope", st.qk), ("attention", st.attention)) if not on]
    if missing:
        return f"needs the fused ops qk_norm_rope and attention; missing {missing}"
    if st.qk_path != "joint":
        return "needs qk_path='joint' (the projections writing one joint buffer)"
    if backend not in (None, "auto", "fa3"):
        return f"attention_backend={backend!r} forces a model-dtype backend (FP8 attention runs FlashAttention-3)"
    if dev is None:
        return "no execution device"
    if dev.type == "cuda":
        from ..ops.attention_fp8 import fp8_attention_unavailable_reason
        why = fp8_attention_unavailable_reason(dev)
        if why:
            return why
        if dtype != torch.bfloat16:
            return f"FlashAttention-3's FP8 forward returns bfloat16; the model is {str(dtype).replace('torch.', '')}"
    elif dev.type != "cpu":
        return f"device {dev.type} (CUDA with FlashAttention-3, or the CPU reference)"
    for block in blocks:
        attn = getattr(block, st.family.attn)
        D = attn.inner_dim // attn.heads
        if D % 16 or D > 256:
            return f"head_dim {D}: FlashAttention-3's FP8 kernels take multiples of 16 up to 256"
    return None


def patch_blocks(st, by_kind, report, dev, dtype, backend):
    """Turn FP8 attention on for the patched double- and single-stream blocks ({kind: blocks}), or report
    why not."""
    blocks = [b for kind in ("double", "single", "self_cross") for b in by_kind.get(kind, ())]
    if not blocks:
        report.stock["attention_precision"] = ("fp8 attention covers double-stream, single-stream and self + cross "
                                               "attention blocks; none is patched")
        return
    why = model_reason(st, blocks, dev, dtype, backend)
    if why:
        report.stock["attention_precision"] = f"fp8 attention not applied ({why}): model dtype attention"
        return
    st.attn_fp8 = Fp8AttentionState()
    where = ("FlashAttention-3 FP8 forward" if dev.type == "cuda"
             else "CPU reference: dequantised, fp32 math")
    kinds = ", ".join(f"{len(by_kind[k])} {name}" for k, name in (("double", "double-stream"),
                                                                  ("single", "single-stream")) if by_kind.get(k))
    if kinds:
        report.swapped.append(f"FP8 e4m3 attention ({kinds} blocks; {where}): q, k quantised by the QK RMSNorm + "
                              "RoPE op (static scale from the norm weights), v per (batch, head) amax")
    if by_kind.get("self_cross"):
        report.swapped.append(f"FP8 e4m3 self-attention ({len(by_kind['self_cross'])} self + cross attention "
                              f"blocks; {where}): q, k after the QK norm across heads + RoPE, and v, each "
                              "quantised per (batch, head) amax (quantize_fp8_heads); the cross-attention keeps "
                              "the model dtype")
