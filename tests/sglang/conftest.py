"""Optional SGLang tier (`make test-sglang`, in the venv made by scripts/sglang_env.sh; on a GPU
see docs/sglang.md).

Without sglang importable, every module here skips (:func:`skip_without_sglang`), so the main
`make test` is unaffected; with ``FUSED_DIT_SGLANG_REQUIRED=1`` (set it for a GPU run) a failing
SGLang import is an error instead of a skip. With sglang: puts TEST-ONLY import stubs at the END of
sys.path for what is missing (``stubs/``: triton, torchvision, when not installed; ``stubs_cuda/``:
sgl_kernel, only when SGLang takes its CUDA import branches and no real sgl_kernel is installed),
so real packages always win; builds a 1-process world and stub server args (as SGLang's own
unit-test conftest does), and applies our plugin once per session, by hand, before any SGLang
model or layer is built.

Device parametrization: ``cpu`` always; ``cuda`` marked ``gpu`` and skipped without a CUDA device.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

HAVE_SGLANG = importlib.util.find_spec("sglang") is not None
REQUIRED = os.environ.get("FUSED_DIT_SGLANG_REQUIRED", "0") == "1"
HAVE_CUDA = torch.cuda.is_available()
STUBS = str(Path(__file__).parent / "stubs")
CUDA_STUBS = str(Path(__file__).parent / "stubs_cuda")
# SGLang's multimodal platform is CUDA when a CUDA device is visible (or when forced by this env).
SGLANG_CUDA_PLATFORM = HAVE_CUDA or os.environ.get("SGLANG_DIFFUSION_PLATFORM_OVERRIDE", "").lower() == "cuda"
STUBBED: list[str] = []  # modules served by the test-only stubs in this process


def _install_stubs() -> None:
    for mod in ("triton", "torchvision"):
        if importlib.util.find_spec(mod) is None:
            STUBBED.append(mod)
    if STUBBED and STUBS not in sys.path:
        # Both stubs live in STUBS; appended (not inserted) so a real package is found first.
        sys.path.append(STUBS)
    if SGLANG_CUDA_PLATFORM and importlib.util.find_spec("sgl_kernel") is None:
        STUBBED.append("sgl_kernel")
        if CUDA_STUBS not in sys.path:
            sys.path.append(CUDA_STUBS)


if HAVE_SGLANG:
    _install_stubs()
    os.environ.setdefault("SGLANG_PLUGINS", "")  # our tests enable the plugin by hand


def stub_pythonpath() -> list[str]:
    """The stub directories this process uses (for PYTHONPATH of child processes, at the END)."""
    return [d for d in (STUBS, CUDA_STUBS) if d in sys.path]


def skip_without_sglang() -> None:
    """Module-level guard of every test module here: skip without sglang, unless required."""
    if REQUIRED:
        import sglang.multimodal_gen  # noqa: F401  (an ImportError here is the finding)
        return
    pytest.importorskip("sglang.multimodal_gen",
                        reason="sglang not installed: run `bash scripts/sglang_env.sh && make test-sglang`")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_report_header(config):
    return (f"sglang tier: sglang={'yes' if HAVE_SGLANG else 'no'}, cuda={HAVE_CUDA}, "
            f"sglang CUDA platform={SGLANG_CUDA_PLATFORM}, stubs={STUBBED or 'none'}")


# --- devices, dtypes, sizes -----------------------------------------------------------------------

_NEEDS_GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=_NEEDS_GPU)]
# CPU keeps the original fp32/bf16 pair; on CUDA fp16 too.
_DTYPES = {"cpu": (torch.float32, torch.bfloat16),
           "cuda": (torch.float32, torch.bfloat16, torch.float16)}
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def device_dtype_params(cpu=None, cuda=None):
    """[pytest.param(device, dtype)] for @pytest.mark.parametrize("device,dtype", ...)."""
    out = []
    for dev, dts in (("cpu", cpu or _DTYPES["cpu"]), ("cuda", cuda or _DTYPES["cuda"])):
        for dt in dts:
            out.append(pytest.param(dev, dt, id=f"{dev}-{_SHORT[dt]}",
                                    marks=_NEEDS_GPU if dev == "cuda" else ()))
    return out


# Relative Frobenius error bounds (tests.helpers.rel_err). fp32/bf16 as the op tests; fp16 has 3
# more mantissa bits than bf16. AFTER_RESIDUAL: LayerNorm of a residual sum that SGLang rounds
# twice (gate*x, then + residual) and we once: <= 1 ulp apart before the norm.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
TOL_AFTER_RESIDUAL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@contextlib.contextmanager
def record_fused_dit_ops():
    """Records every ``torch.ops.fused_dit.*`` call that reaches the dispatcher, with the device
    of its first tensor argument: [("norm_scale_shift", "cuda"), ...]. Proof that our op (its CUDA
    kernel for CUDA tensors) ran, not only that a hook counted the call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls: list[tuple[str, str]] = []

    class _Rec(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "fused_dit":
                dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "?")
                calls.append((func._opname, dev))
            return func(*args, **(kwargs or {}))

    with _Rec():
        yield calls


