#!/usr/bin/env python
"""Old vs new ``fused_dit_ops.patch``, in one process, alternating: one block and the model forward.

The old code (``--old-ref``, default 51f9368: the commit before the integration engine) is loaded as
a renamed copy, because both register the ``fused_dit`` op namespace: its ``fused_dit_ops/`` tree,
from ``git archive`` or a tree extracted beforehand (``--old-dir``), is copied to a temp dir and
textually renamed, package ``fused_dit_ops`` -> ``fdo_old`` and op namespace ``fused_dit`` ->
``fdo_old``, in every Python file. Two identical stock diffusers ``QwenImageTransformer2DModel``
(same seed) are patched, one by each version (``--copies 1``, or ``auto`` where two 60-layer models
do not fit, re-patches one model per timing instead; ``unpatch`` restores it exactly).

Fairness: the renamed copy cannot load the compiled ``fused_dit_ops._C`` (it registers its kernels
under ``fused_dit``), so the old code runs ``gate_residual`` / ``joint_qkv_cat`` on Triton. The new
code would use ``_C`` for ``gate_residual`` (the last block of a forward and every block timed
alone); so this script sets ``FUSED_DIT_DISABLE_C=1`` for the whole process: both versions run the
same Triton kernels and differ only in the Python around them. ``--keep-c`` leaves ``_C`` on.

Timing: the harness of ``bench block`` (the block called as the model calls it, its arguments
captured by a pre-hook; ``triton.testing.do_bench`` with L2 flushes, median) and ``bench model``
(CFG steps: cond + uncond forward per step, one timestep per step, CUDA events, median forward).
Each round times both versions, in alternating order. Reported: per-round medians, the ratio
new/old of the medians over rounds, and whether new <= old x 1.01 for the block and the forward at
the benchmark shape (Edit-2511, 4096 + 4096 image tokens). Also, not part of that verdict: the
block's host time per call (started on an idle GPU) and a small-image block (``--small-tokens``,
1024 + 1024 by default), where the eager block is bound by host time. ``--tiny`` runs the same on
the CPU with the tiny config (a smoke test, not a measurement).

    git archive 51f9368 fused_dit_ops | (mkdir -p build/ab_old && tar -x -C build/ab_old)
    python scripts/ab_old_new.py --old-dir build/ab_old --rounds 3 --out bench/results/ab-old-new.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD_PKG = "fdo_old"


def extract_old(ref: str | None, old_dir: str | None, dest: Path) -> str:
    """Put the old ``fused_dit_ops`` into ``dest/fdo_old``, renamed; returns where it came from."""
    src = dest / "fused_dit_ops"
    if old_dir:
        tree = Path(old_dir)
        tree = tree if (tree / "__init__.py").is_file() else tree / "fused_dit_ops"
        if not (tree / "__init__.py").is_file():
            raise SystemExit(f"--old-dir {old_dir}: no fused_dit_ops package there")
        shutil.copytree(tree, src, ignore=shutil.ignore_patterns("__pycache__", "*.so", "_build_status.json"))
        origin = f"dir {old_dir}"
    else:
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref, "fused_dit_ops"],
                             check=True, capture_output=True).stdout
        tf = tempfile.TemporaryFile()
        tf.write(tar)
        tf.seek(0)
        with tarfile.open(fileobj=tf) as t:
            t.extractall(dest, filter="data")
        origin = f"git {ref}"
    pkg = dest / OLD_PKG
    src.rename(pkg)
    for py in pkg.rglob("*.py"):
        s = py.read_text()
        s = s.replace("fused_dit_ops", OLD_PKG)
        s = re.sub(r"\bfused_dit\b", OLD_PKG, s)  # torch.ops.fused_dit, "fused_dit::op", NAMESPACE
        py.write_text(s)
    return origin


def _sync(device):
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _host_ms(call, device, n=30) -> float:
    """Median host time of one call started on an idle GPU (the launches queue up, nothing waits)."""
    ts = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        call()
        ts.append(time.perf_counter() - t0)
    _sync(device)
    return 1e3 * statistics.median(ts)


def time_block(mod, model, inputs, device, rep_ms) -> dict:
    """Median ms of one patched block call (``ms``), its host time (``host_ms``) and its image output;
    ``mod``: the package that patches."""
    import torch
    from fused_dit_ops.bench import harness
    from fused_dit_ops.bench.block import capture_block_call
    mod.patch(model, reuse_mod=False)  # as `bench block`: one repeated call
    try:
        block, args, kwargs = capture_block_call(model, inputs)

        def call():
            with torch.no_grad():
                return block(*args, **kwargs)
        call()
        _sync(device)
        us = harness.time_us_on(device, call, rep_ms=rep_ms)
        host = _host_ms(call, device)
        out = call()[1].detach().float().cpu()
    finally:
        mod.unpatch(model)
    return {"ms": us / 1e3, "host_ms": host, "out": out}


def time_model(mod, model, cond, uncond, device, warmup, steps) -> dict:
    """(median ms per forward over ``steps`` CFG steps, the cond output), as `bench model` times."""
    import torch
    mod.patch(model, reuse_mod=True)  # as `bench model`: uncond reuses cond's modulation GEMVs
    cuda = torch.device(device).type == "cuda"

    def mark():
        if cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(a, b):
        return a.elapsed_time(b) if cuda else 1e3 * (b - a)

    t0v = float(cond["timestep"].flatten()[0])
    ts = [torch.full_like(cond["timestep"], t0v * (1 - 0.9 * i / (warmup + steps))) for i in range(warmup + steps)]
    try:
        with torch.no_grad():
            for t in ts[:warmup]:
                model(**dict(cond, timestep=t))
                model(**dict(uncond, timestep=t))
            _sync(device)
            marks = []
            for t in ts[warmup:]:
                a = mark()
                model(**dict(cond, timestep=t))
                b = mark()
                model(**dict(uncond, timestep=t))
                c = mark()
                marks.append((a, b, c))
            _sync(device)
            out = model(**cond)[0].detach().float().cpu()
    finally:
        mod.unpatch(model)
    per_fwd = [ms(a, b) for a, b, _ in marks] + [ms(b, c) for _, b, c in marks]
    return {"ms": statistics.median(per_fwd), "out": out}


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old-ref", default="51f9368", help="git ref of the old code (default 51f9368)")
    ap.add_argument("--old-dir", default=None, help="a tree extracted beforehand (holding fused_dit_ops/); "
                                                     "used instead of git archive")
    ap.add_argument("--out", default=None, help="JSON file to write")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each times old and new (default 3)")
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU: a smoke run")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (with --tiny)")
    ap.add_argument("--layers", type=int, default=None, help="model depth (default 60; --tiny 2)")
    ap.add_argument("--copies", default="auto", choices=("auto", "1", "2"),
                    help="model copies for the forward: 2 (one per version) or 1 (re-patched); auto: 2 if they fit")
    ap.add_argument("--rep-ms", type=int, default=500, help="do_bench time per block timing (default 500)")
    ap.add_argument("--steps", type=int, default=5, help="timed CFG steps per model timing (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up CFG steps per model timing (default 2)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: block, block_small, model")
    ap.add_argument("--small-tokens", default="1024,1024",
                    help="image tokens of the small-image block (block_small: host-bound; default 1024,1024)")
    ap.add_argument("--keep-c", action="store_true", help="leave fused_dit_ops._C on for the new code")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    if not args.keep_c:
        os.environ["FUSED_DIT_DISABLE_C"] = "1"  # before either package is imported (module doc)
    tmp = Path(tempfile.mkdtemp(prefix="ab_old_new_"))
    try:
        origin = extract_old(args.old_ref, args.old_dir, tmp)
        sys.path.insert(0, str(ROOT))
        sys.path.insert(1, str(tmp))
        return _run(args, origin)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args, origin) -> int:
    import importlib

    import torch
    import triton

    old = importlib.import_module(OLD_PKG)
    import fused_dit_ops as new
    from fused_dit_ops.bench import harness
    from fused_dit_ops.models import build_qwen_image_transformer, make_qwen_inputs

    device = args.device or ("cpu" if args.tiny else "cuda")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny for the CPU smoke run")
    config = "tiny" if args.tiny else "edit-2511"
    layers = args.layers or (2 if args.tiny else 60)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    versions = {"old": old, "new": new}
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    res = {"benchmark": "old vs new patch code, one process, alternating rounds", "tool": "scripts/ab_old_new.py",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "old": origin, "new_commit": harness.git_commit(), "env": harness.env_info(),
           "gpu": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu",
           "torch": torch.__version__, "triton": triton.__version__,
           "fused_dit_disable_c": os.environ.get("FUSED_DIT_DISABLE_C", ""), "config": config, "dtype": str(dtype),
           "rounds": args.rounds, "block": {}, "model": {}}

    small = None if args.tiny else tuple(int(t) for t in args.small_tokens.split(","))
    for part, tokens in (("block", None), ("block_small", small)):
        if part in skip or (part == "block_small" and small is None):
            continue
        blocks = {v: build_qwen_image_transformer(config, num_layers=1, device=device, dtype=dtype) for v in versions}
        inputs = make_qwen_inputs(blocks["old"], img_tokens=tokens)
        res[part] = {"shape": {"img_tokens": inputs["hidden_states"].shape[1],
                               "txt_len": inputs["encoder_hidden_states"].shape[1]}}
        _rounds(res[part], args.rounds, versions,
                lambda v: time_block(versions[v], blocks[v], inputs, device, args.rep_ms))
        del blocks
    if "model" not in skip:
        m0 = build_qwen_image_transformer(config, num_layers=layers, device=device, dtype=dtype)
        nbytes = sum(p.numel() * p.element_size() for p in m0.parameters())
        copies = int(args.copies) if args.copies != "auto" else (
            2 if torch.device(device).type != "cuda"
            or torch.cuda.mem_get_info()[0] > 1.25 * nbytes + (12 << 30) else 1)
        models = {"old": m0, "new": build_qwen_image_transformer(config, num_layers=layers, device=device,
                                                                 dtype=dtype) if copies == 2 else m0}
        txt = (9, 7) if args.tiny else (225, 208)
        cond = make_qwen_inputs(m0, txt_len=txt[0], seed=1)
        uncond = make_qwen_inputs(m0, txt_len=txt[1], seed=2)
        uncond["hidden_states"] = cond["hidden_states"]  # CFG: same latents, two prompts
        res["model"]["shape"] = {"layers": layers, "img_tokens": cond["hidden_states"].shape[1],
                                 "txt_len_cond": txt[0], "txt_len_uncond": txt[1], "copies": copies,
                                 "weights_gb": round(nbytes / 1e9, 2)}
        _rounds(res["model"], args.rounds, versions,
                lambda v: time_model(versions[v], models[v], cond, uncond, device, args.warmup, args.steps))
        del models, m0

    print(f"\nold ({origin}) vs new ({res['new_commit']}) on {res['gpu']}, torch {torch.__version__}, "
          f"triton {triton.__version__}, FUSED_DIT_DISABLE_C={res['fused_dit_disable_c'] or '0'}")
    print(f"{'part':<12}{'old ms':>10}{'new ms':>10}{'new/old':>9}{'host old':>10}{'host new':>10}  per-round new/old")
    ok = True
    for part in ("block", "model", "block_small"):
        r = res.get(part, {})
        if "median_ms" not in r:
            continue
        if part != "block_small":  # the criterion: the benchmark shape's block and forward
            ok &= r["new_not_slower_by_1pct"]
        host = r.get("median_host_ms", {})
        print(f"{part:<12}{r['median_ms']['old']:>10.3f}{r['median_ms']['new']:>10.3f}{r['ratio_new_over_old']:>9.4f}"
              + (f"{host['old']:>10.3f}{host['new']:>10.3f}" if host else " " * 20) + "  "
              + ", ".join(f"{x:.4f}" for x in r["round_ratios"]) + f"  (outputs rel diff {r['rel_diff_new_vs_old']:.2e})")
    measured = [p for p in ("block", "model") if "median_ms" in res.get(p, {})]
    res["verdict"] = ("not measured (block and model skipped)" if not measured
                      else f"new within 1% of old ({' and '.join(measured)} at the benchmark shape)" if ok
                      else "new slower than old by more than 1%")
    print(res["verdict"] + (" (CPU smoke run: not a measurement)" if args.tiny else ""))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
        print(f"wrote {args.out}")
    return 0


def _rounds(into: dict, rounds: int, versions: dict, timed) -> None:
    """Each round times both versions (the order alternates); medians, ratios, output difference."""
    per = {v: [] for v in versions}
    host = {v: [] for v in versions}
    outs = {}
    for r in range(rounds):
        order = list(versions) if r % 2 == 0 else list(versions)[::-1]
        for v in order:
            got = timed(v)
            per[v].append(got["ms"])
            if "host_ms" in got:
                host[v].append(got["host_ms"])
            outs[v] = got["out"]
            print(f"  round {r + 1}/{rounds} {v}: {got['ms']:.3f} ms"
                  + (f" (host {got['host_ms']:.3f} ms)" if "host_ms" in got else ""), flush=True)
    med = {v: statistics.median(xs) for v, xs in per.items()}
    into["round_ms"] = per
    into["median_ms"] = med
    if all(host.values()):
        into["round_host_ms"] = host
        into["median_host_ms"] = {v: statistics.median(xs) for v, xs in host.items()}
    into["round_ratios"] = [n / o for n, o in zip(per["new"], per["old"])]
    into["ratio_new_over_old"] = med["new"] / med["old"]
    into["new_not_slower_by_1pct"] = med["new"] <= 1.01 * med["old"]
    into["rel_diff_new_vs_old"] = _rel(outs["new"], outs["old"])


if __name__ == "__main__":
    sys.exit(main())
