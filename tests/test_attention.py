"""fused_dit.attention: reference checks, selection over a capability table, overrides, errors,
torch.compile, diffusers integration (CPU); every backend, fallthrough, compile and CUDA-graph
capture on the GPU (``@pytest.mark.gpu``)."""
from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

import fused_dit_ops
from fused_dit_ops import attention_dispatch as disp
from fused_dit_ops import reference as ref
from fused_dit_ops._validation import FusedDitInputError
from fused_dit_ops.attention_dispatch import Capabilities, select_static, static_reason
from helpers import rel_err

op = torch.ops.fused_dit.attention.default
BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


@pytest.fixture(autouse=True)
def _clean_selection(monkeypatch):
    monkeypatch.delenv(disp.ENV_VAR, raising=False)
    disp._SELECTED.clear()
    disp._WARNED.clear()
    yield
    disp._SELECTED.clear()
    disp._WARNED.clear()


def qkv(B, Sq, H, D, Sk=None, Hkv=None, dtype=FP32, device="cpu"):
    Sk, Hkv = Sk or Sq, Hkv or H
    q = torch.randn(B, Sq, H, D, device=device).to(dtype)
    k = torch.randn(B, Sk, Hkv, D, device=device).to(dtype)
    v = torch.randn(B, Sk, Hkv, D, device=device).to(dtype)
    return q, k, v


def oracle(q, k, v, scale=None, causal=False):
    return ref.attention(q.double(), k.double(), v.double(), scale, causal)


def packed_qkv(B, S, H, D, dtype=FP32, device="cpu"):
    """q, k, v as strided chunks of a packed [B, S, 3*H*D] projection (no copies)."""
    w = torch.randn(B, S, 3 * H * D, device=device).to(dtype)
    return tuple(t.unflatten(-1, (H, D)) for t in w.chunk(3, dim=-1))


# ----------------------------------------------------------------------------------------------
# CPU: numerics (SDPA math) against the float64 reference
# ----------------------------------------------------------------------------------------------

CPU_SHAPES = [  # (B, Sq, Sk, H, Hkv, D, causal)
    (2, 37, 37, 4, 4, 64, False),
    (1, 33, 33, 8, 2, 32, False),     # GQA 4:1
    (1, 19, 45, 4, 1, 16, False),     # MQA, cross lengths
    (2, 41, 41, 6, 3, 64, True),      # causal + GQA, odd length
    (1, 1, 1, 2, 2, 8, False),
]


