"""adaLN modulation ops: reference parity, layouts, opcheck, compile, interpreter, GPU, bad input."""
from __future__ import annotations

import pytest
import torch

import fused_dit_ops as fdo
from fused_dit_ops import reference as ref
from fused_dit_ops.shapes import STREAMS
from helpers import max_ulp_err, max_ulp_err_rowwise, poison_, randn, rel_err

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
OPS = ["scale_shift_gate", "norm_scale_shift", "gate_residual_norm_scale_shift", "gate_residual"]


# --- input factory ------------------------------------------------------------------------------

def make_inputs(op, B, L, C, *, dtype, device="cpu", index=True, layout="chunk", n_ref=None,
                affine=False, norm="layer", std=1.0):
    """Random inputs for one op. layout: 'chunk' (params are views of a [rows, 6C] mod output, as
    diffusers' mod.chunk gives: row stride 6C, x strided rows), 'contiguous', or 'broadcast'
    (B > 1 with parameter rows that are expand()ed views: row stride 0)."""
    rows = 2 * B if index else B
    if layout == "chunk":
        x = randn(B, L, 2 * C, dtype=dtype, device=device, std=std)[:, :, C:]  # token stride 2C
        mod = randn(rows, 6 * C, dtype=dtype, device=device, std=0.5)
        shift, scale, gate, shift2, scale2, _ = mod.chunk(6, dim=-1)
    elif layout == "broadcast":
        x = randn(B, L, C, dtype=dtype, device=device, std=std)
        base = randn(2, 3, C, dtype=dtype, device=device, std=0.5)
        if index:  # row r < B is set 0, r >= B set 1: expand each set over its B rows
            pr = [torch.cat([base[0, i:i + 1].expand(B, C), base[1, i:i + 1].expand(B, C)]) for i in range(3)]
        else:
            pr = [base[0, i:i + 1].expand(B, C) for i in range(3)]
        shift, scale, gate = pr
        shift2, scale2 = shift, scale
    else:
        x = randn(B, L, C, dtype=dtype, device=device, std=std)
        shift, scale, gate = (randn(rows, C, dtype=dtype, device=device, std=0.5) for _ in range(3))
        shift2, scale2 = shift, scale
    idx = None
    if index:
        n_ref = L // 2 if n_ref is None else n_ref
        idx = (torch.arange(L, device=device) >= L - n_ref).to(torch.int32).repeat(B, 1)
        if B > 1:  # a different split per batch row
            idx[1:] = torch.randint(0, 2, (B - 1, L), device=device, dtype=torch.int32)
    if op == "scale_shift_gate":
        return (x, shift, scale, gate, idx)
    if op == "norm_scale_shift":
        w = randn(C, dtype=dtype, device=device) if affine else None
        b = randn(C, dtype=dtype, device=device) if affine and norm == "layer" else None
        return (x, shift, scale, idx, w, b, 1e-6, norm)
    upd = randn(B, L, C, dtype=dtype, device=device, std=std)
    if op == "gate_residual":
        return (x, upd, gate, idx)
    return (x, upd, gate, shift2, scale2, idx, 1e-6)


def f64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def oracle(op, args):
    """float64 reference of the op on these inputs (rounded where the op's contract rounds)."""
    if op == "gate_residual_norm_scale_shift":
        return ref.gate_residual_norm_scale_shift(*f64(args), residual_dtype=args[0].dtype)
    return getattr(ref, op)(*f64(args))


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def assert_close(op, outs, refs, dtype, *, ulps=2.0, interpret=False):
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert o.dtype == dtype and o.shape == r.shape and o.is_contiguous()
        assert torch.isfinite(o).all(), f"{op} output {i} has non-finite values (unwritten?)"
        err = rel_err(o, r)
        assert err < (1e-2 if dtype != torch.float32 else 1e-5), f"{op} output {i}: rel err {err}"
        # Elementwise ops: a few ulp (normalised ops: the rsqrt/mean differ; Frobenius only).
        elementwise = op in ("scale_shift_gate", "gate_residual") or (op == "gate_residual_norm_scale_shift" and i == 0)
        if elementwise and dtype != torch.float32:
            u = max_ulp_err(o, r)
            assert u <= ulps + (1 if interpret else 0), f"{op} output {i}: {u} ulp"


