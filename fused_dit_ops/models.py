"""Builders for Qwen-Image(-Edit) transformers with random weights, and their inputs (no download).

Shared by the diffusers-patch tests, the ``demo`` command and the block/model benchmarks.

- :func:`build_qwen_image_transformer`: a diffusers ``QwenImageTransformer2DModel`` from a named
  config ("edit-2511", "edit-2509", "edit", "qwen-image": real dims; "tiny": a ~0.3M-parameter
  model that runs in milliseconds on CPU) with weights drawn like a trained model's
  (Linear weights and biases ~ N(0, init_std), norm weights 1 + N(0, 0.1)).
- :func:`make_qwen_inputs`: the keyword arguments of ``model(**kwargs)`` for diffusers 0.42
  (``hidden_states``, ``encoder_hidden_states``, ``encoder_hidden_states_mask`` (None: no
  padding), ``timestep``, ``img_shapes``, ``return_dict=False`` so ``model(**kw)[0]`` is the output).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Sequence

import torch

# Real Qwen-Image transformer dims (diffusers defaults; the checkpoints' config.json files agree).
_REAL = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
             axes_dims_rope=(16, 56, 56))

CONFIGS: dict[str, dict] = {
    # Qwen-Image-Edit-2511: zero_cond_t (reference tokens modulated with t = 0).
    "edit-2511": dict(_REAL, zero_cond_t=True),
    # Qwen-Image-Edit-2509 and Qwen-Image-Edit: same transformer, no zero_cond_t.
    "edit-2509": dict(_REAL, zero_cond_t=False),
    "edit": dict(_REAL, zero_cond_t=False),
    # Qwen-Image (text-to-image).
    "qwen-image": dict(_REAL, zero_cond_t=False),
    # Tiny: 2 heads x 32 (axes 8+12+12 = 32), D = 64, 2 layers; ~0.3M parameters.
    "tiny": dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=32,
                 num_attention_heads=2, joint_attention_dim=32, guidance_embeds=False,
                 axes_dims_rope=(8, 12, 12), zero_cond_t=True),
}


TINY_INIT_STD = 0.2


def _config(table: dict, what: str, config: str, overrides: dict, **counts) -> dict:
    """A copy of ``table[config]`` with the block counts given (not None) and ``overrides`` applied."""
    if config not in table:
        raise ValueError(f"unknown {what}config {config!r}; choose from {sorted(table)}")
    cfg = dict(table[config])
    cfg.update({k: int(v) for k, v in counts.items() if v is not None})
    cfg.update(overrides)
    return cfg


def config_dict(config: str = "edit-2511", num_layers: int | None = None, **overrides) -> dict:
    return _config(CONFIGS, "", config, overrides, num_layers=num_layers)


def is_tiny(model) -> bool:
    """True for small (CPU-sized) models: inner dim below 1024."""
    c = model.config
    return c.num_attention_heads * c.attention_head_dim < 1024


@contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    if dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@torch.no_grad()
def init_like_trained(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter: Linear / Embedding weights and biases ~ N(0, std); norm weights
    ~ 1 + N(0, 0.1) (so QK-norm weights are exercised), norm biases ~ N(0, std). Deterministic in
    ``seed`` (drawn in fp32 on the parameter's device, one generator per parameter, then cast)."""
    for i, (name, p) in enumerate(sorted(model.named_parameters(), key=lambda kv: kv[0])):
        g = torch.Generator(device=p.device).manual_seed(seed * 100_003 + i)
        t = torch.empty(p.shape, dtype=torch.float32, device=p.device)
        leaf = name.rsplit(".", 1)[-1]
        is_norm = "norm" in name and leaf == "weight" and p.dim() == 1
        if is_norm:
            t.normal_(0.0, 0.1, generator=g).add_(1.0)
        else:
            t.normal_(0.0, std, generator=g)
        p.copy_(t.to(p.dtype))
    return model


