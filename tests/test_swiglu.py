"""swiglu_linear: silu(gate) * linear of one [2F, K] projection (FLUX.2's MLP input).

Tiers: plain (CPU reference vs an fp64 oracle and vs diffusers' ``Flux2FeedForward`` chunk order,
opcheck, compile, bad inputs); ``interpret`` (both Triton kernels on CPU tensors: the GEMM with the
SwiGLU epilogue, the elementwise kernel after a GEMM); ``gpu`` (FLUX.2 dims vs the oracle and vs
``F.linear`` + torch silu * mul, both backends, CUDA-graph capture).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_dit_ops as fdo

from helpers import expect_input_error, poison_, randn, rel_err

OPS = torch.ops.fused_dit


def oracle(x, w, b=None):
    """fp64: silu(y[..., :F]) * y[..., F:] with y = x @ w.T + b."""
    y = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    g, u = y.chunk(2, -1)
    return F.silu(g) * u


def make(shape, F_, *, dtype=torch.float32, device="cpu", bias=True, std=0.2):
    K = shape[-1]
    x = randn(*shape, dtype=dtype, device=device)
    w = randn(2 * F_, K, dtype=dtype, device=device, std=std)
    b = randn(2 * F_, dtype=dtype, device=device) if bias else None
    return x, w, b


# --- CPU: reference -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(13, 48), (2, 7, 40), (1, 0, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_matches_oracle(shape, bias):
    x, w, b = make(shape, 36, bias=bias)
    out = fdo.swiglu_linear(x, w, b)
    assert out.shape == (*shape[:-1], 36) and out.is_contiguous()
    if out.numel():
        assert rel_err(out, oracle(x, w, b)) < 1e-6


def test_chunk_order_matches_diffusers_feedforward():
    """The gate is the first half of linear_in's rows: Flux2FeedForward's own output."""
    from diffusers.models.transformers.transformer_flux2 import Flux2FeedForward
    ff = Flux2FeedForward(dim=40, dim_out=40, mult=1.8, bias=True).eval()  # inner 72
    x = randn(2, 7, 40)
    with torch.no_grad():
        want = ff(x)
        got = ff.linear_out(fdo.swiglu_linear(x, ff.linear_in.weight, ff.linear_in.bias))
    assert rel_err(got, want) < 1e-6
    with torch.no_grad():  # the other order would be wrong (the test can tell)
        w = ff.linear_in.weight
        swapped = ff.linear_out(fdo.swiglu_linear(x, torch.cat([w[72:], w[:72]]), None))
        no_bias = ff.linear_out(fdo.swiglu_linear(x, w, None))
    assert rel_err(swapped, no_bias) > 1e-2


def test_weight_row_views():
    """The MLP rows of a packed projection (a FLUX.2 single block's to_qkv_mlp_proj) as a row view."""
    x = randn(1, 13, 48)
    big = randn(3 * 24 + 2 * 36, 48, std=0.2)
    w = big[72:]
    assert rel_err(fdo.swiglu_linear(x, w), oracle(x, w)) < 1e-6


def test_opcheck_cpu():
    for shape, bias in [((13, 48), True), ((2, 7, 40), False)]:
        x, w, b = make(shape, 20, bias=bias)
        torch.library.opcheck(OPS.swiglu_linear.default, (x, w, b, None),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_compile_fullgraph_dynamic_no_recompile():
    x, w, b = make((1, 13, 48), 20)
    torch._dynamo.reset()

    def f(x):
        return fdo.swiglu_linear(x, w, b) * 2
    cf = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    from torch._dynamo.utils import counters
    counters.clear()
    for L in (13, 7):
        xi = randn(1, L, 48)
        torch.testing.assert_close(cf(xi), f(xi))
    assert counters["stats"]["unique_graphs"] == 1


def test_grad_refused_at_backward():
    x, w, b = make((5, 16), 8)
    w.requires_grad_(True)
    out = fdo.swiglu_linear(x, w, b)
    with pytest.raises(RuntimeError, match="swiglu_linear"):
        out.sum().backward()


def test_bad_inputs():
    x, w, b = make((2, 7, 40), 20)
    f = fdo.swiglu_linear
    expect_input_error(lambda: f(x[0, 0], w, b), "'x'", "2-D or 3-D")
    expect_input_error(lambda: f(x.transpose(1, 2), w[:, :7], b), "'x'", "contiguous last")
    expect_input_error(lambda: f(x, w[:, :16], b), "'weight'", "K = 40")
    expect_input_error(lambda: f(x, w[:39], b[:39]), "'weight'", "even number of rows", "39")
    expect_input_error(lambda: f(x, w.double(), b), "'weight'", "dtype")
    expect_input_error(lambda: f(x, w.t().contiguous().t(), b), "'weight'", "contiguous rows")
    expect_input_error(lambda: f(x, w, b[:8]), "'bias'", "[2F] = [40]")
    expect_input_error(lambda: f(x, w, b, "cutlass"), "'backend'", "cutlass")
    expect_input_error(lambda: f(x.int(), w, b), "'x'", "dtype")


# --- Triton interpreter -----------------------------------------------------------------------------

@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,F_", [((13, 48), 36), ((2, 7, 40), 72), ((1, 70, 24), 20)])
@pytest.mark.parametrize("bias", [True, False])
def test_interpret_gemm_epilogue(dtype, shape, F_, bias):
    """The Triton GEMM with the SwiGLU epilogue (block pointers, tl.dot, fp32 accumulators), edge
    tiles in M, N and K included, against the fp64 oracle."""
    from fused_dit_ops.kernels import swiglu as k
    x, w, b = make(shape, F_, dtype=dtype, bias=bias)
    out = k.swiglu_linear(x, w, b)
    assert out.shape == (*shape[:-1], F_) and out.dtype == dtype and out.is_contiguous()
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # bf16/fp16: the output's rounding
    assert rel_err(out, oracle(x, w, b)) < tol


@pytest.mark.interpret
def test_interpret_gemm_strided_tokens():
    """x rows taken out of a wider buffer (row stride > K), batch stride free."""
    from fused_dit_ops.kernels import swiglu as k
    wide = randn(2, 9, 56)
    x = wide[:, 1:8, :40]
    w = randn(2 * 24, 40, std=0.2)
    assert rel_err(k.swiglu_linear(x, w, None), oracle(x, w)) < 1e-6


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpret_elementwise_after_gemm(dtype):
    from fused_dit_ops.kernels import swiglu as k
    y = randn(13, 2 * 40, dtype=dtype)
    out = poison_(torch.empty(13, 40, dtype=dtype))
    k.swiglu_rows(y, out)
    g, u = y.double().chunk(2, -1)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert rel_err(out, F.silu(g) * u) < tol
    x, w, b = make((2, 7, 40), 36, dtype=dtype)
    assert rel_err(k.swiglu_cublas(x, w, b), oracle(x, w, b)) < (1e-6 if dtype == torch.float32 else 8e-3)


# --- GPU ------------------------------------------------------------------------------------------

def _stock(x, w, b):
    """diffusers' expression: F.linear (cuBLAS, bf16 output), then silu * mul in bf16."""
    y = F.linear(x, w, b)
    Fh = y.shape[-1] // 2
    return F.silu(y[..., :Fh]) * y[..., Fh:]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cublas"])
@pytest.mark.parametrize("L", [4096 + 512, 300])
def test_gpu_flux2_dims_vs_oracle(backend, L):
    """FLUX.2 MLP input (C 6144 -> 2 x 18432, no bias), bf16: error vs the fp64 oracle no larger
    than the stock bf16 expression's (both printed)."""
    x, w, _ = make((1, L, 6144), 18432, dtype=torch.bfloat16, device="cuda", bias=False, std=0.02)
    out = fdo.swiglu_linear(x, w, None, backend)
    want = oracle(x, w)
    e, e_stock = rel_err(out, want), rel_err(_stock(x, w, None), want)
    print(f"\nswiglu_linear {backend} L={L}: rel vs fp64 {e:.2e} (stock bf16 {e_stock:.2e})")
    assert e <= e_stock * 1.05 + 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("backend", ["triton", "cublas"])
def test_gpu_small_shapes_bias_batch(dtype, backend):
    x, w, b = make((2, 77, 200), 136, dtype=dtype, device="cuda")
    wide = randn(2, 80, 232, dtype=dtype, device="cuda")
    wide[:, 3:, :200] = x
    xs = wide[:, 3:, :200]
    for xi in (x, xs):
        out = fdo.swiglu_linear(xi, w, b, backend)
        tol = 1e-5 if dtype == torch.float32 else 8e-3
        assert rel_err(out, oracle(xi, w, b)) < tol


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    x, w, b = make((1, 256, 384), 288, dtype=torch.bfloat16, device="cuda", std=0.05)
    fdo.swiglu_linear(x, w, b)  # compile before capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fdo.swiglu_linear(x, w, b)
    x.copy_(randn(*x.shape, dtype=torch.bfloat16, device="cuda"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fdo.swiglu_linear(x, w, b))
