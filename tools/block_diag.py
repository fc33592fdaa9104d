"""Where does one Qwen-Image-Edit block's time go on the GPU machine? (diagnostic, GPU only)

For the stock and the patched block (real dims, bf16, the call captured from a 1-layer model as
``bench block`` does) this measures:
  gpu_ms   : GPU time alone, by CUDA-graph replay of the eager block (no host cost);
  host_ms  : host time per call while the GPU is kept busy (launch-bound if >= gpu_ms);
  e2e_ms   : back-to-back eager calls, wall clock per call (what ``bench block`` sees);
  syncs    : warnings from torch.cuda.set_sync_debug_mode during one call;
and, for the patched block, a cProfile of a few calls (top functions by own time). With
``--fast-launch both`` the patched block is measured with the Triton fast launch on and off.
Writes block-diag.json (and the cProfile text) to $OUT or --out.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import time
import warnings

import torch


def gpu_ms_graph(call, reps=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        call()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del g
    times.sort()
    return times[len(times) // 2]


def host_times(call, n=8):
    """(wall ms, this thread's CPU ms) per call while the GPU is kept busy. The CPU time leaves out
    time the thread was descheduled, which the shared GPU hosts add to wall time at random."""
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s of GPU spin so that launches never wait on the GPU
    t, c = time.perf_counter(), time.thread_time()
    for _ in range(n):
        call()
    dt, dc = (time.perf_counter() - t) / n * 1e3, (time.thread_time() - c) / n * 1e3
    torch.cuda.synchronize()
    return dt, dc


def host_ms(call, n=8):
    return host_times(call, n)[0]


def e2e_ms(call, n=20):
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def sync_warnings(call):
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sorted({str(x.message).splitlines()[0][:160] for x in w})


def cprofile_text(call, n=5, top=35):
    """cProfile of n calls, GPU kept busy; per call: own (tottime) and cumulative host us by function."""
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        call()
    pr.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(pr).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    rows = [(tt / n * 1e6, ct / n * 1e6, nc / n, f"{os.path.basename(f)}:{ln}({name})")
            for (f, ln, name), (cc, nc, tt, ct, _) in stats.items()]
    total_tt = sum(r[0] for r in rows)
    calls = sum(r[2] for r in rows)
    out = [f"cProfile, {n} calls: {total_tt:.1f} us own time and {calls:.0f} function calls per call "
           "(cProfile adds ~0.5-1 us per Python call)"]
    for title, key in (("by own time", 0), ("by cumulative time", 1)):
        out.append(f"\n{title}: own_us  cum_us  calls_per_call  function")
        for r in sorted(rows, key=lambda r: -r[key])[:top]:
            out.append(f"{r[0]:9.1f} {r[1]:9.1f} {r[2]:7.1f}  {r[3]}")
    return "\n".join(out)


def cpu_ops_text(call, n=5, top=30):
    """torch.profiler CPU-side view of a few calls (GPU kept busy): host time by op, self and total."""
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            call()
    torch.cuda.synchronize()
    t = prof.key_averages()
    return (t.table(sort_by="self_cpu_time_total", row_limit=top) + "\n"
            + t.table(sort_by="cpu_time_total", row_limit=top))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fast-launch", default="both", choices=["on", "off", "both"])
    ap.add_argument("--pack-both", action="store_true", help="also the patched block with pack_qkv=False")
    ap.add_argument("--img-tokens", type=int, nargs="+", default=None,
                    help="token count per image, target first (default 4096 4096)")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cprofile-calls", type=int, default=5, help="calls profiled by cProfile (stock and patched block; more than ~5 can fill the launch queue behind the GPU sleep)")
    args = ap.parse_args()

    from fused_dit_ops.bench.block import capture_block_call
    from fused_dit_ops.kernels import _launch
    from fused_dit_ops.models import build_qwen_image_transformer, make_qwen_inputs

    model = build_qwen_image_transformer("edit-2511", num_layers=1, device="cuda", dtype=torch.bfloat16)
    inputs = make_qwen_inputs(model, img_tokens=args.img_tokens)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    import fused_dit_ops as fdo
    plans = [("stock", None, None)]
    fl = {"on": [True], "off": [False], "both": [True, False]}[args.fast_launch]
    plans += [("patched", f, True) for f in fl]
    if args.pack_both:
        plans.append(("patched", True, False))
    for base, fast, pack in plans:
        if base == "patched":
            fdo.patch(model, pack_qkv=pack)
        try:
            if fast is not None:
                _launch.set_enabled(fast)
            block, a, kw = capture_block_call(model, inputs)

            def call(block=block, a=a, kw=kw):
                with torch.no_grad():
                    return block(*a, **kw)

            call()
            torch.cuda.synchronize()
            row = {"block": base, "fast_launch": fast, "pack_qkv": pack}
            row["e2e_ms"] = e2e_ms(call)
            row["host_ms"] = host_ms(call)
            try:
                row["gpu_ms"] = gpu_ms_graph(call)
            except Exception as e:  # keep the other numbers
                row["gpu_ms_error"] = f"{type(e).__name__}: {e}"[:300]
            row["syncs"] = sync_warnings(call)
            _launch.stats.update(fast=0, slow=0)
            text = cprofile_text(call, n=args.cprofile_calls, top=60)
            if base == "patched":
                row["launch_stats_cprofile_calls"] = dict(_launch.stats, calls=args.cprofile_calls)
                name = f"block-diag-cprofile-{'fast' if fast else 'slow'}{'' if pack else '-nopack'}{args.tag}.txt"
            else:
                name = f"block-diag-cprofile-stock{args.tag}.txt"
            with open(os.path.join(args.out, name), "w") as f:
                f.write(text + "\n\n" + cpu_ops_text(call))
            print(json.dumps(row), flush=True)
            res["rows"].append(row)
        finally:
            _launch.set_enabled(True)
            fdo.unpatch(model)
            torch.cuda.empty_cache()
    res["img_tokens"] = args.img_tokens or [4096, 4096]
    from fused_dit_ops.bench import harness
    res["env"] = harness.env_info()  # GPU, versions, commit (FUSED_DIT_GIT_COMMIT), source digest, date
    res["command"] = "python tools/block_diag.py " + " ".join(__import__("sys").argv[1:])
    with open(os.path.join(args.out, f"block-diag{args.tag}.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