def _build(cls, cfg, config, device, dtype, init_std, seed):
    """``cls(**cfg)`` built directly on ``device`` in ``dtype``, initialised as trained (``init_std``
    None: ``TINY_INIT_STD`` for the "tiny" config, else 0.02), in eval mode without grad."""
    with torch.device(torch.device(device)), _default_dtype(dtype):
        model = cls(**cfg)
    if init_std is None:
        init_std = TINY_INIT_STD if config == "tiny" else 0.02
    init_like_trained(model, init_std, seed)
    return model.eval().requires_grad_(False)


def build_qwen_image_transformer(config: str = "edit-2511", num_layers: int | None = None, device="cpu",
                                 dtype: torch.dtype = torch.float32, seed: int = 0, init_std: float | None = None,
                                 **overrides):
    """A diffusers ``QwenImageTransformer2DModel`` with random weights (see module doc), in eval mode.

    ``config``: "edit-2511" (zero_cond_t), "edit-2509", "edit", "qwen-image", or "tiny" (zero_cond_t
    on; pass ``zero_cond_t=False`` to turn it off). ``num_layers`` overrides the layer count (real
    configs have 60). Extra keyword arguments override config entries. Built directly on ``device``
    in ``dtype`` (60 real layers are ~20B parameters: ~41 GB in bf16). ``init_std`` default: 0.02
    for real configs; ``TINY_INIT_STD`` for "tiny", whose narrow layers would otherwise make the
    modulation nearly independent of the timestep (and zero_cond_t's index invisible in tests).
    """
    from diffusers import QwenImageTransformer2DModel
    cfg = config_dict(config, num_layers, **overrides)
    return _build(QwenImageTransformer2DModel, cfg, config, device, dtype, init_std, seed)


def _grid(n: int) -> tuple[int, int]:
    """(h, w) with h * w == n, as square as possible (h <= w)."""
    h = int(math.isqrt(n))
    while n % h:
        h -= 1
    return h, n // h


def _as_shape(s) -> tuple[int, int, int]:
    if isinstance(s, int):
        h, w = _grid(s)
        return (1, h, w)
    s = tuple(int(v) for v in s)
    if len(s) != 3:
        raise ValueError(f"an image shape is a token count or (frames, h, w), got {s}")
    return s


def _device_dtype(p: torch.Tensor, device, dtype) -> tuple[torch.device, torch.dtype]:
    """``device`` / ``dtype`` of the inputs: as given, else those of the parameter ``p``."""
    return (torch.device(device) if device is not None else p.device), (dtype or p.dtype)


def _token_defaults(model, img_tokens, txt_len, tiny_imgs: tuple, real_imgs: tuple, real_txt: int):
    """(img_tokens as a sequence, txt_len) with the defaults of a tiny model (7 text tokens) or a real one."""
    tiny = is_tiny(model)
    if img_tokens is None:
        img_tokens = tiny_imgs if tiny else real_imgs
    if isinstance(img_tokens, int):
        img_tokens = (img_tokens,)
    if txt_len is None:
        txt_len = 7 if tiny else real_txt
    return img_tokens, txt_len


def make_qwen_inputs(model, img_tokens: Sequence | None = None, txt_len: int | None = None, batch: int = 1,
                     device=None, dtype: torch.dtype | None = None, seed: int = 0, timestep: float = 0.7,
                     text_mask: bool = False) -> dict:
    """Keyword arguments for ``model(**kw)`` (diffusers 0.42 ``QwenImageTransformer2DModel.forward``).

    ``img_tokens``: the images of one sample, target first then references, each a token count
    (laid out as a near-square (1, h, w) grid of packed latents) or a (frames, h, w) shape. Default:
    (4096, 4096) (a 1024x1024 edit: target + one reference) for real models, (16, 16) for tiny
    ones. With a zero_cond_t model the first image gets index 0 and the others index 1.
    ``txt_len``: text tokens (default 208 real, 7 tiny). ``timestep``: the value in [0, 1] the
    pipelines pass (sigma). ``text_mask``: also pass an all-ones ``encoder_hidden_states_mask``.
    Returns ``return_dict=False``, so ``model(**kw)[0]`` is the [B, L_img, patch^2 * out] output.
    """
    cfg = model.config
    device, dtype = _device_dtype(next(model.parameters()), device, dtype)
    img_tokens, txt_len = _token_defaults(model, img_tokens, txt_len, (16, 16), (4096, 4096), 208)
    shapes = [_as_shape(s) for s in img_tokens]
    L_img = sum(f * h * w for f, h, w in shapes)
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(batch, L_img, cfg.in_channels, generator=g)
    enc = torch.randn(batch, txt_len, cfg.joint_attention_dim, generator=g)
    kw = dict(
        hidden_states=hidden.to(device=device, dtype=dtype),
        encoder_hidden_states=enc.to(device=device, dtype=dtype),
        encoder_hidden_states_mask=(torch.ones(batch, txt_len, dtype=torch.bool, device=device)
                                    if text_mask else None),
        timestep=torch.full((batch,), float(timestep), device=device, dtype=dtype),
        img_shapes=[list(shapes) for _ in range(batch)],
        return_dict=False,
    )
    return kw


