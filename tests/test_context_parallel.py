"""The fused blocks under diffusers' context parallelism (``model.enable_parallelism(config=
ContextParallelConfig(...))``): patched + parallel vs the stock model in one process.

CPU: a gloo process group of 2 or 4 processes (torch.multiprocessing spawn), tiny random models in
fp32, Ulysses (all-to-all) attention through diffusers' ``native`` backend, patch before or after
``enable_parallelism``; the output of rank 0 (diffusers gathers it) against the stock single-process
output, relative Frobenius error < 1e-5. Ring attention does not run on CPU with diffusers' backends:
its ring needs a backend that returns the log-sum-exp, and those with context-parallel support (flash,
_native_flash, _native_cudnn, sage) are CUDA-only (``native`` raises "Native attention does not
support return_lse=True"). The ring tests here give ``native`` a float64 math stand-in for its forward
op that returns the log-sum-exp (``cp_worker.cpu_ring_standin``: diffusers' ring loop and merge run,
the per-step attention is the stand-in's); the GPU test runs ring on a real backend. Worker:
tests/cp_worker.py.

``precision="fp8"``: FP8 patched + parallel vs FP8 patched in one process, with every attention step in
float64 in both runs (see REL_FP8 below for why, and what was measured), 2 processes Ulysses per family
and order, 4 processes, ring, and diffusers' native attention (slow); ``attention_precision="fp8"``
under parallelism runs the model-dtype attention, counted.

Without processes: what each rank needs (the RoPE tables and the per-token parameter-set index of a
shard), and the stock fallback for tensor parallelism.

Default run of this file ``-m "not slow"``: under a minute on two cores; the ``slow`` ones (4 processes,
the other families and orders) a few minutes more.

GPU (@pytest.mark.gpu): supporting parallelism costs a run without it nothing (one GPU; diffusers has
no degree-1 context parallelism: its config refuses ring_degree == ulysses_degree == 1 and its
dispatcher has no branch for it), and ring + Ulysses on 2 GPUs (skipped with fewer).
"""
from __future__ import annotations

import os
import tempfile
import types

import pytest
import torch

pytest.importorskip("diffusers")

import cp_worker  # noqa: E402
from helpers import native_diffusers_backend, rel_err  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("native_diffusers_backend")
REL = 1e-5
MLP_NOTE = {"mlp"}  # the GELU-epilogue MLP is CUDA-only: the one expected stock entry on CPU


def _parallel(family, world, when, ulysses=None, ring=1, precision="bf16", offload=False, exact=False,
              attention_precision="bf16"):
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(cp_worker.run, args=(world, os.path.join(d, "rendezvous"), family, ulysses or world // ring, ring,
                                      when, d, "all", precision, offload, exact, attention_precision),
                 nprocs=world, join=True)
        return torch.load(os.path.join(d, "out.pt"), weights_only=False)


def _stock(family, precision="bf16"):
    m, kw = cp_worker.build(family, precision)
    with torch.no_grad():
        return m(**kw)[0]


def _check(family, world, when, blocks_per_forward, ring=1):
    r = _parallel(family, world, when, ring=ring)
    ref = _stock(family)
    assert r["out"].shape == ref.shape
    assert rel_err(r["out"], ref) < REL, rel_err(r["out"], ref)
    assert rel_err(r["out2"], ref) < REL  # second forward: cached tables, reused modulation
    if when == "none":
        return r
    assert set(r["stock"]) <= MLP_NOTE | {"double_stream_modulation_img/double_stream_modulation_txt",
                                          "single_stream_modulation"}, r["report"]
    assert not r["runtime"], r["runtime"]  # nothing fell back to stock
    assert f"context parallelism (ulysses_degree={world // ring}, ring_degree={ring})" in r["report"], r["report"]
    assert "backend native" in r["report"], r["report"]
    # every block's attention went through diffusers' context-parallel dispatch (+1: the patch-time
    # probe when patched after enable_parallelism)
    assert r["cp_calls"] == 2 * blocks_per_forward + (when == "after"), r["cp_calls"]
    return r


# --- 2 processes (default) ---------------------------------------------------------------------------

def test_qwen_edit_2511_ulysses2_patch_before():
    # zero_cond_t: a per-token parameter-set index over 16 target + 8 reference tokens; rank 1's shard
    # holds both sets
    _check("qwen", 2, "before", 2)


