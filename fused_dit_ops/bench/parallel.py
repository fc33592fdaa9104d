"""``python -m fused_dit_ops bench parallel``: the fused blocks under diffusers' context parallelism.

Two modes:

- ``--degree1`` (one GPU): what the support for context parallelism costs a run without it: the
  patched model as shipped vs the same model with the per-forward parallelism check and the blocks'
  context-parallel attention branch replaced by no-ops (ms per forward of each, their ratio, the
  outputs' relative difference: 0). diffusers has no degree-1 context parallelism to measure
  instead: ``ContextParallelConfig`` refuses ring_degree == ulysses_degree == 1 and its dispatcher
  has no branch for it.
- ``--ulysses U --ring R`` (U x R GPUs of one host, NCCL; spawns U x R processes): stock + parallel
  vs patched + parallel on the same model (patched after ``enable_parallelism``; unpatched for the
  stock timing), and the patched model's output against the stock parallel output. Ring needs a
  diffusers attention backend that returns the log-sum-exp: ``--backend`` (default ``_native_cudnn``
  with ring, else diffusers' active backend) is set with ``set_attention_backend`` on every rank.

``--model`` qwen | flux | flux2 | wan, ``--config`` (default: the real one: edit-2511, dev, dev,
t2v-14b), ``--layers``, ``--tokens`` (image token counts, comma-separated; Wan: F,H,W of the
latent). Token counts must divide by U x R. ``--device cpu --tiny`` (``--degree1`` only): a smoke
run of the same code, fp32.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from . import harness

DEFAULT_CONFIG = {"qwen": "edit-2511", "flux": "dev", "flux2": "dev", "wan": "t2v-14b"}


def _plain(t):
    t = t + 0  # an AsyncCollectiveTensor (diffusers' gather) waits on any op
    return t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t


def _time_ms(fn, device, iters) -> float:
    if device.type == "cuda":
        return harness.time_us(fn) / 1e3
    fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def _time_fixed_ms(fn, iters) -> float:
    """ms per call over a fixed number of calls (every rank runs the same collectives: no adaptive
    iteration counts), after two warm-up calls and a barrier."""
    import torch.distributed as dist
    fn()
    fn()
    torch.cuda.synchronize()
    dist.barrier()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(iters):
        fn()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) / iters


def _forward(model, kw):
    with torch.no_grad():
        return _plain(model(**kw)[0])


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _build(family, config, layers, tokens, device, dtype):
    from ..models import build_model_and_inputs
    m, kw = build_model_and_inputs(family, config, layers, img_tokens=tokens, device=device, dtype=dtype)
    if family == "flux2":  # its context-parallel plan shards [B, S, 4] ids (as the pipeline passes them)
        kw.update(img_ids=kw["img_ids"][None], txt_ids=kw["txt_ids"][None])
    return m, kw


def degree1_overhead(family="flux", config=None, layers=2, img_tokens=(4096,), iters=20, device="cuda",
                     dtype=None, rounds=3) -> dict:
    """The patched model without parallelism, as shipped vs with its context-parallel checks taken out
    (``engine._note_cp`` and ``engine.cp_attention`` replaced by no-ops): what supporting parallelism
    costs a single-GPU run. The two alternate over ``rounds`` rounds; ``ratio`` is the ratio of their
    medians. diffusers has no degree-1 context parallelism to run instead (``ContextParallelConfig``
    refuses ring_degree == ulysses_degree == 1 and its dispatcher has no branch for it)."""
    from ..integrations import engine
    import fused_dit_ops as fdo
    if rounds < 1:
        raise ValueError(f"degree1_overhead: rounds must be >= 1, got {rounds}")
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    m, kw = _build(family, config or DEFAULT_CONFIG[family], layers, img_tokens, device, dtype)
    report = fdo.patch(m)
    saved = engine._note_cp, engine.cp_attention

    def no_note(st, model):
        st.cp = False

    def without_cp(fn):
        engine._note_cp, engine.cp_attention = no_note, lambda *a, **k: None
        try:
            return fn()
        finally:
            engine._note_cp, engine.cp_attention = saved

    out = _forward(m, kw)
    ref = without_cp(lambda: _forward(m, kw))
    shipped, without = [], []
    for _ in range(rounds):
        shipped.append(_time_ms(lambda: _forward(m, kw), device, iters))
        without.append(without_cp(lambda: _time_ms(lambda: _forward(m, kw), device, iters)))
    ms_plain, ms_without = statistics.median(shipped), statistics.median(without)
    return dict(family=family, device=str(device), dtype=str(dtype).replace("torch.", ""), rounds=rounds,
                ms_as_shipped=ms_plain, ms_without_cp_checks=ms_without, ratio=ms_plain / ms_without,
                rel_err=_rel(out, ref), runtime=dict(report.runtime), swapped=list(report.swapped))


def _rank(rank, world, family, config, layers, tokens, ulysses, ring, backend, iters, out_dir):
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    import fused_dit_ops as fdo
    torch.cuda.set_device(rank)
    # the ranks meet through a file in the run's temporary directory (no TCP port picked, then bound)
    dist.init_process_group("nccl", init_method="file://" + os.path.join(out_dir, "rendezvous"), rank=rank,
                            world_size=world)
    try:
        dev = torch.device("cuda", rank)
        m, kw = _build(family, config, layers, tokens, dev, torch.bfloat16)
        if backend:
            m.set_attention_backend(backend)
        m.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring))
        ref = _forward(m, kw)
        ms_stock = _time_fixed_ms(lambda: _forward(m, kw), iters)
        report = fdo.patch(m)
        out = _forward(m, kw)
        ms_fused = _time_fixed_ms(lambda: _forward(m, kw), iters)
        if rank == 0:
            torch.save(dict(ms_stock_parallel=ms_stock, ms_patched_parallel=ms_fused, speedup=ms_stock / ms_fused,
                            rel_fro=_rel(out, ref), runtime=dict(report.runtime), stock=dict(report.stock),
                            report=str(report)), os.path.join(out_dir, "r.pt"))
    finally:
        dist.destroy_process_group()


def spawn_compare(family="flux", ulysses=2, ring=1, config=None, layers=2, img_tokens=(4096,), backend=None,
                  iters=10) -> dict:
    """U x R GPUs: stock + parallel vs patched + parallel (rank 0's numbers)."""
    import torch.multiprocessing as mp
    world = ulysses * ring
    if torch.cuda.device_count() < world:
        raise SystemExit(f"needs {world} GPUs, found {torch.cuda.device_count()}")
    if backend is None and ring > 1:
        backend = "_native_cudnn"
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_rank, args=(world, family, config or DEFAULT_CONFIG[family], layers, img_tokens,
                              ulysses, ring, backend, iters, d), nprocs=world, join=True)
        r = torch.load(os.path.join(d, "r.pt"), weights_only=False)
    return dict(family=family, ulysses=ulysses, ring=ring, backend=backend or "diffusers active", **r)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fused_dit_ops bench parallel",
                                description=harness.plain_doc(__doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="flux", choices=sorted(DEFAULT_CONFIG))
    p.add_argument("--config", default=None)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", default=None, help="image token counts, comma-separated (Wan: F,H,W)")
    p.add_argument("--degree1", action="store_true", help="one GPU: degree-1 context parallelism vs none")
    p.add_argument("--ulysses", type=int, default=1)
    p.add_argument("--ring", type=int, default=1)
    p.add_argument("--backend", default=None, help="diffusers attention backend (set_attention_backend)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="--degree1: rounds, the two providers alternating "
                                                         "(ratio of medians)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    tokens = tuple(int(t) for t in a.tokens.split(",")) if a.tokens else None
    config = "tiny" if a.tiny else a.config
    if a.degree1 or a.ulysses * a.ring == 1:
        if a.device.startswith("cuda"):
            harness.require_cuda()
        if tokens is None and not a.tiny:
            tokens = (4096,) if a.model != "wan" else None
        r = degree1_overhead(a.model, config, None if a.tiny else a.layers, tokens, a.iters, a.device,
                             rounds=a.rounds)
        name = "parallel-degree1"
    else:
        harness.require_cuda()
        r = spawn_compare(a.model, a.ulysses, a.ring, config, a.layers, tokens or (4096,), a.backend, a.iters)
        name = f"parallel-u{a.ulysses}r{a.ring}"
    row = {k: v for k, v in r.items() if k not in ("report", "swapped")}
    print(harness.format_table([row], [k for k in row if k not in ("runtime", "stock")]))
    print("runtime fallbacks:", r.get("runtime") or "none")
    print("results:", harness.write_results(name, [row], out_dir=a.out))
    return 0
