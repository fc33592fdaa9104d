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
    # a new tensor, never a view of ``gate``: ``.contiguous()`` of an expand that is already
    # contiguous (L == 1, B == 1 chunk rows, empty) would return the caller's gate itself
    g = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    g.copy_(select_params(gate, index).expand(x.shape))
    return y.to(x.dtype).contiguous(), g


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


def gate_residual_layer_norm(residual, update, gate, index=None, weight=None, bias=None, eps=1e-6,
                             residual_dtype: torch.dtype | None = None):
    """(residual_out, y): residual_out = residual + gate_sel * update (one rounding); y = LayerNorm of
    residual_out as stored (rounded to ``residual_dtype``, default the input dtype), times ``weight``
    plus ``bias`` in fp32, one rounding: a Wan block's ``(x.float() + attn * gate).type_as(x)`` then
    ``norm2(x.float()).type_as(x)`` (``FP32LayerNorm``)."""
    ct = _compute_dtype(residual.dtype)
    rdt = residual_dtype or residual.dtype
    out = (residual.to(ct) + select_params(gate, index).to(ct) * update.to(ct)).to(rdt)
    y = _norm(out.to(ct), weight, bias, eps, "layer")
    return out.to(residual.dtype).contiguous(), y.to(residual.dtype).contiguous()


# --- RoPE and the joint QKV path ---------------------------------------------------------------
# cos_sin_cache: fp32 [P, R], cos of the R/2 frequencies then their sin; row positions[b, l] serves
# token l of batch b (default: row l). Only the first R of D dims rotate. Interleaved pairs are
# (2i, 2i+1) (Qwen, Flux); half-split ("neox") pairs are (i, i + R/2).

def _rope_rows(x, cache, positions):
    """cos, sin [B or 1, L, 1, R/2] in x's compute dtype, gathered from the table."""
    B, L = x.shape[0], x.shape[1]
    ct = _compute_dtype(x.dtype)
    if positions is None:
        pos = torch.arange(L, device=cache.device).unsqueeze(0)
    else:
        pos = (positions if positions.dim() == 2 else positions.unsqueeze(0)).to(cache.device).long()
    rows = cache[pos].to(ct)  # [B|1, L, R]
    half = cache.shape[1] // 2
    return rows[..., :half].unsqueeze(2), rows[..., half:].unsqueeze(2)


