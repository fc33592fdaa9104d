"""Triton kernels of ``swiglu_linear`` and their launchers.

``swiglu_linear(x, weight, bias)``: ``weight`` is [2F, K] whose rows [0, F) are the gate half and
rows [F, 2F) the linear half (the chunk order of diffusers' ``Flux2SwiGLU``: ``silu(y[..., :F]) *
y[..., F:]`` of ``y = x @ weight.T``). Two kernels:

- :func:`_swiglu_gemm_kernel` (backend "triton"): one GEMM whose program computes a [BLOCK_M,
  BLOCK_N] tile of both halves (two fp32 accumulators sharing each loaded ``x`` tile, block
  pointers, ``tl.dot``) and writes only ``silu(g) * u`` as [M, F]: the [M, 2F] pre-activation never
  reaches memory;
- :func:`_swiglu_kernel` (backend "cublas"): the elementwise ``silu(a) * b`` over the [M, 2F]
  output of a cuBLAS GEMM (one read of it, one write of [M, F]).

Math in fp32, one rounding on store. Both run under ``TRITON_INTERPRET=1`` on CPU tensors.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._launch import cdiv, launch, next_power_of_2

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _swiglu_gemm_kernel(
    x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, out_ptr,
    M, K, Fh,
    stride_xb, stride_xm, stride_wn, stride_ob, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr, K_TILES: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[b, m, n] = silu(g) * u, g = x[b, m] . wg[n] (+ bg[n]), u = x[b, m] . wu[n] (+ bu[n]); wg and wu
    are the weight's two row halves (same row stride), bg and bu the bias's."""
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(Fh, BLOCK_N)
    # grouped order: GROUP_M row tiles walk the column tiles together (weight tiles stay in L2)
    per_group = GROUP_M * n_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    x_blk = tl.make_block_ptr(x_ptr + bid * stride_xb, shape=(M, K), strides=(stride_xm, 1),
                              offsets=(m0, 0), block_shape=(BLOCK_M, BLOCK_K), order=(1, 0))
    # each weight half read as its transpose [K, Fh] (column n = row n of the half), bounded by its
    # own Fh rows so that a tile never reads across into the other half
    g_blk = tl.make_block_ptr(wg_ptr, shape=(K, Fh), strides=(1, stride_wn), offsets=(0, n0),
                              block_shape=(BLOCK_K, BLOCK_N), order=(0, 1))
    u_blk = tl.make_block_ptr(wu_ptr, shape=(K, Fh), strides=(1, stride_wn), offsets=(0, n0),
                              block_shape=(BLOCK_K, BLOCK_N), order=(0, 1))
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # K_TILES = cdiv(K, BLOCK_K) as a constexpr: a loop (not unrolled) with a bound known at compile
    # time; K is the model width, so one compile per model
    for _ in range(0, K_TILES):
        a = tl.load(x_blk, boundary_check=(0, 1), padding_option="zero")
        wg = tl.load(g_blk, boundary_check=(0, 1), padding_option="zero")
        wu = tl.load(u_blk, boundary_check=(0, 1), padding_option="zero")
        if UPCAST:  # the interpreter's bf16/fp16 tl.dot is wrong; fp32 products of the same values
            a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        acc_g = tl.dot(a, wg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, wu, acc_u, input_precision=PRECISION)
        x_blk = tl.advance(x_blk, (0, BLOCK_K))
        g_blk = tl.advance(g_blk, (BLOCK_K, 0))
        u_blk = tl.advance(u_blk, (BLOCK_K, 0))
    if HAS_BIAS:
        cols = n0 + tl.arange(0, BLOCK_N)
        cm = cols < Fh
        acc_g += tl.load(bg_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(bu_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    y = acc_g * tl.sigmoid(acc_g) * acc_u
    o_blk = tl.make_block_ptr(out_ptr + bid * stride_ob, shape=(M, Fh), strides=(stride_om, 1),
                              offsets=(m0, n0), block_shape=(BLOCK_M, BLOCK_N), order=(1, 0))
    tl.store(o_blk, y.to(out_ptr.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _swiglu_kernel(y_ptr, out_ptr, M, Fh, stride_ym, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    """out[m, n] = silu(y[m, n]) * y[m, Fh + n] for a [M, 2Fh] y (row stride stride_ym)."""
    pid_f = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < M)[:, None] & (cols < Fh)[None, :]
    base = y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :]
    g = tl.load(base, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    u = tl.load(base + Fh, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    o = g * tl.sigmoid(g) * u
    tl.store(out_ptr + rows[:, None].to(tl.int64) * Fh + cols[None, :], o.to(out_ptr.dtype.element_ty), mask=mask)


def _gemm_config(M: int, Fh: int, K: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Two [BLOCK_M, BLOCK_N] fp32 accumulators
    per program: 128 x 128 tiles with 8 warps (64 + 64 registers a thread), 3 stages of x and both
    weight tiles in shared memory (144 KB at BLOCK_K 64, bf16); small token counts take 64 rows."""
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    bm = 128 if M > 64 else 64
    return bm, 128, 64, 8 if bm == 128 else 4, 3


def swiglu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config=None) -> torch.Tensor:
    """Launch the SwiGLU-epilogue GEMM: x [M, K] or [B, M, K] (last dim contiguous) -> [.., M, F].
    ``config``: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) instead of :func:`_gemm_config`'s
    (for tile sweeps)."""
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    B, M, K = x3.shape
    Fh = weight.shape[0] // 2
    out = torch.empty((B, M, Fh), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out if x.dim() == 3 else out[0]
    bm, bn, bk, nw, ns = config or _gemm_config(M, Fh, K, x.dtype)
    # fp32 inputs: full-precision products (F.linear's default); bf16/fp16: tensor-core MMA, fp32 accumulate
    precision = "ieee" if x.dtype == torch.float32 or _INTERPRET else "tf32"
    grid = (cdiv(M, bm) * cdiv(Fh, bn), B)
    bg, bu = (bias[:Fh], bias[Fh:]) if bias is not None else (weight, weight)  # (unread without a bias)
    launch(_swiglu_gemm_kernel, grid,
           (x3, weight[:Fh], weight[Fh:], bg, bu, out, M, K, Fh, x3.stride(0), x3.stride(1), weight.stride(0), out.stride(0),
            out.stride(1)),
           (bias is not None, bm, bn, bk, 8, precision, cdiv(K, bk),
            _INTERPRET and x.dtype != torch.float32), dict(num_warps=nw, num_stages=ns))
    return out if x.dim() == 3 else out[0]


def swiglu_rows(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [M, F] = silu(y[:, :F]) * y[:, F:] for y [M, 2F] (last dim contiguous), out contiguous."""
    M, F2 = y.shape
    Fh = F2 // 2
    if out.numel() == 0:
        return out
    bf = min(1024, max(16, next_power_of_2(Fh)))
    bm = max(1, 4096 // bf)
    launch(_swiglu_kernel, (cdiv(Fh, bf), cdiv(M, bm)), (y, out, M, Fh, y.stride(0)), (bm, bf),
           dict(num_warps=4))
    return out


def swiglu_cublas(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The [.., 2F] GEMM by cuBLAS (``F.linear``), then :func:`swiglu_rows` into [.., F]."""
    y = torch.nn.functional.linear(x, weight, bias)
    Fh = weight.shape[0] // 2
    out = torch.empty((*x.shape[:-1], Fh), dtype=x.dtype, device=x.device)
    swiglu_rows(y.reshape(-1, 2 * Fh), out.view(-1, Fh))
    return out


__all__ = ["swiglu_linear", "swiglu_rows", "swiglu_cublas"]
