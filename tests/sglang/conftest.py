"""Optional SGLang tier (`make test-sglang`, in the venv made by tools/sglang_env.sh).

Without sglang importable, every module here skips (pytest.importorskip at module top), so the
main `make test` is unaffected. With it: puts the import-only triton/torchvision stubs on
sys.path when the real packages are missing, builds a 1-process gloo world and stub server args
(as SGLang's own unit-test conftest does), and applies our plugin once per session, by hand,
before any SGLang model or layer is built.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

HAVE_SGLANG = importlib.util.find_spec("sglang") is not None
STUBS = str(Path(__file__).parent / "stubs")
if HAVE_SGLANG:
    for _mod in ("triton", "torchvision"):
        if importlib.util.find_spec(_mod) is None:
            # The stubs directory holds both; adding it once serves whichever is missing. If one
            # of them is real it is found first only when it precedes STUBS: append, not insert.
            if STUBS not in sys.path:
                sys.path.append(STUBS)
    os.environ.setdefault("SGLANG_PLUGINS", "")  # our tests enable the plugin by hand

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


# --- the tiny Qwen-Image-Edit-2511 DiT ------------------------------------------------------------

class Tiny(SimpleNamespace):
    pass


def build_tiny(rt, dtype, seed=0, *, fa_attention=False):
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
            p.copy_(torch.randn_like(p) * 0.2)
    m = m.to(dtype).eval()
    if fa_attention:
        from sglang.multimodal_gen.runtime.layers.attention.layer import USPAttention
        for mod in m.modules():
            if isinstance(mod, USPAttention):
                mod.attn_impl = rt.flash_attn.FlashAttentionImpl(**mod._attn_impl_ctor_kwargs)
    return m


def set_dispatch(model, rt, hooked_to_cuda: bool):
    """Every CustomOp -> forward_native; the hooked classes -> forward_cuda when asked (what SGLang
    binds on a CUDA platform; here it reaches our hooks on CPU tensors)."""
    from sglang.multimodal_gen.runtime.layers.custom_op import CustomOp
    import pkgutil
    hooked = tuple(pkgutil.resolve_name(rt.plugin.TARGETS[n].rsplit(".", 1)[0])
                   for n in rt.plugin._CUSTOM_OP_CLASSES)
    for mod in model.modules():
        if isinstance(mod, CustomOp):
            mod._forward_method = (mod.forward_cuda if hooked_to_cuda and isinstance(mod, hooked)
                                   else mod.forward_native)


def tiny_inputs(model, rt, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    img_shapes = [[(1, 4, 4), (1, 4, 4)]]
    x = torch.randn(1, 32, 16, generator=g).to(dtype)
    enc = torch.randn(1, 8, 48, generator=g).to(dtype)
    from sglang.multimodal_gen.configs.pipeline_configs.qwen_image import QwenImagePipelineConfig
    freqs_cis, freqs_complex = QwenImagePipelineConfig.get_freqs_cis(
        img_shapes, [8], model.rotary_emb, "cpu", dtype)
    return dict(hidden_states=x, encoder_hidden_states=enc, timestep=torch.tensor([500.0]),
                img_shapes=img_shapes, txt_seq_lens=[8], freqs_cis=freqs_cis,
                freqs_complex=freqs_complex)


def run_tiny(model, inputs):
    from sglang.multimodal_gen.runtime.managers.forward_context import set_forward_context
    with torch.no_grad(), set_forward_context(current_timestep=0, attn_metadata=None):
        out = model(**inputs)
    return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, (tuple, list)) else out)