# --- Flux.1 (diffusers FluxTransformer2DModel) ----------------------------------------------------

_FLUX_REAL = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                  axes_dims_rope=(16, 56, 56))

FLUX_CONFIGS: dict[str, dict] = {
    # FLUX.1-dev (and Kontext-dev: same transformer): guidance-distilled
    "dev": dict(_FLUX_REAL, guidance_embeds=True),
    # FLUX.1-schnell
    "schnell": dict(_FLUX_REAL, guidance_embeds=False),
    # Tiny: 3 heads x 24 (axes 4+10+10), D = 72, 2 double + 2 single layers; widths not powers of two
    "tiny": dict(patch_size=1, in_channels=20, num_layers=2, num_single_layers=2, attention_head_dim=24,
                 num_attention_heads=3, joint_attention_dim=40, pooled_projection_dim=24, guidance_embeds=True,
                 axes_dims_rope=(4, 10, 10)),
}


def build_flux_transformer(config: str = "dev", num_layers: int | None = None, num_single_layers: int | None = None,
                           device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                           init_std: float | None = None, **overrides):
    """A diffusers ``FluxTransformer2DModel`` with random weights (as :func:`build_qwen_image_transformer`).

    ``config``: "dev" (19 double + 38 single layers, guidance embedding), "schnell", or "tiny".
    ``num_layers`` / ``num_single_layers`` override the block counts."""
    from diffusers import FluxTransformer2DModel
    cfg = _config(FLUX_CONFIGS, "Flux ", config, overrides, num_layers=num_layers,
                  num_single_layers=num_single_layers)
    return _build(FluxTransformer2DModel, cfg, config, device, dtype, init_std, seed)


def _grid_ids(h: int, w: int, first: int, n_axes: int) -> torch.Tensor:
    """Position ids [h * w, n_axes]: (first, row, column, 0, ...)."""
    ids = torch.zeros(h, w, n_axes)
    ids[..., 0] = first
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, n_axes)


def flux_ids(h: int, w: int, first: int = 0) -> torch.Tensor:
    """Image position ids [h * w, 3] as the Flux pipelines make them: (first, row, column)."""
    return _grid_ids(h, w, first, 3)


def make_flux_inputs(model, img_tokens: Sequence | None = None, txt_len: int | None = None, batch: int = 1,
                     device=None, dtype: torch.dtype | None = None, seed: int = 0, timestep: float = 0.7,
                     guidance: float = 3.5) -> dict:
    """Keyword arguments for ``model(**kw)`` (diffusers 0.42 ``FluxTransformer2DModel.forward``).

    ``img_tokens``: token counts of the images, target first; a second image is a reference (Kontext:
    ids with first coordinate 1). Default (4096,) real (1024 x 1024), (15,) tiny. ``txt_len``:
    default 512 real, 7 tiny. ``return_dict=False``: ``model(**kw)[0]`` is the output."""
    cfg = model.config
    device, dtype = _device_dtype(next(model.parameters()), device, dtype)
    img_tokens, txt_len = _token_defaults(model, img_tokens, txt_len, (15,), (4096,), 512)
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.cat([flux_ids(*_grid(int(n)), first=k) for k, n in enumerate(img_tokens)], 0)
    L_img = ids.shape[0]
    kw = dict(
        hidden_states=torch.randn(batch, L_img, cfg.in_channels, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, txt_len, cfg.joint_attention_dim, generator=g).to(device, dtype),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(device, dtype),
        timestep=torch.full((batch,), float(timestep), device=device, dtype=dtype),
        img_ids=ids.to(device),
        txt_ids=torch.zeros(txt_len, 3, device=device),
        guidance=(torch.full((batch,), float(guidance), device=device, dtype=dtype)
                  if cfg.guidance_embeds else None),
        return_dict=False,
    )
    return kw