def test_flux_ulysses2_patch_after():
    _check("flux", 2, "after", 4)


def test_wan_ti2v_ulysses2_patch_before():
    # per-token timesteps: sharded by diffusers' model hook, collapsed per shard to two sets + an index
    _check("wan-ti2v", 2, "before", 2)


def test_qwen_edit_2511_ring2_patch_after():
    # ring attention with a CPU stand-in for the log-sum-exp forward op (cp_worker.cpu_ring_standin)
    _check("qwen", 2, "after", 2, ring=2)


# --- slow: 4 processes, the other families and orders --------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("family,blocks", [("qwen", 2), ("flux", 4), ("wan", 2), ("flux2", 4)])
def test_ulysses4(family, blocks):
    _check(family, 4, "after" if family in ("qwen", "wan") else "before", blocks)


@pytest.mark.slow
@pytest.mark.parametrize("family,when,blocks", [("qwen-plain", "after", 2), ("flux2", "after", 4)])
def test_ulysses2_other_orders(family, when, blocks):
    _check(family, 2, when, blocks)


@pytest.mark.slow
@pytest.mark.parametrize("family,world,ring,blocks", [("flux", 4, 2, 4), ("wan-ti2v", 2, 2, 2)])
def test_ring(family, world, ring, blocks):
    _check(family, world, "before", blocks, ring=ring)


@pytest.mark.slow
def test_wan_ti2v_parallel_enabled_after_patch():
    # the model's split hook is under the patched forward: the fused forward runs it to shard the inputs
    _check("wan-ti2v", 2, "after", 2)


# --- precision="fp8" (FP8 GEMMs) under context parallelism ------------------------------------------------

# FP8 patched + parallel (rank 0's gathered output) vs FP8 patched in one process, same builder and seeds.
# The FP8 GEMMs and the quantising norm ops are per token, so a rank quantises its rows as the one-process
# run does. An ulp of difference anywhere upstream matters in FP8, though: a value next to an e4m3
# rounding tie flips one code, the next quantisations turn that into more flips, and after a few blocks
# the two outputs differ by about the FP8 error itself. Measured on Flux.1 (FP8 vs the fp32 model:
# 4.5e-2): parallel through diffusers' native SDPA vs one process through our fp32 CPU attention, one code
# flipped in the first block's GELU output, 1.7e-2 at the output; 4 processes with float64 attention,
# where the context embedder (an fp32 Linear) gets 3 text rows per rank, 1.65e-2. No tolerance between
# "bit for bit" and "FP8 noise" means anything, so the exact tests remove the ulps instead: every
# attention step in float64 in both runs (cp_worker.exact_attention_patches, cpu_ring_standin: the same
# result whatever the order of the keys), one thread in both, and at least 4 rows per stream and rank
# (MKL's sgemm rounds 1 to 3 rows otherwise than the same rows of a longer matrix, measured on this
# AVX512 machine; from 4 rows on it gave the same bits). Measured then: 0.0 for every family and order.
# REL_FP8 leaves room for fp32 ulps that flip no code (about 2e-7 with two threads in the one-process
# run); a flipped code gives 1e-3 and more. On a machine whose BLAS rounds a shard's rows otherwise
# even so, an exact test that misses REL_FP8 is held to the FP8_RATIO rule below instead.
REL_FP8 = 1e-6
# Where ulps remain (the ring's log-sum-exp merge in fp32, diffusers' native SDPA), a flip makes the
# parallel output another FP8 rounding of the same computation: as far from the fp32 model as the
# one-process FP8 output (measured ratio 1.03 on Flux.1). A wrong shard, table or index moves it much
# farther, a block off the FP8 path much closer (and is counted in report.runtime).
FP8_RATIO = 0.25
FP8_STOCK_OK = MLP_NOTE | {"double_stream_modulation_img/double_stream_modulation_txt", "single_stream_modulation"}


def _fp8_single(family, monkeypatch, attention_precision="bf16"):
    """The FP8 patched model in this process, as the exact workers run it (float64 attention, one thread)."""
    import fused_dit_ops as fdo
    for obj, name, fn in cp_worker.exact_attention_patches():
        monkeypatch.setattr(obj, name, fn)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m, kw = cp_worker.build(family, "fp8")
        report = fdo.patch(m, precision="fp8", attention_precision=attention_precision)
        assert not any(k.startswith("fp8") for k in report.stock) and "precision" not in report.stock, report
        with torch.no_grad():
            return m(**kw)[0]
    finally:
        torch.set_num_threads(threads)