# --- CPU tier: reference implementation through the dispatcher ----------------------------------

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["chunk", "contiguous", "broadcast"])
@pytest.mark.parametrize("index", [True, False])
def test_cpu_matches_float64_oracle(op, dtype, layout, index):
    args = make_inputs(op, 2, 37, 64, dtype=dtype, layout=layout, index=index)
    outs = as_tuple(getattr(fdo, op)(*args))
    assert_close(op, outs, as_tuple(oracle(op, args)), dtype)


def test_scale_shift_gate_equals_diffusers_modulate():
    """Same result as diffusers' _modulate(x, cat([shift, scale, gate]), index) (fp32: exact math)."""
    B, L, C = 2, 29, 48
    x = randn(B, L, C)
    mod = randn(2 * B, 3 * C)
    idx = torch.randint(0, 2, (B, L), dtype=torch.int32)
    y_ref, g_ref = ref.diffusers_modulate(x, mod, idx)
    y, g = fdo.scale_shift_gate(x, *mod.chunk(3, -1), idx)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, g_ref.expand(B, L, C))


def test_index_semantics_nonzero_selects_set1():
    """index values other than 0/1 select set 1 (index != 0), int64 index accepted."""
    B, L, C = 1, 6, 8
    x = randn(B, L, C)
    shift = torch.zeros(2, C)
    scale = torch.zeros(2, C)
    gate = torch.stack([torch.full((C,), 1.0), torch.full((C,), 2.0)])
    idx = torch.tensor([[0, 1, 5, -3, 0, 7]], dtype=torch.int64)
    _, g = fdo.scale_shift_gate(x, shift, scale, gate, idx)
    assert g[0, :, 0].tolist() == [1.0, 2.0, 2.0, 2.0, 1.0, 2.0]


