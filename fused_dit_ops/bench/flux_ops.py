"""``python -m fused_dit_ops bench flux-ops``: the memory-bound ops of patched Flux.1 and FLUX.2 blocks
against their bandwidth floor.

Rows per (shape, op, provider) at the blocks' benchmark shape (1024 x 1024: 4096 image + 512 text
tokens; ``flux1`` C 3072 = 24 x 128, ``flux2`` C 6144 = 48 x 128), bf16, one timestep. The ops, with
the arguments the integrations (``integrations/double_stream.py``, ``integrations/single_stream.py``)
pass:

- ``dual_norm_scale_shift``: the double-stream block's norm1 + modulation of both streams in one
  launch (shift / scale: [B, C] column views of each stream's [B, 6C] modulation GEMV output);
- ``dual_gate_residual_norm_scale_shift``: its attention residual + norm2 + modulation, both streams
  (the block end fused with the next block's norm1 is the same launch at the same shape);
- ``joint_qk_norm_rope``: its q / k RMSNorm (each stream's weights) + RoPE over the joint [text, image]
  sequence, in place on views of the joint q|k|v buffer [B, Lt + Li, 3C];
- ``norm_scale_shift``: the single-stream block's norm + modulation over the joint sequence (params:
  views of the [B, 3C] modulation output);
- ``gate_residual_norm_scale_shift``: the single-stream block end fused with the next block's norm +
  modulation;
- ``gate_residual``: the last single-stream block's end;
- ``single_qk_norm_rope``: the single-stream q / k RMSNorm + RoPE on views of its q|k|v projection.

Providers: ``eager`` (the expressions of diffusers 0.42 ``FluxTransformerBlock`` /
``FluxSingleTransformerBlock`` / ``FluxAttnProcessor``: LayerNorm then modulation in bf16, the
``RMSNorm`` modules, ``apply_rotary_emb`` on the concatenated q / k; FLUX.2's blocks compute the same),
``compile`` (``torch.compile`` of that expression, static shapes) and ``fused`` (the op as the
integration calls it: ``fused_dit_ops.ops._eager``).

Timing and floor as ``bench wan-ops``: GPU time per call by CUDA-graph replay over rotating inputs
larger than L2 (median of ``--rounds`` interleaved rounds); the floor is the bytes the op must move
(activation-sized reads and writes, bf16, and the fp32 RoPE table) at the copy bandwidth measured in the
same run; ``pct_floor`` = 100 x floor / time (target >= 87: within 1.15x). ``--device cpu --tiny``: a
smoke run on tiny shapes that also checks every provider's output against eager.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _floor, harness

EPS = 1e-6
PROVIDERS = ("eager", "compile", "fused")
DOUBLE_OPS = ("dual_norm_scale_shift", "dual_gate_residual_norm_scale_shift", "joint_qk_norm_rope")
SINGLE_OPS = ("norm_scale_shift", "gate_residual_norm_scale_shift", "gate_residual", "single_qk_norm_rope")
OPS = DOUBLE_OPS + SINGLE_OPS
ROLE = {"dual_norm_scale_shift": "double: norm1 + modulation, both streams",
        "dual_gate_residual_norm_scale_shift": "double: attn residual + norm2 + modulation, both streams",
        "joint_qk_norm_rope": "double: q/k RMSNorm + RoPE, joint",
        "norm_scale_shift": "single: norm + modulation",
        "gate_residual_norm_scale_shift": "single: block end + next block's norm + modulation",
        "gate_residual": "single: last block end",
        "single_qk_norm_rope": "single: q/k RMSNorm + RoPE"}


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    Li: int  # image tokens
    Lt: int  # text tokens
    C: int
    heads: int

    @property
    def L(self) -> int:
        return self.Lt + self.Li

    @property
    def D(self) -> int:
        return self.C // self.heads


SHAPES = {"flux1": Shape("flux1", 1, 4096, 512, 3072, 24), "flux2": Shape("flux2", 1, 4096, 512, 6144, 48)}
# --tiny: widths, head counts and token counts not powers of two
TINY = {"tiny-a": Shape("tiny-a", 1, 45, 7, 72, 3), "tiny-b": Shape("tiny-b", 2, 13, 5, 48, 2)}


# --- the eager expressions (diffusers 0.42) ------------------------------------------------------------

def _ln_mod(x, shift, scale):
    return F.layer_norm(x, (x.shape[-1],), eps=EPS) * (1 + scale[:, None]) + shift[:, None]


def eager_dual_norm(xi, shi, sci, xt, sht, sct):
    return _ln_mod(xi, shi, sci), _ln_mod(xt, sht, sct)


def eager_dual_grns(xi, ai, gi, shi, sci, xt, at, gt, sht, sct):
    hi = xi + gi[:, None] * ai
    ht = xt + gt[:, None] * at
    return hi, _ln_mod(hi, shi, sci), ht, _ln_mod(ht, sht, sct)


def _rms(x, w):
    """diffusers ``RMSNorm`` (fp32 statistics, rounded to the 16-bit weight's dtype, times the weight)."""
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return n.to(w.dtype) * w


def _rotary(x, cos, sin):
    """diffusers ``apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1)``:
    x [B, S, H, D], cos / sin [S, D] fp32 (each frequency repeated for its interleaved pair)."""
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    re, im = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rot = torch.stack([-im, re], dim=-1).flatten(3)
    return (x.float() * c + rot.float() * s).to(x.dtype)


def eager_joint_qk(qi, ki, qt, kt, wqi, wki, wqt, wkt, cos, sin):
    q = torch.cat([_rms(qt, wqt), _rms(qi, wqi)], dim=1)
    k = torch.cat([_rms(kt, wkt), _rms(ki, wki)], dim=1)
    return _rotary(q, cos, sin), _rotary(k, cos, sin)


def eager_single_qk(q, k, wq, wk, cos, sin):
    return _rotary(_rms(q, wq), cos, sin), _rotary(_rms(k, wk), cos, sin)


def eager_norm(x, shift, scale):
    return _ln_mod(x, shift, scale)


def eager_grns(x, u, gate, shift, scale):
    h = x + gate[:, None] * u
    return h, _ln_mod(h, shift, scale)


def eager_gate_residual(x, u, gate):
    return x + gate[:, None] * u


EAGER = {"dual_norm_scale_shift": eager_dual_norm, "dual_gate_residual_norm_scale_shift": eager_dual_grns,
         "joint_qk_norm_rope": eager_joint_qk, "norm_scale_shift": eager_norm,
         "gate_residual_norm_scale_shift": eager_grns, "gate_residual": eager_gate_residual,
         "single_qk_norm_rope": eager_single_qk}


# --- the fused calls, as the integrations make them ----------------------------------------------------

def _fused(op, s: Shape):
    from ..ops import _eager as E
    if op == "dual_norm_scale_shift":
        return lambda xi, shi, sci, xt, sht, sct: E.dual_norm_scale_shift(xi, shi, sci, None, EPS, xt, sht, sct, None,
                                                                          EPS, "layer")
    if op == "dual_gate_residual_norm_scale_shift":
        return lambda xi, ai, gi, shi, sci, xt, at, gt, sht, sct: E.dual_gate_residual_norm_scale_shift(
            xi, ai, gi, shi, sci, None, EPS, xt, at, gt, sht, sct, None, EPS)
    if op in ("joint_qk_norm_rope", "single_qk_norm_rope"):
        def qk(q, k, wqt, wkt, wqi, wki, table):
            E.joint_qk_norm_rope_(q, k, s.Lt, wqt, wkt, wqi, wki, table[:s.Lt], table[s.Lt:], EPS, True)
            return q, k
        return qk
    if op == "norm_scale_shift":
        return lambda x, shift, scale: E.norm_scale_shift(x, shift, scale, None, None, None, EPS, "layer")
    if op == "gate_residual_norm_scale_shift":
        return lambda x, u, gate, shift, scale: E.gate_residual_norm_scale_shift(x, u, gate, shift, scale, None, EPS)
    if op == "gate_residual":
        return lambda x, u, gate: E.gate_residual(x, u, gate, None)
    raise ValueError(op)


# --- inputs ----------------------------------------------------------------------------------------------

def make_inputs(op: str, s: Shape, device, dtype=torch.bfloat16, generator=None) -> dict:
    def rnd(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=generator, device=device, dtype=torch.float32) * std).to(dt)

    B, C = s.B, s.C
    d = {}
    if op.endswith("qk_norm_rope"):
        d["qkv"] = rnd(B, s.L, 3 * C)  # the joint q|k|v buffer (single: the q|k|v columns of the projection)
        d["w"] = [1 + rnd(s.D, std=0.1) for _ in range(4)]  # RMSNorm weights: txt q, txt k, img q, img k
        ang = torch.rand(s.L, s.D // 2, generator=generator, device=device) * 6.2832
        d["cos"], d["sin"] = ang.cos(), ang.sin()
        return d
    if op in DOUBLE_OPS:
        for tag, L in (("i", s.Li), ("t", s.Lt)):
            d["x" + tag], d["u" + tag] = rnd(B, L, C), rnd(B, L, C)
            d["mod" + tag] = rnd(B, 6 * C, std=0.3)  # the stream's modulation GEMV output
        return d
    d["x"], d["u"] = rnd(B, s.L, C), rnd(B, s.L, C)
    d["mod"], d["mod_next"] = rnd(B, 3 * C, std=0.3), rnd(B, 3 * C, std=0.3)
    return d


def args_for(op: str, provider: str, d: dict, s: Shape) -> tuple:
    """The op's arguments for ``provider``: [B, C] column views of the modulation outputs for both (the
    diffusers blocks chunk the same output); for the QK ops separate contiguous [B, L, H, D] projections
    (eager) or views of the joint q|k|v buffer (fused)."""
    C, fused = s.C, provider == "fused"
    if op.endswith("qk_norm_rope"):
        # the fused op works in place: on a copy of the buffer, so that every provider sees the same input
        qkv, w = (d["qkv"].clone() if fused else d["qkv"]), d["w"]
        if op == "single_qk_norm_rope":
            w = [w[0], w[1], w[0], w[1]]  # one pair of norms for the joint sequence
        q, k = (qkv[..., j * C:(j + 1) * C].unflatten(-1, (s.heads, s.D)) for j in range(2))
        if fused:
            table = torch.cat([d["cos"], d["sin"]], dim=-1).contiguous()
            return q, k, *w, table
        cos, sin = (t.repeat_interleave(2, dim=-1) for t in (d["cos"], d["sin"]))
        if op == "single_qk_norm_rope":
            return q.contiguous(), k.contiguous(), w[2], w[3], cos, sin
        Lt = s.Lt
        return (q[:, Lt:].contiguous(), k[:, Lt:].contiguous(), q[:, :Lt].contiguous(), k[:, :Lt].contiguous(),
                w[2], w[3], w[0], w[1], cos, sin)
    if op in DOUBLE_OPS:
        mi, mt = (d["mod" + t].chunk(6, dim=-1) for t in ("i", "t"))
        if op == "dual_norm_scale_shift":
            return d["xi"], mi[0], mi[1], d["xt"], mt[0], mt[1]
        return d["xi"], d["ui"], mi[2], mi[3], mi[4], d["xt"], d["ut"], mt[2], mt[3], mt[4]
    m, n = d["mod"].chunk(3, dim=-1), d["mod_next"].chunk(3, dim=-1)
    if op == "norm_scale_shift":
        return d["x"], m[0], m[1]
    if op == "gate_residual_norm_scale_shift":
        return d["x"], d["u"], m[2], n[0], n[1]
    if op == "gate_residual":
        return d["x"], d["u"], m[2]
    raise ValueError(op)


def bytes_moved(op: str, s: Shape, itemsize: int = 2) -> int:
    """Bytes the op must move: reads + writes of its activation-sized tensors (the [B, C] parameters left
    out) and, for the QK ops, the fp32 cos|sin table [L, D]."""
    act = s.B * s.L * s.C * itemsize  # both streams together (the joint sequence)
    if op in ("dual_norm_scale_shift", "norm_scale_shift"):
        return 2 * act
    if op == "gate_residual":
        return 3 * act
    if op in ("dual_gate_residual_norm_scale_shift", "gate_residual_norm_scale_shift"):
        return 4 * act
    if op.endswith("qk_norm_rope"):
        return 4 * act + s.L * s.D * 4
    raise ValueError(op)


def _columns(s: Shape) -> dict:
    return {"shape": s.name, "B": s.B, "L_img": s.Li, "L_txt": s.Lt, "C": s.C}


FAMILY = _floor.Family(eager=EAGER, fused=_fused, make_inputs=make_inputs, args_for=args_for,
                       bytes_moved=bytes_moved, role=ROLE, columns=_columns)


def providers(op: str, names, s: Shape) -> dict:
    return _floor.providers(FAMILY, op, names, s)


def _outs(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def main(argv=None) -> int:
    from ._configs import resolve_device
    ap = argparse.ArgumentParser(prog="python -m fused_dit_ops bench flux-ops", description=harness.plain_doc(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help=f"comma list from: {', '.join(SHAPES)} (default: both; --tiny: "
                                                   f"{', '.join(TINY)})")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma list from: {', '.join(OPS)} (default: all)")
    _floor.add_run_args(ap, PROVIDERS)
    args = ap.parse_args(argv)
    device = resolve_device(args.device, args.tiny, "bench flux-ops")
    if device is None:
        return 2
    table = TINY if args.tiny else SHAPES
    shapes = [table[n] for n in _floor.pick(args.shapes or ",".join(table), list(table), "shapes")]
    ops_ = _floor.pick(args.ops, OPS, "ops")
    provs = _floor.pick(args.providers, PROVIDERS, "providers")
    shapes_extra = {s.name: {"B": s.B, "L_img": s.Li, "L_txt": s.Lt, "C": s.C, "heads": s.heads} for s in shapes}
    return _floor.main(FAMILY, "flux-ops", shapes, ops_, provs, args.rounds, device, args.tiny, shapes_extra,
                       args.out)