@pytest.mark.parametrize("dtype", [FP32, BF16, FP64])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_matches_float64_reference(shape, dtype):
    B, Sq, Sk, H, Hkv, D, causal = shape
    q, k, v = qkv(B, Sq, H, D, Sk, Hkv, dtype)
    out = fused_dit_ops.attention(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    tol = {FP64: 1e-10, FP32: 1e-5, BF16: 1e-2}[dtype]
    assert rel_err(out, oracle(q, k, v, causal=causal)) < tol


def test_cpu_softmax_scale_and_sdpa_agree():
    q, k, v = qkv(1, 29, 4, 32, Hkv=2)
    out = fused_dit_ops.attention(q, k, v, softmax_scale=0.3)
    assert rel_err(out, oracle(q, k, v, 0.3)) < 1e-5
    # float64 SDPA as a second, independent oracle
    sd = torch.nn.functional.scaled_dot_product_attention(
        q.double().transpose(1, 2), k.double().repeat_interleave(2, 2).transpose(1, 2),
        v.double().repeat_interleave(2, 2).transpose(1, 2), scale=0.3).transpose(1, 2)
    assert rel_err(out, sd) < 1e-5


def test_cpu_strided_inputs_accepted():
    q, k, v = packed_qkv(1, 23, 4, 32)
    assert not q.is_contiguous()
    out = fused_dit_ops.attention(q, k, v)
    assert out.is_contiguous() and rel_err(out, oracle(q, k, v)) < 1e-5


def test_opcheck():
    for args in [qkv(1, 17, 4, 32, Hkv=2), packed_qkv(2, 9, 2, 16)]:
        torch.library.opcheck(op, (*args, None, False, None))
    q, k, v = qkv(1, 12, 2, 16)
    torch.library.opcheck(op, (q, k, v, 0.2, True, "math"))


def test_compile_fullgraph_cpu():
    q, k, v = qkv(1, 21, 4, 32, Hkv=2)

    def f(q, k, v):
        return fused_dit_ops.attention(q * 1.0, k, v).sum(-1) + 1

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    assert torch.allclose(got, f(q, k, v), atol=1e-6)


def test_fake_tensor_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q, k, v = qkv(2, 7, 4, 16, Hkv=1)
        out = op(q, k, v, None, False, None)
        assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()


# ----------------------------------------------------------------------------------------------
# CPU: selection over a table of capabilities
# ----------------------------------------------------------------------------------------------

H100_FA3FWD = Capabilities("cuda", (9, 0), fa3="fa3_fwd_interface", fa3_dtypes=frozenset({BF16}), cudnn=True)
H100_UPSTREAM = Capabilities("cuda", (9, 0), fa3="flash_attn_interface", fa3_dtypes=frozenset({BF16, FP16}),
                             cudnn=True)
H100_BARE = Capabilities("cuda", (9, 0), cudnn=True, missing=(("fa3", "not importable: nope"),))
H100_FA4 = Capabilities("cuda", (9, 0), fa4=True, cudnn=True)
H100_NOCUDNN = Capabilities("cuda", (9, 0), fa3="fa3_fwd_interface", fa3_dtypes=frozenset({BF16}))
A100_FA3 = Capabilities("cuda", (8, 0), fa3="fa3_fwd_interface", fa3_dtypes=frozenset({BF16}), cudnn=True)
B200_ALL = Capabilities("cuda", (10, 0), fa3="flash_attn_interface", fa3_dtypes=frozenset({BF16, FP16}),
                        fa4=True, cudnn=True)
V100 = Capabilities("cuda", (7, 0), cudnn=True)
CPU = Capabilities("cpu")
OLD_TORCH = Capabilities("cuda", (9, 0), cudnn=True, sdpa_gqa=False)

# (caps, dtype, head_dim, gqa, causal) -> chosen, {skipped backend: substring of its reason}
TABLE = [
    (H100_FA3FWD, BF16, 128, False, False, "fa3", {}),
    (H100_FA3FWD, BF16, 128, True, True, "fa3", {}),
    (H100_FA3FWD, FP16, 128, False, False, "cudnn", {"fa3": "fp16 not built in fa3-fwd (bf16/fp8 only)"}),
    (H100_UPSTREAM, FP16, 128, False, False, "fa3", {}),
    (H100_FA3FWD, BF16, 512, False, False, "efficient",
     {"fa3": "head_dim 512", "cudnn": "head_dim 512", "fa2": "head_dim 512"}),
    (H100_FA3FWD, BF16, 100, False, False, "fa2", {"fa3": "head_dim 100", "cudnn": "head_dim 100"}),
    (H100_FA3FWD, FP32, 128, False, False, "efficient", {"fa3": "float32", "cudnn": "float32", "fa2": "float32"}),
    (H100_FA3FWD, FP64, 64, False, False, "math", {"efficient": "float64"}),
    (H100_BARE, BF16, 128, False, False, "cudnn", {"fa3": "not importable", "fa4": "not installed"}),
    (H100_FA4, BF16, 128, False, False, "fa4", {"fa3": "not installed"}),
    (H100_NOCUDNN, FP16, 128, False, False, "fa2", {"fa3": "fp16", "cudnn": "cudnn"}),
    (A100_FA3, BF16, 128, False, False, "cudnn", {"fa3": "needs sm90 (got sm80)"}),
    (B200_ALL, BF16, 128, False, False, "fa4", {"fa3": "needs sm90 (got sm100)"}),
    (B200_ALL, BF16, 256, False, False, "cudnn", {"fa4": "head_dim 256"}),
    (V100, FP16, 64, False, False, "efficient", {"cudnn": "needs sm80", "fa2": "needs sm80"}),
    (CPU, BF16, 128, False, False, "math", {"fa3": "needs a CUDA device (got cpu)"}),
    (OLD_TORCH, BF16, 128, True, False, "math", {"cudnn": "GQA", "fa2": "GQA", "efficient": "GQA"}),
    (OLD_TORCH, BF16, 128, False, False, "cudnn", {}),
]


@pytest.mark.parametrize("row", TABLE, ids=lambda r: f"sm{r[0].sm}-{r[0].fa3}-{r[1]}-d{r[2]}-gqa{r[3]}-c{r[4]}")
def test_selection_table(row):
    caps, dtype, hd, gqa, causal, want, reasons = row
    got, skipped = select_static(caps, dtype, hd, gqa, causal)
    assert got == want, skipped
    texts = dict((n, r.text) for n, r in skipped)
    assert list(texts) == list(disp.BACKENDS[:disp.BACKENDS.index(want)])  # in preference order
    for name, sub in reasons.items():
        assert sub in texts[name], (name, texts[name])


def test_selection_deterministic_and_forced():
    for caps, dtype, hd, gqa, causal, want, _ in TABLE:
        assert select_static(caps, dtype, hd, gqa, causal)[0] == want
    assert select_static(H100_FA3FWD, BF16, 128, forced="cudnn")[0] == "cudnn"
    with pytest.raises(disp.AttentionBackendError, match="fp16 not built in fa3-fwd"):
        select_static(H100_FA3FWD, FP16, 128, forced="fa3")
    with pytest.raises(disp.AttentionBackendError, match="needs sm90 .got sm80."):
        select_static(A100_FA3, BF16, 128, forced="fa3")
    with pytest.raises(disp.AttentionBackendError, match="unknown backend 'fa5'"):
        select_static(H100_FA3FWD, BF16, 128, forced="fa5")


def test_reason_kinds():
    assert static_reason("fa3", H100_FA3FWD, FP16, 128, False, False).kind == "input"
    assert static_reason("fa3", A100_FA3, BF16, 128, False, False).kind == "arch"
    assert static_reason("fa3", H100_BARE, BF16, 128, False, False).kind == "package"
    assert static_reason("cudnn", CPU, BF16, 128, False, False).kind == "device"


def test_runtime_fallthrough_warns_once(monkeypatch):
    """On a (pretend) H100 with fa3-fwd, fp16 falls through and says why, once per key."""
    monkeypatch.setattr(disp, "runtime_capabilities", lambda dev: H100_FA3FWD)
    monkeypatch.setattr(disp, "_sdpa_reason", lambda *a: None)
    monkeypatch.setattr(disp, "_misaligned", lambda *a: False)
    q, k, v = qkv(1, 8, 2, 128, dtype=FP16)
    with pytest.warns(disp.AttentionFallbackWarning, match="fp16 not built in fa3-fwd"):
        assert disp.select(q, k, v, False) == "cudnn"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert disp.select(q, k, v, False) == "cudnn"   # cached, silent
    q, k, v = qkv(1, 8, 2, 128, dtype=BF16)
    assert disp.select(q, k, v, False) == "fa3"


def test_runtime_alignment_rule(monkeypatch):
    monkeypatch.setattr(disp, "runtime_capabilities", lambda dev: H100_FA3FWD)
    monkeypatch.setattr(disp, "_sdpa_reason", lambda *a: None)
    q, k, v = qkv(1, 8, 2, 128, dtype=BF16)
    caps = H100_FA3FWD
    assert disp.runtime_reason("fa3", caps, q, k, v, False) is None
    buf = torch.randn(1, 8, 2 * 128 + 1).to(BF16)
    qm = buf[..., 1:].unflatten(-1, (2, 128))    # pointer off by 2 bytes, row stride 257 elements
    r = disp.runtime_reason("fa3", caps, qm, k, v, False)
    assert r is not None and "16-byte aligned" in r.text
    with pytest.warns(disp.AttentionFallbackWarning):
        assert disp.select(qm, k, v, False) == "cudnn"


# ----------------------------------------------------------------------------------------------
# CPU: overrides (argument > context manager > environment variable > automatic)
# ----------------------------------------------------------------------------------------------

def test_env_var_override(monkeypatch):
    q, k, v = qkv(1, 9, 2, 16)
    monkeypatch.setenv(disp.ENV_VAR, "math")
    assert disp.select(q, k, v, False) == "math"
    fused_dit_ops.attention(q, k, v)
    monkeypatch.setenv(disp.ENV_VAR, "fa3")
    with pytest.raises(disp.AttentionBackendError, match=r"'fa3' was requested \(\$FUSED_DIT_ATTN_BACKEND\)"
                       r".*needs a CUDA device"):
        fused_dit_ops.attention(q, k, v)
    monkeypatch.setenv(disp.ENV_VAR, "AUTO")
    assert disp.select(q, k, v, False) == "math"
    monkeypatch.setenv(disp.ENV_VAR, "bogus")
    with pytest.raises(disp.AttentionBackendError, match="unknown backend 'bogus'"):
        fused_dit_ops.attention(q, k, v)


def test_context_manager_and_precedence(monkeypatch):
    q, k, v = qkv(1, 9, 2, 16)
    monkeypatch.setenv(disp.ENV_VAR, "cudnn")
    with fused_dit_ops.attention_backend("math"):           # context beats env
        out = fused_dit_ops.attention(q, k, v)
        assert rel_err(out, oracle(q, k, v)) < 1e-5
        with fused_dit_ops.attention_backend("efficient"):  # innermost wins
            with pytest.raises(disp.AttentionBackendError, match="attention_backend\\(\\) context"):
                fused_dit_ops.attention(q, k, v)
            fused_dit_ops.attention(q, k, v, backend="math")  # argument beats context
        fused_dit_ops.attention(q, k, v)                     # restored
    with pytest.raises(disp.AttentionBackendError, match="cudnn"):
        fused_dit_ops.attention(q, k, v)                     # env again
    with fused_dit_ops.attention_backend("auto"):
        fused_dit_ops.attention(q, k, v)
    with pytest.raises(disp.AttentionBackendError, match="unknown backend"):
        with fused_dit_ops.attention_backend("flash"):
            pass


def test_forced_backend_raises_on_cpu():
    q, k, v = qkv(1, 9, 2, 16)
    for name in ("fa3", "fa4", "cudnn", "fa2", "efficient"):
        with pytest.raises(disp.AttentionBackendError, match=f"'{name}' was requested \\(argument\\)"):
            fused_dit_ops.attention(q, k, v, backend=name)
    assert rel_err(fused_dit_ops.attention(q, k, v, backend="math"), oracle(q, k, v)) < 1e-5
    assert isinstance(disp.AttentionBackendError("x"), FusedDitInputError)


def test_attention_backends_listing():
    rows = fused_dit_ops.attention_backends()
    assert [r.name for r in rows] == list(disp.BACKENDS)
    for r in rows:
        assert r.available == (r.reason == "")
        if not r.available:
            assert r.reason.startswith(r.name + ":")
    if not torch.cuda.is_available():
        assert [r.name for r in rows if r.available] == ["math"]
    from fused_dit_ops.env import report
    assert "attention backends (bfloat16" in report()


def test_warmup_cpu():
    assert fused_dit_ops.warmup_attention(seq_lens=(5, 7), heads=2, head_dim=16, dtype=FP32,
                                          device="cpu") == ["math", "math"]


def test_explain():
    q, k, v = qkv(1, 9, 2, 16)
    info = disp.explain(q, k, v)
    assert info["chosen"] == "math" and set(info["backends"]) == set(disp.BACKENDS)
    assert info["backends"]["math"] == "ok"


# ----------------------------------------------------------------------------------------------
# CPU: bad inputs name the argument
# ----------------------------------------------------------------------------------------------

def _bad_cases():
    q, k, v = qkv(1, 8, 4, 16)
    yield (q[0], k, v), "'q' must be 4-D"
    yield (q, k, v[:, :, :, :8]), "'v' must have the shape of 'k'"
    yield (q, k.to(FP16), v), "'k' has dtype float16 but 'q' has float32"
    yield (q.to(torch.int32), k, v), "'q' must have dtype"
    yield (q, *qkv(2, 8, 4, 16)[1:]), "batch size"
    yield (q, *qkv(1, 8, 4, 8)[1:]), "head_dim"
    yield (q, *qkv(1, 8, 3, 16)[1:]), "Hkv must divide"
    yield (q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v), "'q' must have a contiguous last"
    yield (q, k[:, :, :0], v[:, :, :0]), "Hkv must divide"  # no kv heads for q's 4 heads


@pytest.mark.parametrize("case", list(range(9)))
def test_bad_inputs(case):
    args, msg = list(_bad_cases())[case]
    with pytest.raises(FusedDitInputError, match=msg):
        op(*args, None, False, None)
    with pytest.raises(FusedDitInputError, match=msg):   # the fake says the same while tracing
        with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
            op(*args, None, False, None)


def test_bad_scalars():
    q, k, v = qkv(1, 8, 4, 16)
    with pytest.raises(FusedDitInputError, match="'causal'=True needs Sq == Sk"):
        op(q, *qkv(1, 9, 4, 16)[1:], None, True, None)
    with pytest.raises(FusedDitInputError, match="'softmax_scale' must be"):
        op(q, k, v, -1.0, False, None)
    with pytest.raises(FusedDitInputError, match="'backend' must be one of"):
        op(q, k, v, None, False, "FA3")


# ----------------------------------------------------------------------------------------------
# CPU: diffusers integration
# ----------------------------------------------------------------------------------------------

def _tiny_qwen():
    pytest.importorskip("diffusers")
    from diffusers import QwenImageTransformer2DModel
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=32, num_attention_heads=2, joint_attention_dim=24,
                                       axes_dims_rope=(8, 12, 12)).eval()