def test_gate_residual_norm_uses_rounded_residual():
    """The fused op normalises residual_out as stored (bf16), like eager diffusers' norm2(h)."""
    B, L, C = 1, 16, 256
    args = make_inputs("gate_residual_norm_scale_shift", B, L, C, dtype=torch.bfloat16, layout="contiguous")
    r_out, y = fdo.gate_residual_norm_scale_shift(*args)
    y_from_stored = fdo.norm_scale_shift(r_out, args[3], args[4], args[5])
    torch.testing.assert_close(y, y_from_stored, rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_norm_affine(norm):
    args = make_inputs("norm_scale_shift", 2, 11, 96, dtype=torch.float32, affine=True, norm=norm)
    y = fdo.norm_scale_shift(*args)
    assert_close("norm_scale_shift", (y,), (oracle("norm_scale_shift", args),), torch.float32)


def test_empty_sequence():
    args = make_inputs("scale_shift_gate", 1, 0, 64, dtype=torch.bfloat16, layout="contiguous", n_ref=0)
    y, g = fdo.scale_shift_gate(*args)
    assert y.shape == (1, 0, 64) and g.shape == (1, 0, 64)


# --- opcheck and torch.compile --------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["chunk", "contiguous", "broadcast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_opcheck(op, layout, dtype):
    args = make_inputs(op, 2, 9, 32, dtype=dtype, layout=layout, index=layout != "contiguous")
    torch.library.opcheck(getattr(torch.ops.fused_dit, op).default, args)


def _block_like(x, upd, mod1, mod2, idx):
    """A block's modulation glue written with our ops: what the diffusers patch does."""
    s1, c1, g1 = mod1.chunk(3, -1)
    s2, c2, _ = mod2.chunk(3, -1)
    y1 = fdo.norm_scale_shift(x, s1, c1, idx)
    h, y2 = fdo.gate_residual_norm_scale_shift(x, upd * y1, g1, s2, c2, idx)
    y3, g3 = fdo.scale_shift_gate(h, s1, c1, g1, idx)
    return fdo.gate_residual(h, y2 * y3, g3[:, 0].contiguous().repeat(2, 1), idx)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_no_breaks(backend):
    B, L, C = 1, 24, 64
    x, upd = randn(B, L, C), randn(B, L, C)
    mod1, mod2 = randn(2 * B, 3 * C), randn(2 * B, 3 * C)
    idx = (torch.arange(L) >= 12).int()[None]
    eager = _block_like(x, upd, mod1, mod2, idx)
    torch._dynamo.reset()
    compiled = torch.compile(_block_like, fullgraph=True, backend=backend)
    out = compiled(x, upd, mod1, mod2, idx)
    torch.testing.assert_close(out, eager)
    # a second shape recompiles cleanly, fake shapes propagate
    out2 = compiled(randn(B, L + 3, C), randn(B, L + 3, C), mod1, mod2, (torch.arange(L + 3) >= 5).int()[None])
    assert out2.shape == (B, L + 3, C)


# --- bad input: clear errors naming the argument, before any launch ---------------------------------

def _base(op):
    return list(make_inputs(op, 2, 8, 64, dtype=torch.bfloat16, layout="contiguous"))


BAD_CASES = [
    # (op, arg position, replacement builder, expected message fragment)
    ("scale_shift_gate", 1, lambda a: a[1].half(), "'shift' has dtype float16 but 'x' has bfloat16; parameters "
     "must have the activation's dtype or float32"),
    ("scale_shift_gate", 0, lambda a: a[0].to(torch.float64), "'x' must have dtype in (bfloat16, float16, float32), got float64"),
    ("scale_shift_gate", 2, lambda a: a[2][:2], "'scale' has shape [2, 64]; with 'index' given it must be [2B, C] = [4, 64]"),
    ("scale_shift_gate", 4, lambda a: a[4].float(), "'index' must have dtype in (int32, int64), got float32"),
    ("scale_shift_gate", 4, lambda a: a[4][:, :5], "'index' must have shape [B, L] = [2, 8]"),
    ("scale_shift_gate", 0, lambda a: a[0].transpose(1, 2).contiguous().transpose(1, 2), "'x' must have a contiguous last dimension"),
    ("scale_shift_gate", 0, lambda a: randn(2, 8, 60, dtype=torch.bfloat16), "C must be a multiple of 8, got C=60"),
    ("scale_shift_gate", 0, lambda a: a[0][0], "'x' must be 3-D, got 2-D"),
    ("scale_shift_gate", 3, lambda a: randn(4, 128, dtype=torch.bfloat16)[:, ::2], "'gate' must have a contiguous last dimension"),
    ("norm_scale_shift", 7, lambda a: "group", "'norm' must be 'layer' or 'rms', got 'group'"),
    ("norm_scale_shift", 4, lambda a: randn(32, dtype=torch.bfloat16), "'weight' must have shape [C] = [64], got [32]"),
    ("gate_residual", 1, lambda a: randn(2, 9, 64, dtype=torch.bfloat16), "'update' must have the shape of 'residual' [2, 8, 64], got [2, 9, 64]"),
    ("gate_residual", 2, lambda a: a[2].half(), "'gate' has dtype float16 but 'residual' has bfloat16"),
    ("gate_residual_norm_scale_shift", 4, lambda a: a[4][:2], "'scale' has shape [2, 64]"),
    ("gate_residual_norm_scale_shift", 6, lambda a: 0.0, "'eps' must be > 0"),
]


@pytest.mark.parametrize("op,pos,make,msg", BAD_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_CASES)])
def test_bad_input_messages(op, pos, make, msg):
    args = _base(op)
    args[pos] = make(args)
    with pytest.raises(fdo.FusedDitInputError) as e:
        getattr(fdo, op)(*args)
    assert msg in str(e.value)
    assert str(e.value).startswith(f"fused_dit.{op}:")


def test_bad_input_param_without_index():
    args = _base("scale_shift_gate")
    args[4] = None
    with pytest.raises(fdo.FusedDitInputError, match=r"a \[2B, C\] parameter needs an 'index'"):
        fdo.scale_shift_gate(*args)


def test_bad_input_raised_by_fake_under_compile():
    args = _base("gate_residual")
    args[2] = args[2][:2]
    torch._dynamo.reset()
    with pytest.raises(Exception, match="'gate' has shape"):
        torch.compile(fdo.gate_residual, fullgraph=True, backend="aot_eager")(*args)