def _fp8_ratio_rule(family, what, attention, out, ref, err):
    stock = _stock(family, "fp8")
    e_one, e_par = rel_err(ref, stock), rel_err(out, stock)
    print(f"{what}, {attention} attention: rel_fro vs one process {err:.3e}; vs the fp32 model {e_par:.3e}, "
          f"one process {e_one:.3e}")
    assert err < e_one and abs(e_par / e_one - 1) < FP8_RATIO, (err, e_par, e_one)


def _check_fp8(family, when, blocks_per_forward, monkeypatch, world=2, ring=1, offload=False, exact=True):
    """``exact``: float64 attention in both runs, output within REL_FP8 of the one-process run; else
    (diffusers' native SDPA, or a ring) the FP8_RATIO rule against the fp32 model."""
    r = _parallel(family, world, when, ring=ring, precision="fp8", offload=offload, exact=exact)
    ref = _fp8_single(family, monkeypatch)
    assert r["out"].shape == ref.shape
    err = rel_err(r["out"], ref)
    what = f"fp8 {family}, {world} ranks (ulysses {world // ring}, ring {ring}), patch {when}"
    if exact and ring == 1 and err < REL_FP8:
        print(f"{what}: rel_fro vs one process {err:.3e}")
    else:
        # a ring, native SDPA, or a BLAS that rounds a shard's few rows otherwise than this machine's
        # MKL (the exact setup removes the ulps only where the GEMMs round the same): the FP8_RATIO rule
        _fp8_ratio_rule(family, what, "float64" if exact else "native", r["out"], ref, err)
    # second forward: cached tables, reused modulation, look-ahead; same rows, same bits
    assert rel_err(r["out2"], r["out"]) < REL_FP8
    assert "precision" not in r["stock"] and set(r["stock"]) <= FP8_STOCK_OK, r["report"]
    assert "FP8 e4m3 GEMMs" in r["report"], r["report"]
    assert not r["runtime"], r["runtime"]  # no block left the FP8 path, nothing ran stock
    assert f"context parallelism (ulysses_degree={world // ring}, ring_degree={ring})" in r["report"], r["report"]
    # every FP8 block's attention went through diffusers' context-parallel dispatch (+1: the probe)
    assert r["cp_calls"] == 2 * blocks_per_forward + (when == "after"), r["cp_calls"]
    if offload:
        # the bf16 weights swapped out while patched (as on CUDA), back bit for bit after unpatch
        assert r["offloaded"] and r["unpatched"] and r["unpatch_exact"] and not r["fp8_buffers_left"], r
        assert rel_err(r["out3"], _stock(family, "fp8")) < REL  # unpatched: the stock model under parallelism
    return r


def test_fp8_flux_ulysses2_patch_before_offloaded_weights(monkeypatch):
    # 2 double-stream + 2 single-stream blocks; the bf16 weights offloaded as on CUDA, unpatched after
    _check_fp8("flux", "before", 4, monkeypatch, offload=True)


def test_fp8_wan_ulysses2_patch_after(monkeypatch):
    _check_fp8("wan", "after", 2, monkeypatch)


