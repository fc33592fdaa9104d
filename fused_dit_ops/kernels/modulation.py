"""Triton kernels for the adaLN modulation ops and their launchers.

Layout contract (checked by the op layer, not here): activations [B, L, C] with the last dim
contiguous and free batch/token strides; parameters [B, C] or, with ``index``, [2B, C] with a
free row stride (row views of ``mod.chunk(...)``); outputs are freshly allocated contiguous.

Every grid has the batch on its last axis so that a program's rows share one batch: it loads
the (one or two) parameter rows it needs once as [BLOCK_C] vectors and selects per token with
``tl.where``, instead of gathering parameters per element. Math is fp32, one rounding on store.
The launchers run unchanged under ``TRITON_INTERPRET=1`` on CPU tensors (the CPU test tier).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._launch import cdiv, launch, next_power_of_2, row_segments, two_segments


@triton.jit
def _load_param(p_ptr, b, B, stride, cols, cmask, HAS_INDEX: tl.constexpr):
    """The (one or two) parameter rows a batch needs, as fp32 [BLOCK_C] vectors (set 0, set 1)."""
    p0 = tl.load(p_ptr + b * stride + cols, mask=cmask, other=0.0, eviction_policy="evict_last").to(tl.float32)
    if HAS_INDEX:
        p1 = tl.load(p_ptr + (b + B) * stride + cols, mask=cmask, other=0.0,
                     eviction_policy="evict_last").to(tl.float32)
    else:
        p1 = p0
    return p0, p1


@triton.jit
def _pick(sel, p0, p1, HAS_INDEX: tl.constexpr):
    """[BLOCK_M, BLOCK_C] tile: row r takes p1 where sel[r] else p0."""
    if HAS_INDEX:
        return tl.where(sel[:, None], p1[None, :], p0[None, :])
    else:
        return tl.broadcast_to(p0[None, :], (sel.shape[0], p0.shape[0]))


@triton.jit
def _gather_param(p_ptr, b, B, stride, sel, cols, mask, HAS_INDEX: tl.constexpr):
    """[BLOCK_M, BLOCK_C] fp32 tile of each row's own parameter row (row b, or b + B where sel):
    two contiguous row loads (L1/L2 hits) instead of both sets in registers plus a select."""
    if HAS_INDEX:
        prow = b + tl.where(sel, B, 0).to(tl.int64)
    else:
        prow = b + tl.zeros_like(sel).to(tl.int64)
    return tl.load(p_ptr + prow[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _row_select(idx_ptr, b, l, stride_ib, stride_il, rmask, HAS_INDEX: tl.constexpr):
    if HAS_INDEX:
        return tl.load(idx_ptr + b * stride_ib + l * stride_il, mask=rmask, other=0) != 0
    else:
        return l < 0  # all False, right shape


@triton.jit
def _whole_rows(pid_m, L, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row tile pid_m of a whole-row kernel: (cols, column mask, rows l, row mask, 2-D mask)."""
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    l = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = l < L
    return cols, cmask, l, rmask, rmask[:, None] & cmask[None, :]


@triton.jit
def _load_rows(ptr, b, l, stride_b, stride_l, cols, mask):
    """The [len(l), BLOCK_C] tile of rows l of batch b (columns contiguous), in its own dtype, read
    once (evict_first); masked elements are 0."""
    return tl.load(ptr + b * stride_b + l[:, None].to(tl.int64) * stride_l + cols[None, :], mask=mask, other=0.0,
                   eviction_policy="evict_first")


@triton.jit
def _store(ptr, v, mask, STREAM: tl.constexpr):
    """Store; STREAM marks the lines evict-first in L2 (st.global.cs): outputs are not re-read by
    this kernel, and on the H100 the norm kernels run ~3 us faster with it (docs/performance.md)."""
    if STREAM:
        tl.store(ptr, v, mask=mask, cache_modifier=".cs")
    else:
        tl.store(ptr, v, mask=mask)


@triton.jit
def _column_tile(C, BLOCK_C: tl.constexpr):
    """Elementwise grid (n_cblocks * n_mblocks, B), column block fastest so that consecutive
    programs walk memory in order: (row-block id, batch, column offsets, column mask)."""
    return _column_tile_of(tl.program_id(0), C, BLOCK_C)


