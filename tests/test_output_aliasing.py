"""No op returns a tensor that aliases one of its inputs (the schemas promise new tensors).

Every functional op, on the CPU implementation, over the shapes where a reference expression
could hand back a view: L == 1, B == 1 chunk views of a packed parameter buffer, empty tensors,
with and without an index. Also opcheck's schema test, which catches the same thing.
"""
from __future__ import annotations

import pytest
import torch

import fused_dit_ops as fdo  # noqa: F401  (registers the ops)
from helpers import randn

C = 16
H, D = 2, 8


def _params(B, index, layout):
    rows = 2 * B if index else B
    if layout == "chunk":  # views of one packed [rows, 3C] buffer, as mod.chunk(3, -1) gives
        return list(randn(rows, 3 * C).chunk(3, dim=-1))
    return [randn(rows, C) for _ in range(3)]


def _modulation_cases():
    for B, L in ((1, 1), (2, 1), (1, 0), (0, 3), (1, 5), (2, 3)):
        for index in (False, True):
            for layout in ("chunk", "contiguous"):
                x = randn(B, L, C)
                idx = torch.randint(0, 2, (B, L), dtype=torch.int32) if index else None
                sh, sc, g = _params(B, index, layout)
                upd = randn(B, L, C)
                tag = f"B{B}-L{L}-{'index' if index else 'noindex'}-{layout}"
                yield f"scale_shift_gate-{tag}", "scale_shift_gate", (x, sh, sc, g, idx)
                yield f"norm_scale_shift-{tag}", "norm_scale_shift", (x, sh, sc, idx, None, None, 1e-6, "layer")
                yield f"gate_residual-{tag}", "gate_residual", (x, upd, g, idx)
                yield (f"gate_residual_norm_scale_shift-{tag}", "gate_residual_norm_scale_shift",
                       (x, upd, g, sh, sc, idx, 1e-6))
                xb = randn(B, L + 1, C)
                shb, scb, gb = _params(B, False, layout)
                yield (f"dual_norm_scale_shift-{tag}", "dual_norm_scale_shift",
                       (x, sh, sc, idx, 1e-6, xb, shb, scb, None, 1e-6, "layer"))
                yield (f"dual_gate_residual_norm_scale_shift-{tag}", "dual_gate_residual_norm_scale_shift",
                       (x, upd, g, sh, sc, idx, 1e-6, xb, randn(B, L + 1, C), gb, shb, scb, None, 1e-6))


def _joint_cases():
    for B, Lt, Li in ((1, 0, 3), (1, 3, 0), (1, 1, 1), (0, 2, 2), (2, 2, 3)):
        t = [randn(B, Lt, H, D) for _ in range(3)]
        i = [randn(B, Li, H, D) for _ in range(3)]
        w = [randn(D) for _ in range(4)]
        tabs = [randn(max(Lt, 1), D), randn(max(Li, 1), D)]
        tag = f"B{B}-Lt{Lt}-Li{Li}"
        yield f"joint_qkv_cat-{tag}", "joint_qkv_cat", (*t, *i)
        yield f"qk_norm_rope_cat-{tag}", "qk_norm_rope_cat", (*t, *i, *w, *tabs, 1e-6, True)
    for B, S in ((1, 1), (2, 3)):
        q, k, v = (randn(B, S, H, D) for _ in range(3))
        yield f"attention-B{B}-S{S}", "attention", (q, k, v, None, False, None)


CASES = list(_modulation_cases()) + list(_joint_cases())


def _tensors(args):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [t for t in a if isinstance(t, torch.Tensor)]
    return out


def _shares_memory(o: torch.Tensor, i: torch.Tensor) -> bool:
    if o is i or o._base is i or (i._base is not None and o._base is i._base):
        return True
    so, si = o.untyped_storage(), i.untyped_storage()
    return so.nbytes() > 0 and so.data_ptr() == si.data_ptr()


@pytest.mark.parametrize("name,op,args", CASES, ids=[c[0] for c in CASES])
def test_outputs_never_alias_inputs(name, op, args):
    out = getattr(torch.ops.fused_dit, op).default(*args)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for n, o in enumerate(outs):
        for a in _tensors(args):
            assert not _shares_memory(o, a), f"{name}: output {n} aliases an input of shape {list(a.shape)}"
        # the schema promises a new tensor: writing into it must leave every input untouched
    snapshot = [a.clone() for a in _tensors(args)]
    for o in outs:
        if o.numel():
            o.zero_()
    for a, s in zip(_tensors(args), snapshot):
        assert torch.equal(a, s), f"{name}: zeroing an output changed an input"


# torch's schema checker itself fails to clone a chunk view of a 0-row tensor (any op, aten.add too)
OPCHECK_CASES = [c for c in CASES if not ("B0-" in c[0] and c[0].endswith("chunk"))]


@pytest.mark.parametrize("name,op,args", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_schema(name, op, args):
    torch.library.opcheck(getattr(torch.ops.fused_dit, op).default, args, test_utils=("test_schema",))


def test_scale_shift_gate_gate_is_a_copy():
    x, gate, p = randn(2, 1, 8), randn(2, 8), torch.zeros(2, 8)
    keep = gate.clone()
    _, g = fdo.scale_shift_gate(x, p, p, gate)
    g.mul_(0)
    assert torch.equal(gate, keep)