def _qwen_inputs(device="cpu", dtype=FP32, mask=False):
    x = torch.randn(1, 16, 16, device=device).to(dtype)
    e = torch.randn(1, 7, 24, device=device).to(dtype)
    kw = dict(hidden_states=x, encoder_hidden_states=e, timestep=torch.tensor([0.5], device=device).to(dtype),
              img_shapes=[[(1, 4, 4)]], return_dict=False)
    if mask:
        m = torch.ones(1, 7, device=device)
        m[:, 5:] = 0
        kw["encoder_hidden_states_mask"] = m
    return kw


@pytest.fixture
def restore_diffusers_backend():
    """set_attention_backend("_flash_3") also moves diffusers' process-wide active backend: put it back."""
    pytest.importorskip("diffusers")
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    old = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(old)


def test_diffusers_flash3_wiring(monkeypatch, restore_diffusers_backend):
    pytest.importorskip("diffusers")
    from diffusers.models import attention_dispatch as ad
    from fused_dit_ops.integrations import diffusers_attention as da
    fake = types.ModuleType("fa3_fwd_interface")
    fake.flash_attn_func = lambda *a, **k: None
    fake.flash_attn_varlen_func = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", fake)
    before = (ad.flash_attn_3_func, ad.flash_attn_3_varlen_func, ad._CAN_USE_FLASH_ATTN_3)
    if before[2] and before[0] is not None:
        pytest.skip("upstream FA3 installed: diffusers' _flash_3 works without the shim")
    try:
        assert da.enable_diffusers_flash3_with_fa3_fwd() is True
        assert ad.flash_attn_3_func is fake.flash_attn_func
        assert ad.flash_attn_3_varlen_func is fake.flash_attn_varlen_func
        assert ad._CAN_USE_FLASH_ATTN_3 is True
        ad._check_attention_backend_requirements(ad.AttentionBackendName._FLASH_3)  # no raise
        model = _tiny_qwen()
        model.set_attention_backend("_flash_3")
        assert da.enable_diffusers_flash3_with_fa3_fwd() is True   # idempotent
    finally:
        da.disable_diffusers_flash3_with_fa3_fwd()
    assert (ad.flash_attn_3_func, ad.flash_attn_3_varlen_func, ad._CAN_USE_FLASH_ATTN_3) == before


