"""Triton kernels that write FP8 (e4m3) activations with one fp32 scale per token, and their launchers.

Every kernel holds whole rows (BLOCK_C = next_pow2(C)), so the row's absolute maximum is a
register reduction on the values it is about to store: ``scale = amax / 448`` (1 for an all-zero
row, NaN for a row holding a NaN), ``q = clamp(y * (448 / amax), -448, 448)`` (the reciprocal 1 for an
all-zero row) cast to float8_e4m3fn (round to nearest). The two divisions per row are IEEE-rounded
(``tl.div_rn``) and the values multiplied, as in :mod:`fused_dit_ops.reference`: an IEEE division
per value costs more ALU time than the kernel's memory traffic. Outputs are new contiguous
tensors: values [B, L, C] (or [M, K]) and scales [B, L] (or [M]).

The norm kernels reuse the row helpers of :mod:`.modulation` (same LayerNorm / RMSNorm, same
parameter selection); only the store differs. ``quantize_cat`` (rows of [a | act(b)], e.g. a
single-stream block's [attention | GELU(MLP)]) and ``quantize_rows`` hold whole rows in one tile
up to 8192 padded columns; wider rows are held as a tuple of column chunks (up to 32768 columns: each
value read and activated once), and rows wider still take a two-pass kernel over column chunks (the
row maximum, then the values recomputed).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, launch, next_power_of_2
from .gate_residual_norm import _affine_rows, _gate_residual_layer_norm_rows
from .modulation import (_device_guard, _index_args, _layer_norm_rows, _load_rows, _modulate_rows, _row_select,
                         _store, _whole_rows)

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@triton.jit
def _nan_max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _row_amax(y, mask):
    """Per-row absolute maximum of the tile (masked columns ignored), NaN for a row holding a NaN: one
    NaN-propagating max reduction."""
    return tl.reduce(tl.where(mask, tl.abs(y), 0.0), 1, _nan_max)


@triton.jit
def _row_scales(amax):
    """(scale, reciprocal) per row of the row maxima: amax / 448 and 448 / amax, each one IEEE
    division per row (not per value); 1 and 1 for an all-zero row, NaN for a NaN row."""
    scale = tl.where(amax == 0.0, 1.0, tl.div_rn(amax, 448.0))
    inv = tl.where(amax == 0.0, 1.0, tl.div_rn(448.0, amax))
    return scale, inv


@triton.jit
def _store_e4m3(q_ptr, q, row_off, rmask, ncols, BLOCK: tl.constexpr, STREAM_STORES: tl.constexpr):
    """Store the e4m3 tile q [BLOCK_M, BLOCK] (columns < ncols; row r at q_ptr + row_off[r]) eight
    bytes per thread: as [BLOCK_M, BLOCK / 8, 8], so that the store takes the layout of the 16-bit
    loads (eight elements per thread). A [BLOCK_M, BLOCK] e4m3 store gets sixteen per thread (one
    128-bit vector), which moves the whole computation into that layout and converts every loaded
    tile through shared memory (about twice the barriers of the model-dtype kernel)."""
    BM: tl.constexpr = q.shape[0]
    c3 = (tl.arange(0, BLOCK // 8) * 8)[None, :, None] + tl.arange(0, 8)[None, None, :]
    m3 = rmask[:, None, None] & (c3 < ncols)
    _store(q_ptr + row_off[:, None, None] + c3, tl.reshape(q, [BM, BLOCK // 8, 8]), m3, STREAM_STORES)


@triton.jit
def _quant_store(y, mask, q_ptr, s_ptr, row, rmask, C, BLOCK_C: tl.constexpr, STREAM_STORES: tl.constexpr):
    """Per-row quantisation of the fp32 tile y [BLOCK_M, BLOCK_C] (masked columns ignored) into
    contiguous rows of C values (row r at row[r] * C) and one scale per row."""
    scale, inv = _row_scales(_row_amax(y, mask))
    q = y * inv[:, None]
    q = tl.clamp(q, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
    _store_e4m3(q_ptr, q.to(q_ptr.dtype.element_ty), row * C, rmask, C, BLOCK_C, STREAM_STORES)
    tl.store(s_ptr + row, scale, mask=rmask)


@triton.jit
def _norm_fp8_rows(
    pid_m, b, x_ptr, shift_ptr, scale_ptr, idx_ptr, q_ptr, s_ptr,
    L, C, B, eps,
    stride_xb, stride_xl, stride_shift, stride_scale, stride_ib, stride_il,
    HAS_INDEX: tl.constexpr, IS_RMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    STREAM_STORES: tl.constexpr,
):
    """BLOCK_M rows of norm_scale_shift_fp8 (row tile pid_m of batch b)."""
    cols, cmask, l, rmask, mask = _whole_rows(pid_m, L, C, BLOCK_M, BLOCK_C)
    x = _load_rows(x_ptr, b, l, stride_xb, stride_xl, cols, mask).to(tl.float32)
    n = _layer_norm_rows(x, cmask, C, eps, IS_RMS)
    sel = _row_select(idx_ptr, b, l, stride_ib, stride_il, rmask, HAS_INDEX)
    y = _modulate_rows(n, sel, scale_ptr, shift_ptr, b, B, stride_scale, stride_shift, cols, mask,
                       0.0, 0.0, 0.0, 0.0, HAS_INDEX, True)
    row = (b * L + l).to(tl.int64)
    _quant_store(y, mask, q_ptr, s_ptr, row, rmask, C, BLOCK_C, STREAM_STORES)


@triton.jit
def _dual_norm_fp8_kernel(
    xa_ptr, sha_ptr, sca_ptr, ia_ptr, qa_ptr, sa_ptr, La, eps_a, s_xab, s_xal, s_sha, s_sca, s_iab, s_ial,
    xb_ptr, shb_ptr, scb_ptr, ib_ptr, qb_ptr, sb_ptr, Lb, eps_b, s_xbb, s_xbl, s_shb, s_scb, s_ibb, s_ibl,
    C, B, n_prog_a,
    HAS_INDEX_A: tl.constexpr, HAS_INDEX_B: tl.constexpr, IS_RMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, STREAM_STORES: tl.constexpr,
):
    """One or two streams in one launch: the first n_prog_a row tiles of each batch are stream a's
    (a single-stream call passes Lb = 0)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < n_prog_a:
        _norm_fp8_rows(pid, b, xa_ptr, sha_ptr, sca_ptr, ia_ptr, qa_ptr, sa_ptr, La, C, B, eps_a,
                       s_xab, s_xal, s_sha, s_sca, s_iab, s_ial, HAS_INDEX_A, IS_RMS, BLOCK_M, BLOCK_C, STREAM_STORES)
    else:
        _norm_fp8_rows(pid - n_prog_a, b, xb_ptr, shb_ptr, scb_ptr, ib_ptr, qb_ptr, sb_ptr, Lb, C, B, eps_b,
                       s_xbb, s_xbl, s_shb, s_scb, s_ibb, s_ibl, HAS_INDEX_B, IS_RMS, BLOCK_M, BLOCK_C, STREAM_STORES)


