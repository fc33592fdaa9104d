"""Dual-stream modulation ops (image + text stream in one launch): equal to two single-stream calls,
opcheck, compile, bad input, interpreter, GPU."""
from __future__ import annotations

import pytest
import torch

import fused_dit_ops as fdo
from fused_dit_ops import FusedDitInputError
from test_modulation import as_tuple, assert_close, make_inputs, oracle

NSS, GRNS = "norm_scale_shift", "gate_residual_norm_scale_shift"


def _streams(op, La, Lb, C=96, B=2, dtype=torch.float32, device="cpu"):
    """Stream a with an index (the image stream with zero_cond_t), stream b without (text)."""
    a = make_inputs(op, B, La, C, dtype=dtype, device=device, index=True, layout="chunk")
    b = make_inputs(op, B, Lb, C, dtype=dtype, device=device, index=False, layout="chunk")
    return a, b


def _dual_args(op, a, b):
    if op == NSS:  # single args: (x, shift, scale, index, weight, bias, eps, norm)
        return (a[0], a[1], a[2], a[3], 1e-6, b[0], b[1], b[2], b[3], 1e-5, "layer")
    return (*a[:6], 1e-6, *b[:6], 1e-5)  # (residual, update, gate, shift, scale, index, eps) x 2


def _single_refs(op, a, b, fn):
    b = b[:-2] + (1e-5, b[-1]) if op == NSS else b[:-1] + (1e-5,)
    return as_tuple(fn(op, a)) + as_tuple(fn(op, b))


def _call_dual(op, args, module=None):
    f = getattr(module or fdo, "dual_" + op)
    return as_tuple(f(*args))


@pytest.mark.parametrize("op", [NSS, GRNS])
@pytest.mark.parametrize("lengths", [(19, 5), (7, 0), (0, 3)])
def test_cpu_dual_equals_two_single_calls(op, lengths):
    a, b = _streams(op, *lengths)
    outs = _call_dual(op, _dual_args(op, a, b))
    refs = _single_refs(op, a, b, lambda o, args: getattr(fdo, o)(*args))
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert torch.equal(o, r)


@pytest.mark.parametrize("op", [NSS, GRNS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_opcheck(op, dtype):
    a, b = _streams(op, 9, 4, dtype=dtype)
    torch.library.opcheck(getattr(torch.ops.fused_dit, "dual_" + op).default, _dual_args(op, a, b))


def test_compile_fullgraph():
    a, b = _streams(GRNS, 9, 4)
    args = _dual_args(GRNS, a, b)
    torch._dynamo.reset()
    out = torch.compile(fdo.dual_gate_residual_norm_scale_shift, fullgraph=True, backend="aot_eager")(*args)
    for o, r in zip(out, fdo.dual_gate_residual_norm_scale_shift(*args)):
        torch.testing.assert_close(o, r)


def test_bad_inputs_name_the_stream():
    a, b = _streams(GRNS, 9, 4)
    args = list(_dual_args(GRNS, a, b))
    bad = list(args)
    bad[7] = args[7][..., :64].contiguous()  # residual_b with another C
    with pytest.raises(FusedDitInputError, match="'update_b' must have the shape of 'residual_b'"):
        fdo.dual_gate_residual_norm_scale_shift(*bad)
    bad = list(args)
    bad[8] = args[8][..., :88]  # update_b C 88 vs residual_b 96
    with pytest.raises(FusedDitInputError, match="update_b"):
        fdo.dual_gate_residual_norm_scale_shift(*bad)
    bad = list(args)
    bad[5] = None  # index_a dropped while the a params have 2B rows
    with pytest.raises(FusedDitInputError, match="'gate_a' has shape .*needs an 'index_a'"):
        fdo.dual_gate_residual_norm_scale_shift(*bad)
    n = _streams(NSS, 9, 4)
    nargs = list(_dual_args(NSS, *n))
    nargs[5] = nargs[5][:1]  # x_b with another batch
    with pytest.raises(FusedDitInputError, match="same batch B and channels C"):
        fdo.dual_norm_scale_shift(nargs[0], nargs[1], nargs[2], nargs[3], 1e-6, nargs[5], nargs[6][:1],
                                  nargs[7][:1], None, 1e-6)
    with pytest.raises(FusedDitInputError, match="'eps_b' must be > 0"):
        fdo.dual_norm_scale_shift(*nargs[:5], *_dual_args(NSS, *n)[5:9], 0.0)


def test_bad_dtype_device_stride_name_the_argument():
    a, b = _streams(GRNS, 9, 4)
    args = list(_dual_args(GRNS, a, b))
    bad = list(args)
    bad[7:12] = [t.half() for t in args[7:12]]  # stream b in fp16, stream a in fp32
    with pytest.raises(FusedDitInputError, match="'residual_b' has dtype float16 but 'residual_a' has float32"):
        fdo.dual_gate_residual_norm_scale_shift(*bad)
    bad = list(args)
    bad[1] = torch.randn(2, 96, 9).transpose(1, 2)  # update_a with a strided last dim
    with pytest.raises(FusedDitInputError, match="'update_a' must have a contiguous last dimension"):
        fdo.dual_gate_residual_norm_scale_shift(*bad)
    n = list(_dual_args(NSS, *_streams(NSS, 9, 4)))
    n[6] = n[6].long()  # shift_b int64
    with pytest.raises(FusedDitInputError, match="'shift_b' must have dtype in"):
        fdo.dual_norm_scale_shift(*n)
    n = list(_dual_args(NSS, *_streams(NSS, 9, 4)))
    n[5] = n[5].to("meta")  # x_b on another device than x_a (and its own params)
    with pytest.raises(FusedDitInputError, match="'x_b' is on meta but the other 6 tensors are on cpu"):
        fdo.dual_norm_scale_shift(*n)


@pytest.mark.interpret
@pytest.mark.parametrize("op", [NSS, GRNS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [(19, 5), (0, 3)])
def test_triton_dual_kernel_interpreted(op, dtype, lengths):
    from fused_dit_ops.kernels import modulation as k
    a, b = _streams(op, *lengths, dtype=dtype)
    outs = _call_dual(op, _dual_args(op, a, b), module=k)
    refs = _single_refs(op, a, b, oracle)
    half = len(outs) // 2  # per stream: (y,) or (residual_out, y)
    for sl in (slice(0, half), slice(half, None)):
        assert_close(op, outs[sl], refs[sl], dtype, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("op", [NSS, GRNS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_dual_bit_equal_to_single_kernels(op, dtype):
    """Qwen-Image-Edit streams (image 8192 rows with the index, text 208 without): the dual launch
    writes exactly what the two single-stream kernels write."""
    a, b = _streams(op, 8192, 208, C=3072, B=1, dtype=dtype, device="cuda")
    outs = _call_dual(op, _dual_args(op, a, b))
    refs = _single_refs(op, a, b, lambda o, args: getattr(fdo, o)(*args))
    for o, r in zip(outs, refs):
        assert torch.equal(o, r)
