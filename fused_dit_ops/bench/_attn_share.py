"""Attention alone at a Wan model's shapes, for ``bench block`` / ``bench model --model wan``.

Per block, a Wan model runs its self-attention over the L video tokens and its cross-attention from
those tokens to the text (and, I2V, to the image context). Each is timed alone here with the
attention the blocks call: ``fused_dit.attention`` (automatic backend choice, as the patched blocks
call it) for patched providers, diffusers' ``dispatch_attention_fn`` with its active backend (what
the stock processor calls) for stock ones, on random q/k/v in the model's [B, L, H, D] layout and
dtype. FLOPs: 4 * B * H * Lq * Lk * D per call (two GEMMs of 2 * Lq * Lk * D per head). The share of
a forward is layers x (attention time per block) / (forward time); of a block, the attention time
per block / block time. The attention timed alone runs without the rest of the forward around it
(no contention, warm L2 across its own repetitions), so the share is an estimate, not a trace.
"""
from __future__ import annotations

import torch

from . import _configs, harness


def flops(batch: int, heads: int, lq: int, lk: int, head_dim: int) -> float:
    """Floating-point operations of one non-causal attention: 4 B H Lq Lk D."""
    return 4.0 * batch * heads * lq * lk * head_dim


def wan_calls(model, inputs: dict) -> dict:
    """The attention calls of one Wan block: {"batch", "heads", "head_dim", "calls": [(name, Lq, Lk)]}."""
    cfg = model.config
    x = inputs["hidden_states"]
    pt, ph, pw = cfg.patch_size
    L = (x.shape[2] // pt) * (x.shape[3] // ph) * (x.shape[4] // pw)
    calls = [("self", L, L), ("cross_text", L, inputs["encoder_hidden_states"].shape[1])]
    img = inputs.get("encoder_hidden_states_image")
    if img is not None:
        calls.append(("cross_image", L, img.shape[1]))
    return {"batch": x.shape[0], "heads": cfg.num_attention_heads, "head_dim": cfg.attention_head_dim,
            "calls": calls}


def _stock_fn():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry, dispatch_attention_fn
    name = _AttentionBackendRegistry.get_active_backend()[0]
    name = getattr(name, "value", name)

    def run(q, k, v):
        return dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
    return f"diffusers:{name}", run


def _fused_fn(q, k, v):
    from .. import attention_dispatch
    from ..ops import _eager
    name = attention_dispatch.select(q, k, v, False, None)

    def run(q, k, v):
        return _eager.attention(q, k, v, None, False, None)
    return name, run


def time_block_attention(spec: dict, impl: str, device, dtype: torch.dtype, rep_ms: int = 200, seed: int = 0) -> dict:
    """Time each attention call of ``spec`` (:func:`wan_calls`) alone with ``impl`` "patched" (the fused
    op) or "stock" (diffusers' dispatch). Returns {"impl", "backend", "calls": {name: {lq, lk, ms,
    tflops}}, "block_ms", "block_gflop", "tflops", "self_tflops"}."""
    import fused_dit_ops  # noqa: F401  (registers the ops)
    B, H, D = spec["batch"], spec["heads"], spec["head_dim"]
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = {"impl": impl, "calls": {}}
    total_us = total_flops = 0.0
    for name, lq, lk in spec["calls"]:
        q = torch.randn(B, lq, H, D, generator=g).to(device, dtype)
        k = torch.randn(B, lk, H, D, generator=g).to(device, dtype)
        v = torch.randn(B, lk, H, D, generator=g).to(device, dtype)
        backend, run = _fused_fn(q, k, v) if impl == "patched" else _stock_fn()
        out.setdefault("backend", backend)  # the self-attention's (the first call)
        with torch.no_grad():
            us = harness.time_us_on(device, lambda: run(q, k, v), rep_ms=rep_ms)
        f = flops(B, H, lq, lk, D)
        out["calls"][name] = {"lq": lq, "lk": lk, "backend": backend, "ms": us / 1e3,
                              "tflops": f / (us * 1e-6) / 1e12 if us > 0 else None}
        total_us += us
        total_flops += f
        del q, k, v
    out["block_ms"] = total_us / 1e3
    out["block_gflop"] = total_flops / 1e9
    out["tflops"] = total_flops / (total_us * 1e-6) / 1e12 if total_us > 0 else None
    out["self_tflops"] = out["calls"]["self"]["tflops"]
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return out


def measure(model, inputs: dict, providers, device, rep_ms: int = 200) -> dict:
    """{"stock": ..., "patched": ...}: :func:`time_block_attention` for each kind of provider in
    ``providers`` (a failure is kept as {"error": ...}, the benchmark goes on)."""
    dtype = model.blocks[0].attn1.to_q.weight.dtype
    spec = wan_calls(model, inputs)
    kinds = sorted({"patched" if _configs.is_patched(p) else "stock" for p in providers})
    res = {"shapes": {"batch": spec["batch"], "heads": spec["heads"], "head_dim": spec["head_dim"],
                      "calls": [list(c) for c in spec["calls"]], "dtype": str(dtype)}}
    for kind in kinds:
        try:
            res[kind] = time_block_attention(spec, kind, device, dtype, rep_ms=rep_ms)
        except Exception as e:  # keep the benchmark's own numbers
            res[kind] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return res


def annotate(rows, attn: dict, time_key: str, layers: int) -> None:
    """Per row with ``time_key`` (ms of a forward or a block): the backend its blocks' attention runs
    on, that attention's TFLOP/s (all calls of a block; self-attention alone), the attention ms per
    ``time_key`` unit (``layers`` blocks) and its share (%) of it."""
    for r in rows:
        if time_key not in r:
            continue
        a = attn.get("patched" if _configs.is_patched(r["provider"]) else "stock")
        if not a or "error" in a:
            continue
        ms = layers * a["block_ms"]
        r.update({"attn_backend": a["backend"], "attn_tflops": a["tflops"], "attn_self_tflops": a["self_tflops"],
                  "attn_ms": ms, "attn_share_pct": 100.0 * ms / r[time_key] if r[time_key] else None})


def describe(attn: dict) -> str:
    """One line per timed kind: backend, ms per block, TFLOP/s per call."""
    lines = []
    for kind in ("stock", "patched"):
        a = attn.get(kind)
        if not a:
            continue
        if "error" in a:
            lines.append(f"attention alone ({kind}): FAILED: {a['error']}")
            continue
        calls = ", ".join(f"{n} {c['lq']}x{c['lk']}: {c['ms']:.3f} ms, {c['tflops']:.3g} TFLOP/s"
                          for n, c in a["calls"].items())
        lines.append(f"attention alone ({kind}, {a['backend']}): {a['block_ms']:.3f} ms per block "
                     f"({a['block_gflop']:.4g} GFLOP, {a['tflops']:.3g} TFLOP/s); {calls}")
    return "\n".join(lines)
