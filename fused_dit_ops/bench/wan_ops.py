"""``python -m fused_dit_ops bench wan-ops``: the memory-bound ops of a patched Wan block against their
bandwidth floor.

Rows per (shape, op, provider), at Wan's widths (``fused_dit_ops.shapes.STREAMS``: wan1.3b C 1536,
wan-ti2v5b C 3072, wan14b and wan14b-720p C 5120; head_dim 128; ``--shapes`` also takes
wan1.3b-720p, wan-ti2v5b-L32760 and wan-ti2v5b-L75600: C 1536 and 3072 at the other token
counts), bf16 activations, one timestep per batch row. The ops, with the arguments the Wan
integration (``integrations/self_cross.py``) passes:

- ``norm_scale_shift``: norm1 + modulation; fp32 shift/scale are column views of the [B, 6, C] fp32
  sum ``scale_shift_table + temb.float()``;
- ``gate_residual_layer_norm``: the self-attention residual with the fp32 gate, then norm2 (affine
  fp32 LayerNorm);
- ``gate_residual_norm_scale_shift``: the cross-attention's plain residual add (a stride-0 fp32 gate
  of ones) with norm3 + modulation;
- ``gate_residual``: the block end, x + ff * c_gate with the fp32 gate;
- ``block_end_lookahead``: the block end fused with the next block's norm1 + modulation
  (``gate_residual_norm_scale_shift`` with the fp32 gate: what the eager model forward runs);
- ``qk_norm_rope_across_heads``: the self-attention's RMSNorm over all heads + Wan's 3D RoPE (the fp32
  cos|sin table [L, 128]) on q and k, column views of the packed q|k|v GEMM output [B, L, 3C];
- ``qk_norm_across_heads_cross``: the cross-attention's RMSNorm over all heads, no RoPE: q [B, L, C]
  and the text k [B, 512, C].

Providers: ``eager`` (the expression as diffusers' ``WanTransformerBlock`` / ``WanAttnProcessor``
write it: ``.float()`` upcasts, fp32 [B, 1, C] chunks, ``.type_as``; q and k as separate contiguous
projections), ``compile`` (``torch.compile`` of that expression, default mode, static shapes) and
``fused`` (the op as the integration calls it: ``fused_dit_ops.ops._eager``, the kernel launcher).

Timing: GPU time per call by CUDA-graph replay over rotating inputs larger than L2 (median of
``--rounds`` interleaved rounds). Floor: the bytes the op must move (reads + writes of the
activation-sized tensors, bf16, and of the RoPE table; the [B, C] parameters are left out) divided
by the copy bandwidth measured in the same run; ``pct_floor`` = 100 x floor / time (the target:
>= 87, within 1.15x of the floor). ``--device cpu --tiny``: a smoke run on tiny shapes (timings
meaningless) that also checks every provider's output against eager.

``--per-token --shapes wan-ti2v5b``: Wan2.2 TI2V-5B's per-token timestep (the conditioning frame's
tokens at timestep 0). The patched model runs the modulation ops on two fp32 parameter sets [2B, 6, C]
and a per-token int32 index [B, L] (``fused``); the stock block modulates with per-token fp32
parameters [B, L, C] (views of ``table + temb.float()`` [B, L, 6, C]), which ``eager`` and ``compile``
get. The floor adds the index's bytes.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..shapes import STREAMS, StreamShape
from . import _floor, harness

WAN_SHAPES = ("wan1.3b", "wan-ti2v5b", "wan14b", "wan14b-720p")
HEAD_DIM = 128
TEXT_LEN = 512  # the cross-attention's text tokens
EPS = 1e-6
PROVIDERS = ("eager", "compile", "fused")
OPS = ("norm_scale_shift", "gate_residual_layer_norm", "gate_residual_norm_scale_shift", "gate_residual",
       "block_end_lookahead", "qk_norm_rope_across_heads", "qk_norm_across_heads_cross")
ROLE = {"norm_scale_shift": "norm1 + modulation",
        "gate_residual_layer_norm": "self-attn residual + norm2",
        "gate_residual_norm_scale_shift": "cross-attn residual + norm3 + modulation",
        "gate_residual": "block end (gated residual)",
        "block_end_lookahead": "block end + next block's norm1 + modulation",
        "qk_norm_rope_across_heads": "self-attn q/k RMSNorm + RoPE",
        "qk_norm_across_heads_cross": "cross-attn q/k RMSNorm (text k)"}
# latent grids (frames, height, width after the 1 x 2 x 2 patch) of the token counts, for the RoPE table
GRIDS = {32760: (21, 30, 52), 75600: (21, 45, 80), 27280: (31, 22, 40)}


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    L: int
    C: int
    heads: int
    text_len: int
    per_token: bool = False  # Wan2.2 TI2V's per-token timestep (two parameter sets + a per-token index)

    @property
    def label(self) -> str:
        return self.name + ("+index" if self.per_token else "")


def wan_shape(s: StreamShape, per_token: bool = False) -> Shape:
    return Shape(s.name, s.B, s.L, s.C, s.C // HEAD_DIM, TEXT_LEN, per_token)


MOD_OPS = ("norm_scale_shift", "gate_residual_layer_norm", "gate_residual_norm_scale_shift", "gate_residual",
           "block_end_lookahead")


# tiny shapes for --tiny: widths, heads and token counts not powers of two
TINY = {"tiny-a": Shape("tiny-a", 1, 45, 72, 3, 7), "tiny-b": Shape("tiny-b", 2, 13, 48, 2, 5)}
TINY_GRIDS = {45: (3, 3, 5), 13: (13, 1, 1)}


# --- Wan's RoPE ---------------------------------------------------------------------------------------

def _axis_angles(n: int, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """[n, dim / 2] float64 angles pos * theta^(-2i / dim) of one axis."""
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim)
    return torch.arange(n, dtype=torch.float64)[:, None] * freqs[None]


def wan_rope(grid, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) fp32 [1, F*H*W, 1, head_dim] as ``WanRotaryPosEmbed`` returns them for a latent of
    ``grid`` = (F, H, W) patches: the frame, height and width axes' frequencies (head_dim - 4 (head_dim
    // 6), 2 (head_dim // 6), 2 (head_dim // 6) dims), each repeated for its interleaved pair."""
    f, h, w = grid
    hw = 2 * (head_dim // 6)
    dims = (head_dim - 2 * hw, hw, hw)
    parts = []
    for ax, (n, d) in enumerate(zip((f, h, w), dims)):
        a = _axis_angles(n, d).repeat_interleave(2, dim=-1)  # [n, d]
        shape = [1, 1, 1, d]
        shape[ax] = n
        parts.append(a.view(*shape).expand(f, h, w, d))
    ang = torch.cat(parts, dim=-1).reshape(1, f * h * w, 1, head_dim)
    return ang.cos().float().to(device), ang.sin().float().to(device)


def rope_table(cos, sin) -> torch.Tensor:
    """The fused ops' fp32 cos|sin table [L, head_dim] from Wan's (cos, sin) (``diffusers_wan.as_rope_tables``)."""
    from ..integrations.diffusers_wan import as_rope_tables
    return as_rope_tables((cos, sin))


def _grid(s: Shape):
    g = GRIDS.get(s.L) or TINY_GRIDS.get(s.L) or (s.L, 1, 1)
    assert math.prod(g) == s.L, (s, g)
    return g


# --- the eager expressions (diffusers 0.42 WanTransformerBlock / WanAttnProcessor) ---------------------

def eager_norm_scale_shift(x, shift, scale):
    return (F.layer_norm(x.float(), (x.shape[-1],), eps=EPS) * (1 + scale) + shift).type_as(x)


def eager_gate_residual_layer_norm(x, a, gate, weight, bias):
    h = (x.float() + a * gate).type_as(x)
    return h, F.layer_norm(h.float(), (h.shape[-1],), weight.float(), bias.float(), EPS).type_as(h)


def eager_residual_norm_scale_shift(x, a, shift, scale):
    h = x + a
    return h, (F.layer_norm(h.float(), (h.shape[-1],), eps=EPS) * (1 + scale) + shift).type_as(h)


def eager_gate_residual(x, y, gate):
    return (x.float() + y.float() * gate).type_as(x)


def eager_block_end_lookahead(x, y, gate, shift, scale):
    h = (x.float() + y.float() * gate).type_as(x)
    return h, (F.layer_norm(h.float(), (h.shape[-1],), eps=EPS) * (1 + scale) + shift).type_as(h)


def _rotary(t, cos, sin):
    x1, x2 = t.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(t)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(t)


def eager_qk_rope(q, k, wq, wk, cos, sin, heads):
    q = F.rms_norm(q, (q.shape[-1],), wq, EPS).unflatten(2, (heads, -1))
    k = F.rms_norm(k, (k.shape[-1],), wk, EPS).unflatten(2, (heads, -1))
    return _rotary(q, cos, sin), _rotary(k, cos, sin)


def eager_qk_cross(q, k, wq, wk, heads):
    return (F.rms_norm(q, (q.shape[-1],), wq, EPS).unflatten(2, (heads, -1)),
            F.rms_norm(k, (k.shape[-1],), wk, EPS).unflatten(2, (heads, -1)))


EAGER = {"norm_scale_shift": eager_norm_scale_shift, "gate_residual_layer_norm": eager_gate_residual_layer_norm,
         "gate_residual_norm_scale_shift": eager_residual_norm_scale_shift, "gate_residual": eager_gate_residual,
         "block_end_lookahead": eager_block_end_lookahead, "qk_norm_rope_across_heads": eager_qk_rope,
         "qk_norm_across_heads_cross": eager_qk_cross}


# --- the fused calls, as self_cross.run_block makes them ----------------------------------------------

def _fused(op):
    """The op as ``self_cross.run_block`` calls it (``index``: the per-token set index, or None)."""
    from ..ops import _eager as E
    if op == "norm_scale_shift":
        return lambda x, shift, scale, index=None: E.norm_scale_shift(x, shift, scale, index, None, None, EPS)
    if op == "gate_residual_layer_norm":
        return lambda x, a, gate, w, b, index=None: E.gate_residual_layer_norm(x, a, gate, index, w, b, EPS)
    if op in ("gate_residual_norm_scale_shift", "block_end_lookahead"):
        return lambda x, a, gate, shift, scale, index=None: E.gate_residual_norm_scale_shift(x, a, gate, shift, scale,
                                                                                            index, EPS)
    if op == "gate_residual":
        return lambda x, y, gate, index=None: E.gate_residual(x, y, gate, index)
    if op == "qk_norm_rope_across_heads":
        return lambda q, k, wq, wk, table, heads: E.qk_norm_rope_across_heads(q, k, wq, wk, table, heads, EPS, True)
    if op == "qk_norm_across_heads_cross":
        return lambda q, k, wq, wk, heads: E.qk_norm_rope_across_heads(q, k, wq, wk, None, heads, EPS, True)
    raise ValueError(op)


# --- inputs -------------------------------------------------------------------------------------------

def make_inputs(op: str, s: Shape, device, dtype=torch.bfloat16, generator=None) -> dict:
    """One set of the op's inputs (the tensors both argument forms are views of)."""
    def rnd(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=generator, device=device, dtype=torch.float32) * std).to(dt)

    B, L, C = s.B, s.L, s.C
    d = {}
    if op.startswith("qk_"):
        d["wq"], d["wk"] = 1 + rnd(C, std=0.1), 1 + rnd(C, std=0.1)  # RMSNorm weights: the block's dtype
        if op == "qk_norm_rope_across_heads":
            d["qkv"] = rnd(B, L, 3 * C)
            d["cos"], d["sin"] = wan_rope(_grid(s), C // s.heads, device)
        else:
            d["q"], d["k"] = rnd(B, L, C), rnd(B, s.text_len, C)
        return d
    d["x"] = rnd(B, L, C)
    if op != "norm_scale_shift":
        d["u"] = rnd(B, L, C)
    # the block's fp32 modulation: scale_shift_table [1, 6, C] + temb.float() [B, 6, C] ([2B, 6, C] for
    # the two timesteps of a per-token timestep)
    rows = 2 * B if s.per_token else B
    d["e"] = rnd(1, 6, C, std=C ** -0.5, dt=torch.float32) + rnd(rows, 6, C, std=0.3, dt=torch.float32)
    if s.per_token:
        # TI2V: the conditioning (first) frame's tokens at timestep 0 (set 0), the others at t (set 1)
        f, h, w = _grid(s)
        d["index"] = (torch.arange(L, device=device) >= h * w).to(torch.int32).expand(B, L).contiguous()
    if op == "gate_residual_layer_norm":
        d["w"], d["b"] = 1 + rnd(C, std=0.1, dt=torch.float32), rnd(C, std=0.1, dt=torch.float32)
    return d


def args_for(op: str, provider: str, d: dict, s: Shape) -> tuple:
    """The op's arguments for ``provider`` from one input set ``d``: [B, 1, C] chunks and contiguous
    q/k projections for the diffusers expression, [B, C] column views, the stride-0 ones gate and
    q/k views of the packed q|k|v output for the fused op."""
    fused = provider == "fused"
    if op in MOD_OPS:
        e = d["e"]
        index = d.get("index")
        if fused:
            p = lambda j: e[:, j]  # noqa: E731
        elif index is None:
            p = lambda j: e[:, j:j + 1]  # noqa: E731  (diffusers' chunk(6, dim=1): [B, 1, C])
        else:
            # the stock TI2V block: table + per-token temb [B, L, 6, C] fp32, chunk(6, dim=2).squeeze(2)
            B = e.shape[0] // 2
            e_tok = torch.where((index != 0)[..., None, None], e[B:, None], e[:B, None])
            p = lambda j: e_tok[:, :, j]  # noqa: E731
        tail = (index,) if fused and index is not None else ()
        if op == "norm_scale_shift":
            return (d["x"], p(0), p(1), *tail)
        if op == "gate_residual_layer_norm":
            return (d["x"], d["u"], p(2), d["w"], d["b"], *tail)
        if op == "gate_residual_norm_scale_shift":
            if fused:  # x + 1 * update, the plain add (self_cross._ones_gate)
                ones = torch.ones(1, s.C, dtype=torch.float32, device=e.device).expand(e.shape[0], s.C)
                return (d["x"], d["u"], ones, p(3), p(4), *tail)
            return d["x"], d["u"], p(3), p(4)
        if op == "gate_residual":
            return (d["x"], d["u"], p(5), *tail)
        if op == "block_end_lookahead":  # this block's c_gate, the next block's shift / scale
            return (d["x"], d["u"], p(5), p(0), p(1), *tail)
    if op == "qk_norm_rope_across_heads":
        C = s.C
        qkv = d["qkv"]
        if fused:
            return qkv[..., :C], qkv[..., C:2 * C], d["wq"], d["wk"], rope_table(d["cos"], d["sin"]), s.heads
        return (qkv[..., :C].contiguous(), qkv[..., C:2 * C].contiguous(), d["wq"], d["wk"], d["cos"], d["sin"],
                s.heads)
    if op == "qk_norm_across_heads_cross":
        return d["q"], d["k"], d["wq"], d["wk"], s.heads
    raise ValueError(op)


def bytes_moved(op: str, s: Shape, itemsize: int = 2) -> int:
    """Bytes the op must move: reads + writes of its activation-sized tensors (and the RoPE table; with a
    per-token timestep, the int32 index [B, L] of the modulation ops)."""
    act = s.B * s.L * s.C * itemsize
    if op in MOD_OPS and s.per_token:
        return bytes_moved(op, Shape(s.name, s.B, s.L, s.C, s.heads, s.text_len), itemsize) + s.B * s.L * 4
    if op == "norm_scale_shift":
        return 2 * act  # read x, write y
    if op == "gate_residual":
        return 3 * act  # read x, update; write x
    if op in ("gate_residual_layer_norm", "gate_residual_norm_scale_shift", "block_end_lookahead"):
        return 4 * act  # read x, update; write x, y
    if op == "qk_norm_rope_across_heads":
        return 4 * act + s.L * (s.C // s.heads) * 4  # read q, k; write q, k; the fp32 cos|sin table
    if op == "qk_norm_across_heads_cross":
        return 2 * act + 2 * s.B * s.text_len * s.C * itemsize  # read q, k; write q, k
    raise ValueError(op)


def _columns(s: Shape) -> dict:
    return {"shape": s.label, "B": s.B, "L": s.L, "C": s.C}


FAMILY = _floor.Family(eager=EAGER, fused=lambda op, s: _fused(op), make_inputs=make_inputs, args_for=args_for,
                       bytes_moved=bytes_moved, role=ROLE, columns=_columns)
_flat, max_rel_diff = _floor.flat, _floor.max_rel_diff


def providers(op: str, names) -> dict:
    return _floor.providers(FAMILY, op, names, None)


def main(argv=None) -> int:
    from ._configs import resolve_device
    ap = argparse.ArgumentParser(prog="python -m fused_dit_ops bench wan-ops", description=harness.plain_doc(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None,
                    help=f"comma list from: {', '.join(STREAMS)} (default: {','.join(WAN_SHAPES)}; "
                         f"--tiny: {','.join(TINY)})")
    ap.add_argument("--ops", default=None, help=f"comma list from: {', '.join(OPS)} (default: all; "
                                                "--per-token: the modulation ops)")
    ap.add_argument("--per-token", action="store_true",
                    help="Wan2.2 TI2V's per-token timestep (use with --shapes wan-ti2v5b): the modulation ops "
                         "with two fp32 parameter sets + the per-token index (fused) against the stock per-token "
                         "[B, L, C] fp32 parameters (eager, compile); rows 'SHAPE+index'")
    _floor.add_run_args(ap, PROVIDERS)
    args = ap.parse_args(argv)
    device = resolve_device(args.device, args.tiny, "bench wan-ops")
    if device is None:
        return 2
    table = dict(TINY) if args.tiny else {}
    names = [n.strip() for n in (args.shapes or ",".join(TINY if args.tiny else WAN_SHAPES)).split(",") if n.strip()]
    shapes = []
    for n in names:
        if n in table:
            shapes.append(dataclasses.replace(table[n], per_token=args.per_token))
        elif n in STREAMS:
            shapes.append(wan_shape(STREAMS[n], args.per_token))
        else:
            raise SystemExit(f"--shapes: unknown shape {n!r}; choose from {', '.join([*STREAMS, *table])}")
    ops_ = _floor.pick(args.ops or ",".join(MOD_OPS if args.per_token else OPS), OPS, "ops")
    provs = _floor.pick(args.providers, PROVIDERS, "providers")
    shapes_extra = {s.label: {"B": s.B, "L": s.L, "C": s.C, "heads": s.heads, "text_len": s.text_len,
                              "per_token": s.per_token} for s in shapes}
    return _floor.main(FAMILY, "wan-ops", shapes, ops_, provs, args.rounds, device, args.tiny, shapes_extra, args.out)