# --- interpreter tier: the Triton kernels themselves, on CPU tensors --------------------------------

@pytest.mark.interpret
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout,index", [("chunk", True), ("broadcast", True), ("contiguous", False)])
def test_triton_kernel_interpreted(op, dtype, layout, index):
    from fused_dit_ops.kernels import modulation as k
    args = make_inputs(op, 2, 19, 96, dtype=dtype, layout=layout, index=index, affine=(op == "norm_scale_shift"))
    outs = as_tuple(getattr(k, op)(*args))
    assert_close(op, outs, as_tuple(oracle(op, args)), dtype, interpret=True)


@pytest.mark.interpret
@pytest.mark.parametrize("config", [{"BLOCK_M": 4, "BLOCK_C": 32, "ITERS": 1, "num_warps": 1},
                                    {"BLOCK_M": 2, "BLOCK_C": 64, "ITERS": 3, "num_warps": 2},
                                    {"BLOCK_M": 16, "BLOCK_C": 128, "ITERS": 2, "num_warps": 4}])
@pytest.mark.parametrize("op", ["scale_shift_gate", "gate_residual"])
@pytest.mark.parametrize("split", [True, False])
def test_triton_tiles_cover_ragged_edges(config, op, split):
    """Tiles (and row loops) that do not divide L or C still write every element correctly; for
    scale_shift_gate both with y and gate written by separate programs (SPLIT_OUTPUTS) and not."""
    from fused_dit_ops.kernels import modulation as k
    if op != "scale_shift_gate":
        if not split:
            pytest.skip("SPLIT_OUTPUTS is a scale_shift_gate option")
    else:
        config = dict(config, SPLIT_OUTPUTS=split)
    args = make_inputs(op, 2, 23, 72, dtype=torch.float32, layout="chunk")
    outs = as_tuple(getattr(k, op)(*args, config=config))
    assert_close(op, outs, as_tuple(oracle(op, args)), torch.float32)


@pytest.mark.interpret
@pytest.mark.parametrize("config", [{"BLOCK_M": 1, "BLOCK_C": 128, "ITERS": 4, "num_warps": 2},
                                    {"BLOCK_M": 2, "BLOCK_C": 128, "ITERS": 3, "num_warps": 4},
                                    {"BLOCK_M": 2, "BLOCK_C": 128, "ITERS": 2, "num_warps": 4, "PARAM_GATHER": True},
                                    {"BLOCK_M": 1, "BLOCK_C": 128, "ITERS": 1, "num_warps": 4, "PARAM_GATHER": True},
                                    {"BLOCK_M": 1, "BLOCK_C": 128, "ITERS": 1, "num_warps": 4, "PARAM_GATHER": True,
                                     "STREAM_STORES": True}])
@pytest.mark.parametrize("op", ["norm_scale_shift", "gate_residual_norm_scale_shift"])
@pytest.mark.parametrize("index", [True, False])
def test_triton_norm_row_loops(config, op, index):
    from fused_dit_ops.kernels import modulation as k
    args = make_inputs(op, 2, 23, 72, dtype=torch.float32, layout="chunk", index=index)
    outs = as_tuple(getattr(k, op)(*args, config=config))
    assert_close(op, outs, as_tuple(oracle(op, args)), torch.float32)


