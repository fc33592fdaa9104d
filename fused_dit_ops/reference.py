"""Reference semantics of every op: pure PyTorch, written from the diffusers expressions.

Math runs in float32 (or float64 when given float64 inputs) and is cast back to the input dtype,
once. These functions are the CPU implementations of the ops, the oracle of the tests (called on
float64 copies of the inputs) and the ground truth of ``python -m fused_dit_ops check``.

Ground truth: diffusers 0.42 ``QwenImageTransformerBlock._modulate`` / ``forward``
(models/transformers/transformer_qwenimage.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def select_params(p: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """[B, C] -> [B, 1, C]; with index, [2B, C] -> [B, L, C] picking set ``index != 0``."""
    if index is None:
        return p.unsqueeze(1)
    B = p.shape[0] // 2
    return torch.where((index != 0).unsqueeze(-1), p[B:].unsqueeze(1), p[:B].unsqueeze(1))


def _norm(x: torch.Tensor, weight, bias, eps: float, norm: str) -> torch.Tensor:
    """LayerNorm / RMSNorm over the last dim in x's (already upcast) dtype."""
    if norm == "layer":
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).square().mean(-1, keepdim=True)
        n = (x - mean) * torch.rsqrt(var + eps)
    elif norm == "rms":
        n = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    else:
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    if weight is not None:
        n = n * weight.to(x.dtype)
    if bias is not None:
        n = n + bias.to(x.dtype)
    return n


def scale_shift_gate(x, shift, scale, gate, index=None):
    ct = _compute_dtype(x.dtype)
    y = x.to(ct) * (1 + select_params(scale, index).to(ct)) + select_params(shift, index).to(ct)
    g = select_params(gate, index).expand(x.shape)
    return y.to(x.dtype).contiguous(), g.contiguous()


def norm_scale_shift(x, shift, scale, index=None, weight=None, bias=None, eps=1e-6, norm="layer"):
    ct = _compute_dtype(x.dtype)
    n = _norm(x.to(ct), weight, bias, eps, norm)
    y = n * (1 + select_params(scale, index).to(ct)) + select_params(shift, index).to(ct)
    return y.to(x.dtype).contiguous()


def gate_residual(residual, update, gate, index=None):
    ct = _compute_dtype(residual.dtype)
    out = residual.to(ct) + select_params(gate, index).to(ct) * update.to(ct)
    return out.to(residual.dtype).contiguous()


def gate_residual_norm_scale_shift(residual, update, gate, shift, scale, index=None, eps=1e-6,
                                   residual_dtype: torch.dtype | None = None):
    """residual_out = residual + gate_sel * update; y = LayerNorm(residual_out) * (1 + scale) + shift.

    The LayerNorm reads residual_out *as stored* (rounded to ``residual_dtype``, default the
    input dtype), which is what eager diffusers normalises (``norm2(hidden_states)`` after the
    bf16 residual add) and what the next layer sees. Pass ``residual_dtype=torch.bfloat16`` with
    float64 inputs to get a float64 oracle of the bf16 kernel.
    """
    ct = _compute_dtype(residual.dtype)
    rdt = residual_dtype or residual.dtype
    out = residual.to(ct) + select_params(gate, index).to(ct) * update.to(ct)
    out = out.to(rdt)
    n = _norm(out.to(ct), None, None, eps, "layer")
    y = n * (1 + select_params(scale, index).to(ct)) + select_params(shift, index).to(ct)
    return out.to(residual.dtype).contiguous(), y.to(residual.dtype).contiguous()


# --- the eager diffusers expressions (bf16 arithmetic as written upstream), for benchmarks -----

def diffusers_modulate(x, mod_params, index=None):
    """Same computation as diffusers ``QwenImageTransformerBlock._modulate`` (0.42)."""
    shift, scale, gate = mod_params.chunk(3, dim=-1)
    if index is not None:
        B = shift.size(0) // 2
        idx = index.unsqueeze(-1)
        shift_r = torch.where(idx == 0, shift[:B].unsqueeze(1), shift[B:].unsqueeze(1))
        scale_r = torch.where(idx == 0, scale[:B].unsqueeze(1), scale[B:].unsqueeze(1))
        gate_r = torch.where(idx == 0, gate[:B].unsqueeze(1), gate[B:].unsqueeze(1))
    else:
        shift_r, scale_r, gate_r = shift.unsqueeze(1), scale.unsqueeze(1), gate.unsqueeze(1)
    return x * (1 + scale_r) + shift_r, gate_r


def diffusers_layer_norm(x, eps=1e-6):
    """``nn.LayerNorm(C, elementwise_affine=False, eps)`` as the block's norm1/norm2."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


# --- attention ---

def attention(q, k, v, softmax_scale=None, causal=False):
    """softmax(q k^T * scale [+ causal mask]) v over [B, S, H, D] tensors, explicit math.

    k/v may have fewer heads (GQA): query head h reads kv head h // (H // Hkv). ``causal`` masks
    key j > query i (Sq == Sk). Math in float32 (float64 for float64 inputs), cast back once;
    output contiguous [B, Sq, H, D].
    """
    ct = _compute_dtype(q.dtype)
    H, Hkv, D = q.shape[2], k.shape[2], q.shape[3]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    qh, kh, vh = (t.to(ct).transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    if Hkv != H:
        kh = kh.repeat_interleave(H // Hkv, dim=1)
        vh = vh.repeat_interleave(H // Hkv, dim=1)
    s = (qh @ kh.transpose(-1, -2)) * scale
    if causal:
        Sq, Sk = s.shape[-2], s.shape[-1]
        keep = torch.ones(Sq, Sk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return (p @ vh).transpose(1, 2).to(q.dtype).contiguous()