@triton.jit
def _grns_fp8_rows(
    pid_m, b, r_ptr, u_ptr, gate_ptr, shift_ptr, scale_ptr, idx_ptr, r_out_ptr, q_ptr, s_ptr,
    L, C, B, eps,
    stride_rb, stride_rl, stride_ub, stride_ul, stride_gate, stride_shift, stride_scale, stride_ib, stride_il,
    HAS_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, STREAM_STORES: tl.constexpr,
):
    """BLOCK_M rows of gate_residual_norm_scale_shift_fp8: residual_out as the residual dtype, the
    modulated LayerNorm of residual_out as stored, quantised."""
    n, cols, cmask, mask, out_off, row, rmask, sel = _gate_residual_layer_norm_rows(
        pid_m, b, r_ptr, u_ptr, gate_ptr, idx_ptr, r_out_ptr, L, C, B, eps,
        stride_rb, stride_rl, stride_ub, stride_ul, stride_gate, stride_ib, stride_il,
        HAS_INDEX, BLOCK_M, BLOCK_C, STREAM_STORES)
    y = _modulate_rows(n, sel, scale_ptr, shift_ptr, b, B, stride_scale, stride_shift, cols, mask,
                       0.0, 0.0, 0.0, 0.0, HAS_INDEX, True)
    _quant_store(y, mask, q_ptr, s_ptr, row, rmask, C, BLOCK_C, STREAM_STORES)


