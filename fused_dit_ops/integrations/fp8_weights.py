"""The FP8 weight records of a patched block, shared by :mod:`.fp8` (double-stream blocks) and
:mod:`.fp8_kinds` (single-stream, self + cross attention): the buffer names, the module links from
a block to its quantised Linears, and :func:`ready` (does a block run its FP8 path now)."""
from __future__ import annotations

import torch

from . import engine as E

PREFIX = "_fused_dit_fp8_"


def _links(block, targets):
    """(parent, key, child) for every module on the paths from ``block`` to the ``targets`` (each
    link once): a module replaced anywhere on the way breaks one of them."""
    want = {id(t) for t in targets}
    out, seen = [], set()

    def walk(m, chain):
        for key, c in m._modules.items():
            if c is None:
                continue
            link = chain + [(m, key, c)]
            if id(c) in want:
                for ln in link:
                    if (id(ln[0]), ln[1]) not in seen:
                        seen.add((id(ln[0]), ln[1]))
                        out.append(ln)
            walk(c, link)

    walk(block, [])
    return out


def _buf(block, name):
    return block._buffers.get(PREFIX + name)


def ready(block, st, x, key=None) -> bool:
    """Does this block run the FP8 path now? Its buffers (``key``: the name of one, default the
    double-stream q|k|v weight) are there in FP8 on x's device; eagerly also: the modules and weights
    are those quantised at patch time (same objects, same version counters)."""
    w = _buf(block, key or f"{st.family.streams[0].name}_qkv_w")
    if w is None:
        return False
    if w.dtype != torch.float8_e4m3fn or w.device != x.device:
        if not torch.compiler.is_compiling():
            st.count("fp8: weight buffers converted or on another device than the activations (model.to after "
                     "patching; re-patch): bf16 fused path")
        return False
    if torch.compiler.is_compiling():
        return True
    f8 = st.fp8
    entry = f8.blocks.get(id(block)) if f8 is not None else None
    if entry is None:
        return False
    for parent, key, child in entry[0]:  # a loop, not any(<genexpr>): on the eager host path
        if parent._modules.get(key) is not child or not E.no_hooks(child):
            st.count("fp8: block modules replaced or wrapped since patching (LoRA, hooks): bf16 fused path")
            return False
    for m, p, v, b, bv in entry[1]:
        ps = m._parameters
        if (ps.get("weight") is not p or E.version_of(p) != v or ps.get("bias") is not b
                or (b is not None and E.version_of(b) != bv)):
            st.count("fp8: weights replaced or edited since patching (re-patch to re-quantise): bf16 fused path")
            return False
    return True
