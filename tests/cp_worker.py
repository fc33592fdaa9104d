"""Worker of tests/test_context_parallel.py: one rank of a CPU (gloo) process group running a tiny
diffusers model with context parallelism enabled, patched or not; rank 0 saves the output."""
from __future__ import annotations

import os

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
}


def build(family):
    from fused_dit_ops import models
    b, bkw, mk, mkw = FAMILIES[family]
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
    raises for it and those that return it are CUDA-only. For the CPU test of ring attention only:
    ``native``'s forward op gets a float64 math stand-in that returns (out, lse) in the layout the
    ring merge takes (out [B, S, H, D], lse [B, S, H]). Ulysses never asks for the lse."""
    from diffusers.models import attention_dispatch as ad

    def op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
           enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        assert attn_mask is None and not is_causal and dropout_p == 0.0
        q, k, v = (t.double() for t in (query, key, value))
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (scale if scale is not None else q.shape[-1] ** -0.5)
        lse = torch.logsumexp(s, dim=-1)  # [B, H, Sq]
        out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v).to(query.dtype)
        lse = lse.transpose(1, 2).float()
        return (out, lse) if return_lse else out
    ad._native_attention_forward_op = op


def plain(t):
    t = t + 0
    return t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t


def run(rank, world, port, family, ulysses, ring, when, out_dir, ops="all"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import fused_dit_ops as fdo
        from diffusers import ContextParallelConfig
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
        _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
        cpu_device_count_shim()
        if ring > 1:
            cpu_ring_standin()
        from fused_dit_ops.integrations import engine
        calls = [0]
        cp_attention = engine.cp_attention

        def counting(*a, **k):  # the fused blocks' attention under context parallelism
            out = cp_attention(*a, **k)
            calls[0] += out is not None
            return out
        engine.cp_attention = counting
        m, kw = build(family)
        report = None
        if when == "before":
            report = fdo.patch(m, ops=ops)
        m.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring))
        if when == "after":
            report = fdo.patch(m, ops=ops)
        with torch.no_grad():
            # (the gathered output may be an AsyncCollectiveTensor: any op waits and gives a plain tensor)
            out = plain(m(**kw)[0])
            out2 = plain(m(**kw)[0])  # second forward: cached tables, reused modulation
        if rank == 0:
            torch.save(dict(out=out, out2=out2, report=str(report) if report is not None else "",
                            stock=dict(report.stock) if report is not None else {},
                            runtime=dict(report.runtime) if report is not None else {}, cp_calls=calls[0]),
                       os.path.join(out_dir, "out.pt"))
    finally:
        # every rank's collectives (diffusers' ring loop issues asynchronous ones) are finished before
        # any rank tears the group down: a rank leaving early made gloo abort a peer still in one
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