@pytest.mark.interpret
@pytest.mark.parametrize("C", [40, 80, 88, 33])
@pytest.mark.parametrize("index", [True, False])
@pytest.mark.parametrize("norm,affine", [("layer", False), ("layer", True), ("rms", True)])
def test_triton_norm_two_segments(C, index, norm, affine):
    """norm_scale_shift rows held as two power-of-two segments (C 40 = 32 + 8, 80 = 64 + 16; masked
    rests: 88 = 64 + 24 in 32 lanes, 33 = 32 + 1), as C 5120 = 4096 + 1024 is on the GPU: against the
    oracle, and within last places of the one-tile kernel (the row's sums are added in another order)."""
    from fused_dit_ops.kernels import _launch, modulation as k
    seg = lambda c: _launch.row_segments(c, k.NORM_SEGMENTS_MIN_TILE)  # noqa: E731
    assert seg(5120) == (4096, 1024, False) and seg(6144) == (4096, 2048, False)
    assert all(seg(c) is None for c in (1536, 3072, 4096, 8192)) and _launch.row_segments(6144) is None
    assert seg(C) is not None
    for dtype in (torch.float32, torch.bfloat16):
        args = make_inputs("norm_scale_shift", 2, 19, C, dtype=dtype, layout="chunk", index=index, affine=affine,
                           norm=norm)
        two = k.norm_scale_shift(*args)
        assert_close("norm_scale_shift", (two,), (oracle("norm_scale_shift", args),), dtype, interpret=True)
        one = k.norm_scale_shift(*args, split=False)  # (1 + scale) n + shift cancels: last places at the row's max
        assert max_ulp_err_rowwise(two, one, C) <= (1 if dtype == torch.bfloat16 else 4), dtype
    assert torch.equal(k.norm_scale_shift(*args, split=True), two)


@pytest.mark.interpret
def test_triton_rms_affine_interpreted():
    from fused_dit_ops.kernels import modulation as k
    args = make_inputs("norm_scale_shift", 1, 13, 40, dtype=torch.float32, affine=True, norm="rms")
    assert_close("norm_scale_shift", (k.norm_scale_shift(*args),), (oracle("norm_scale_shift", args),),
                 torch.float32)


# --- GPU tier ----------------------------------------------------------------------------------------

