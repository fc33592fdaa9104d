"""Triton kernel for RoPE, QK RMSNorm + RoPE, and the joint [text, image] write, and its launchers.

One kernel serves four ops (all flags are constexpr, so each use compiles to its own specialisation):

- ``rope`` (Triton backend): one stream, q and k rotated in place (outputs are the inputs);
- ``qk_norm_rope_cat(_out)``: two streams; per-head RMSNorm of q and k, RoPE, and q/k/v written
  into the joint [B, Lt + Li, H, D] buffers at their token offsets;
- ``joint_qk_norm_rope_``: the same in place on an already-joint buffer (rows < Lt use the text
  weights and table, the rest the image ones);
- ``joint_qkv_cat`` fallback (no ``_C``): no norm, no rope: a strided copy of q, k, v.

Grid: (Lt + Li tokens, ceil(H / BLOCK_H) head groups, B). A program owns [BLOCK_H, D] of q, k and
v of one token: it picks its stream with a scalar branch (token < La: stream A, else B), loads the
token's cos|sin table row once, and handles q and k (norm -> rope) and v (copy). Interleaved pairs
are loaded as contiguous [BLOCK_H, R] tiles and split into even/odd lanes with reshape+split (no
gathers); half-split (neox) loads the two halves. Dims past the rotary width R are passed through
(normalised when the norm is on). Math is fp32; diffusers' RMSNorm roundings are reproduced when
the weight is 16-bit (x * rsqrt(ms + eps) rounded to the weight dtype, then * weight rounded),
then RoPE in fp32 and one rounding on store.

Layout contract (checked by the op layer): q/k/v [B, L, H, D] with a contiguous last dim and free
batch/token/head strides; tables fp32 [P, R] with a contiguous last dim; positions int32/int64
[B, L] (batch stride may be 0). Table rows are clamped to [0, P) so a bad device position can never
read out of bounds (the op layer checks CPU positions; device positions are not synced to check).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, next_power_of_2
from ._launch import launch as launch_kernel


@triton.jit
def _load_pairs(base, hoff, hmask, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr,
                BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The rotary part of [BLOCK_H] head rows at base + hoff as fp32 (x1, x2) [BLOCK_H, HALF_BLOCK]."""
    if INTERLEAVED:
        c2 = tl.arange(0, 2 * HALF_BLOCK)
        m = hmask[:, None] & (c2 < 2 * HALF)[None, :]
        x = tl.load(base + hoff[:, None] + c2[None, :], mask=m, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_H, HALF_BLOCK, 2)))
    else:
        i = tl.arange(0, HALF_BLOCK)
        m = hmask[:, None] & (i < HALF)[None, :]
        x1 = tl.load(base + hoff[:, None] + i[None, :], mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(base + hoff[:, None] + HALF + i[None, :], mask=m, other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _store_pairs(base, hoff, hmask, y1, y2, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr,
                 BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr):
    ty = base.dtype.element_ty
    if INTERLEAVED:
        c2 = tl.arange(0, 2 * HALF_BLOCK)
        m = hmask[:, None] & (c2 < 2 * HALF)[None, :]
        y = tl.reshape(tl.join(y1, y2), (BLOCK_H, 2 * HALF_BLOCK))
        tl.store(base + hoff[:, None] + c2[None, :], y.to(ty), mask=m)
    else:
        i = tl.arange(0, HALF_BLOCK)
        m = hmask[:, None] & (i < HALF)[None, :]
        tl.store(base + hoff[:, None] + i[None, :], y1.to(ty), mask=m)
        tl.store(base + hoff[:, None] + HALF + i[None, :], y2.to(ty), mask=m)


@triton.jit
def _weight_pairs(w_ptr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, INTERLEAVED: tl.constexpr):
    if INTERLEAVED:
        c2 = tl.arange(0, 2 * HALF_BLOCK)
        w = tl.load(w_ptr + c2, mask=c2 < 2 * HALF, other=0.0).to(tl.float32)
        w1, w2 = tl.split(tl.reshape(w, (HALF_BLOCK, 2)))
    else:
        i = tl.arange(0, HALF_BLOCK)
        w1 = tl.load(w_ptr + i, mask=i < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
    return w1, w2


@triton.jit
def _norm_scale(x, r, w, ROUND: tl.constexpr, wty: tl.constexpr):
    """diffusers RMSNorm on a normalised tile: (x * r) [rounded to w's dtype] * w [rounded]."""
    n = x * r
    if ROUND:
        n = n.to(wty).to(tl.float32)
        return (n * w).to(wty).to(tl.float32)
    else:
        return n * w


@triton.jit
def _qk_row(x_in, s_in_h, x_out, s_out_h, w_ptr, heads64, hmask, cos, sin, eps,
            D: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, TAIL: tl.constexpr,
            TAIL_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr,
            NORM: tl.constexpr, ROPE: tl.constexpr, ROUND: tl.constexpr):
    """Norm (optional) and RoPE (optional) of [BLOCK_H, D] head rows of one token of q or k."""
    hin = heads64 * s_in_h
    hout = heads64 * s_out_h
    x1, x2 = _load_pairs(x_in, hin, hmask, HALF, HALF_BLOCK, BLOCK_H, INTERLEAVED)
    if TAIL > 0:
        j = tl.arange(0, TAIL_BLOCK)
        tm = hmask[:, None] & (j < TAIL)[None, :]
        xt = tl.load(x_in + hin[:, None] + 2 * HALF + j[None, :], mask=tm, other=0.0).to(tl.float32)
    if NORM:
        ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
        if TAIL > 0:
            ss += tl.sum(xt * xt, axis=1)
        r = tl.rsqrt(ss / D + eps)[:, None]
        wty: tl.constexpr = w_ptr.dtype.element_ty
        w1, w2 = _weight_pairs(w_ptr, HALF, HALF_BLOCK, INTERLEAVED)
        x1 = _norm_scale(x1, r, w1[None, :], ROUND, wty)
        x2 = _norm_scale(x2, r, w2[None, :], ROUND, wty)
        if TAIL > 0:
            wt = tl.load(w_ptr + 2 * HALF + j, mask=j < TAIL, other=0.0).to(tl.float32)
            xt = _norm_scale(xt, r, wt[None, :], ROUND, wty)
    if ROPE:
        y1 = x1 * cos[None, :] - x2 * sin[None, :]
        y2 = x1 * sin[None, :] + x2 * cos[None, :]
    else:
        y1 = x1
        y2 = x2
    _store_pairs(x_out, hout, hmask, y1, y2, HALF, HALF_BLOCK, BLOCK_H, INTERLEAVED)
    if TAIL > 0:
        tl.store(x_out + hout[:, None] + 2 * HALF + j[None, :], xt.to(x_out.dtype.element_ty), mask=tm)


@triton.jit
def _copy_row(x_in, s_in_h, x_out, s_out_h, heads64, hmask, D: tl.constexpr, D_BLOCK: tl.constexpr):
    c = tl.arange(0, D_BLOCK)
    m = hmask[:, None] & (c < D)[None, :]
    x = tl.load(x_in + (heads64 * s_in_h)[:, None] + c[None, :], mask=m)
    tl.store(x_out + (heads64 * s_out_h)[:, None] + c[None, :], x, mask=m)


@triton.jit
def _token(q_in, k_in, v_in, sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_l, sv_h,
           q_out, k_out, v_out, oq_b, oq_l, oq_h, ok_b, ok_l, ok_h, ov_b, ov_l, ov_h,
           wq, wk, cache, s_c, n_rows, pos, sp_b, sp_l,
           b, l, lo, heads64, hmask, eps,
           D: tl.constexpr, D_BLOCK: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr,
           TAIL: tl.constexpr, TAIL_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr,
           INTERLEAVED: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr, ROUND: tl.constexpr,
           HAS_POS: tl.constexpr, HAS_V: tl.constexpr):
    """One token (input row l, output row lo) of one stream."""
    cos = None
    sin = None
    if ROPE:
        if HAS_POS:
            row = tl.load(pos + b * sp_b + l * sp_l).to(tl.int64)
        else:
            row = l
        row = tl.minimum(tl.maximum(row, 0), n_rows - 1)
        i = tl.arange(0, HALF_BLOCK)
        cos = tl.load(cache + row * s_c + i, mask=i < HALF, other=1.0)
        sin = tl.load(cache + row * s_c + HALF + i, mask=i < HALF, other=0.0)
    if NORM or ROPE:
        _qk_row(q_in + b * sq_b + l * sq_l, sq_h, q_out + b * oq_b + lo * oq_l, oq_h, wq, heads64, hmask,
                cos, sin, eps, D, HALF, HALF_BLOCK, TAIL, TAIL_BLOCK, BLOCK_H, INTERLEAVED, NORM, ROPE, ROUND)
        _qk_row(k_in + b * sk_b + l * sk_l, sk_h, k_out + b * ok_b + lo * ok_l, ok_h, wk, heads64, hmask,
                cos, sin, eps, D, HALF, HALF_BLOCK, TAIL, TAIL_BLOCK, BLOCK_H, INTERLEAVED, NORM, ROPE, ROUND)
    else:
        _copy_row(q_in + b * sq_b + l * sq_l, sq_h, q_out + b * oq_b + lo * oq_l, oq_h, heads64, hmask, D, D_BLOCK)
        _copy_row(k_in + b * sk_b + l * sk_l, sk_h, k_out + b * ok_b + lo * ok_l, ok_h, heads64, hmask, D, D_BLOCK)
    if HAS_V:
        _copy_row(v_in + b * sv_b + l * sv_l, sv_h, v_out + b * ov_b + lo * ov_l, ov_h, heads64, hmask, D, D_BLOCK)


@triton.jit
def _joint_qk_kernel(
    aq, ak, av, bq, bk, bv, oq, ok, ov,
    wqa, wka, wqb, wkb, ca, cb, pa, pb,
    La, H, Pa, Pb, eps,
    saq_b, saq_l, saq_h, sak_b, sak_l, sak_h, sav_b, sav_l, sav_h,
    sbq_b, sbq_l, sbq_h, sbk_b, sbk_l, sbk_h, sbv_b, sbv_l, sbv_h,
    oq_b, oq_l, oq_h, ok_b, ok_l, ok_h, ov_b, ov_l, ov_h,
    s_ca, s_cb, spa_b, spa_l, spb_b, spb_l,
    D: tl.constexpr, D_BLOCK: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr,
    TAIL: tl.constexpr, TAIL_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr,
    INTERLEAVED: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr, ROUND: tl.constexpr,
    POS_A: tl.constexpr, POS_B: tl.constexpr, HAS_V: tl.constexpr,
):
    lo = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < H
    heads64 = heads.to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    if lo < La:
        _token(aq, ak, av, saq_b, saq_l, saq_h, sak_b, sak_l, sak_h, sav_b, sav_l, sav_h,
               oq, ok, ov, oq_b, oq_l, oq_h, ok_b, ok_l, ok_h, ov_b, ov_l, ov_h,
               wqa, wka, ca, s_ca, Pa, pa, spa_b, spa_l, b, lo, lo, heads64, hmask, eps,
               D, D_BLOCK, HALF, HALF_BLOCK, TAIL, TAIL_BLOCK, BLOCK_H, INTERLEAVED, NORM, ROPE, ROUND,
               POS_A, HAS_V)
    else:
        _token(bq, bk, bv, sbq_b, sbq_l, sbq_h, sbk_b, sbk_l, sbk_h, sbv_b, sbv_l, sbv_h,
               oq, ok, ov, oq_b, oq_l, oq_h, ok_b, ok_l, ok_h, ov_b, ov_l, ov_h,
               wqb, wkb, cb, s_cb, Pb, pb, spb_b, spb_l, b, lo - La, lo, heads64, hmask, eps,
               D, D_BLOCK, HALF, HALF_BLOCK, TAIL, TAIL_BLOCK, BLOCK_H, INTERLEAVED, NORM, ROPE, ROUND,
               POS_B, HAS_V)


# --- launch -----------------------------------------------------------------------------------

def _block_h(H: int) -> int:
    for bh in (8, 4, 2):
        if H % bh == 0:
            return bh
    return min(8, next_power_of_2(H))


def _device_guard(t: torch.Tensor):
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    import contextlib
    return contextlib.nullcontext()


def _strides(t):
    return (t.stride(0), t.stride(1), t.stride(2)) if t is not None else (0, 0, 0)


def _pos_args(pos):
    if pos is None:
        return None, 0, 0
    if pos.dim() == 1:
        return pos, 0, pos.stride(0)
    return pos, pos.stride(0), pos.stride(1)


def launch(a, b, out, *, weights=None, tables=None, positions=(None, None), eps=1e-6,
           interleaved=True, norm=False, rope=False, config=None):
    """Generic launcher. a, b: (q, k, v|None) of the two streams [B, La|Lb, H, D] (b may be None);
    out: (q, k, v|None) [B, La + Lb, H, D] (may alias the inputs row for row: in place);
    weights: (wq_a, wk_a, wq_b, wk_b) [D]; tables: (cache_a, cache_b) fp32 [P, R];
    positions: (pos_a, pos_b) each None (row = token index), [L] or [B, L]."""
    qa = a[0]
    B, La, H, D = qa.shape
    Lb = b[0].shape[1] if b is not None else 0
    if B == 0 or La + Lb == 0 or H == 0:
        return
    b = b if b is not None else a  # never read (every token < La)
    has_v = out[2] is not None
    R = tables[0].shape[1] if rope else D - (D % 2)
    if not rope and not norm:
        R = 0
    half = R // 2
    tail = D - 2 * half
    cfg = dict(config or {})
    bh = cfg.pop("BLOCK_H", _block_h(H))
    nw = cfg.pop("num_warps", 4)
    if weights is None:
        weights = (qa, qa, qa, qa)  # dummies, never read
        wround = False
    else:
        wround = weights[0].dtype in (torch.float16, torch.bfloat16)
    if tables is None:
        dummy = torch.empty(1, 1, dtype=torch.float32, device=qa.device)
        tables = (dummy, dummy)
    pa, spa_b, spa_l = _pos_args(positions[0])
    pb, spb_b, spb_l = _pos_args(positions[1])
    grid = (La + Lb, cdiv(H, bh), B)
    with _device_guard(qa):
        launch_kernel(
            _joint_qk_kernel, grid,
            (a[0], a[1], a[2] if has_v else a[0], b[0], b[1], b[2] if has_v else b[0],
             out[0], out[1], out[2] if has_v else out[0],
             weights[0], weights[1], weights[2], weights[3], tables[0], tables[1], pa, pb,
             La, H, tables[0].shape[0], tables[1].shape[0], float(eps),
             *_strides(a[0]), *_strides(a[1]), *_strides(a[2]),
             *_strides(b[0]), *_strides(b[1]), *_strides(b[2]),
             *_strides(out[0]), *_strides(out[1]), *_strides(out[2]),
             tables[0].stride(0), tables[1].stride(0), spa_b, spa_l, spb_b, spb_l),
            (D, next_power_of_2(D), max(half, 1) if R else 1,
             next_power_of_2(max(half, 1)), tail, next_power_of_2(max(tail, 1)), bh,
             interleaved, norm, rope, wround,
             positions[0] is not None, positions[1] is not None, has_v),
            dict(num_warps=nw, **cfg))


def rope_(q, k, cache, positions=None, interleaved=True):
    """In-place RoPE of q, k [B, L, H, D] (one stream)."""
    launch((q, k, None), None, (q, k, None), tables=(cache, cache), positions=(positions, None),
           interleaved=interleaved, rope=True)


def joint_qkv_cat_out(txt, img, out):
    launch(txt, img, out)


def qk_norm_rope_cat_out(txt, img, out, weights, tables, eps, interleaved):
    launch(txt, img, out, weights=weights, tables=tables, eps=eps, interleaved=interleaved,
           norm=True, rope=True)


def joint_qk_norm_rope_(q, k, txt_len, weights, tables, eps, interleaved):
    txt = (q[:, :txt_len], k[:, :txt_len], None)
    img = (q[:, txt_len:], k[:, txt_len:], None)
    launch(txt, img, (q, k, None), weights=weights, tables=tables, eps=eps, interleaved=interleaved,
           norm=True, rope=True)