def apply_rope(x, cache, positions=None, interleaved=True):
    """RoPE of x [B, L, H, D] (fp32/fp64 math, one rounding back to x.dtype); a new tensor."""
    ct = _compute_dtype(x.dtype)
    cos, sin = _rope_rows(x, cache, positions)
    R = cache.shape[1]
    xf = x.to(ct)
    rot, rest = xf[..., :R], xf[..., R:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        y = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., : R // 2], rot[..., R // 2:]
        y = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([y, rest], dim=-1).to(x.dtype)


def rope(q, k, cache, positions=None, interleaved=True):
    """(q_rot, k_rot) for q, k [B, L, H, D] or [L, H, D]; positions [L] or [B, L]."""
    squeeze = q.dim() == 3
    if squeeze:
        q, k = q.unsqueeze(0), k.unsqueeze(0)
        if positions is not None and positions.dim() == 1:
            positions = positions.unsqueeze(0)
    qo, ko = apply_rope(q, cache, positions, interleaved), apply_rope(k, cache, positions, interleaved)
    return (qo[0], ko[0]) if squeeze else (qo, ko)


def rms_norm_diffusers(x, weight, eps=1e-6):
    """diffusers ``RMSNorm(D, eps, elementwise_affine=True)`` over the last dim, roundings included:
    fp32 ``x * rsqrt(mean(x^2) + eps)``, cast to the weight dtype when it is 16-bit, times the weight
    (rounded to that dtype). float64 inputs and weight: one exact pass (the oracle)."""
    if x.dtype == torch.float64:
        n = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
        return n * weight.to(torch.float64)
    xf = x.float()
    n = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        return (n.to(weight.dtype) * weight).float()
    return n * weight.float()


def qk_norm_rope(x, weight, cache, eps=1e-6, interleaved=True, positions=None):
    """RMSNorm (diffusers roundings) then RoPE, one final rounding to x.dtype."""
    ct = _compute_dtype(x.dtype)
    n = rms_norm_diffusers(x, weight, eps).to(ct)
    return apply_rope(n, cache, positions, interleaved).to(x.dtype)


def rms_norm_torch(x, weight, eps=1e-6):
    """``torch.nn.RMSNorm(C, eps)`` over the last dim, roundings included: fp32
    ``x * rsqrt(mean(x^2) + eps)``, times the weight in fp32, one rounding to x's dtype (float64: exact)."""
    ct = _compute_dtype(x.dtype)
    xf = x.to(ct)
    n = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (n * weight.to(ct)).to(x.dtype)


def qk_norm_rope_across_heads(q, k, q_weight, k_weight, cos_sin=None, heads=1, eps=1e-6, interleaved=True):
    """(q_out, k_out) [B, L, C]: RMSNorm over the whole C = heads x head_dim row (``torch.nn.RMSNorm``'s
    roundings), then, with a table, RoPE per head (row l for token l; fp32 math, one rounding).
    Ground truth: diffusers ``WanAttnProcessor`` (``norm_q``/``norm_k`` then ``apply_rotary_emb``)."""
    outs = []
    for x, w in ((q, q_weight), (k, k_weight)):
        n = rms_norm_torch(x, w, eps)
        if cos_sin is not None:
            n = apply_rope(n.unflatten(-1, (heads, -1)), cos_sin, None, interleaved).flatten(-2)
        outs.append(n.contiguous())
    return outs[0], outs[1]


def joint_qkv_cat(txt_q, txt_k, txt_v, img_q, img_k, img_v):
    return (torch.cat([txt_q, img_q], dim=1), torch.cat([txt_k, img_k], dim=1),
            torch.cat([txt_v, img_v], dim=1))


def joint_linear(txt, img, txt_weights, txt_biases, img_weights, img_biases):
    """[B, Lt + Li, N]: cat([txt @ cat(txt_weights).T + cat(txt_biases),
    img @ cat(img_weights).T + cat(img_biases)], dim=1); a None bias adds zeros for its columns."""
    def proj(x, ws, bs):
        w = torch.cat(list(ws), 0)
        b = None
        if any(t is not None for t in bs):
            b = torch.cat([t if t is not None else w.new_zeros(wj.shape[0]) for t, wj in zip(bs, ws)], 0)
        return torch.nn.functional.linear(x, w, b)
    return torch.cat([proj(txt, txt_weights, txt_biases), proj(img, img_weights, img_biases)], dim=1)


def qk_norm_rope_cat(txt_q, txt_k, txt_v, img_q, img_k, img_v, txt_q_weight, txt_k_weight,
                     img_q_weight, img_k_weight, txt_cos_sin, img_cos_sin, eps=1e-6, interleaved=True):
    """Joint (q, k, v) [B, Lt + Li, H, D]: per stream RMSNorm(q|k) -> RoPE (table row l for
    token l), then cat([text, image], dim=1); v is copied."""
    tq = qk_norm_rope(txt_q, txt_q_weight, txt_cos_sin, eps, interleaved)
    tk = qk_norm_rope(txt_k, txt_k_weight, txt_cos_sin, eps, interleaved)
    iq = qk_norm_rope(img_q, img_q_weight, img_cos_sin, eps, interleaved)
    ik = qk_norm_rope(img_k, img_k_weight, img_cos_sin, eps, interleaved)
    return joint_qkv_cat(tq, tk, txt_v, iq, ik, img_v)


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


# --- FP8 (float8_e4m3fn) activations and GEMMs -------------------------------------------------
# Row-wise scaling: one fp32 scale per token (activation) or per output channel (weight),
# scale = amax(row) / 448 (1 for an all-zero row, NaN for a row with a NaN), values =
# clamp(row * (448 / amax), -448, 448) (the reciprocal: 1 for an all-zero row; one division per row) cast to
# float8_e4m3fn (round to nearest even). The quantised value of a modulated norm is computed from
# its fp32 value (no intermediate rounding to the activation dtype).

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def _fdiv(a, b) -> torch.Tensor:
    """a / b with one IEEE rounding on any device (as the kernels' ``tl.div_rn``): both operands as
    tensors of one device. (torch turns ``tensor / python_scalar`` into a multiplication by the
    reciprocal on CUDA, and ``python_scalar / tensor`` into ``reciprocal(tensor) * scalar``.)"""
    t = a if isinstance(a, torch.Tensor) else b
    a = a if isinstance(a, torch.Tensor) else torch.full_like(t, a)
    b = b if isinstance(b, torch.Tensor) else torch.full_like(t, b)
    return torch.div(a, b)


def quantize_fp8_rows(y: torch.Tensor, cast: bool = True):
    """(q float8_e4m3fn [..., K], scale fp32 [...]) of y [..., K], computed in fp32. ``cast=False``:
    q as the fp32 values just before the e4m3 cast (clamped, scaled), for tests of that stage."""
    y = y.float()
    amax = y.abs().amax(-1) if y.shape[-1] else y.new_zeros(y.shape[:-1])
    scale = torch.where(amax == 0, torch.ones_like(amax), _fdiv(amax, FP8_MAX))  # NaN rows: NaN
    inv = torch.where(amax == 0, torch.ones_like(amax), _fdiv(FP8_MAX, amax))
    q = (y * inv.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX)
    return (q.to(FP8_DTYPE) if cast else q).contiguous(), scale.contiguous()


def dequantize_fp8_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 q * scale (row-wise)."""
    return q.float() * scale.float().unsqueeze(-1)


def norm_scale_shift_fp8(x, shift, scale, index=None, eps=1e-6, norm="layer", cast=True):
    """quantize_fp8_rows(Norm(x) * (1 + scale_sel) + shift_sel), fp32 math."""
    n = _norm(x.float(), None, None, eps, norm)
    y = n * (1 + select_params(scale, index).float()) + select_params(shift, index).float()
    return quantize_fp8_rows(y, cast)


def gate_residual_norm_scale_shift_fp8(residual, update, gate, shift, scale, index=None, eps=1e-6, cast=True):
    """(residual_out, q, scale): residual_out as :func:`gate_residual_norm_scale_shift`; the modulated
    LayerNorm of residual_out as stored, quantised from fp32."""
    out = (residual.float() + select_params(gate, index).float() * update.float()).to(residual.dtype)
    n = _norm(out.float(), None, None, eps, "layer")
    y = n * (1 + select_params(scale, index).float()) + select_params(shift, index).float()
    return (out.contiguous(), *quantize_fp8_rows(y, cast))


def quantize_fp8(x, bias=None, activation="none", cast=True):
    """Per-row quantisation of x [..., K] (+ bias [K]) (then GELU-tanh with activation="gelu_tanh")."""
    y = x.float()
    if bias is not None:
        y = y + bias.float()
    if activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    return quantize_fp8_rows(y, cast)


def activate_fp8_input(b, activation="none"):
    """fp32 act(b): "none", "gelu_tanh", or "swiglu" (silu(b[..., :F]) * b[..., F:], width F)."""
    y = b.float()
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "swiglu":
        g, u = y.chunk(2, dim=-1)
        return F.silu(g) * u
    return y


def quantize_fp8_cat(a, b, activation_b="none", cast=True):
    """Per-row quantisation of [a | act(b)] ([..., Ka + Kb'], Kb' = Kb, or Kb / 2 for "swiglu"), fp32
    math: one scale per row over both parts. ``a`` None: act(b) alone."""
    y = activate_fp8_input(b, activation_b)
    return quantize_fp8_rows(y if a is None else torch.cat([a.float(), y], dim=-1), cast)


def gate_residual_layer_norm_fp8(residual, update, gate, index=None, weight=None, bias=None, eps=1e-6, cast=True):
    """(residual_out, q, scale): residual_out as :func:`gate_residual_layer_norm`; the affine
    LayerNorm of residual_out as stored, quantised from fp32 (no rounding to the activation dtype)."""
    out = (residual.float() + select_params(gate, index).float() * update.float()).to(residual.dtype)
    y = _norm(out.float(), weight, bias, eps, "layer")
    return (out.contiguous(), *quantize_fp8_rows(y, cast))


def quantize_fp8_weight(w: torch.Tensor):
    """(w_q float8_e4m3fn [N, K], w_scale fp32 [N]): per output channel (row) of a Linear weight."""
    return quantize_fp8_rows(w.detach())


def fp8_linear(x, x_scale, weight, weight_scale, bias=None, out_dtype=None, activation="none"):
    """act((x * x_scale) @ (weight * weight_scale).T + bias) in fp32, cast to out_dtype once.
    x [..., K] e4m3 with x_scale [...]; weight [N, K] e4m3 with weight_scale [N]. The op's
    ``fast_accum`` (CUDA: ``torch._scaled_mm``'s ``use_fast_accum``) has no counterpart here: the
    products are summed in fp32 either way."""
    out_dtype = out_dtype or (bias.dtype if bias is not None else torch.bfloat16)
    y = dequantize_fp8_rows(x, x_scale) @ dequantize_fp8_rows(weight, weight_scale).t()
    if bias is not None:
        y = y + bias.float()
    if activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    return y.to(out_dtype).contiguous()


def joint_fp8_linear(txt, txt_scale, img, img_scale, txt_weight, txt_weight_scale, txt_bias,
                     img_weight, img_weight_scale, img_bias, out_dtype):
    """[B, Lt + Li, N]: cat([fp8_linear(txt ...), fp8_linear(img ...)], dim=1)."""
    return torch.cat([fp8_linear(txt, txt_scale, txt_weight, txt_weight_scale, txt_bias, out_dtype),
                      fp8_linear(img, img_scale, img_weight, img_weight_scale, img_bias, out_dtype)], dim=1)


# --- FP8 attention inputs: one fp32 descale per (batch, head) (FlashAttention-3's layout) ------------
# q and k after the QK RMSNorm (weight w) + RoPE are bounded without looking at the data: the
# normalised row has rms 1, so each of its D values is at most sqrt(D) in magnitude, and more
# precisely every rotated pair (x_2i, x_2i+1) has norm <= sqrt(D) * max|w|; RoPE keeps pair norms.
# One static scale per tensor (both streams' weights) therefore never saturates:
# scale = sqrt(D) * max|w| * QK_BOUND_MARGIN / 448 (the margin covers the 16-bit roundings of
# diffusers' RMSNorm). v has no such bound: its scale is amax over the tokens and head_dim of each
# (batch, head) / 448.

QK_BOUND_MARGIN = 1.0 + 2.0 ** -6


def qk_bound_scale(weights, D: int) -> torch.Tensor:
    """fp32 scalar tensor: sqrt(D) * max|w| * QK_BOUND_MARGIN / 448 over ``weights`` (the RMSNorm
    weights of one of q / k, both streams), 1 when they are all zero."""
    wmax = torch.stack([w.detach().float().abs().amax() for w in weights]).amax()
    bound = wmax * torch.tensor(float(D) ** 0.5 * QK_BOUND_MARGIN, dtype=torch.float32)
    return torch.where(wmax == 0, torch.ones_like(bound), _fdiv(bound, FP8_MAX))


def quantize_fp8_heads(y: torch.Tensor, scale: torch.Tensor | None = None, cast: bool = True):
    """(q float8_e4m3fn [B, N, H, D], descale fp32 [B, H]) of y [B, N, H, D] (fp32 math). ``scale``:
    a given fp32 scalar (the static q/k bound) or None: amax over (N, D) of each (batch, head) / 448
    (1 for an all-zero head; +inf for a head holding a NaN, so that every dequantised value of it is NaN)."""
    y = y.float()
    B, N, H, _ = y.shape
    if scale is None:
        amax = y.abs().amax(dim=(1, 3)) if y.numel() else y.new_zeros(B, H)
        amax = torch.where(y.isnan().any(dim=3).any(dim=1), torch.full_like(amax, float("inf")), amax)
        s = torch.where(amax == 0, torch.ones_like(amax), _fdiv(amax, FP8_MAX))
    else:
        s = scale.float().expand(B, H)
    q = (y * _fdiv(1.0, s)[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)  # one division per scale
    return (q.to(FP8_DTYPE) if cast else q).contiguous(), s.contiguous()


def dequantize_fp8_heads(q: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    """fp32 q [B, N, H, D] * descale [B, H]."""
    return q.float() * descale.float()[:, None, :, None]


def joint_qk_norm_rope_fp8(q, k, v, txt_len, txt_q_weight, txt_k_weight, img_q_weight, img_k_weight,
                           txt_cos_sin, img_cos_sin, eps=1e-6, interleaved=True, cast=True, qk_scale="bound"):
    """(q8, k8, v8, q_descale, k_descale, v_descale): the joint QK RMSNorm + RoPE of
    ``joint_qk_norm_rope_`` (rows < txt_len: text weights and table) computed in fp32 and quantised
    to e4m3 with the static bound scale (``qk_scale="amax"``: per-(batch, head) amax instead, for
    accuracy comparisons); v quantised per (batch, head) with its amax. Inputs are not modified."""
    D = q.shape[-1]
    outs, scales = [], []
    for x, wt, wi in ((q, txt_q_weight, img_q_weight), (k, txt_k_weight, img_k_weight)):
        y = torch.cat([apply_rope(rms_norm_diffusers(x[:, :txt_len], wt, eps).float(), txt_cos_sin, None,
                                  interleaved),
                       apply_rope(rms_norm_diffusers(x[:, txt_len:], wi, eps).float(), img_cos_sin, None,
                                  interleaved)], dim=1)
        s = qk_bound_scale((wt, wi), D) if qk_scale == "bound" else None
        o, d = quantize_fp8_heads(y, s, cast)
        outs.append(o)
        scales.append(d)
    vo, vd = quantize_fp8_heads(v, None, cast)
    return outs[0], outs[1], vo, scales[0], scales[1], vd


def attention_fp8(q, k, v, q_descale, k_descale, v_descale, softmax_scale=None, causal=False, out_dtype=None):
    """:func:`attention` of the dequantised e4m3 inputs (value = q * descale[b, h_kv]; the q descale is
    per kv head, as FlashAttention-3 takes it), fp32 math, one rounding to ``out_dtype`` (bf16 default)."""
    H, Hkv = q.shape[2], k.shape[2]
    qd = q_descale.float().repeat_interleave(H // Hkv, dim=1) if Hkv and H != Hkv else q_descale
    out = attention(dequantize_fp8_heads(q, qd), dequantize_fp8_heads(k, k_descale),
                    dequantize_fp8_heads(v, v_descale), softmax_scale, causal)
    return out.to(out_dtype or torch.bfloat16).contiguous()


def swiglu_linear(x, weight, bias=None):
    """``silu(y[..., :F]) * y[..., F:]`` of ``y = x @ weight.T + bias`` (weight [2F, K]: the gate rows,
    then the linear rows; diffusers ``Flux2FeedForward.linear_in`` followed by ``Flux2SwiGLU``), with
    y kept in the compute dtype (one rounding, on the output)."""
    ct = _compute_dtype(x.dtype)
    y = F.linear(x.to(ct), weight.to(ct), None if bias is None else bias.to(ct))
    g, u = y.chunk(2, dim=-1)
    return (F.silu(g) * u).to(x.dtype)
