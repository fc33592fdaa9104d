"""The baseline FP8 recipe the benches and tests compare ``patch(precision="fp8")`` against.

torchao's "float8 dynamic activation + float8 weight, per-row granularity" scheme, written plainly in
PyTorch so that it needs no torchao: each Linear of the transformer blocks (all but the modulation
Linears) gets its weight quantised once, per output channel (``amax / 448``, e4m3), and at every call
quantises its input per token (``amax / 448``, divide, cast) before ``torch._scaled_mm`` with the two
row-wise scales. The activation quantisation is separate torch ops; under ``torch.compile`` inductor
fuses it as far as it can, which is the torchao setting ("per-row, compiled"). torchao's default is
fast accumulation (``torch._scaled_mm(..., use_fast_accum=True)``: on Hopper the tensor-core partial
sums are not promoted to fp32 at intervals along K), and :func:`install` defaults to it too;
``install(..., fast_accum=False)`` gives the fp32-promoted accumulation that ``patch(precision="fp8",
fp8_fast_accum=False)`` uses (``patch``'s default is fast accumulation, as torchao's).

:func:`install` sets instance ``forward`` s on the Linears and returns a handle; :func:`remove`
undoes it exactly (the bf16 weights are never touched).
"""
from __future__ import annotations

import types

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
ATTR = "_fused_dit_fp8_recipe"


def block_linears(block: torch.nn.Module) -> list[torch.nn.Linear]:
    """The Linears of a transformer block that the recipe quantises: every ``nn.Linear`` except the
    modulation ones (a name part containing "mod" or "norm": Qwen's ``img_mod``, Flux's
    ``norm1.linear``), with in and out features multiples of 16 (``_scaled_mm``'s rule)."""
    out = []
    for name, m in block.named_modules():
        if type(m) is not torch.nn.Linear:
            continue
        parts = name.split(".")
        if any("mod" in p or "norm" in p for p in parts):
            continue
        if m.in_features % 16 or m.out_features % 16:
            continue
        out.append(m)
    return out


def _forward(self, x):
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    pad = (-m) % 16  # _scaled_mm with row-wise scales wants the token rows a multiple of 16 on CUDA
    xs = x2.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
    xq = (x2.float() / xs).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    if pad:
        xq = torch.nn.functional.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(E4M3)
        xs = torch.nn.functional.pad(xs, (0, 0, 0, pad), value=1.0)
    y = torch._scaled_mm(xq, self._fp8_recipe_w.t(), scale_a=xs, scale_b=self._fp8_recipe_s.t(),
                         bias=self.bias, out_dtype=x.dtype, use_fast_accum=self._fp8_recipe_fast_accum)
    if pad:
        y = y[:m]
    return y.view(*lead, -1)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight [N, K], fp32 scale [N, 1]): per output channel, ``amax / 448``."""
    s = w.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
    return (w.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), s


def install(model: torch.nn.Module, blocks=None, linears=None, fast_accum: bool = True) -> list[torch.nn.Linear]:
    """Put the recipe on the Linears of ``blocks`` (default: every block list of the model:
    ``transformer_blocks``, ``single_transformer_blocks``, ``blocks``), or on exactly ``linears``.
    ``fast_accum``: ``torch._scaled_mm``'s ``use_fast_accum`` (torchao's default, True). Returns the
    Linears."""
    if getattr(model, ATTR, None):
        raise RuntimeError("the FP8 recipe is already installed on this model")
    if linears is not None:
        lins = list(linears)
    else:
        if blocks is None:
            blocks = [b for name in ("transformer_blocks", "single_transformer_blocks", "blocks")
                      for b in (getattr(model, name, None) or [])]
        lins = [lin for b in blocks for lin in block_linears(b)]
    for lin in lins:
        w, s = quantize_weight(lin.weight.detach())
        lin._fp8_recipe_w, lin._fp8_recipe_s = w, s
        lin._fp8_recipe_fast_accum = bool(fast_accum)
        lin.forward = types.MethodType(_forward, lin)
    setattr(model, ATTR, lins)
    return lins


def remove(model: torch.nn.Module) -> None:
    """Undo :func:`install` (no-op when it is not installed)."""
    for lin in getattr(model, ATTR, None) or []:
        del lin.forward
        del lin._fp8_recipe_w, lin._fp8_recipe_s, lin._fp8_recipe_fast_accum
    if hasattr(model, ATTR):
        delattr(model, ATTR)
