"""Model configurations shared by ``profile``, ``bench block`` and ``bench model``.

A configuration is applied to a model in place and undone afterwards, so one copy of the weights
serves every configuration (the 60-layer bf16 model is ~41 GB):

- ``stock``: the diffusers model as built;
- ``patched``: ``fused_dit_ops.patch(model)``;
- ``stock-compile`` / ``patched-compile``: the same, then regional compilation of the transformer
  blocks (diffusers' ``compile_repeated_blocks``: one block compiled once, reused by every layer);
- ``stock-cudagraphs`` / ``patched-cudagraphs``: the same, then the whole transformer compiled with
  ``torch.compile(model, mode="reduce-overhead")`` (CUDA graphs: no host time per kernel at replay;
  regional compilation with CUDA graphs does not run the patched model). Whole-model forwards only
  (``bench model``).

``X-eager`` is accepted as a synonym of ``X``.
"""
from __future__ import annotations

import torch

CONFIGS = ("stock", "patched", "stock-compile", "patched-compile", "stock-cudagraphs", "patched-cudagraphs")


def normalize(name: str) -> str:
    n = name.strip().lower().replace("_", "-")
    if n.endswith("-eager"):
        n = n[: -len("-eager")]
    if n == "compile":
        n = "stock-compile"
    if n not in CONFIGS:
        raise ValueError(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)} "
                         "(or stock-eager / patched-eager)")
    return n


def is_patched(name: str) -> bool:
    return normalize(name.partition("+")[0]).startswith("patched")


def is_compiled(name: str) -> bool:
    """Regional compilation (``*-compile``)."""
    return normalize(name.partition("+")[0]).endswith("compile")


def is_cudagraphs(name: str) -> bool:
    """The whole model under ``torch.compile(mode="reduce-overhead")`` (``*-cudagraphs``)."""
    return normalize(name.partition("+")[0]).endswith("cudagraphs")


def whole_model_only(name: str, who: str) -> None:
    """Raise ValueError for a ``*-cudagraphs`` configuration where one block is run or profiled alone."""
    if is_cudagraphs(name):
        raise ValueError(f"{who}: {name!r} compiles the whole model with CUDA graphs; it applies to whole "
                         "forwards only (python -m fused_dit_ops bench model)")


def _patch_api():
    """(patch with the A/B switches of MODIFIERS, unpatch)."""
    import fused_dit_ops
    unpatch = getattr(fused_dit_ops, "unpatch", None)
    try:
        from fused_dit_ops.integrations.engine import patch_ab
    except ImportError:
        patch_ab = None
    if patch_ab is None or unpatch is None:
        raise RuntimeError("fused_dit_ops.patch()/unpatch() are not available in this checkout; "
                           "use the stock configurations")
    return patch_ab, unpatch


def patch_available() -> bool:
    try:
        _patch_api()
        return True
    except RuntimeError:
        return False


def compile_blocks(model, fullgraph: bool = True) -> str:
    """Regional compilation of the repeated blocks; returns how it was done."""
    if getattr(model, "_repeated_blocks", None) and hasattr(model, "compile_repeated_blocks"):
        model.compile_repeated_blocks(fullgraph=fullgraph)
        return "compile_repeated_blocks"
    for block in model.transformer_blocks:
        block.compile(fullgraph=fullgraph)
    return "block.compile"


def uncompile(model) -> None:
    """Undo ``nn.Module.compile`` on every submodule and drop dynamo's caches."""
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    torch._dynamo.reset()


# "patched-eager+nopack+nomlp": patch options for A/B runs of the benches, one word each
MODIFIERS = {
    "noreuse": {"reuse_mod": False},  # every forward runs its modulation GEMVs
    "nopack": {"pack_qkv": False},  # joint_linear concatenates the q/k/v weights per call instead of packed ones
    "nomlp": {"ops": ("modulation", "qk_norm_rope", "attention")},  # stock FeedForward (GELU kernel)
    "nodual": {"dual_launch": False},  # one launch per stream for each norm op
    "nolookahead": {"lookahead": False},  # each block does its own norm1 + modulation
    "fp8": {"precision": "fp8"},  # the block Linears as FP8 e4m3 GEMMs (integrations/fp8.py)
    # with +fp8: those GEMMs without fast accumulation (patch's default is torch._scaled_mm's use_fast_accum)
    "slowaccum": {"fp8_fast_accum": False},
    # stock providers only: the baseline FP8 recipe (torchao's per-row dynamic scheme in plain PyTorch,
    # bench/fp8_recipe.py) on the block Linears, e.g. stock-compile+fp8recipe; with fast accumulation,
    # torchao's default (fp8recipeslow: use_fast_accum=False)
    "fp8recipe": {"fp8_recipe": True},
    "fp8recipeslow": {"fp8_recipe": True, "fp8_recipe_fast_accum": False},
    # Wan: per-token timesteps (TI2V-5B) projected per token and modulated per token in torch, instead of
    # collapsed to two parameter sets + an index (diffusers_wan.set_timestep_collapse)
    "nocollapse": {"timestep_collapse": False},
    "fp8attn": {"attention_precision": "fp8"},  # the joint attention on e4m3 q/k/v (integrations/fp8_attention.py)
}
STOCK_MODIFIERS = ("fp8recipe", "fp8recipeslow")
# options of MODIFIERS set after patch() rather than passed to it
_AFTER_PATCH = ("timestep_collapse",)