# --- FLUX.2 (diffusers Flux2Transformer2DModel) ---------------------------------------------------

_FLUX2_REAL = dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
                   num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256,
                   mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=True)

FLUX2_CONFIGS: dict[str, dict] = {
    # FLUX.2-dev: 8 double + 48 single blocks, C 6144 = 48 x 128, SwiGLU MLP 18432, guidance-distilled
    "dev": dict(_FLUX2_REAL),
    # Tiny: 3 heads x 24 (axes 6+6+6+6), C = 72, MLP 216, 2 double + 2 single layers; not powers of two
    "tiny": dict(patch_size=1, in_channels=20, num_layers=2, num_single_layers=2, attention_head_dim=24,
                 num_attention_heads=3, joint_attention_dim=40, timestep_guidance_channels=48, mlp_ratio=3.0,
                 axes_dims_rope=(6, 6, 6, 6), rope_theta=2000, guidance_embeds=True),
}


def build_flux2_transformer(config: str = "dev", num_layers: int | None = None,
                            num_single_layers: int | None = None, device="cpu", dtype: torch.dtype = torch.float32,
                            seed: int = 0, init_std: float | None = None, **overrides):
    """A diffusers ``Flux2Transformer2DModel`` with random weights (as :func:`build_qwen_image_transformer`).

    ``config``: "dev" (8 double + 48 single layers: ~32B parameters, ~64 GB in bf16) or "tiny".
    ``num_layers`` / ``num_single_layers`` override the block counts."""
    from diffusers import Flux2Transformer2DModel
    cfg = _config(FLUX2_CONFIGS, "FLUX.2 ", config, overrides, num_layers=num_layers,
                  num_single_layers=num_single_layers)
    return _build(Flux2Transformer2DModel, cfg, config, device, dtype, init_std, seed)


def flux2_ids(h: int, w: int, t: int = 0) -> torch.Tensor:
    """Image position ids [h * w, 4] as the FLUX.2 pipelines make them: (t, row, column, 0); the
    target image has t 0, reference image i t = 10 + 10 * i."""
    return _grid_ids(h, w, t, 4)


def make_flux2_inputs(model, img_tokens: Sequence | None = None, txt_len: int | None = None, batch: int = 1,
                      device=None, dtype: torch.dtype | None = None, seed: int = 0, timestep: float = 0.7,
                      guidance: float = 4.0) -> dict:
    """Keyword arguments for ``model(**kw)`` (diffusers 0.42 ``Flux2Transformer2DModel.forward``).

    ``img_tokens``: token counts of the images, target first, then reference images (ids with t = 10,
    20, ...). Default (4096,) real (1024 x 1024), (15,) tiny. ``txt_len``: default 512 real, 7 tiny
    (text ids (0, 0, 0, l)). ``return_dict=False``: ``model(**kw)[0]`` is the output."""
    cfg = model.config
    device, dtype = _device_dtype(next(model.parameters()), device, dtype)
    img_tokens, txt_len = _token_defaults(model, img_tokens, txt_len, (15,), (4096,), 512)
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.cat([flux2_ids(*_grid(int(n)), t=10 * k) for k, n in enumerate(img_tokens)], 0)
    txt_ids = torch.zeros(txt_len, 4)
    txt_ids[:, 3] = torch.arange(txt_len)
    kw = dict(
        hidden_states=torch.randn(batch, ids.shape[0], cfg.in_channels, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, txt_len, cfg.joint_attention_dim, generator=g).to(device, dtype),
        timestep=torch.full((batch,), float(timestep), device=device, dtype=dtype),
        img_ids=ids.to(device),
        txt_ids=txt_ids.to(device),
        guidance=(torch.full((batch,), float(guidance), device=device, dtype=dtype)
                  if cfg.guidance_embeds else None),
        return_dict=False,
    )
    return kw