@triton.jit
def _column_tile_of(pid, C, BLOCK_C: tl.constexpr):
    n_c = tl.cdiv(C, BLOCK_C)
    cols = (pid % n_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    return pid // n_c, tl.program_id(1).to(tl.int64), cols, cols < C


@triton.jit
def _row_tile(pid_m, it, b, L, C, cols, cmask, idx_ptr, stride_ib, stride_il,
              HAS_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, ITERS: tl.constexpr):
    """Rows of iteration ``it`` of an elementwise tile: (token ids, 2-D mask, per-row set select,
    offsets into the contiguous [B, L, C] output)."""
    l = (pid_m * ITERS + it) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = l < L
    mask = rmask[:, None] & cmask[None, :]
    sel = _row_select(idx_ptr, b, l, stride_ib, stride_il, rmask, HAS_INDEX)
    out_off = (b * L + l[:, None]).to(tl.int64) * C + cols[None, :]
    return l, mask, sel, out_off


@triton.jit
def _ssg_y_tile(pid, x_ptr, shift_ptr, scale_ptr, gate_ptr, idx_ptr, y_ptr, g_ptr, L, C, B,
                stride_xb, stride_xl, stride_shift, stride_scale, stride_gate, stride_ib, stride_il,
                HAS_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ITERS: tl.constexpr,
                STREAM_STORES: tl.constexpr, WRITE_GATE: tl.constexpr):
    pid_m, b, cols, cmask = _column_tile_of(pid, C, BLOCK_C)
    sh0, sh1 = _load_param(shift_ptr, b, B, stride_shift, cols, cmask, HAS_INDEX)
    sc0, sc1 = _load_param(scale_ptr, b, B, stride_scale, cols, cmask, HAS_INDEX)
    if WRITE_GATE:
        g0, g1 = _load_param(gate_ptr, b, B, stride_gate, cols, cmask, HAS_INDEX)
    for it in tl.static_range(ITERS):
        l, mask, sel, out_off = _row_tile(pid_m, it, b, L, C, cols, cmask, idx_ptr, stride_ib, stride_il,
                                          HAS_INDEX, BLOCK_M, ITERS)
        x = _load_rows(x_ptr, b, l, stride_xb, stride_xl, cols, mask).to(tl.float32)
        y = x * (1.0 + _pick(sel, sc0, sc1, HAS_INDEX)) + _pick(sel, sh0, sh1, HAS_INDEX)
        _store(y_ptr + out_off, y.to(y_ptr.dtype.element_ty), mask, STREAM_STORES)
        if WRITE_GATE:
            _store(g_ptr + out_off, _pick(sel, g0, g1, HAS_INDEX).to(g_ptr.dtype.element_ty), mask, STREAM_STORES)


@triton.jit
def _ssg_gate_tile(pid, gate_ptr, idx_ptr, g_ptr, L, C, B, stride_gate, stride_ib, stride_il,
                   HAS_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ITERS: tl.constexpr,
                   STREAM_STORES: tl.constexpr):
    pid_m, b, cols, cmask = _column_tile_of(pid, C, BLOCK_C)
    g0, g1 = _load_param(gate_ptr, b, B, stride_gate, cols, cmask, HAS_INDEX)
    for it in tl.static_range(ITERS):
        _, mask, sel, out_off = _row_tile(pid_m, it, b, L, C, cols, cmask, idx_ptr, stride_ib, stride_il,
                                          HAS_INDEX, BLOCK_M, ITERS)
        _store(g_ptr + out_off, _pick(sel, g0, g1, HAS_INDEX).to(g_ptr.dtype.element_ty), mask, STREAM_STORES)


@triton.jit
def _scale_shift_gate_kernel(
    x_ptr, shift_ptr, scale_ptr, gate_ptr, idx_ptr, y_ptr, g_ptr,
    L, C, B,
    stride_xb, stride_xl, stride_shift, stride_scale, stride_gate, stride_ib, stride_il,
    HAS_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ITERS: tl.constexpr,
    STREAM_STORES: tl.constexpr, SPLIT_OUTPUTS: tl.constexpr,
):
    # SPLIT_OUTPUTS: the grid is doubled; the first half of each batch's programs write y (read x),
    # the second half only the selected gate (parameter rows, no activation read). One write stream
    # per program: on the H100 53.0 us vs 53.5 for both outputs per program (docs/performance.md).
    pid = tl.program_id(0)
    if SPLIT_OUTPUTS:
        n_tiles = tl.cdiv(L, BLOCK_M * ITERS) * tl.cdiv(C, BLOCK_C)
        if pid >= n_tiles:
            _ssg_gate_tile(pid - n_tiles, gate_ptr, idx_ptr, g_ptr, L, C, B, stride_gate, stride_ib, stride_il,
                           HAS_INDEX, BLOCK_M, BLOCK_C, ITERS, STREAM_STORES)
        else:
            _ssg_y_tile(pid, x_ptr, shift_ptr, scale_ptr, gate_ptr, idx_ptr, y_ptr, g_ptr, L, C, B,
                        stride_xb, stride_xl, stride_shift, stride_scale, stride_gate, stride_ib, stride_il,
                        HAS_INDEX, BLOCK_M, BLOCK_C, ITERS, STREAM_STORES, False)
    else:
        _ssg_y_tile(pid, x_ptr, shift_ptr, scale_ptr, gate_ptr, idx_ptr, y_ptr, g_ptr, L, C, B,
                    stride_xb, stride_xl, stride_shift, stride_scale, stride_gate, stride_ib, stride_il,
                    HAS_INDEX, BLOCK_M, BLOCK_C, ITERS, STREAM_STORES, True)


@triton.jit
def _layer_norm_rows(v, cmask, C, eps, IS_RMS: tl.constexpr):
    """Normalise each row of fp32 tile v over its first C (masked) columns."""
    if IS_RMS:
        ms = tl.sum(v * v, axis=1) / C
        return v * tl.rsqrt(ms + eps)[:, None]
    else:
        mean = tl.sum(v, axis=1) / C
        d = tl.where(cmask[None, :], v - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / C
        return d * tl.rsqrt(var + eps)[:, None]


@triton.jit
def _modulate_rows(n, sel, scale_ptr, shift_ptr, b, B, stride_scale, stride_shift, cols, mask,
                   sc0, sc1, sh0, sh1, HAS_INDEX: tl.constexpr, PARAM_GATHER: tl.constexpr):
    """n * (1 + scale_sel) + shift_sel for a normalised [BLOCK_M, BLOCK_C] tile: each row gathers its
    own parameter rows (PARAM_GATHER) or selects from the sets held in registers."""
    if PARAM_GATHER:
        scale = _gather_param(scale_ptr, b, B, stride_scale, sel, cols, mask, HAS_INDEX)
        shift = _gather_param(shift_ptr, b, B, stride_shift, sel, cols, mask, HAS_INDEX)
    else:
        scale = _pick(sel, sc0, sc1, HAS_INDEX)
        shift = _pick(sel, sh0, sh1, HAS_INDEX)
    return n * (1.0 + scale) + shift


@triton.jit
def _norm_scale_shift_rows(
    pid_m, b, x_ptr, shift_ptr, scale_ptr, idx_ptr, w_ptr, bias_ptr, y_ptr,
    L, C, B, eps,
    stride_xb, stride_xl, stride_shift, stride_scale, stride_ib, stride_il,
    HAS_INDEX: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ITERS: tl.constexpr, PARAM_GATHER: tl.constexpr,
    STREAM_STORES: tl.constexpr,
):
    """One program's rows of norm_scale_shift (row tile pid_m of batch b)."""
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    if PARAM_GATHER:
        sh0, sh1, sc0, sc1 = 0.0, 0.0, 0.0, 0.0  # unused: each row gathers its own parameter row
    else:
        sh0, sh1 = _load_param(shift_ptr, b, B, stride_shift, cols, cmask, HAS_INDEX)
        sc0, sc1 = _load_param(scale_ptr, b, B, stride_scale, cols, cmask, HAS_INDEX)
    # Rows are processed ITERS x BLOCK_M at a time; the next tile's load is issued before this
    # tile's reductions (their barriers would otherwise serialise load -> reduce -> store).
    l_nxt = pid_m * (ITERS * BLOCK_M) + tl.arange(0, BLOCK_M)
    x_nxt = _load_rows(x_ptr, b, l_nxt, stride_xb, stride_xl, cols, (l_nxt < L)[:, None] & cmask[None, :])
    for it in tl.static_range(ITERS):
        l = l_nxt
        x = x_nxt.to(tl.float32)
        if it + 1 < ITERS:
            l_nxt = l + BLOCK_M
            x_nxt = _load_rows(x_ptr, b, l_nxt, stride_xb, stride_xl, cols, (l_nxt < L)[:, None] & cmask[None, :])
        rmask = l < L
        mask = rmask[:, None] & cmask[None, :]
        n = _layer_norm_rows(x, cmask, C, eps, IS_RMS)
        if HAS_WEIGHT:
            n = n * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            n = n + tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        sel = _row_select(idx_ptr, b, l, stride_ib, stride_il, rmask, HAS_INDEX)
        y = _modulate_rows(n, sel, scale_ptr, shift_ptr, b, B, stride_scale, stride_shift, cols, mask,
                           sc0, sc1, sh0, sh1, HAS_INDEX, PARAM_GATHER)
        out_off = (b * L + l[:, None]).to(tl.int64) * C + cols[None, :]
        _store(y_ptr + out_off, y.to(y_ptr.dtype.element_ty), mask, STREAM_STORES)


@triton.jit
def _norm_scale_shift_kernel(
    x_ptr, shift_ptr, scale_ptr, idx_ptr, w_ptr, bias_ptr, y_ptr,
    L, C, B, eps,
    stride_xb, stride_xl, stride_shift, stride_scale, stride_ib, stride_il,
    HAS_INDEX: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ITERS: tl.constexpr, PARAM_GATHER: tl.constexpr,
    STREAM_STORES: tl.constexpr,
):
    _norm_scale_shift_rows(tl.program_id(0), tl.program_id(1).to(tl.int64), x_ptr, shift_ptr, scale_ptr, idx_ptr,
                           w_ptr, bias_ptr, y_ptr, L, C, B, eps, stride_xb, stride_xl, stride_shift, stride_scale,
                           stride_ib, stride_il, HAS_INDEX, HAS_WEIGHT, HAS_BIAS, IS_RMS, BLOCK_M, BLOCK_C, ITERS,
                           PARAM_GATHER, STREAM_STORES)


@triton.jit
def _segment(ptr, c, C, MASKED: tl.constexpr, STREAMED: tl.constexpr = False):
    """ptr[c] as fp32 (lanes c >= C read as 0 where MASKED); STREAMED: read once (evict_first)."""
    if MASKED:
        if STREAMED:
            return tl.load(ptr + c, mask=c < C, other=0.0, eviction_policy="evict_first").to(tl.float32)
        return tl.load(ptr + c, mask=c < C, other=0.0).to(tl.float32)
    if STREAMED:
        return tl.load(ptr + c, eviction_policy="evict_first").to(tl.float32)
    return tl.load(ptr + c).to(tl.float32)


@triton.jit
def _modulate_store_segment(n, c, C, w_ptr, bias_ptr, scale_row, shift_row, y_row,
                            HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, MASKED: tl.constexpr,
                            STREAM: tl.constexpr):
    """y = (n [* w] [+ bias]) * (1 + scale) + shift over one segment's columns c, rounded once on store."""
    if HAS_WEIGHT:
        n = n * _segment(w_ptr, c, C, MASKED)
    if HAS_BIAS:
        n = n + _segment(bias_ptr, c, C, MASKED)
    y = n * (1.0 + _segment(scale_row, c, C, MASKED)) + _segment(shift_row, c, C, MASKED)
    _store(y_row + c, y.to(y_row.dtype.element_ty), c < C if MASKED else None, STREAM)


@triton.jit
def _norm_scale_shift_segments_kernel(
    x_ptr, shift_ptr, scale_ptr, idx_ptr, w_ptr, bias_ptr, y_ptr,
    L, C, B, eps,
    stride_xb, stride_xl, stride_shift, stride_scale, stride_ib, stride_il,
    HAS_INDEX: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, MASK_B: tl.constexpr, STREAM_STORES: tl.constexpr,
):
    """norm_scale_shift of one token row (grid (L, B)) held as two power-of-two segments,
    [0, BLOCK_A) unmasked and [BLOCK_A, C) in BLOCK_B lanes (see ``row_segments``): no masked lanes
    at C 5120 = 4096 + 1024 or 6144 = 4096 + 2048, where one tile would be 8192 lanes. Same arithmetic as the one-tile
    kernel; the row's fp32 sums are added in another order (an output may move by one ulp)."""
    l = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row = x_ptr + b * stride_xb + l.to(tl.int64) * stride_xl
    ca = tl.arange(0, BLOCK_A)
    cb = BLOCK_A + tl.arange(0, BLOCK_B)
    xa = _segment(row, ca, C, False, True)
    xb = _segment(row, cb, C, MASK_B, True)
    if IS_RMS:
        r = tl.rsqrt((tl.sum(xa * xa, axis=0) + tl.sum(xb * xb, axis=0)) / C + eps)
        na, nb = xa * r, xb * r
    else:
        mean = (tl.sum(xa, axis=0) + tl.sum(xb, axis=0)) / C
        da = xa - mean
        db = tl.where(cb < C, xb - mean, 0.0) if MASK_B else xb - mean
        r = tl.rsqrt((tl.sum(da * da, axis=0) + tl.sum(db * db, axis=0)) / C + eps)
        na, nb = da * r, db * r
    prow = b
    if HAS_INDEX:
        prow += tl.where(tl.load(idx_ptr + b * stride_ib + l * stride_il) != 0, B, 0).to(tl.int64)
    scale_row = scale_ptr + prow * stride_scale
    shift_row = shift_ptr + prow * stride_shift
    y_row = y_ptr + (b * L + l).to(tl.int64) * C
    _modulate_store_segment(na, ca, C, w_ptr, bias_ptr, scale_row, shift_row, y_row, HAS_WEIGHT, HAS_BIAS,
                            False, STREAM_STORES)
    _modulate_store_segment(nb, cb, C, w_ptr, bias_ptr, scale_row, shift_row, y_row, HAS_WEIGHT, HAS_BIAS,
                            MASK_B, STREAM_STORES)


@triton.jit
def _dual_norm_scale_shift_kernel(
    xa_ptr, sha_ptr, sca_ptr, ia_ptr, ya_ptr, La, eps_a, s_xab, s_xal, s_sha, s_sca, s_iab, s_ial,
    xb_ptr, shb_ptr, scb_ptr, ib_ptr, yb_ptr, Lb, eps_b, s_xbb, s_xbl, s_shb, s_scb, s_ibb, s_ibl,
    C, B, n_prog_a,
    HAS_INDEX_A: tl.constexpr, HAS_INDEX_B: tl.constexpr, IS_RMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ITERS: tl.constexpr, PARAM_GATHER: tl.constexpr,
    STREAM_STORES: tl.constexpr,
):
    """Two streams (e.g. image and text) in one launch: the first n_prog_a row tiles of each
    batch are stream a's, the rest stream b's. Saves a launch and the small stream's ramp."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < n_prog_a:
        _norm_scale_shift_rows(pid, b, xa_ptr, sha_ptr, sca_ptr, ia_ptr, xa_ptr, xa_ptr, ya_ptr, La, C, B, eps_a,
                               s_xab, s_xal, s_sha, s_sca, s_iab, s_ial, HAS_INDEX_A, False, False, IS_RMS,
                               BLOCK_M, BLOCK_C, ITERS, PARAM_GATHER, STREAM_STORES)
    else:
        _norm_scale_shift_rows(pid - n_prog_a, b, xb_ptr, shb_ptr, scb_ptr, ib_ptr, xb_ptr, xb_ptr, yb_ptr, Lb, C,
                               B, eps_b, s_xbb, s_xbl, s_shb, s_scb, s_ibb, s_ibl, HAS_INDEX_B, False, False,
                               IS_RMS, BLOCK_M, BLOCK_C, ITERS, PARAM_GATHER, STREAM_STORES)


@triton.jit
def _gate_residual_norm_scale_shift_rows(
    pid_m, b, r_ptr, u_ptr, gate_ptr, shift_ptr, scale_ptr, idx_ptr, r_out_ptr, y_ptr,
    L, C, B, eps,
    stride_rb, stride_rl, stride_ub, stride_ul, stride_gate, stride_shift, stride_scale,
    stride_ib, stride_il,
    HAS_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ITERS: tl.constexpr,
    PARAM_GATHER: tl.constexpr, STREAM_STORES: tl.constexpr,
):
    """One program's rows of gate_residual_norm_scale_shift (row tile pid_m of batch b)."""
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    if PARAM_GATHER:
        g0, g1, sh0, sh1, sc0, sc1 = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0  # unused: rows gather their own
    else:
        g0, g1 = _load_param(gate_ptr, b, B, stride_gate, cols, cmask, HAS_INDEX)
        sh0, sh1 = _load_param(shift_ptr, b, B, stride_shift, cols, cmask, HAS_INDEX)
        sc0, sc1 = _load_param(scale_ptr, b, B, stride_scale, cols, cmask, HAS_INDEX)
    # Next tile's loads are issued before this tile's reductions (see _norm_scale_shift_kernel).
    l_nxt = pid_m * (ITERS * BLOCK_M) + tl.arange(0, BLOCK_M)
    m_nxt = (l_nxt < L)[:, None] & cmask[None, :]
    r_nxt = _load_rows(r_ptr, b, l_nxt, stride_rb, stride_rl, cols, m_nxt)
    u_nxt = _load_rows(u_ptr, b, l_nxt, stride_ub, stride_ul, cols, m_nxt)
    for it in tl.static_range(ITERS):
        l = l_nxt
        r = r_nxt.to(tl.float32)
        u = u_nxt.to(tl.float32)
        if it + 1 < ITERS:
            l_nxt = l + BLOCK_M
            m_nxt = (l_nxt < L)[:, None] & cmask[None, :]
            r_nxt = _load_rows(r_ptr, b, l_nxt, stride_rb, stride_rl, cols, m_nxt)
            u_nxt = _load_rows(u_ptr, b, l_nxt, stride_ub, stride_ul, cols, m_nxt)
        rmask = l < L
        mask = rmask[:, None] & cmask[None, :]
        sel = _row_select(idx_ptr, b, l, stride_ib, stride_il, rmask, HAS_INDEX)
        if PARAM_GATHER:
            gate = _gather_param(gate_ptr, b, B, stride_gate, sel, cols, mask, HAS_INDEX)
        else:
            gate = _pick(sel, g0, g1, HAS_INDEX)
        # Normalise the residual as stored (rounded to the output dtype), as eager diffusers does.
        r_out = (r + gate * u).to(r_out_ptr.dtype.element_ty)
        out_off = (b * L + l[:, None]).to(tl.int64) * C + cols[None, :]
        _store(r_out_ptr + out_off, r_out, mask, STREAM_STORES)
        n = _layer_norm_rows(r_out.to(tl.float32), cmask, C, eps, False)
        y = _modulate_rows(n, sel, scale_ptr, shift_ptr, b, B, stride_scale, stride_shift, cols, mask,
                           sc0, sc1, sh0, sh1, HAS_INDEX, PARAM_GATHER)
        _store(y_ptr + out_off, y.to(y_ptr.dtype.element_ty), mask, STREAM_STORES)


@triton.jit
def _gate_residual_norm_scale_shift_kernel(
    r_ptr, u_ptr, gate_ptr, shift_ptr, scale_ptr, idx_ptr, r_out_ptr, y_ptr,
    L, C, B, eps,
    stride_rb, stride_rl, stride_ub, stride_ul, stride_gate, stride_shift, stride_scale,
    stride_ib, stride_il,
    HAS_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ITERS: tl.constexpr,
    PARAM_GATHER: tl.constexpr, STREAM_STORES: tl.constexpr,
):
    _gate_residual_norm_scale_shift_rows(
        tl.program_id(0), tl.program_id(1).to(tl.int64), r_ptr, u_ptr, gate_ptr, shift_ptr, scale_ptr, idx_ptr,
        r_out_ptr, y_ptr, L, C, B, eps, stride_rb, stride_rl, stride_ub, stride_ul, stride_gate, stride_shift,
        stride_scale, stride_ib, stride_il, HAS_INDEX, BLOCK_M, BLOCK_C, ITERS, PARAM_GATHER, STREAM_STORES)


@triton.jit
def _dual_gate_residual_norm_scale_shift_kernel(
    ra_ptr, ua_ptr, ga_ptr, sha_ptr, sca_ptr, ia_ptr, roa_ptr, ya_ptr, La, eps_a,
    s_rab, s_ral, s_uab, s_ual, s_ga, s_sha, s_sca, s_iab, s_ial,
    rb_ptr, ub_ptr, gb_ptr, shb_ptr, scb_ptr, ib_ptr, rob_ptr, yb_ptr, Lb, eps_b,
    s_rbb, s_rbl, s_ubb, s_ubl, s_gb, s_shb, s_scb, s_ibb, s_ibl,
    C, B, n_prog_a,
    HAS_INDEX_A: tl.constexpr, HAS_INDEX_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ITERS: tl.constexpr, PARAM_GATHER: tl.constexpr, STREAM_STORES: tl.constexpr,
):
    """Two streams in one launch (see _dual_norm_scale_shift_kernel)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if pid < n_prog_a:
        _gate_residual_norm_scale_shift_rows(
            pid, b, ra_ptr, ua_ptr, ga_ptr, sha_ptr, sca_ptr, ia_ptr, roa_ptr, ya_ptr, La, C, B, eps_a,
            s_rab, s_ral, s_uab, s_ual, s_ga, s_sha, s_sca, s_iab, s_ial, HAS_INDEX_A, BLOCK_M, BLOCK_C, ITERS,
            PARAM_GATHER, STREAM_STORES)
    else:
        _gate_residual_norm_scale_shift_rows(
            pid - n_prog_a, b, rb_ptr, ub_ptr, gb_ptr, shb_ptr, scb_ptr, ib_ptr, rob_ptr, yb_ptr, Lb, C, B, eps_b,
            s_rbb, s_rbl, s_ubb, s_ubl, s_gb, s_shb, s_scb, s_ibb, s_ibl, HAS_INDEX_B, BLOCK_M, BLOCK_C, ITERS,
            PARAM_GATHER, STREAM_STORES)


@triton.jit
def _gate_residual_kernel(
    r_ptr, u_ptr, gate_ptr, idx_ptr, out_ptr,
    L, C, B,
    stride_rb, stride_rl, stride_ub, stride_ul, stride_gate, stride_ib, stride_il,
    HAS_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ITERS: tl.constexpr,
    STREAM_STORES: tl.constexpr,
):
    pid_m, b, cols, cmask = _column_tile(C, BLOCK_C)
    g0, g1 = _load_param(gate_ptr, b, B, stride_gate, cols, cmask, HAS_INDEX)
    for it in tl.static_range(ITERS):
        l, mask, sel, out_off = _row_tile(pid_m, it, b, L, C, cols, cmask, idx_ptr, stride_ib, stride_il,
                                          HAS_INDEX, BLOCK_M, ITERS)
        r = _load_rows(r_ptr, b, l, stride_rb, stride_rl, cols, mask).to(tl.float32)
        u = _load_rows(u_ptr, b, l, stride_ub, stride_ul, cols, mask).to(tl.float32)
        _store(out_ptr + out_off, (r + _pick(sel, g0, g1, HAS_INDEX) * u).to(out_ptr.dtype.element_ty), mask,
               STREAM_STORES)


# --- launch configuration ---------------------------------------------------------------------
# Chosen by `python -m fused_dit_ops bench modulation --sweep` on an H100 (bench/results/).
# Elementwise kernels: 2-D tiles, a program covers ITERS x BLOCK_M rows of one column block and
# loads its parameter rows once. Norm kernels hold whole rows (BLOCK_C = next_pow2(C)).

# Streaming stores: H100, Qwen image stream, 5 interleaved rounds (docs/performance.md):
# scale_shift_gate 53.5-54.3 us with vs 53.8-54.7 without; Triton gate_residual 51.8-52.0 vs 53.2-53.4.
ELEMENTWISE_CONFIG = {"BLOCK_M": 1, "BLOCK_C": 1024, "ITERS": 1, "STREAM_STORES": True, "num_warps": 4}
SCALE_SHIFT_GATE_CONFIG = dict(ELEMENTWISE_CONFIG, SPLIT_OUTPUTS=True)


# Whole-row norm kernels: rows of 8192 lanes or more go as two segments even where one tile masks
# only a quarter of its lanes (H100, C 6144: 41.2 us against 44.2; scripts/norm_config_sweep.py).
NORM_SEGMENTS_MIN_TILE = 8192


def _norm_config(C: int) -> dict:
    # One row per program, each row gathering its own parameter row (PARAM_GATHER): the fewest
    # registers, so the most rows in flight per SM. H100 sweep (C 3072): 38.5 us vs 48.6 us for
    # both parameter sets held in registers (bench/results/modulation-*-20261124T013953.json).
    block_c = next_power_of_2(C)
    block_m = max(1, min(4, 4096 // block_c))
    num_warps = 8 if block_c >= 8192 else 4
    return {"BLOCK_M": block_m, "BLOCK_C": block_c, "ITERS": 1, "PARAM_GATHER": True, "STREAM_STORES": True,
            "num_warps": num_warps}


def _split(cfg, norm=False):
    """config dict -> (BLOCK_M, BLOCK_C, ITERS, extra constexprs in signature order, launch options)."""
    cfg = dict(cfg)
    extra = ((cfg.pop("PARAM_GATHER", False),) if norm else ()) + (cfg.pop("STREAM_STORES", False),)
    return cfg.pop("BLOCK_M"), cfg.pop("BLOCK_C"), cfg.pop("ITERS", 1), extra, cfg


def _index_args(index, dummy):
    # Absent optional tensors are passed as a dummy pointer (never read: HAS_* is constexpr).
    if index is None:
        return dummy, 0, 0
    return index, index.stride(0), index.stride(1)


def _device_guard(t: torch.Tensor):
    # Triton launches on the current device; make it the tensor's (no-op when already so).
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def scale_shift_gate(x, shift, scale, gate, index=None, config=None):
    B, L, C = x.shape
    y = torch.empty((B, L, C), dtype=x.dtype, device=x.device)
    g = torch.empty((B, L, C), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y, g
    kw0 = dict(config or SCALE_SHIFT_GATE_CONFIG)
    split_outputs = kw0.pop("SPLIT_OUTPUTS", True)
    bm, bc, iters, extra, kw = _split(kw0)
    idx, sib, sil = _index_args(index, x)
    grid = (cdiv(L, bm * iters) * cdiv(C, bc) * (2 if split_outputs else 1), B)
    with _device_guard(x):
        launch(_scale_shift_gate_kernel, grid,
               (x, shift, scale, gate, idx, y, g, L, C, B,
                x.stride(0), x.stride(1), shift.stride(0), scale.stride(0), gate.stride(0), sib, sil),
               (index is not None, bm, bc, iters, *extra, split_outputs), kw)
    return y, g


def norm_scale_shift(x, shift, scale, index=None, weight=None, bias=None, eps=1e-6, norm="layer",
                     config=None, split=None):
    """``split``: None holds a row as two power-of-two segments where ``row_segments`` picks that
    with ``NORM_SEGMENTS_MIN_TILE`` (C 5120, 6144) and no ``config`` is given, else one tile (an explicit ``config`` describes the one-tile
    kernel); True / False force it on / off (tests and A/B timing). The two-segment kernel takes only
    ``STREAM_STORES`` and ``num_warps`` from ``config``."""
    B, L, C = x.shape
    y = torch.empty((B, L, C), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    cfg = config or _norm_config(C)
    if split is None:
        seg = row_segments(C, NORM_SEGMENTS_MIN_TILE) if config is None else None
    else:
        seg = two_segments(C) if split else None
    idx, sib, sil = _index_args(index, x)
    args = (x, shift, scale, idx, x if weight is None else weight, x if bias is None else bias, y,
            L, C, B, float(eps), x.stride(0), x.stride(1), shift.stride(0), scale.stride(0), sib, sil)
    flags = (index is not None, weight is not None, bias is not None, norm == "rms")
    with _device_guard(x):
        if seg:
            launch(_norm_scale_shift_segments_kernel, (L, B), args,
                   (*flags, *seg, cfg.get("STREAM_STORES", True)), {"num_warps": cfg.get("num_warps", 8)})
        else:
            bm, bc, iters, extra, kw = _split(cfg, norm=True)
            launch(_norm_scale_shift_kernel, (cdiv(L, bm * iters), B), args, (*flags, bm, bc, iters, *extra), kw)
    return y


def gate_residual_norm_scale_shift(residual, update, gate, shift, scale, index=None, eps=1e-6,
                                   config=None):
    B, L, C = residual.shape
    r_out = torch.empty((B, L, C), dtype=residual.dtype, device=residual.device)
    y = torch.empty((B, L, C), dtype=residual.dtype, device=residual.device)
    if y.numel() == 0:
        return r_out, y
    bm, bc, iters, extra, kw = _split(config or _norm_config(C), norm=True)
    idx, sib, sil = _index_args(index, residual)
    grid = (cdiv(L, bm * iters), B)
    with _device_guard(residual):
        launch(_gate_residual_norm_scale_shift_kernel, grid,
               (residual, update, gate, shift, scale, idx, r_out, y, L, C, B, float(eps),
                residual.stride(0), residual.stride(1), update.stride(0), update.stride(1),
                gate.stride(0), shift.stride(0), scale.stride(0), sib, sil),
               (index is not None, bm, bc, iters, *extra), kw)
    return r_out, y


def gate_residual(residual, update, gate, index=None, config=None):
    B, L, C = residual.shape
    out = torch.empty((B, L, C), dtype=residual.dtype, device=residual.device)
    if out.numel() == 0:
        return out
    bm, bc, iters, extra, kw = _split(config or ELEMENTWISE_CONFIG)
    idx, sib, sil = _index_args(index, residual)
    grid = (cdiv(L, bm * iters) * cdiv(C, bc), B)
    with _device_guard(residual):
        launch(_gate_residual_kernel, grid,
               (residual, update, gate, idx, out, L, C, B,
                residual.stride(0), residual.stride(1), update.stride(0), update.stride(1),
                gate.stride(0), sib, sil),
               (index is not None, bm, bc, iters, *extra), kw)
    return out


def dual_norm_scale_shift(xa, sha, sca, ia, eps_a, xb, shb, scb, ib, eps_b, norm="layer", config=None):
    """norm_scale_shift (no weight/bias) of two streams with the same B, C and dtype, one launch."""
    B, La, C = xa.shape
    Lb = xb.shape[1]
    ya = torch.empty((B, La, C), dtype=xa.dtype, device=xa.device)
    yb = torch.empty((B, Lb, C), dtype=xb.dtype, device=xb.device)
    if B == 0 or C == 0 or La + Lb == 0:
        return ya, yb
    bm, bc, iters, extra, kw = _split(config or _norm_config(C), norm=True)
    n_a = cdiv(La, bm * iters)
    grid = (n_a + cdiv(Lb, bm * iters), B)
    i_a, s_iab, s_ial = _index_args(ia, xa)
    i_b, s_ibb, s_ibl = _index_args(ib, xb)
    with _device_guard(xa):
        launch(_dual_norm_scale_shift_kernel, grid,
               (xa, sha, sca, i_a, ya, La, float(eps_a), xa.stride(0), xa.stride(1), sha.stride(0), sca.stride(0),
                s_iab, s_ial,
                xb, shb, scb, i_b, yb, Lb, float(eps_b), xb.stride(0), xb.stride(1), shb.stride(0), scb.stride(0),
                s_ibb, s_ibl, C, B, n_a),
               (ia is not None, ib is not None, norm == "rms", bm, bc, iters, *extra), kw)
    return ya, yb


def dual_gate_residual_norm_scale_shift(ra, ua, ga, sha, sca, ia, eps_a, rb, ub, gb, shb, scb, ib, eps_b,
                                        config=None):
    """gate_residual_norm_scale_shift of two streams with the same B, C and dtype, one launch."""
    B, La, C = ra.shape
    Lb = rb.shape[1]
    roa, ya = (torch.empty((B, La, C), dtype=ra.dtype, device=ra.device) for _ in range(2))
    rob, yb = (torch.empty((B, Lb, C), dtype=rb.dtype, device=rb.device) for _ in range(2))
    if B == 0 or C == 0 or La + Lb == 0:
        return roa, ya, rob, yb
    bm, bc, iters, extra, kw = _split(config or _norm_config(C), norm=True)
    n_a = cdiv(La, bm * iters)
    grid = (n_a + cdiv(Lb, bm * iters), B)
    i_a, s_iab, s_ial = _index_args(ia, ra)
    i_b, s_ibb, s_ibl = _index_args(ib, rb)
    with _device_guard(ra):
        launch(_dual_gate_residual_norm_scale_shift_kernel, grid,
               (ra, ua, ga, sha, sca, i_a, roa, ya, La, float(eps_a),
                ra.stride(0), ra.stride(1), ua.stride(0), ua.stride(1), ga.stride(0), sha.stride(0), sca.stride(0),
                s_iab, s_ial,
                rb, ub, gb, shb, scb, i_b, rob, yb, Lb, float(eps_b),
                rb.stride(0), rb.stride(1), ub.stride(0), ub.stride(1), gb.stride(0), shb.stride(0), scb.stride(0),
                s_ibb, s_ibl, C, B, n_a),
               (ia is not None, ib is not None, bm, bc, iters, *extra), kw)
    return roa, ya, rob, yb
