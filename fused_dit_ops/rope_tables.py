"""RoPE table builders: fp32 ``cos_sin_cache`` [L, R] tables (cos of R/2 frequencies, then sin).

A per-token table (row l serves token l, ``positions = arange(L)``) expresses any multi-axis RoPE:
the rope ops just gather row ``positions[l]``. These builders reproduce the model code:

- :func:`qwen_image_rope_tables`: diffusers ``QwenEmbedRope(theta=10000, axes_dim=(16, 56, 56),
  scale_rope=True)`` output, converted to cos|sin (angles in fp32 exactly as diffusers computes
  them, so the tables equal its complex64 freqs up to cos/sin rounding);
- :func:`cos_sin_from_complex`: any complex freqs tensor [..., R/2] -> fp32 [..., R] (and
  :func:`complex_from_cos_sin` back);
- :func:`flux_rope_table`: diffusers ``FluxPosEmbed(theta=10000, axes_dim=(16, 56, 56))`` for
  position ids [S, 3] (angles in float64, as diffusers does on CUDA/CPU).
"""
from __future__ import annotations

from typing import Sequence

import torch

QWEN_AXES = (16, 56, 56)
QWEN_THETA = 10000


def cos_sin_from_complex(freqs: torch.Tensor) -> torch.Tensor:
    """Complex freqs [..., R/2] (e^{i angle}) -> fp32 [..., R] = cat(cos, sin), contiguous."""
    if not torch.is_complex(freqs):
        raise TypeError(f"cos_sin_from_complex: 'freqs' must be a complex tensor, got {freqs.dtype}")
    return torch.cat([freqs.real, freqs.imag], dim=-1).to(torch.float32).contiguous()


def complex_from_cos_sin(table: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`cos_sin_from_complex`: fp32 [..., R] cos|sin -> complex64 [..., R/2]."""
    if torch.is_complex(table) or table.shape[-1] % 2:
        raise TypeError(f"complex_from_cos_sin: 'table' must be a real [..., R] tensor with even R, got "
                        f"{table.dtype} {tuple(table.shape)}")
    c, s = table.float().chunk(2, dim=-1)
    return torch.complex(c, s)


def _inv_freq(dim: int, theta: float) -> torch.Tensor:
    # diffusers QwenEmbedRope.rope_params: 1 / theta ** (arange(0, dim, 2) / dim), fp32
    return 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float32).div(dim))


def _angles(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    # torch.outer(int index, fp32 inv_freq) promotes to fp32, as in diffusers
    return torch.outer(pos.to(torch.float32), _inv_freq(dim, theta))


def qwen_image_rope_angles(img_shapes, txt_len: int, axes_dim: Sequence[int] = QWEN_AXES,
                           theta: float = QWEN_THETA, scale_rope: bool = True):
    """(img_angles [L_img, R/2], txt_angles [txt_len, R/2]) fp32, R = sum(axes_dim).

    ``img_shapes``: the (frame, height, width) grids of the images of one sample, in token order
    (image k = 0 target, 1 reference, ...), as diffusers' ``img_shapes[0]``; a list of such lists
    (one per batch sample) uses the first, as diffusers does.
    """
    if len(img_shapes) and isinstance(img_shapes[0], (list, tuple)) and len(img_shapes[0]) \
            and isinstance(img_shapes[0][0], (list, tuple)):
        img_shapes = img_shapes[0]
    if len(img_shapes) and not isinstance(img_shapes[0], (list, tuple)):
        img_shapes = [img_shapes]
    a0, a1, a2 = axes_dim
    parts = []
    max_vid = 0
    for k, (f, h, w) in enumerate(img_shapes):
        pf = torch.arange(k, k + f)
        if scale_rope:
            ph = torch.cat([torch.arange(-(h - h // 2), 0), torch.arange(0, h // 2)])
            pw = torch.cat([torch.arange(-(w - w // 2), 0), torch.arange(0, w // 2)])
            max_vid = max(max_vid, h // 2, w // 2)
        else:
            ph, pw = torch.arange(h), torch.arange(w)
            max_vid = max(max_vid, h, w)
        af = _angles(pf, a0, theta).view(f, 1, 1, -1).expand(f, h, w, -1)
        ah = _angles(ph, a1, theta).view(1, h, 1, -1).expand(f, h, w, -1)
        aw = _angles(pw, a2, theta).view(1, 1, w, -1).expand(f, h, w, -1)
        parts.append(torch.cat([af, ah, aw], dim=-1).reshape(f * h * w, -1))
    img = torch.cat(parts, dim=0) if parts else torch.empty(0, sum(axes_dim) // 2)
    pt = torch.arange(max_vid, max_vid + int(txt_len))
    txt = torch.cat([_angles(pt, a0, theta), _angles(pt, a1, theta), _angles(pt, a2, theta)], dim=-1)
    return img, txt


def qwen_image_rope_tables(img_shapes, txt_len: int, axes_dim: Sequence[int] = QWEN_AXES,
                           theta: float = QWEN_THETA, scale_rope: bool = True, device=None):
    """(img_cos_sin [L_img, R], txt_cos_sin [txt_len, R]) fp32 per-token tables of Qwen-Image
    (R = 128 with the default axes), for ``rope(..., interleaved=True)`` and ``qk_norm_rope_cat``."""
    img, txt = qwen_image_rope_angles(img_shapes, txt_len, axes_dim, theta, scale_rope)
    # cos/sin of the fp32 angle, as torch.polar in diffusers
    conv = lambda a: torch.cat([torch.cos(a), torch.sin(a)], dim=-1).contiguous().to(device)  # noqa: E731
    return conv(img), conv(txt)


def flux_rope_table(ids: torch.Tensor, axes_dim: Sequence[int] = QWEN_AXES, theta: float = 10000,
                    device=None) -> torch.Tensor:
    """fp32 [S, R] per-token table of Flux's ``FluxPosEmbed`` for position ids [S, n_axes]
    (text ids, then image ids (0, row, col)), R = sum(axes_dim); interleaved pairs."""
    if ids.dim() != 2 or ids.shape[1] != len(axes_dim):
        raise ValueError(f"flux_rope_table: 'ids' must be [S, {len(axes_dim)}], got {list(ids.shape)}")
    pos = ids.to(torch.float64).cpu()
    angles = []
    for i, dim in enumerate(axes_dim):
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles.append(torch.outer(pos[:, i], inv))
    a = torch.cat(angles, dim=-1)
    return torch.cat([torch.cos(a), torch.sin(a)], dim=-1).to(torch.float32).contiguous().to(device)


def flux_ids(height: int, width: int, txt_len: int) -> torch.Tensor:
    """Flux position ids [txt_len + height * width, 3]: text all zeros, then (0, row, col)."""
    rr, cc = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    img = torch.stack([torch.zeros_like(rr), rr, cc], dim=-1).reshape(-1, 3)
    return torch.cat([torch.zeros(txt_len, 3, dtype=img.dtype), img], dim=0)