def test_diffusers_flash3_missing_package(monkeypatch):
    pytest.importorskip("diffusers")
    from diffusers.models import attention_dispatch as ad
    from fused_dit_ops.integrations import diffusers_attention as da
    if ad._CAN_USE_FLASH_ATTN_3:
        pytest.skip("upstream FA3 installed")
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", None)   # import raises ImportError
    with pytest.raises(ImportError, match="fa3-fwd"):
        da.enable_diffusers_flash3_with_fa3_fwd()


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------

def _available(dtype, head_dim=128, heads=8, kv_heads=None):
    return {b.name: b for b in fused_dit_ops.attention_backends("cuda", dtype, head_dim, heads, kv_heads)}


GPU_SMALL = [  # (B, Sq, Sk, H, Hkv, D, causal)
    (2, 128, 128, 8, 8, 128, False),
    (1, 257, 257, 8, 2, 128, False),   # GQA, odd length
    (1, 77, 301, 4, 4, 64, False),     # cross lengths
    (1, 193, 193, 4, 4, 128, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", GPU_SMALL, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", list(disp.BACKENDS))
def test_gpu_backend_vs_float64(backend, shape, dtype):
    B, Sq, Sk, H, Hkv, D, causal = shape
    q, k, v = qkv(B, Sq, H, D, Sk, Hkv, dtype, "cuda")
    why = disp.runtime_reason(backend, disp.runtime_capabilities("cuda"), q, k, v, causal)
    if why is not None:
        with pytest.raises(disp.AttentionBackendError):
            op(q, k, v, None, causal, backend)
        pytest.skip(why.text)
    out = op(q, k, v, None, causal, backend)
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert rel_err(out, oracle(q, k, v, causal=causal)) < 1e-2
    # strided (packed-QKV chunk) inputs give the same answer
    qs, ks, vs = packed_qkv(B, Sq, H, D, dtype, "cuda")
    if Sq == Sk and Hkv == H and disp.runtime_reason(backend, disp.runtime_capabilities("cuda"),
                                                     qs, ks, vs, causal) is None:
        assert rel_err(op(qs, ks, vs, None, causal, backend), oracle(qs, ks, vs, causal=causal)) < 1e-2


def _head_slice_reference(q, k, v, heads=2):
    """float64 reference of the first ``heads`` query heads (and their kv heads), one head at a time."""
    rep = q.shape[2] // k.shape[2]
    outs = [oracle(q[:, :, h:h + 1], k[:, :, h // rep:h // rep + 1], v[:, :, h // rep:h // rep + 1])
            for h in range(heads)]
    return torch.cat(outs, dim=2)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["short", "flux", "qwen-edit", "wan14b"])
def test_gpu_backends_agree_at_real_shapes(shape):
    from fused_dit_ops.shapes import ATTENTION
    s = ATTENTION[shape]
    q, k, v = qkv(s.B, s.N, s.H, s.D, dtype=BF16, device="cuda")
    refh = _head_slice_reference(q, k, v)
    auto = op(q, k, v, None, False, None)
    outs = {}
    for name, st in _available(BF16, s.D, s.H).items():
        if not st.available or (name == "math" and s.N > 4096):
            continue
        outs[name] = op(q, k, v, None, False, name)
        assert rel_err(outs[name][:, :, :2], refh) < 1e-2, name
        assert rel_err(outs[name], auto) < 1e-2, name
    assert len(outs) >= 2, outs.keys()


@pytest.mark.gpu
def test_gpu_fp16_on_fa3_fwd_falls_through():
    caps = disp.runtime_capabilities("cuda")
    if caps.fa3 != "fa3_fwd_interface" or caps.sm[0] != 9:
        pytest.skip(f"needs fa3-fwd on sm90 (fa3 module: {caps.fa3}, sm {caps.sm})")
    q, k, v = qkv(1, 256, 8, 128, dtype=FP16, device="cuda")
    with pytest.warns(disp.AttentionFallbackWarning, match="fp16 not built in fa3-fwd"):
        name = disp.select(q, k, v, False)
    assert name != "fa3"
    assert rel_err(op(q, k, v, None, False, None), oracle(q, k, v)) < 1e-2
    with pytest.raises(disp.AttentionBackendError, match="fp16 not built in fa3-fwd"):
        op(q, k, v, None, False, "fa3")
    qb, kb, vb = qkv(1, 256, 8, 128, dtype=BF16, device="cuda")
    assert disp.select(qb, kb, vb, False) == "fa3"


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    q, k, v = packed_qkv(1, 1000, 8, 128, BF16, "cuda")

    def f(q, k, v):
        return fused_dit_ops.attention(q, k, v) * 2.0

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(q, k, v)
    assert rel_err(got, f(q, k, v)) < 1e-6 and rel_err(got, 2 * oracle(q, k, v)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_gpu_cuda_graph_capture(dtype):
    N, H, D = 1031, 8, 128
    chosen = fused_dit_ops.warmup_attention(seq_lens=(N,), heads=H, head_dim=D, dtype=dtype)
    q, k, v = qkv(1, N, H, D, dtype=dtype, device="cuda")
    op(q, k, v, None, False, None)          # warm this exact key too
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = op(q, k, v, None, False, None)
    for _ in range(2):
        q2, k2, v2 = qkv(1, N, H, D, dtype=dtype, device="cuda")
        q.copy_(q2), k.copy_(k2), v.copy_(v2)
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(out, oracle(q2, k2, v2)) < 1e-2, chosen


@pytest.mark.gpu
def test_gpu_diffusers_processor_and_flash3(restore_diffusers_backend):
    import copy
    model = _tiny_qwen().to("cuda", BF16)
    model2 = copy.deepcopy(model)
    from fused_dit_ops.integrations import diffusers_attention as da
    kw = _qwen_inputs("cuda", BF16)
    import fused_dit_ops as fdo
    with torch.no_grad():
        stock = model(**kw)[0]
        fdo.patch(model, ops="attention")  # the fused attention alone in a diffusers model
        ours = model(**kw)[0]
        fdo.unpatch(model)
    assert rel_err(ours, stock) < 2e-2
    try:
        import fa3_fwd_interface  # noqa: F401
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"fa3-fwd not importable: {e}")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("fa3-fwd needs sm90")
    from diffusers.models import attention_dispatch as ad
    try:
        da.enable_diffusers_flash3_with_fa3_fwd()
        assert ad.flash_attn_3_func is not None, "enable left diffusers' flash_attn_3_func None"
        init_fn = getattr(ad._wrapped_flash_attn_3, "_init_fn", None)
        if init_fn is not None:
            assert init_fn.__globals__ is vars(ad), "diffusers' FA3 wrapper reads another module's globals"
            assert init_fn.__globals__["flash_attn_3_func"] is not None
        model2.set_attention_backend("_flash_3")
        with torch.no_grad():
            fa3 = model2(**kw)[0]
    finally:
        da.disable_diffusers_flash3_with_fa3_fwd()
    assert rel_err(fa3, stock) < 2e-2


# ----------------------------------------------------------------------------------------------
# CPU: runner wiring with stand-in FA modules (checks call signatures and return normalisation)
# ----------------------------------------------------------------------------------------------

def _fake_fa(returns_tuple):
    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, **kw):
        calls.append(dict(scale=softmax_scale, causal=causal, kw=kw))
        out = ref.attention(q, k, v, softmax_scale, causal)
        return (out, None) if returns_tuple else out

    return types.SimpleNamespace(flash_attn_func=flash_attn_func, __name__="fake"), calls


@pytest.mark.parametrize("name", ["fa3", "fa4"])
def test_fa_runner_wiring(monkeypatch, name):
    mod, calls = _fake_fa(returns_tuple=(name == "fa4"))   # FA4 returns (out, lse)
    monkeypatch.setattr(disp, f"_{name}_module", lambda: mod)
    caps = H100_FA4 if name == "fa4" else H100_FA3FWD
    monkeypatch.setattr(disp, "runtime_capabilities", lambda dev: caps)
    monkeypatch.setattr(disp, "_misaligned", lambda *a: False)
    q, k, v = qkv(1, 24, 4, 64, Hkv=2, dtype=BF16)
    out = op(q, k, v, 0.25, True, name)
    assert calls == [dict(scale=0.25, causal=True, kw={})]
    assert out.is_contiguous() and rel_err(out, oracle(q, k, v, 0.25, True)) < 1e-2
    assert disp.select(q, k, v, False) == name               # automatic choice on that machine


def test_sdpa_check_api_on_cpu_tensors():
    """torch's can_use_* run (and refuse CPU tensors with a message): the API call is right."""
    q, k, v = qkv(1, 16, 4, 64, Hkv=2, dtype=BF16)
    for name in ("cudnn", "fa2", "efficient"):
        r = disp._sdpa_reason(name, q, k, v, False)
        if r is not None and r.kind == "probe":
            # a CUDA build of torch without a driver: the check itself raises (AcceleratorError);
            # the backend is then unavailable with that reason (tests/test_backend_probes.py)
            assert r.text.startswith(f"{name}: torch.backends.cuda.{disp._SDPA_CHECK[name]} raised"), r
            continue
        assert r is not None and r.text.startswith(f"{name}: torch SDPA refuses"), r


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_fa3_raw_op_matches_flash_attn_func(causal):
    """The shim calls fa3-fwd's registered forward op directly (no autograd.Function, no custom_op
    wrapper): bit-identical to ``flash_attn_func`` on strided q/k/v views of a packed buffer; with
    grad enabled and inputs that require grad it goes through ``flash_attn_func``."""
    from fused_dit_ops import attention_dispatch as ad
    mod = ad._fa3_module()
    if mod is None or torch.cuda.get_device_capability() != (9, 0) or ad._fa3_raw_forward(mod) is None:
        pytest.skip("fa3-fwd with its registered forward op on an sm90 GPU")
    buf = torch.randn(2, 700, 3, 24, 128, device="cuda", dtype=torch.bfloat16)
    q, k, v = buf.unbind(2)  # row stride 3 * 24 * 128: views, last dim contiguous
    for scale in (None, 0.07):
        with torch.no_grad():
            raw = ad._run_fa3(q, k, v, scale, causal)
            ref = mod.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
        ref = ref[0] if isinstance(ref, tuple) else ref
        assert raw.shape == ref.shape and torch.equal(raw, ref)
    with torch.no_grad():
        raw = ad._run_fa3(q, k, v, None, causal)
    out = ad._run_fa3(q.detach().clone().requires_grad_(), k, v, None, causal)
    assert out.requires_grad and torch.equal(out.detach(), raw)