@triton.jit
def _dual_grns_fp8_kernel(
    ra_ptr, ua_ptr, ga_ptr, sha_ptr, sca_ptr, ia_ptr, roa_ptr, qa_ptr, sa_ptr, La, eps_a,
    s_rab, s_ral, s_uab, s_ual, s_ga, s_sha, s_sca, s_iab, s_ial,
    rb_ptr, ub_ptr, gb_ptr, shb_ptr, scb_ptr, ib_ptr, rob_ptr, qb_ptr, sb_ptr, Lb, eps_b,
    s_rbb, s_rbl, s_ubb, s_ubl, s_gb, s_shb, s_scb, s_ibb, s_ibl,
    C, B, n_prog_a,
    HAS_INDEX_A: tl.constexpr, HAS_INDEX_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    STREAM_STORES: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < n_prog_a:
        _grns_fp8_rows(pid, b, ra_ptr, ua_ptr, ga_ptr, sha_ptr, sca_ptr, ia_ptr, roa_ptr, qa_ptr, sa_ptr, La, C, B,
                       eps_a, s_rab, s_ral, s_uab, s_ual, s_ga, s_sha, s_sca, s_iab, s_ial, HAS_INDEX_A, BLOCK_M,
                       BLOCK_C, STREAM_STORES)
    else:
        _grns_fp8_rows(pid - n_prog_a, b, rb_ptr, ub_ptr, gb_ptr, shb_ptr, scb_ptr, ib_ptr, rob_ptr, qb_ptr, sb_ptr,
                       Lb, C, B, eps_b, s_rbb, s_rbl, s_ubb, s_ubl, s_gb, s_shb, s_scb, s_ibb, s_ibl, HAS_INDEX_B,
                       BLOCK_M, BLOCK_C, STREAM_STORES)


@triton.jit
def _gelu_tanh(x):
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), tanh via exp (no libdevice in the interpreter)
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    t = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)
    return 0.5 * x * (1.0 + t)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, bias_ptr, q_ptr, s_ptr, M, L, K, stride_xb, stride_xl,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    STREAM_STORES: tl.constexpr,
):
    """Rows of x [M = B * L, K] (row m at (m // L) * stride_xb + (m % L) * stride_xl, last dim
    contiguous): [+ bias] [GELU-tanh] then per-row quantisation into contiguous outputs."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    cmask = cols < K
    rmask = m < M
    mask = rmask[:, None] & cmask[None, :]
    m64 = m.to(tl.int64)
    x_off = (m64 // L) * stride_xb + (m64 % L) * stride_xl
    y = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=mask, other=0.0,
                eviction_policy="evict_first").to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if GELU:
        y = _gelu_tanh(y)
    _quant_store(y, mask, q_ptr, s_ptr, m64, rmask, K, BLOCK_K, STREAM_STORES)


@triton.jit
def _quantize_cat_kernel(
    a_ptr, b_ptr, q_ptr, s_ptr, M, L, KA, KB, stride_ab, stride_al, stride_bb, stride_bl,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    STREAM_STORES: tl.constexpr,
):
    """Rows of [a | act(b)] (a [M, KA], b [M, KB] or [M, 2 KB] for SwiGLU; row m of each at
    (m // L) * stride_*b + (m % L) * stride_*l, last dims contiguous): one scale per row over both
    tiles, values into one contiguous [M, KA + KB] output. ACT: 0 none, 1 GELU-tanh, 2 SwiGLU
    (silu(b[:, :KB]) * b[:, KB:])."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = m < M
    m64 = m.to(tl.int64)
    ca = tl.arange(0, BLOCK_A)
    cb = tl.arange(0, BLOCK_B)
    mask_a = rmask[:, None] & (ca < KA)[None, :]
    mask_b = rmask[:, None] & (cb < KB)[None, :]
    a_off = (m64 // L) * stride_ab + (m64 % L) * stride_al
    b_off = (m64 // L) * stride_bb + (m64 % L) * stride_bl
    ya = tl.load(a_ptr + a_off[:, None] + ca[None, :], mask=mask_a, other=0.0,
                 eviction_policy="evict_first").to(tl.float32)
    yb = tl.load(b_ptr + b_off[:, None] + cb[None, :], mask=mask_b, other=0.0,
                 eviction_policy="evict_first").to(tl.float32)
    if ACT == 1:
        yb = _gelu_tanh(yb)
    if ACT == 2:
        u = tl.load(b_ptr + b_off[:, None] + KB + cb[None, :], mask=mask_b, other=0.0,
                    eviction_policy="evict_first").to(tl.float32)
        yb = yb / (1.0 + tl.exp(-yb)) * u
    am_a = _row_amax(ya, mask_a)
    am_b = _row_amax(yb, mask_b)
    amax = tl.where((am_a != am_a) | (am_b != am_b), float("nan"), tl.maximum(am_a, am_b))
    scale, inv = _row_scales(amax)
    qa = tl.clamp(ya * inv[:, None], -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
    qb = tl.clamp(yb * inv[:, None], -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
    out = m64 * (KA + KB)
    _store_e4m3(q_ptr, qa.to(q_ptr.dtype.element_ty), out, rmask, KA, BLOCK_A, STREAM_STORES)
    _store_e4m3(q_ptr + KA, qb.to(q_ptr.dtype.element_ty), out, rmask, KB, BLOCK_B, STREAM_STORES)
    tl.store(s_ptr + m64, scale, mask=rmask)


@triton.jit
def _act_chunk(b_row, c, cb, msk, bias_ptr, KB, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, EVICT: tl.constexpr):
    """act(b[c : c + BLOCK_K] (+ bias)) of the rows at b_row (fp32) for one column chunk."""
    y = tl.load(b_row + c + cb[None, :], mask=msk, other=0.0, eviction_policy=EVICT).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + c + cb, mask=(c + cb) < KB, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        y = _gelu_tanh(y)
    if ACT == 2:
        u = tl.load(b_row + KB + c + cb[None, :], mask=msk, other=0.0, eviction_policy=EVICT).to(tl.float32)
        y = y / (1.0 + tl.exp(-y)) * u
    return y


@triton.jit
def _cat_rows(a_ptr, b_ptr, M, L, KA, KB, stride_ab, stride_al, stride_bb, stride_bl, BLOCK_M: tl.constexpr):
    """This program's rows of the chunked [a | act(b)] kernels: (row index int64, row mask, a and b row
    pointers [BLOCK_M, 1], output row offset)."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m64 = m.to(tl.int64)
    a_row = (a_ptr + (m64 // L) * stride_ab + (m64 % L) * stride_al)[:, None]
    b_row = (b_ptr + (m64 // L) * stride_bb + (m64 % L) * stride_bl)[:, None]
    return m64, m < M, a_row, b_row, m64 * (KA + KB)


@triton.jit
def _quantize_cat_chunked_kernel(
    a_ptr, b_ptr, bias_ptr, q_ptr, s_ptr, M, L, KA, KB, stride_ab, stride_al, stride_bb, stride_bl,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    N_A: tl.constexpr, N_B: tl.constexpr, STREAM_STORES: tl.constexpr,
):
    """:func:`_quantize_cat_kernel` for rows too wide for registers (and ``quantize_rows`` of wide
    rows: KA = 0, b = x, optional bias): BLOCK_K columns at a time over a, then over b, in two passes.
    Pass 1 folds |y| into an elementwise [BLOCK_M, BLOCK_K] maximum (one row reduction at the end),
    keeping the rows in L2; pass 2 reads them again (from L2), scales and stores. Contiguous column
    chunks of each input: vector loads and stores. N_A, N_B = cdiv(KA, BLOCK_K), cdiv(KB, BLOCK_K) as
    constexprs (the model's widths: one compile per model)."""
    m64, rmask, a_row, b_row, q_row = _cat_rows(a_ptr, b_ptr, M, L, KA, KB, stride_ab, stride_al, stride_bb,
                                                 stride_bl, BLOCK_M)
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for i in range(0, N_A):
        c = i * BLOCK_K
        msk = rmask[:, None] & ((c + k) < KA)[None, :]
        y = tl.load(a_row + c + k[None, :], mask=msk, other=0.0, eviction_policy="evict_last").to(tl.float32)
        acc = tl.maximum(acc, tl.abs(y), propagate_nan=tl.PropagateNan.ALL)
    for i in range(0, N_B):
        c = i * BLOCK_K
        msk = rmask[:, None] & ((c + k) < KB)[None, :]
        y = _act_chunk(b_row, c, k, msk, bias_ptr, KB, ACT, HAS_BIAS, "evict_last")
        acc = tl.maximum(acc, tl.where(msk, tl.abs(y), 0.0), propagate_nan=tl.PropagateNan.ALL)
    amax = tl.reduce(acc, 1, _nan_max)
    scale, inv = _row_scales(amax)
    inv = inv[:, None]
    for i in range(0, N_A):
        c = i * BLOCK_K
        msk = rmask[:, None] & ((c + k) < KA)[None, :]
        y = tl.load(a_row + c + k[None, :], mask=msk, other=0.0, eviction_policy="evict_first").to(tl.float32)
        q = tl.clamp(y * inv, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
        _store_e4m3(q_ptr + c, q.to(q_ptr.dtype.element_ty), q_row, rmask, KA - c, BLOCK_K, STREAM_STORES)
    for i in range(0, N_B):
        c = i * BLOCK_K
        msk = rmask[:, None] & ((c + k) < KB)[None, :]
        y = _act_chunk(b_row, c, k, msk, bias_ptr, KB, ACT, HAS_BIAS, "evict_first")
        q = tl.clamp(y * inv, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
        _store_e4m3(q_ptr + KA + c, q.to(q_ptr.dtype.element_ty), q_row, rmask, KB - c, BLOCK_K, STREAM_STORES)
    tl.store(s_ptr + m64, scale, mask=rmask)


@triton.jit
def _quantize_cat_onepass_kernel(
    a_ptr, b_ptr, bias_ptr, q_ptr, s_ptr, M, L, KA, KB, stride_ab, stride_al, stride_bb, stride_bl,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    N_A: tl.constexpr, N_B: tl.constexpr, STREAM_STORES: tl.constexpr,
):
    """:func:`_quantize_cat_chunked_kernel`'s rows in one pass: the row is held in registers as a tuple
    of N_A + N_B BLOCK_K-column chunks (unrolled), so each input value is read once and activated once,
    then the row maximum scales the held values. The chunked kernel activates every value twice: with
    GELU-tanh or SwiGLU its instruction count per value, not memory, bounded it (sm_90 SASS: ~62
    instructions per value over both passes, ~40 here)."""
    m64, rmask, a_row, b_row, q_row = _cat_rows(a_ptr, b_ptr, M, L, KA, KB, stride_ab, stride_al, stride_bb,
                                                 stride_bl, BLOCK_M)
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    ya = ()
    for i in tl.static_range(N_A):
        c = i * BLOCK_K
        msk = rmask[:, None] & ((c + k) < KA)[None, :]
        y = tl.load(a_row + c + k[None, :], mask=msk, other=0.0, eviction_policy="evict_first").to(tl.float32)
        acc = tl.maximum(acc, tl.abs(y), propagate_nan=tl.PropagateNan.ALL)
        ya = ya + (y,)
    yb = ()
    for i in tl.static_range(N_B):
        c = i * BLOCK_K
        msk = rmask[:, None] & ((c + k) < KB)[None, :]
        y = _act_chunk(b_row, c, k, msk, bias_ptr, KB, ACT, HAS_BIAS, "evict_first")
        acc = tl.maximum(acc, tl.where(msk, tl.abs(y), 0.0), propagate_nan=tl.PropagateNan.ALL)
        yb = yb + (y,)
    scale, inv = _row_scales(tl.reduce(acc, 1, _nan_max))
    inv = inv[:, None]
    for i in tl.static_range(N_A):
        c = i * BLOCK_K
        q = tl.clamp(ya[i] * inv, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
        _store_e4m3(q_ptr + c, q.to(q_ptr.dtype.element_ty), q_row, rmask, KA - c, BLOCK_K, STREAM_STORES)
    for i in tl.static_range(N_B):
        c = i * BLOCK_K
        q = tl.clamp(yb[i] * inv, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
        _store_e4m3(q_ptr + KA + c, q.to(q_ptr.dtype.element_ty), q_row, rmask, KB - c, BLOCK_K, STREAM_STORES)
    tl.store(s_ptr + m64, scale, mask=rmask)


@triton.jit
def _grln_fp8_kernel(
    r_ptr, u_ptr, gate_ptr, idx_ptr, w_ptr, bias_ptr, r_out_ptr, q_ptr, s_ptr,
    L, C, B, eps,
    stride_rb, stride_rl, stride_ub, stride_ul, stride_gate, stride_ib, stride_il,
    HAS_INDEX: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, STREAM_STORES: tl.constexpr,
):
    """gate_residual_layer_norm_fp8: residual_out stored in the residual dtype, the affine LayerNorm
    of residual_out as stored (fp32) quantised per row."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n, cols, cmask, mask, out_off, row, rmask, _ = _gate_residual_layer_norm_rows(
        pid_m, b, r_ptr, u_ptr, gate_ptr, idx_ptr, r_out_ptr, L, C, B, eps,
        stride_rb, stride_rl, stride_ub, stride_ul, stride_gate, stride_ib, stride_il,
        HAS_INDEX, BLOCK_M, BLOCK_C, STREAM_STORES)
    n = _affine_rows(n, w_ptr, bias_ptr, cols, cmask, HAS_WEIGHT, HAS_BIAS)
    _quant_store(n, mask, q_ptr, s_ptr, row, rmask, C, BLOCK_C, STREAM_STORES)


# --- launch configuration ---------------------------------------------------------------------------
# Whole rows per program; not yet swept on a GPU: the row counts follow the bf16 norm kernels
# (kernels/modulation.py:_norm_config).

def _row_config(C: int) -> dict:
    block_c = next_power_of_2(max(C, 16))
    block_m = max(1, min(4, 4096 // block_c))
    num_warps = 16 if block_c >= 16384 else 8 if block_c >= 8192 else 4
    return {"BLOCK_M": block_m, "BLOCK_C": block_c, "STREAM_STORES": True, "num_warps": num_warps}


def _row_launch(config, C: int):
    """(BLOCK_M, BLOCK_C, STREAM_STORES, launch options) of ``config`` (default: ``_row_config(C)``)."""
    cfg = dict(config or _row_config(C))
    return cfg.pop("BLOCK_M"), cfg.pop("BLOCK_C"), cfg.pop("STREAM_STORES"), cfg


def _dual_plan(config, B: int, C: int, La: int, Lb: int):
    """``_row_launch`` of a two-stream launch, then the row tiles of stream a (the first programs of
    each batch) and the grid (tiles of a + tiles of b, B)."""
    bm, bc, stream, cfg = _row_launch(config, C)
    n_a = cdiv(La, bm)
    return bm, bc, stream, cfg, n_a, (n_a + cdiv(Lb, bm), B)


def _outs(shape, dev, q_dtype=torch.float8_e4m3fn):
    # q_dtype=torch.float32 stores the clamped, scaled values before the e4m3 cast (a test hook: the
    # Triton interpreter's fp32 -> e4m3 conversion is wrong where rounding carries into the exponent)
    return (torch.empty(shape, dtype=q_dtype, device=dev),
            torch.empty(shape[:-1], dtype=torch.float32, device=dev))


def dual_norm_scale_shift_fp8(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm="layer", config=None,
                              q_dtype=torch.float8_e4m3fn):
    """(q_a, s_a, q_b, s_b); xb may be None (one stream)."""
    B, La, C = xa.shape
    qa, sa = _outs((B, La, C), xa.device, q_dtype)
    if xb is None:
        xb, shb, scb, ib, eps_b, Lb = xa, sha, sca, None, eps_a, 0
        qb, sb = qa, sa
    else:
        Lb = xb.shape[1]
        qb, sb = _outs((B, Lb, C), xb.device, q_dtype)
    if B == 0 or C == 0 or La + Lb == 0:
        return qa, sa, qb, sb
    bm, bc, stream, cfg, n_a, grid = _dual_plan(config, B, C, La, Lb)
    i_a, s_iab, s_ial = _index_args(ia, xa)
    i_b, s_ibb, s_ibl = _index_args(ib, xb)
    with _device_guard(xa):
        launch(_dual_norm_fp8_kernel, grid,
               (xa, sha, sca, i_a, qa, sa, La, float(eps_a), xa.stride(0), xa.stride(1), sha.stride(0),
                sca.stride(0), s_iab, s_ial,
                xb, shb, scb, i_b, qb, sb, Lb, float(eps_b), xb.stride(0), xb.stride(1), shb.stride(0),
                scb.stride(0), s_ibb, s_ibl, C, B, n_a),
               (ia is not None, ib is not None, norm == "rms", bm, bc, stream), cfg)
    return qa, sa, qb, sb


def norm_scale_shift_fp8(x, shift, scale, index=None, eps=1e-6, norm="layer", config=None,
                         q_dtype=torch.float8_e4m3fn):
    q, s, _, _ = dual_norm_scale_shift_fp8(x, shift, scale, index, eps, None, None, None, None, None, norm, config,
                                           q_dtype)
    return q, s


def dual_gate_residual_norm_scale_shift_fp8(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b,
                                            config=None, q_dtype=torch.float8_e4m3fn):
    """(r_out_a, q_a, s_a, r_out_b, q_b, s_b); rb may be None (one stream)."""
    B, La, C = ra.shape
    roa = torch.empty((B, La, C), dtype=ra.dtype, device=ra.device)
    qa, sa = _outs((B, La, C), ra.device, q_dtype)
    if rb is None:
        rb, ub, gb, shb, scb, ib, eps_b, Lb = ra, ua, ga, sha, sca, None, eps_a, 0
        rob, qb, sb = roa, qa, sa
    else:
        Lb = rb.shape[1]
        rob = torch.empty((B, Lb, C), dtype=rb.dtype, device=rb.device)
        qb, sb = _outs((B, Lb, C), rb.device, q_dtype)
    if B == 0 or C == 0 or La + Lb == 0:
        return roa, qa, sa, rob, qb, sb
    bm, bc, stream, cfg, n_a, grid = _dual_plan(config, B, C, La, Lb)
    i_a, s_iab, s_ial = _index_args(ia, ra)
    i_b, s_ibb, s_ibl = _index_args(ib, rb)
    with _device_guard(ra):
        launch(_dual_grns_fp8_kernel, grid,
               (ra, ua, ga, sha, sca, i_a, roa, qa, sa, La, float(eps_a),
                ra.stride(0), ra.stride(1), ua.stride(0), ua.stride(1), ga.stride(0), sha.stride(0), sca.stride(0),
                s_iab, s_ial,
                rb, ub, gb, shb, scb, i_b, rob, qb, sb, Lb, float(eps_b),
                rb.stride(0), rb.stride(1), ub.stride(0), ub.stride(1), gb.stride(0), shb.stride(0), scb.stride(0),
                s_ibb, s_ibl, C, B, n_a),
               (ia is not None, ib is not None, bm, bc, stream), cfg)
    return roa, qa, sa, rob, qb, sb


def gate_residual_norm_scale_shift_fp8(residual, update, gate, shift, scale, index=None, eps=1e-6, config=None,
                                       q_dtype=torch.float8_e4m3fn):
    ro, q, s, _, _, _ = dual_gate_residual_norm_scale_shift_fp8(residual, update, gate, shift, scale, index, eps,
                                                                None, None, None, None, None, None, None, config,
                                                                q_dtype)
    return ro, q, s


def quantize_rows(x, bias=None, gelu=False, config=None, q_dtype=torch.float8_e4m3fn):
    """(q [..., K] e4m3, scale [...] fp32) of x [..., K] (last dim contiguous; [B, L, K] with free
    batch and token strides, other ranks with rows that collapse into one strided run):
    [+ bias] [GELU-tanh], per-row quantisation."""
    K = x.shape[-1]
    q, s = _outs(tuple(x.shape), x.device, q_dtype)
    if x.dim() == 3:
        x3 = x
    else:  # the op layer checks that the leading dims collapse
        x3 = x.view(1, -1, K) if x.dim() != 1 else x.view(1, 1, K)
    B, L = x3.shape[0], x3.shape[1]
    M = B * L
    if M == 0 or K == 0:
        return q, s
    cfg = dict(config or _rows_config(K))
    chunked, bm, stream = cfg.pop("CHUNKED", False), cfg.pop("BLOCK_M"), cfg.pop("STREAM_STORES")
    onepass = cfg.pop("ONEPASS", False)
    with _device_guard(x):
        if chunked:
            bk = cfg.pop("BLOCK_K")
            launch(_quantize_cat_onepass_kernel if onepass else _quantize_cat_chunked_kernel, (cdiv(M, bm),),
                   (x3, x3, x3 if bias is None else bias, q, s, M, L, 0, K, x3.stride(0), x3.stride(1),
                    x3.stride(0), x3.stride(1)),
                   (1 if gelu else 0, bias is not None, bm, bk, 0, cdiv(K, bk), stream), cfg)
        else:
            launch(_quantize_rows_kernel, (cdiv(M, bm),),
                   (x3, x3 if bias is None else bias, q, s, M, L, K, x3.stride(0), x3.stride(1)),
                   (bias is not None, bool(gelu), bm, cfg.pop("BLOCK_C"), stream), cfg)
    return q, s


_ACTS = {"none": 0, "gelu_tanh": 1, "swiglu": 2}


# padded row tiles (a + b, SwiGLU's two b tiles counted) held in one register tile at most; wider rows are
# held as column chunks (ONEPASS_CONFIG) up to ONEPASS_MAX_CHUNKS of them (values per thread: chunks x
# BLOCK_K / threads = 8 per chunk), wider still they take the two-pass chunked kernel (an H100 ran the
# whole-row kernel at ~1.5 TB/s for 16384-column tiles)
CAT_WHOLE_ROW_MAX = 8192
CHUNKED_CONFIG = {"CHUNKED": True, "BLOCK_M": 1, "BLOCK_K": 2048, "STREAM_STORES": True, "num_warps": 8}
ONEPASS_CONFIG = {"CHUNKED": True, "ONEPASS": True, "BLOCK_M": 1, "BLOCK_K": 4096, "STREAM_STORES": True,
                  "num_warps": 16}
ONEPASS_MAX_CHUNKS = 8


def _wide_config(KA: int, KB: int) -> dict:
    """Rows wider than one register tile: one pass over held chunks while they fit, else two passes."""
    bk = ONEPASS_CONFIG["BLOCK_K"]
    if cdiv(KA, bk) + cdiv(KB, bk) <= ONEPASS_MAX_CHUNKS:
        return dict(ONEPASS_CONFIG)
    return dict(CHUNKED_CONFIG)


def _rows_config(K: int) -> dict:
    """quantize_rows: whole rows (``_row_config``) up to CAT_WHOLE_ROW_MAX padded columns, else
    ``_wide_config``."""
    if next_power_of_2(max(K, 16)) > CAT_WHOLE_ROW_MAX:
        return _wide_config(0, K)
    return dict(_row_config(K), CHUNKED=False)


def _cat_config(KA: int, KB: int, act: str = "none") -> dict:
    """Whole rows per program (as _row_config) while the padded tiles fit, else ``_wide_config``
    (``CHUNKED``: BLOCK_K-column chunks, held in one pass with ``ONEPASS``, else two passes)."""
    ba, bb = next_power_of_2(max(KA, 16)), next_power_of_2(max(KB, 16))
    width = ba + bb * (2 if act == "swiglu" else 1)
    if width > CAT_WHOLE_ROW_MAX:
        return _wide_config(KA, KB)
    block_m = 1 << (max(1, min(4, 4096 // width)).bit_length() - 1)  # a power of two
    num_warps = 16 if width >= 16384 else 8 if width >= 8192 else 4
    return {"CHUNKED": False, "BLOCK_M": block_m, "BLOCK_A": ba, "BLOCK_B": bb, "STREAM_STORES": True,
            "num_warps": num_warps}


def _rows3(x):
    """[B, L, K] view of x (3-D as is; 2-D [M, K] as [1, M, K], its row stride kept)."""
    return x if x.dim() == 3 else x.unsqueeze(0)


def quantize_cat(a, b, activation="none", config=None, q_dtype=torch.float8_e4m3fn):
    """(q [..., KA + KB'] e4m3, scale [...] fp32) of [a | act(b)] (a, b 2-D or 3-D with the same
    leading dims, last dims contiguous, free row strides; KB' = KB, or KB / 2 for "swiglu"; a None:
    KA = 0)."""
    KA = 0 if a is None else a.shape[-1]
    KB = b.shape[-1] // 2 if activation == "swiglu" else b.shape[-1]
    q, s = _outs((*b.shape[:-1], KA + KB), b.device, q_dtype)
    b3 = _rows3(b)
    a3 = b3 if a is None else _rows3(a)
    B, L = a3.shape[0], a3.shape[1]
    M = B * L
    if M == 0 or KA + KB == 0:
        return q, s
    cfg = dict(config or _cat_config(KA, KB, activation))
    chunked, bm, stream = cfg.pop("CHUNKED"), cfg.pop("BLOCK_M"), cfg.pop("STREAM_STORES")
    onepass = cfg.pop("ONEPASS", False)
    args = (a3, b3, q, s, M, L, KA, KB, a3.stride(0), a3.stride(1), b3.stride(0), b3.stride(1))
    with _device_guard(b):
        if chunked:
            bk = cfg.pop("BLOCK_K")
            launch(_quantize_cat_onepass_kernel if onepass else _quantize_cat_chunked_kernel, (cdiv(M, bm),),
                   (a3, b3, b3, *args[2:]),
                   (_ACTS[activation], False, bm, bk, cdiv(KA, bk), cdiv(KB, bk), stream), cfg)
        else:
            launch(_quantize_cat_kernel, (cdiv(M, bm),), args,
                   (_ACTS[activation], bm, cfg.pop("BLOCK_A"), cfg.pop("BLOCK_B"), stream), cfg)
    return q, s


def gate_residual_layer_norm_fp8(residual, update, gate, index=None, weight=None, bias=None, eps=1e-6, config=None,
                                 q_dtype=torch.float8_e4m3fn):
    """(residual_out, q, scale) of ``gate_residual_layer_norm_fp8``."""
    B, L, C = residual.shape
    r_out = torch.empty((B, L, C), dtype=residual.dtype, device=residual.device)
    q, s = _outs((B, L, C), residual.device, q_dtype)
    if r_out.numel() == 0:
        return r_out, q, s
    bm, bc, stream, cfg = _row_launch(config, C)
    idx, sib, sil = _index_args(index, residual)
    with _device_guard(residual):
        launch(_grln_fp8_kernel, (cdiv(L, bm), B),
               (residual, update, gate, idx, residual if weight is None else weight,
                residual if bias is None else bias, r_out, q, s, L, C, B, float(eps),
                residual.stride(0), residual.stride(1), update.stride(0), update.stride(1), gate.stride(0), sib, sil),
               (index is not None, weight is not None, bias is not None, bm, bc, stream), cfg)
    return r_out, q, s
