"""Worker of tests/test_context_parallel.py: one rank of a CPU (gloo) process group running a tiny
diffusers model with context parallelism enabled, patched or not; rank 0 saves the output."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

FAMILIES = {
    # family: (builder, builder kwargs, inputs maker, inputs kwargs); heads divisible by the Ulysses
    # degree (2, 4), token counts by the number of ranks
    "qwen": ("build_qwen_image_transformer", dict(config="tiny", seed=1, num_attention_heads=4),
             "make_qwen_inputs", dict(img_tokens=(16, 8), txt_len=12, seed=2)),
    "qwen-plain": ("build_qwen_image_transformer",
                   dict(config="tiny", seed=1, zero_cond_t=False, num_attention_heads=4),
                   "make_qwen_inputs", dict(img_tokens=(24,), txt_len=12, seed=2)),
    "flux": ("build_flux_transformer", dict(config="tiny", seed=1, num_attention_heads=4),
             "make_flux_inputs", dict(img_tokens=(28,), txt_len=12, seed=2)),
    "flux2": ("build_flux2_transformer", dict(config="tiny", seed=1, num_attention_heads=4),
              "make_flux2_inputs", dict(img_tokens=(28,), txt_len=12, seed=2)),
    "wan": ("build_wan_transformer", dict(config="tiny", seed=1, num_attention_heads=4),
            "make_wan_inputs", dict(latent=(3, 4, 8), seed=2)),
    "wan-ti2v": ("build_wan_transformer", dict(config="tiny-ti2v", seed=1, num_attention_heads=4),
                 "make_wan_inputs", dict(latent=(3, 4, 8), seed=2, per_token=True)),
    # head_dim 32 (FP8 attention takes multiples of 16; the tiny Flux.1 and Wan have 24)
    "flux-hd32": ("build_flux_transformer", dict(config="tiny", seed=1, num_attention_heads=4, attention_head_dim=32,
                                                 axes_dims_rope=(8, 12, 12)),
                  "make_flux_inputs", dict(img_tokens=(28,), txt_len=12, seed=2)),
    "wan-hd32": ("build_wan_transformer", dict(config="tiny", seed=1, num_attention_heads=4, attention_head_dim=32),
                 "make_wan_inputs", dict(latent=(3, 4, 8), seed=2)),
}


# precision="fp8" needs Linear sizes that are multiples of 16 (torch._scaled_mm): the tiny Wan's MLP of 104
# is not (its blocks would stay on the model-dtype path), 112 is
FP8_BUILD = {"wan": dict(ffn_dim=112), "wan-ti2v": dict(ffn_dim=112), "wan-hd32": dict(ffn_dim=112)}


def build(family, precision="bf16"):
    from fused_dit_ops import models
    b, bkw, mk, mkw = FAMILIES[family]
    if precision == "fp8":
        bkw = dict(bkw, **FP8_BUILD.get(family, {}))
    m = getattr(models, b)(**bkw)
    kw = getattr(models, mk)(m, **mkw)
    if family == "flux2":
        # FLUX.2's context-parallel plan shards [B, S, 4] ids (as its pipeline passes them); [S, 4] ids
        # are not sharded and the stock forward fails under parallelism
        kw.update(img_ids=kw["img_ids"][None], txt_ids=kw["txt_ids"][None])
    return m, kw


def cpu_device_count_shim():
    """diffusers' ``_resolve_parallel_config`` places rank r on device ``r % torch.accelerator.device_count()``;
    on a machine without an accelerator that count is 0 (ZeroDivisionError). The CPU process group
    needs device ``cpu`` for every rank, which a count of 1 gives."""
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1


def cpu_ring_standin():
    """Ring attention needs a forward op that returns the log-sum-exp; diffusers' ``native`` one
    raises for it and those that return it are CUDA-only. For the CPU tests of ring attention (and the
    exact FP8 tests, Ulysses too): ``native``'s forward op gets a float64 math stand-in that returns
    (out, lse) in the layout the ring merge takes (out [B, S, H, D], lse [B, S, H]). Ulysses never asks
    for the lse."""
    from diffusers.models import attention_dispatch as ad

    def op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
           enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        assert attn_mask is None and not is_causal and dropout_p == 0.0
        out, lse = attention64(query, key, value, scale)
        return (out, lse) if return_lse else out
    ad._native_attention_forward_op = op


def attention64(q, k, v, scale=None):
    """(softmax(q k^T * scale) v rounded once to q's dtype, log-sum-exp [B, S, H] fp32) of [B, S, H, D]
    in float64: the same result for any order of the keys (all-to-all puts each rank's rows in rank
    order) and any query rows, up to a float64 rounding near an fp32 tie."""
    qd, kd, vd = (t.double() for t in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * (scale if scale is not None else q.shape[-1] ** -0.5)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), vd).to(q.dtype)
    return out, torch.logsumexp(s, dim=-1).transpose(1, 2).float()


def exact_attention(q, k, v, softmax_scale=None, causal=False, backend=None):
    """Our ``attention`` op's signature over :func:`attention64`."""
    assert not causal
    return attention64(q, k, v, softmax_scale)[0].contiguous()


def exact_attention_patches():
    """(object, attribute, stand-in) for the fused blocks' own attention steps on the CPU: our
    ``attention`` op as the blocks call it (``ops._eager``). Under context parallelism the blocks' self
    attention is diffusers' ``native`` forward op instead, which :func:`cpu_ring_standin` replaces (also
    float64; ``run(..., exact=True)`` installs both). For FP8 comparisons between a parallel and a
    one-process run: with both in float64 the attention outputs agree bit for bit, so no e4m3 code
    downstream sits on the other side of a rounding tie because of fp32 summation order."""
    from fused_dit_ops.ops import _eager
    return [(_eager, "attention", exact_attention),
            (_eager, "attention_unchecked", exact_attention)]


def plain(t):
    t = t + 0
    return t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t


def run(rank, world, init_file, family, ulysses, ring, when, out_dir, ops="all", precision="bf16", offload=False,
        exact=False, attention_precision="bf16"):
    """``precision``, ``attention_precision``: passed to ``fdo.patch``. ``offload`` (precision="fp8"): the
    bf16 weights of the quantised Linears are swapped for CPU copies as on CUDA
    (``integrations.fp8._should_offload``); after the two forwards the worker unpatches, checks the state
    dict is what it was before patching and runs one more forward (the stock model under parallelism:
    ``out3``). ``exact``: every attention step in float64 (:func:`exact_attention_patches`,
    :func:`cpu_ring_standin`)."""
    torch.set_num_threads(1)
    # a file rendezvous (in the test's temporary directory): no TCP port to find free and race for
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import fused_dit_ops as fdo
        from diffusers import ContextParallelConfig
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
        cpu_device_count_shim()
        if ring > 1 or exact:
            cpu_ring_standin()
        if exact:
            for obj, name, fn in exact_attention_patches():
                setattr(obj, name, fn)
        from fused_dit_ops.integrations import engine
        calls = [0]
        cp_attention = engine.cp_attention

        def counting(*a, **k):  # the fused blocks' attention under context parallelism
            out = cp_attention(*a, **k)
            calls[0] += out is not None
            return out
        engine.cp_attention = counting
        if offload:
            from fused_dit_ops.integrations import fp8 as I8
            I8._should_offload = lambda dev, keep: not keep
        m, kw = build(family, precision)
        sd = {k: v.clone() for k, v in m.state_dict().items()} if offload else None
        report = None
        if when == "before":
            report = fdo.patch(m, ops=ops, precision=precision, attention_precision=attention_precision)
        m.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring))
        if when == "after":
            report = fdo.patch(m, ops=ops, precision=precision, attention_precision=attention_precision)
        with torch.no_grad():
            # (the gathered output may be an AsyncCollectiveTensor: any op waits and gives a plain tensor)
            out = plain(m(**kw)[0])
            out2 = plain(m(**kw)[0])  # second forward: cached tables, reused modulation
        extra = {}
        if offload:
            extra["offloaded"] = any("kept on the CPU" in s for s in report.swapped)
            extra["unpatched"] = fdo.unpatch(m)
            extra["unpatch_exact"] = all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
            extra["fp8_buffers_left"] = any("_fused_dit_fp8_" in n for n, _ in m.named_buffers())
            with torch.no_grad():
                extra["out3"] = plain(m(**kw)[0])
        if rank == 0:
            torch.save(dict(out=out, out2=out2, report=str(report) if report is not None else "",
                            stock=dict(report.stock) if report is not None else {},
                            runtime=dict(report.runtime) if report is not None else {}, cp_calls=calls[0],
                            **extra),
                       os.path.join(out_dir, "out.pt"))
    finally:
        # every rank's collectives (diffusers' ring loop issues asynchronous ones) are finished before
        # any rank tears the group down: a rank leaving early made gloo abort a peer still in one
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
    # finished: leave without the interpreter's teardown (a 2-core CI runner once saw a worker abort
    # after its results were saved, "terminate called without an active exception")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