# --- Wan 2.1 / 2.2 (diffusers WanTransformer3DModel) -------------------------------------------------

_WAN_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
_WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=24, in_channels=12, out_channels=12,
                 text_dim=40, freq_dim=32, ffn_dim=104, num_layers=2, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)

WAN_CONFIGS: dict[str, dict] = {
    # Wan2.1 T2V-14B; Wan2.2 T2V-A14B's two experts have this transformer each
    "t2v-14b": dict(_WAN_14B),
    "a14b": dict(_WAN_14B),
    # Wan2.1 I2V-14B: image context (CLIP features, 1280) through added K/V projections
    "i2v-14b": dict(_WAN_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120),
    # Wan2.1 T2V-1.3B
    "t2v-1.3b": dict(_WAN_14B, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    # Wan2.2 TI2V-5B: per-token timesteps (0 on the conditioning frame)
    "ti2v-5b": dict(_WAN_14B, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48,
                    out_channels=48),
    # Tiny: 3 heads x 24 (RoPE axes 8 + 8 + 8), C = 72, MLP 104, 2 layers; widths not powers of two
    "tiny": dict(_WAN_TINY),
    "tiny-i2v": dict(_WAN_TINY, image_dim=24, added_kv_proj_dim=72),
    "tiny-ti2v": dict(_WAN_TINY),
}


def build_wan_transformer(config: str = "t2v-14b", num_layers: int | None = None, device="cpu",
                          dtype: torch.dtype = torch.float32, seed: int = 0, init_std: float | None = None,
                          keep_fp32: bool = True, **overrides):
    """A diffusers ``WanTransformer3DModel`` with random weights (as :func:`build_qwen_image_transformer`).

    ``config``: one of :data:`WAN_CONFIGS` ("t2v-14b", "a14b" (one expert), "i2v-14b", "t2v-1.3b",
    "ti2v-5b", "tiny", "tiny-i2v", "tiny-ti2v"). ``keep_fp32``: the parameters of the model's
    ``_keep_in_fp32_modules`` (modulation tables, norms, time embedder) stay fp32 as
    ``from_pretrained(torch_dtype=...)`` keeps them."""
    from diffusers import WanTransformer3DModel
    cfg = _config(WAN_CONFIGS, "Wan ", config, overrides, num_layers=num_layers)
    m = _build(WanTransformer3DModel, cfg, "tiny" if config.startswith("tiny") else config, device, dtype,
               init_std, seed)
    if keep_fp32 and dtype != torch.float32:
        keep = set(m._keep_in_fp32_modules or ())
        with torch.no_grad():
            for name, p in m.named_parameters():
                if keep & set(name.split(".")):
                    p.data = p.data.float()
    return m


def wan_latent_shape(model, frames=None, height=None, width=None):
    """(frames, height, width) of the latent: default 21 x 60 x 104 (480p, 81 frames: 32760 tokens) for
    real models, 3 x 6 x 10 (45 tokens) for tiny ones."""
    tiny = is_tiny(model)
    return (frames or (3 if tiny else 21), height or (6 if tiny else 60), width or (10 if tiny else 104))


def make_wan_inputs(model, latent: Sequence | None = None, txt_len: int | None = None, batch: int = 1, device=None,
                    dtype: torch.dtype | None = None, seed: int = 0, timestep: float = 700.0,
                    per_token: bool | None = None, image_tokens: int | None = None) -> dict:
    """Keyword arguments for ``model(**kw)`` (diffusers 0.42 ``WanTransformer3DModel.forward``).

    ``latent``: (frames, height, width) of the latent video (default :func:`wan_latent_shape`);
    ``txt_len``: text tokens (512; 7 for tiny models without an image context); ``timestep`` in
    [0, 1000]. ``per_token`` (default: True for models with 48 input channels, TI2V-5B): a [B, L]
    timestep with 0 on the first latent frame's tokens and ``timestep`` elsewhere, as the Wan2.2
    TI2V pipeline passes it.
    Models with an image context (I2V) get ``encoder_hidden_states_image`` of ``image_tokens``
    tokens (257 real, 3 tiny)."""
    cfg = model.config
    # (the first parameters are fp32 tables: _keep_in_fp32_modules)
    device, dtype = _device_dtype(model.patch_embedding.weight, device, dtype)
    tiny = is_tiny(model)
    F_, H, W = tuple(latent) if latent is not None else wan_latent_shape(model)
    if txt_len is None:
        # the cross-attention takes the last 512 context tokens as text, the rest as image context (I2V)
        txt_len = 7 if tiny and cfg.image_dim is None else 512
    if per_token is None:
        per_token = cfg.in_channels == 48
    g = torch.Generator(device="cpu").manual_seed(seed)
    kw = dict(
        hidden_states=torch.randn(batch, cfg.in_channels, F_, H, W, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, txt_len, cfg.text_dim, generator=g).to(device, dtype),
        return_dict=False,
    )
    pt, ph, pw = cfg.patch_size
    L = (F_ // pt) * (H // ph) * (W // pw)
    if per_token:
        first = (H // ph) * (W // pw)
        ts = torch.full((L,), float(timestep))
        ts[:first] = 0.0
        kw["timestep"] = ts.unsqueeze(0).expand(batch, -1).to(device)
    else:
        kw["timestep"] = torch.full((batch,), float(timestep), device=device)
    if cfg.image_dim is not None:
        n = image_tokens or (3 if tiny else 257)
        kw["encoder_hidden_states_image"] = torch.randn(batch, n, cfg.image_dim, generator=g).to(device, dtype)
    return kw


def build_model_and_inputs(family: str, config: str, layers: int | None, img_tokens=None, txt_len=None,
                           device="cpu", dtype: torch.dtype = torch.float32, batch: int = 1, seed: int = 0):
    """(model, inputs) of a family ("qwen", "flux", "flux2" or "wan") for the demo and the benchmarks. Flux:
    ``layers`` double-stream blocks and twice as many single-stream blocks (the real ratio, 19 + 38;
    GPU default 2 + 4). FLUX.2: ``layers`` double-stream blocks and six times as many single-stream
    blocks (the real ratio, 8 + 48; GPU default 1 + 6)."""
    if family == "qwen":
        m = build_qwen_image_transformer(config, num_layers=layers, device=device, dtype=dtype, seed=seed)
        return m, make_qwen_inputs(m, img_tokens=img_tokens, txt_len=txt_len, device=device, dtype=dtype,
                                   batch=batch, seed=seed)
    if family in ("flux", "flux2"):
        # (configs, builder, inputs, default double-stream blocks, single-stream blocks per double-stream one)
        table, build, make, default_layers, ratio = (
            (FLUX_CONFIGS, build_flux_transformer, make_flux_inputs, 2, 2) if family == "flux" else
            (FLUX2_CONFIGS, build_flux2_transformer, make_flux2_inputs, 1, 6))
        if config not in table:
            config = "dev"
        if layers is None and config != "tiny":
            layers = default_layers
        single = None if layers is None else ratio * int(layers)
        m = build(config, num_layers=layers, num_single_layers=single, device=device, dtype=dtype, seed=seed)
        return m, make(m, img_tokens=img_tokens, txt_len=txt_len, device=device, dtype=dtype, batch=batch,
                       seed=seed)
    if family == "wan":
        if config not in WAN_CONFIGS:
            config = "t2v-14b"
        if layers is None and not config.startswith("tiny"):
            layers = 2
        m = build_wan_transformer(config, num_layers=layers, device=device, dtype=dtype, seed=seed)
        latent = img_tokens if isinstance(img_tokens, (tuple, list)) and len(img_tokens) == 3 else None
        return m, make_wan_inputs(m, latent=latent, txt_len=txt_len, device=device, dtype=dtype, batch=batch,
                                  seed=seed, per_token=True if config.endswith("ti2v") else None)
    raise ValueError(f"unknown model family {family!r}; choose qwen, flux, flux2 or wan")