def split_modifiers(provider: str) -> tuple[str, dict]:
    """("patched-eager", patch kwargs) from "patched-eager+nopack+..."; modifiers need a patched
    provider. Raises ValueError naming the unknown modifier and the known ones."""
    base, *mods = provider.strip().split("+")
    kwargs: dict = {}
    for m in mods:
        if m not in MODIFIERS:
            raise ValueError(f"unknown provider modifier {m!r} in {provider!r} (known: "
                             f"{', '.join('+' + k for k in MODIFIERS)})")
        kwargs.update(MODIFIERS[m])
    stock_ok = all(m in STOCK_MODIFIERS for m in mods)
    patched = normalize(base).startswith("patched")
    if mods and not patched and not stock_ok:
        raise ValueError(f"provider {provider!r}: modifiers other than "
                         f"{', '.join('+' + m for m in STOCK_MODIFIERS)} apply to patched providers only")
    if patched and any(m in STOCK_MODIFIERS for m in mods):
        raise ValueError(f"provider {provider!r}: {', '.join('+' + m for m in STOCK_MODIFIERS)} "
                         "applies to stock providers only")
    if "slowaccum" in mods and "fp8" not in mods:
        raise ValueError(f"provider {provider!r}: +slowaccum (fp8_fast_accum=False) applies to the FP8 GEMMs and "
                         "needs +fp8")
    return base, kwargs


def options_row(opts: dict) -> dict:
    """``{"patch_options": opts}`` (JSON-ready) for a result row, or {} without modifiers."""
    return {"patch_options": {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}} if opts else {}


def apply(model, name: str, *, fullgraph: bool = True, reuse_mod: bool = False, **patch_kwargs) -> dict:
    """Put ``model`` into configuration ``name`` (in place). Returns a small info dict.

    ``reuse_mod`` (patched): let a forward reuse the previous forward's modulation GEMVs when the
    temb is equal. Off by default: callers that repeat one identical forward (demo, profile) would
    otherwise time a forward without its GEMVs; ``bench model``, whose steps have their own
    timesteps as a sampler's do, turns it on (cond computes, uncond reuses). ``patch_kwargs``:
    further :func:`fused_dit_ops.patch` options and the A/B switches of
    ``fused_dit_ops.integrations.engine.patch_ab`` (see :data:`MODIFIERS`)."""
    name = normalize(name)
    info: dict = {"config": name}
    recipe = patch_kwargs.pop("fp8_recipe", False)
    recipe_fast = patch_kwargs.pop("fp8_recipe_fast_accum", True)
    if recipe:
        from . import fp8_recipe
        info["fp8_recipe"] = (f"{len(fp8_recipe.install(model, fast_accum=recipe_fast))} Linears, "
                              f"use_fast_accum={recipe_fast}")
    if is_patched(name):
        patch, unpatch = _patch_api()
        after = {k: patch_kwargs.pop(k) for k in _AFTER_PATCH if k in patch_kwargs}
        report = patch(model, reuse_mod=reuse_mod, **patch_kwargs)
        if "timestep_collapse" in after:
            from ..integrations import diffusers_wan
            try:
                diffusers_wan.set_timestep_collapse(model, after["timestep_collapse"])
            except ValueError as e:
                unpatch(model)
                raise ValueError(f"+nocollapse: {e}") from None
        info["patch"] = str(report)
    if is_compiled(name):
        info["compile"] = compile_blocks(model, fullgraph=fullgraph)
    if is_cudagraphs(name):
        model.compile(mode="reduce-overhead")
        info["compile"] = 'torch.compile(model, mode="reduce-overhead")'
    return info