SGLANG_PIN = "0.5.23"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sglang_rt():
    """The SGLang runtime, set up once: gloo world, server args, CPU fallbacks, our plugin applied."""
    import importlib.metadata as md
    assert md.version("sglang") == SGLANG_PIN, f"tests are pinned to sglang=={SGLANG_PIN}"
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                     LOCAL_RANK="0", WORLD_SIZE="1").items():
        os.environ.setdefault(k, v)
    from sglang.multimodal_gen.runtime.server_args import set_global_server_args
    set_global_server_args(SimpleNamespace(
        attention_backend=None, attention_backend_config=None, comfyui_mode=False,
        disable_autocast=False, enable_cfg_parallel=False, enable_breakable_cuda_graph=False,
        enable_layerwise_nvtx_marker=False, enable_torch_compile=False, kv_gather_degree=1,
        sp_split_auto=False, model_loaded={}, model_paths={}, pipeline_config=None))
    from sglang.multimodal_gen.runtime.distributed.parallel_state import (
        maybe_init_distributed_environment_and_model_parallel, model_parallel_is_initialized)
    if not model_parallel_is_initialized():
        maybe_init_distributed_environment_and_model_parallel(tp_size=1, sp_size=1)

    # SGLang's CPU forward_native paths call fuse_scale_shift_kernel, bound at import to the
    # sgl_kernel CPU build (absent here): point it at SGLang's own pure-torch fallback.
    from sglang.kernels.ops.diffusion.common.fallback_torch import fuse_scale_shift_kernel_native
    from sglang.multimodal_gen.runtime.layers import elementwise, layernorm
    layernorm.fuse_scale_shift_kernel = fuse_scale_shift_kernel_native
    elementwise.fuse_scale_shift_kernel = fuse_scale_shift_kernel_native

    from fused_dit_ops.integrations import sglang_plugin as plugin
    plugin.enable()  # by hand, before any model is built
    from sglang.multimodal_gen.runtime.layers import fused_scale_shift_gate as fsg
    from sglang.multimodal_gen.runtime.layers.attention.backends import flash_attn, sdpa
    from sglang.multimodal_gen.runtime.models.dits import qwen_image
    return SimpleNamespace(plugin=plugin, fsg=fsg, layernorm=layernorm, qwen_image=qwen_image,
                           flash_attn=flash_attn, sdpa=sdpa)


@pytest.fixture
def plugin(sglang_rt):
    p = sglang_rt.plugin
    p.reset_stats()
    p._active = True
    yield p
    p._active = True


# --- stand-ins for OUR not-yet-merged ops (never for SGLang code) ------------------------------------