def test_fp8_qwen_edit_2511_ulysses2_patch_before(monkeypatch):
    # zero_cond_t: the per-token index of each rank's shard selects the modulation (FP8 norm ops)
    _check_fp8("qwen", "before", 2, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("family,when,blocks", [
    ("flux", "after", 4), ("wan", "before", 2), ("qwen", "after", 2),
    ("flux2", "before", 4), ("flux2", "after", 4), ("wan-ti2v", "before", 2), ("wan-ti2v", "after", 2)])
def test_fp8_ulysses2_other_families_and_orders(family, when, blocks, monkeypatch):
    _check_fp8(family, when, blocks, monkeypatch, offload=family == "wan-ti2v")


@pytest.mark.slow
@pytest.mark.parametrize("family,world,ring,blocks,exact", [
    ("wan", 4, 1, 2, True),  # 6 image rows per rank (the text is not sharded)
    ("qwen", 2, 2, 2, True), ("wan", 4, 2, 2, True),  # ring: its merge rounds in fp32
    ("flux", 2, 1, 4, False)])  # diffusers' native SDPA per rank (float64 in the one-process run)
def test_fp8_4_processes_ring_and_native_attention(family, world, ring, blocks, exact, monkeypatch):
    _check_fp8(family, "before", blocks, monkeypatch, world=world, ring=ring, exact=exact)


FP8_ATTN_CP = "fp8 attention under context parallelism: model dtype attention (diffusers' all-to-all / ring)"


@pytest.mark.parametrize("family,when,blocks", [
    ("flux-hd32", "after", 4),
    pytest.param("wan-hd32", "before", 2, marks=pytest.mark.slow)])
def test_fp8_attention_under_context_parallelism_counts_model_dtype_attention(family, when, blocks, monkeypatch):
    """attention_precision="fp8" does not run under context parallelism (diffusers' all-to-all / ring
    takes model-dtype q, k, v): each such block call runs the model-dtype QK norm + RoPE and
    diffusers' attention, counted in report.runtime; the FP8 GEMMs stay. Output: that of FP8 GEMMs
    with model-dtype attention in one process (REL_FP8, as above). Head_dim 32: FP8 attention applies
    to the model."""
    r = _parallel(family, 2, when, precision="fp8", exact=True, attention_precision="fp8")
    ref = _fp8_single(family, monkeypatch)
    err = rel_err(r["out"], ref)
    print(f"fp8 GEMMs + attention_precision=fp8 {family}, 2 ranks, patch {when}: rel_fro vs FP8 GEMMs with "
          f"model-dtype attention in one process {err:.3e}")
    if err >= REL_FP8:  # see _check_fp8
        _fp8_ratio_rule(family, f"fp8 attention {family}", "float64", r["out"], ref, err)
    assert rel_err(r["out2"], r["out"]) < REL_FP8
    assert "attention_precision" not in r["stock"] and "precision" not in r["stock"], r["report"]
    assert "FP8 e4m3 attention" in r["report"] or "FP8 e4m3 self-attention" in r["report"], r["report"]
    n = 2 * blocks + (when == "after")  # (+1: the probe runs the first block under the parallel config)
    assert r["runtime"] == {FP8_ATTN_CP: n}, r["runtime"]
    assert r["cp_calls"] == n, r["cp_calls"]


# --- what each rank needs, without processes ------------------------------------------------------------

def test_rope_tables_of_a_shard_are_the_shard_of_the_tables():
    """Under parallelism the RoPE module keeps its stock output, which diffusers' hooks shard by token
    rows; the blocks convert each rank's rows: the same rows as the tables of the whole sequence."""
    from fused_dit_ops.integrations import diffusers_flux, diffusers_qwen, diffusers_wan
    m, kw = cp_worker.build("qwen")
    vid, txt = m.pos_embed([(1, 4, 4), (1, 2, 4)], "cpu", max_txt_seq_len=12)
    full = diffusers_qwen.as_rope_tables((vid, txt))
    for world in (2, 4):
        for r in range(world):
            part = diffusers_qwen.as_rope_tables((vid.chunk(world, 0)[r], txt.chunk(world, 0)[r]))
            assert torch.equal(part[0], full[0].chunk(world, 0)[r]) and torch.equal(part[1], full[1].chunk(world, 0)[r])
    m, kw = cp_worker.build("flux")
    cos, sin = m.pos_embed(torch.cat([kw["txt_ids"], kw["img_ids"]], 0))
    full = diffusers_flux.as_rope_tables((cos, sin))
    for r in range(2):
        assert torch.equal(diffusers_flux.as_rope_tables((cos.chunk(2, 0)[r], sin.chunk(2, 0)[r])), full.chunk(2, 0)[r])
    m, kw = cp_worker.build("wan")
    cos, sin = m.rope(kw["hidden_states"])  # [1, L, 1, D]: diffusers shards dim 1
    full = diffusers_wan.as_rope_tables((cos, sin))
    for r in range(4):
        part = diffusers_wan.as_rope_tables((cos.chunk(4, 1)[r], sin.chunk(4, 1)[r]))
        assert torch.equal(part, full.chunk(4, full.dim() - 2)[r] if full.dim() > 2 else full.chunk(4, 0)[r])


@pytest.mark.parametrize("world", [2, 4])
def test_ti2v_index_of_a_shard_selects_each_tokens_timestep(world):
    """Wan TI2V: a rank collapses its own shard of the per-token timesteps to two sets + an index; every
    token's selected set is its own timestep (a shard may hold one value only: both sets equal)."""
    from fused_dit_ops.integrations import diffusers_wan
    L, first = 24, 8
    ts = torch.full((2, L), 700.0)
    ts[:, :first] = 0.0
    ts[1] = torch.where(ts[1] > 0, torch.tensor(300.0), ts[1])
    st = types.SimpleNamespace(cp=True)
    for part in ts.chunk(world, 1):
        ts2, idx = diffusers_wan._collapse(st, part)
        B = part.shape[0]
        sel = torch.where(idx.bool(), ts2[B:, None], ts2[:B, None])
        assert torch.equal(sel, part)
        assert idx.shape == part.shape and idx.dtype == torch.int32


def test_rope_rows_must_be_the_ranks_tokens_under_parallelism():
    """The fused ops read row l for token l of a longer table; under parallelism a table the plan did
    not shard (FLUX.2 with [S, 4] ids) must not be read silently."""
    from fused_dit_ops.integrations import engine
    tab = torch.zeros(40, 24)
    engine.cp_check_rows(types.SimpleNamespace(cp=False), tab, 20)  # no parallelism: longer tables pass
    engine.cp_check_rows(types.SimpleNamespace(cp=True), (tab[:14], tab[:6]), 20)
    with pytest.raises(ValueError, match="40 rows for this rank's 20 tokens"):
        engine.cp_check_rows(types.SimpleNamespace(cp=True), tab, 20)


def test_tensor_parallelism_stays_stock_with_the_reason():
    import fused_dit_ops as fdo
    m, kw = cp_worker.build("flux")
    m._parallel_config = types.SimpleNamespace(tensor_parallel_config=object(), context_parallel_config=None)
    report = fdo.patch(m)
    assert "tensor parallelism" in report.stock["model"], report
    from fused_dit_ops.integrations.engine import is_patched
    assert not is_patched(m)


def test_fp8_with_tensor_parallelism_stays_stock_with_the_reason():
    """FP8 runs under context parallelism (tests above); tensor parallelism (sharded Linears) still
    leaves the model stock, whatever the precision."""
    import fused_dit_ops as fdo
    m, kw = cp_worker.build("flux", "fp8")
    m._parallel_config = types.SimpleNamespace(tensor_parallel_config=object(), context_parallel_config=object())
    report = fdo.patch(m, precision="fp8")
    assert "tensor parallelism" in report.stock["model"], report
    assert "precision" not in report.stock and not any("FP8" in s for s in report.swapped), report
    from fused_dit_ops.integrations.engine import is_patched
    assert not is_patched(m)


# --- GPU ------------------------------------------------------------------------------------------------

def test_bench_parallel_degree1_cpu_smoke():
    from fused_dit_ops.bench.parallel import degree1_overhead
    r = degree1_overhead(family="flux", config="tiny", layers=None, img_tokens=None, iters=2, device="cpu",
                         rounds=2)
    assert r["rel_err"] == 0 and r["ms_as_shipped"] > 0 and r["ms_without_cp_checks"] > 0, r
    assert r["rounds"] == 2 and r["ratio"] == pytest.approx(r["ms_as_shipped"] / r["ms_without_cp_checks"]), r
    assert not r["runtime"], r
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        degree1_overhead(family="flux", config="tiny", layers=None, img_tokens=None, device="cpu", rounds=0)


@pytest.mark.gpu
def test_gpu_parallel_degree_1_costs_nothing():
    """One GPU: the patched model as shipped vs with its context-parallel checks taken out (diffusers
    has no degree-1 context parallelism): same output, time within 3%."""
    from fused_dit_ops.bench.parallel import degree1_overhead
    r = degree1_overhead(family="flux", config="dev", layers=2, img_tokens=(4096,), iters=20)
    assert r["rel_err"] == 0, r
    assert r["ratio"] < 1.03, r


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("ulysses,ring", [(2, 1), (1, 2)])
def test_gpu_two_gpus_ulysses_and_ring(ulysses, ring):
    """2 GPUs (NCCL), bf16 Flux.1 at real width, 2 + 4 blocks: patched + parallel vs stock + parallel
    (ring through diffusers' flash / cuDNN backend, set with set_attention_backend)."""
    from fused_dit_ops.bench.parallel import spawn_compare
    r = spawn_compare(family="flux", ulysses=ulysses, ring=ring)
    assert r["rel_fro"] < 2e-2, r
    assert not r["runtime"], r