def reset(model, name: str) -> None:
    """Undo :func:`apply` (uncompile, then unpatch)."""
    name = normalize(name)
    if is_compiled(name) or is_cudagraphs(name):
        uncompile(model)
    from . import fp8_recipe
    fp8_recipe.remove(model)
    if is_patched(name):
        _, unpatch = _patch_api()
        unpatch(model)


def parse_tokens(spec) -> tuple:
    """"4096,4096" -> (4096, 4096); ints pass through."""
    if spec is None:
        return None
    if isinstance(spec, (tuple, list)):
        return tuple(int(v) for v in spec)
    return tuple(int(v) for v in str(spec).split(",") if v.strip())


def resolve_device(device: str | None, tiny: bool, prog: str) -> str | None:
    """The device a benchmark runs on, or None (after printing why) when it cannot run: real
    shapes need CUDA; ``--tiny`` runs the tiny config anywhere (a smoke run, not a measurement)."""
    import sys
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: needs a CUDA GPU (torch.cuda.is_available() is False); "
              "for a CPU smoke run use --device cpu --tiny", file=sys.stderr)
        return None
    if torch.device(device).type != "cuda" and not tiny:
        print(f"{prog}: real shapes need a CUDA GPU; for a CPU smoke run use --device cpu --tiny",
              file=sys.stderr)
        return None
    return device


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (fp32)."""
    out, ref = out.float(), ref.float()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def parse_providers(spec: str, who: str) -> list[str]:
    """Comma list of provider names, validated; patched ones dropped (with a message) when
    ``fused_dit_ops.patch`` is unavailable."""
    import sys
    providers = [p.strip() for p in spec.split(",") if p.strip()]
    for p in providers:
        split_modifiers(p)  # a bad name or "+modifier" fails here, before any model is built
    if any(is_patched(p) for p in providers) and not patch_available():
        print(f"{who}: fused_dit_ops.patch() is not available; dropping the patched providers", file=sys.stderr)
        providers = [p for p in providers if not is_patched(p)]
    return providers


def report_target(row: dict | None, key: str, shape: dict, benchmark_shape: dict, target_ms: float,
                  target_ratio: float, device, what: str, quiet: bool = False) -> dict:
    """:func:`target_verdict` for the patched-eager ``row`` (time in ``row[key]`` ms), printed as one
    line unless ``quiet`` or there is no row."""
    dev = torch.device(device)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    ratio = row.get("ratio_vs_stock_compile") if row else None
    v = target_verdict(shape, benchmark_shape, row[key] if row else None, ratio, target_ms, target_ratio, gpu)
    if row is not None and not quiet:
        met = {True: "met", False: "NOT met", None: "no verdict"}[v["target_met"]]
        print(f"target: {what} on an H100 ({v['target_basis']}): {met} ({row[key]:.3f} ms, ratio "
              f"{ratio if ratio is not None else float('nan'):.3f})")
    return v


def target_verdict(shape: dict, benchmark_shape: dict, ms: float | None, ratio: float | None,
                   target_ms: float, target_ratio: float, gpu: str | None) -> dict:
    """The issue's verdict on a run. Its targets are absolute times on an H100 at the benchmark
    shape; on another GPU only the ratio to stock compile on the same GPU compares (the H100
    target's own ratio: e.g. 4.3 / 4.93 ms for the block). Off the benchmark shape there is no
    verdict. Returns {"target_met": True/False/None, "target_basis": why}."""
    off = {k: shape.get(k) for k, v in benchmark_shape.items() if shape.get(k) != v}
    if off:
        return {"target_met": None, "target_basis": f"n/a: not the benchmark shape ({off} instead of "
                                                     f"{ {k: benchmark_shape[k] for k in off} })"}
    if ms is None:
        return {"target_met": None, "target_basis": "n/a: no patched time"}
    if gpu and "H100" in gpu:
        return {"target_met": ms <= target_ms, "target_basis": f"absolute on an H100: <= {target_ms:g} ms"}
    if gpu is None or ratio is None:
        return {"target_met": None, "target_basis": f"n/a on {gpu or 'this device'}: the H100 times do not "
                                                    "apply and no stock-compile row gives the ratio"}
    return {"target_met": ratio <= target_ratio,
            "target_basis": f"ratio to stock compile on {gpu}: <= {target_ratio:.3f} (the H100 target's ratio)"}