def ref_rope(q, k, cos_sin_cache, positions=None, interleaved=True):
    """Test reference of fused_dit_ops.rope (FlashInfer semantics, fp32 math, in place)."""
    import fused_dit_ops
    if cos_sin_cache.dtype != torch.float32 or cos_sin_cache.dim() != 2:
        raise fused_dit_ops.FusedDitInputError("fused_dit.rope: cos_sin_cache must be fp32 [P, R]")
    L = q.shape[-3]
    R = cos_sin_cache.shape[1]
    pos = torch.arange(L, device=q.device) if positions is None else positions.long()
    cs = cos_sin_cache[pos]  # [L, R] or [B, L, R]
    cos, sin = cs[..., : R // 2].unsqueeze(-2), cs[..., R // 2:].unsqueeze(-2)
    for t in (q, k):
        x = t[..., :R].float()
        if interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)
        else:
            x1, x2 = x[..., : R // 2], x[..., R // 2:]
            out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
        t[..., :R] = out.to(t.dtype)


def ref_attention(q, k, v, softmax_scale=None, causal=False):
    """Test reference of fused_dit_ops.attention ([B, S, H, D] in and out, fp32 math)."""
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(),
        is_causal=causal, scale=softmax_scale, enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2).to(q.dtype)


@pytest.fixture
def our_ops(monkeypatch):
    """fused_dit_ops.rope / .attention: the real ops when merged, else the test references above.

    Returns {"rope": "real"|"test reference", "attention": ...} so tests can say what ran.
    """
    import fused_dit_ops
    which = {}
    for name, ref in (("rope", ref_rope), ("attention", ref_attention)):
        if getattr(fused_dit_ops, name, None) is None:
            monkeypatch.setattr(fused_dit_ops, name, ref, raising=False)
            which[name] = "test reference"
        else:
            which[name] = "real"
    return which


@pytest.fixture
def no_new_ops(monkeypatch):
    """Hide fused_dit_ops.rope / .attention (as on this branch before the merge)."""
    import fused_dit_ops
    for name in ("rope", "attention", "qk_norm_rope_cat"):
        monkeypatch.delattr(fused_dit_ops, name, raising=False)


# --- SGLang's native QK-norm + RoPE (the reference on any device) ------------------------------------

def sglang_native_qk_norm_rope(rt, monkeypatch, q, k, q_norm, k_norm, head_dim, cache, **kw):
    """SGLang's own unfused ``apply_qk_norm_with_optional_rope`` (the function under our hook) on
    its pure-torch path: RMSNorm ``forward_native``, no fused in-place kernel (``allow_inplace=False``
    skips SGLang's JIT qknorm(+rope) kernels, which on CUDA would be taken otherwise), RoPE through
    ``RotaryEmbedding.forward_native`` with flashinfer off (SGLang's torch fallback)."""
    ln = rt.layernorm
    from sglang.multimodal_gen.runtime.layers.rotary_embedding import utils as rope_utils
    monkeypatch.setattr(rope_utils, "flashinfer_apply_rope_inplace", None)
    for n in (q_norm, k_norm):
        n._forward_method = n.forward_native
    is_neox = kw.get("is_neox", False)
    emb = ln.RotaryEmbedding(head_size=head_dim, rotary_dim=head_dim, use_precomputed_cache=False,
                             is_neox_style=is_neox)  # as SGLang makes it lazily, here on forward_native
    emb._forward_method = emb.forward_native
    monkeypatch.setitem(ln._QK_NORM_ROPE_DICT, (head_dim, is_neox), emb)
    return ln.apply_qk_norm_with_optional_rope.__wrapped__(
        q, k, q_norm, k_norm, head_dim, cache, allow_inplace=False, **kw)


# --- the tiny Qwen-Image-Edit-2511 DiT ------------------------------------------------------------

class Tiny(SimpleNamespace):
    pass