GPU_SHAPES = [STREAMS[n] for n in ("qwen-edit-img", "qwen-edit-txt", "odd-L", "wan14b")]


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[s.name for s in GPU_SHAPES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_shapes(op, shape, dtype):
    args = make_inputs(op, shape.B, shape.L, shape.C, dtype=dtype, device="cuda", index=shape.has_index,
                       n_ref=shape.n_ref or None, layout="chunk")
    outs = as_tuple(getattr(fdo, op)(*args))
    torch.cuda.synchronize()
    cpu_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    assert_close(op, tuple(o.cpu() for o in outs), as_tuple(oracle(op, cpu_args)), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("index", [True, False])
@pytest.mark.parametrize("C", [5120, 6144])
def test_gpu_norm_two_segments_match_one_tile(index, C):
    """C 5120 (Wan 14B), 6144 (FLUX.2): the two-segment row (the default there) against the one-tile kernel."""
    from fused_dit_ops.kernels import _launch, modulation as k
    assert _launch.row_segments(C, k.NORM_SEGMENTS_MIN_TILE) is not None
    args = make_inputs("norm_scale_shift", 2, 1031, C, dtype=torch.bfloat16, device="cuda", index=index)
    two, one = k.norm_scale_shift(*args), k.norm_scale_shift(*args, split=False)
    assert torch.isfinite(two).all() and max_ulp_err_rowwise(two, one, C) <= 1


@pytest.mark.gpu
def test_gpu_batch2_and_fp32():
    for op in OPS:
        args = make_inputs(op, 2, 1031, 3072, dtype=torch.float32, device="cuda", layout="broadcast")
        outs = as_tuple(getattr(fdo, op)(*args))
        cpu_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
        assert_close(op, tuple(o.cpu() for o in outs), as_tuple(oracle(op, cpu_args)), torch.float32)


@pytest.mark.gpu
def test_gpu_outputs_fully_written():
    """Run into NaN-poisoned memory from the caching allocator: every element must be overwritten."""
    s = STREAMS["odd-L"]
    for op in OPS:
        junk = torch.empty(4 * s.L * s.C, device="cuda", dtype=torch.bfloat16)
        poison_(junk)
        del junk  # the op's outputs will likely reuse these NaN blocks
        args = make_inputs(op, 1, s.L, s.C, dtype=torch.bfloat16, device="cuda", n_ref=s.n_ref)
        for o in as_tuple(getattr(fdo, op)(*args)):
            assert torch.isfinite(o).all(), op


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_equals_eager():
    s = STREAMS["qwen-edit-img"]
    for op in OPS:
        args = make_inputs(op, 1, s.L, s.C, dtype=torch.bfloat16, device="cuda", n_ref=s.n_ref)
        fn = getattr(fdo, op)
        eager = as_tuple(fn(*args))
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(*args)  # warm-up on the side stream (JIT already done above)
            with torch.cuda.graph(g, stream=stream):
                captured = as_tuple(fn(*args))
        torch.cuda.current_stream().wait_stream(stream)
        for t in captured:
            poison_(t)
        g.replay()
        torch.cuda.synchronize()
        for a, b in zip(captured, eager):
            assert torch.equal(a, b), op


@pytest.mark.gpu
def test_gpu_compile_matches_eager():
    B, L, C = 1, 4096, 3072
    x, upd = randn(B, L, C, dtype=torch.bfloat16, device="cuda"), randn(B, L, C, dtype=torch.bfloat16, device="cuda")
    mod1 = randn(2 * B, 3 * C, dtype=torch.bfloat16, device="cuda", std=0.3)
    mod2 = randn(2 * B, 3 * C, dtype=torch.bfloat16, device="cuda", std=0.3)
    idx = (torch.arange(L, device="cuda") >= L // 2).int()[None]
    eager = _block_like(x, upd, mod1, mod2, idx)
    torch._dynamo.reset()
    out = torch.compile(_block_like, fullgraph=True)(x, upd, mod1, mod2, idx)
    assert rel_err(out, eager) < 1e-2


@pytest.mark.gpu
def test_gpu_cpp_and_triton_gate_residual_agree():
    """When _C is built, its gate_residual and the Triton fallback give identical bits."""
    from fused_dit_ops import _extension
    from fused_dit_ops.kernels import modulation as k
    if not _extension.C_LOADED:
        pytest.skip(f"fused_dit_ops._C not loaded: {_extension.C_ERROR}")
    for layout, dtype in (("chunk", torch.bfloat16), ("contiguous", torch.float16), ("broadcast", torch.float32)):
        args = make_inputs("gate_residual", 2, 777, 3072, dtype=dtype, device="cuda", layout=layout)
        assert torch.equal(fdo.gate_residual(*args), k.gate_residual(*args)), (layout, dtype)
    # unaligned base pointer: the scalar (VEC=1) path
    args = list(make_inputs("gate_residual", 1, 100, 3072 + 8, dtype=torch.bfloat16, device="cuda",
                            layout="contiguous", index=False))
    args[0], args[1], args[2] = args[0][..., 1:3073], args[1][..., 1:3073], args[2][:, 1:3073]
    assert torch.equal(fdo.gate_residual(*args), k.gate_residual(*args))


@pytest.mark.gpu
def test_gpu_bad_input_is_fused_dit_input_error_with_or_without_cpp():
    """The C++ kernels sit behind private ops: torch.ops.fused_dit.gate_residual / joint_qkv_cat run
    the Python checks first, so a bad input raises FusedDitInputError, as on CPU and while tracing."""
    from fused_dit_ops import FusedDitInputError
    from fused_dit_ops._schemas import PRIVATE_CPP
    r, u, g, idx = make_inputs("gate_residual", 1, 64, 256, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(FusedDitInputError, match="gate"):
        torch.ops.fused_dit.gate_residual(r, u, g[:, :128], idx)
    t = torch.randn(1, 5, 2, 16, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(FusedDitInputError, match="img_v"):
        torch.ops.fused_dit.joint_qkv_cat(t, t, t, t, t, t.float())
    from fused_dit_ops import _extension
    if _extension.C_LOADED:  # and the C++ kernels are the ones that run
        for public, private in PRIVATE_CPP.items():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_dit::{private}", "CUDA"), private
        from fused_dit_ops.ops import modulation as om, rope as orope
        assert om._GATE_RESIDUAL_CPP is not None and orope._CAT_CPP is not None and orope._CAT_OUT_CPP is not None


@pytest.mark.gpu
def test_gpu_multi_device_guard():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    args = make_inputs("norm_scale_shift", 1, 64, 256, dtype=torch.bfloat16, device="cuda:1")
    y = fdo.norm_scale_shift(*args)
    assert y.device == torch.device("cuda:1")