def build_tiny(rt, dtype, seed=0, *, fa_attention=False, sdpa_attention=False, device="cpu"):
    """2-block QwenImageEditPlus_2511 DiT with random weights (one seed: the same weights, built in
    fp32 where SGLang builds them, then moved to ``device``/``dtype``). ``fa_attention``/``sdpa_attention``: replace every
    attention impl with SGLang's FlashAttentionImpl (what H100 picks; our hook) / SDPAImpl."""
    from sglang.multimodal_gen.configs.models.dits.qwenimage import QwenImageEditPlus_2511_DitConfig
    cfg = QwenImageEditPlus_2511_DitConfig()
    a = cfg.arch_config
    a.num_layers, a.attention_head_dim, a.num_attention_heads = 2, 32, 2
    a.joint_attention_dim, a.in_channels = 48, 16
    a.axes_dims_rope = (8, 12, 12)
    a.__post_init__()
    torch.manual_seed(seed)
    m = rt.qwen_image.QwenImageTransformer2DModel(cfg, hf_config={})
    with torch.no_grad():  # random, non-zero weights everywhere (zero-init layers hide bugs)
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, device=p.device) * 0.2)
    m = m.to(device=device, dtype=dtype).eval()
    # Plain tensor attributes (not parameters/buffers) stay where SGLang made them: on a CUDA platform
    # e.g. ``timestep_zero`` on get_local_torch_device(). Move them along (dtype unchanged).
    for mod in m.modules():
        for k, v in list(vars(mod).items()):
            if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter) and v.device != torch.device(device):
                setattr(mod, k, v.to(device))
    if fa_attention or sdpa_attention:
        from sglang.multimodal_gen.runtime.layers.attention.layer import USPAttention
        impl = rt.flash_attn.FlashAttentionImpl if fa_attention else rt.sdpa.SDPAImpl
        for mod in m.modules():
            if isinstance(mod, USPAttention):
                mod.attn_impl = impl(**mod._attn_impl_ctor_kwargs)
    return m


def set_dispatch(model, rt, hooked_to_cuda: bool):
    """Every CustomOp -> forward_native; the hooked classes -> forward_cuda when asked (what SGLang
    binds on a CUDA platform; on CPU tensors it reaches our hooks too)."""
    from sglang.multimodal_gen.runtime.layers.custom_op import CustomOp
    import pkgutil
    hooked = tuple(pkgutil.resolve_name(rt.plugin.TARGETS[n].rsplit(".", 1)[0])
                   for n in rt.plugin._CUSTOM_OP_CLASSES)
    for mod in model.modules():
        if isinstance(mod, CustomOp):
            mod._forward_method = (mod.forward_cuda if hooked_to_cuda and isinstance(mod, hooked)
                                   else mod.forward_native)


def tiny_inputs(model, rt, dtype, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    img_shapes = [[(1, 4, 4), (1, 4, 4)]]
    x = torch.randn(1, 32, 16, generator=g).to(device=device, dtype=dtype)
    enc = torch.randn(1, 8, 48, generator=g).to(device=device, dtype=dtype)
    from sglang.multimodal_gen.configs.pipeline_configs.qwen_image import QwenImagePipelineConfig
    freqs_cis, freqs_complex = QwenImagePipelineConfig.get_freqs_cis(
        img_shapes, [8], model.rotary_emb, device, dtype)
    return dict(hidden_states=x, encoder_hidden_states=enc, timestep=torch.tensor([500.0], device=device),
                img_shapes=img_shapes, txt_seq_lens=[8], freqs_cis=freqs_cis,
                freqs_complex=freqs_complex)


def run_tiny(model, inputs):
    from sglang.multimodal_gen.runtime.managers.forward_context import set_forward_context
    with torch.no_grad(), set_forward_context(current_timestep=0, attn_metadata=None):
        out = model(**inputs)
    return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, (tuple, list)) else out)
