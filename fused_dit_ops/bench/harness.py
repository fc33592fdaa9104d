"""Benchmark harness shared by every ``python -m fused_dit_ops bench <name>``.

Timing: ``time_graph_us`` (CUDA-graph replay over rotating input sets larger than L2: the GPU time
a compiled / graph-captured deployment sees, no host launch cost) for memory-bound ops, or
``time_us`` (``triton.testing.do_bench``: CUDA events per iteration, median, L2 flushed between
iterations) where host overhead is negligible (attention, whole blocks). ``host_us_per_call``
reports the eager-mode host cost separately. Floors use the copy bandwidth
measured in the same run. Results: a printed table and a JSON file with device and versions.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

RESULTS_DIR = Path(os.environ.get("FUSED_DIT_BENCH_DIR", "bench/results"))


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (torch.cuda.is_available() is False)")


def kernel_script_args(doc: str | None = None):
    """The arguments of a kernel A/B script (``--rounds``, ``--json``), after :func:`require_cuda`:
    (args, the copy bandwidth in bytes per second, for the floor)."""
    import argparse
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    require_cuda()
    return args, device_copy_bandwidth_bytes_per_s("cuda")


def time_us(fn: Callable[[], object], *, warmup_ms: int = 25, rep_ms: int = 200) -> float:
    """Median time of fn() in microseconds (fn is called once before timing: JIT warm-up)."""
    import triton.testing
    fn()
    torch.cuda.synchronize()
    return 1e3 * triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def rotating(make_args: Callable[[], tuple], fn: Callable, n_sets: int = 3) -> Callable[[], object]:
    """fn over n_sets freshly made argument sets, a different one each call."""
    sets = [make_args() for _ in range(n_sets)]
    cyc = itertools.cycle(sets)
    return lambda: fn(*next(cyc))


def time_graph_us(make_args: Callable[[], tuple], fn: Callable, *, min_set_bytes: int = 150 << 20,
                  calls_per_graph: int = 12, replays: int = 15) -> float:
    """Median GPU time of fn in microseconds, measured by CUDA-graph replay.

    Host-side launch cost is excluded (what a CUDA-graph or compiled deployment sees, and the
    same for every provider). The graph calls fn on rotating argument sets whose total size is
    at least ``min_set_bytes`` (3x the H100's 50 MB L2), so inputs come from DRAM, not L2.
    """
    first = make_args()
    set_bytes = sum(a.numel() * a.element_size() for a in first if isinstance(a, torch.Tensor))
    # closures over fixed buffers (set_bytes 0) are called as they are; else rotate sets > L2
    n_sets = 1 if set_bytes == 0 else max(2, min(32, -(-min_set_bytes // set_bytes)))
    sets = [first] + [make_args() for _ in range(n_sets - 1)]
    calls = max(calls_per_graph, n_sets)
    for a in sets:  # warm-up: JIT compiles, autotuners, allocator
        fn(*a)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*sets[0])
        with torch.cuda.graph(g, stream=side):
            for i in range(calls):
                fn(*sets[i % n_sets])
    torch.cuda.current_stream().wait_stream(side)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del g
    times.sort()
    return times[len(times) // 2]


def host_us_per_call(fn: Callable[[], object], n: int = 200) -> float:
    """Host (CPU) time per call with the GPU kept busy: the eager-mode launch overhead."""
    import time
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - t
    torch.cuda.synchronize()
    return elapsed / n * 1e6


_COPY_BW: float | None = None


def copy_bandwidth_bytes_per_s() -> float:
    """Device-to-device copy rate (bytes read + written per second), measured once per process."""
    global _COPY_BW
    if _COPY_BW is None:
        n = 256 * 1024 * 1024
        src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
        dst = torch.empty_like(src)
        us = time_us(lambda: dst.copy_(src))
        _COPY_BW = 2 * n / (us * 1e-6)
        del src, dst
    return _COPY_BW


def git_commit() -> str:
    env = os.environ.get("FUSED_DIT_GIT_COMMIT")
    if env:
        return env
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], stderr=subprocess.DEVNULL,
                                       text=True).strip()
    except Exception:
        return "unknown"


_SOURCE_DIGEST: str | None = None


def source_digest() -> str:
    """SHA-256 (first 12 hex digits) of the code that ran: every ``.py`` file of the installed
    ``fused_dit_ops`` package plus the C++/CUDA sources beside it (``csrc/``), by relative path and
    content. Unlike the git commit it cannot be stale (a copied tree's ``.git`` can be)."""
    global _SOURCE_DIGEST
    if _SOURCE_DIGEST is None:
        import hashlib
        pkg = Path(__file__).resolve().parents[1]
        files = sorted(pkg.rglob("*.py"))
        csrc = pkg.parent / "csrc"
        if csrc.is_dir():
            files += sorted(p for p in csrc.rglob("*") if p.suffix in (".cu", ".cuh", ".cpp", ".h", ".txt"))
        h = hashlib.sha256()
        for f in files:
            if "__pycache__" in f.parts:
                continue
            h.update(str(f.relative_to(pkg.parent)).encode() + b"\0" + f.read_bytes() + b"\0")
        _SOURCE_DIGEST = h.hexdigest()[:12]
    return _SOURCE_DIGEST


def env_info() -> dict:
    import triton
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "source_digest": source_digest(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sm_count=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1))
    return info


def gpu_state() -> dict | None:
    """Temperature (C), SM clock (MHz) and power draw (W) of the current CUDA device from
    ``nvidia-smi`` (None where it is missing or fails): recorded next to block and model timings,
    because on power-capped GPUs the clock, and so the time, follows the temperature."""
    if not torch.cuda.is_available():
        return None
    try:
        idx = torch.cuda.current_device()
        out = subprocess.run(["nvidia-smi", f"--id={idx}", "--query-gpu=temperature.gpu,clocks.sm,power.draw",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
        temp, clock, power = (x.strip() for x in out.stdout.strip().splitlines()[0].split(","))
        return {"temp_c": int(temp), "sm_mhz": int(clock), "power_w": float(power)}
    except Exception:  # no nvidia-smi, another vendor, unparsable output
        return None


_NVML: dict = {}


def _nvml_handle():
    """NVML handle of the current CUDA device (matched by UUID, so CUDA_VISIBLE_DEVICES is
    respected), or None without CUDA or ``pynvml`` (package ``nvidia-ml-py``)."""
    if not torch.cuda.is_available():
        return None
    idx = torch.cuda.current_device()
    if idx not in _NVML:
        try:
            import pynvml
            pynvml.nvmlInit()
            try:
                h = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(idx).uuid}")
            except Exception:  # no UUID in this torch build: the index (right unless devices are masked)
                h = pynvml.nvmlDeviceGetHandleByIndex(idx)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(h)  # Volta and later; raises elsewhere
            _NVML[idx] = (pynvml, h)
        except Exception:
            _NVML[idx] = None
    return _NVML[idx]


def energy_per_call(fn: Callable[[], object], seconds: float = 1.0) -> dict | None:
    """fn() called back to back for about ``seconds``: the GPU's energy counter (NVML, mJ) read
    before and after, CUDA events around the calls. Returns joules per call, the average power
    (W) and ms per call over that window, and the enforced power limit (W); None where NVML is
    unavailable. On a GPU at its power cap, time per call follows energy per call (average power
    ~ the limit). The counter moves in steps: over a 1-2 s window, readings of one workload differ
    by 5-10% (on an H200: averages of 632-749 W under a 700 W cap), so compare medians of
    several rounds."""
    nv = _nvml_handle()
    if nv is None or seconds <= 0:
        return None
    import time
    pynvml, h = nv
    fn()  # warm-up (handles, JIT), then one timed call sizes the loop
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    n = max(3, int(seconds / max(time.perf_counter() - t0, 1e-5)))
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    mj0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    e0.record()
    for _ in range(n):
        fn()
    e1.record()
    torch.cuda.synchronize()
    mj1 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    ms = e0.elapsed_time(e1)
    joules = (mj1 - mj0) / 1e3
    try:
        limit_w = pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1e3
    except Exception:
        limit_w = None
    return {"j_per_call": joules / n, "avg_power_w": joules / (ms / 1e3) if ms > 0 else None,
            "ms_per_call_b2b": ms / n, "calls": n, "power_limit_w": limit_w}


def cool_down(seconds: float) -> dict | None:
    """Idle the GPU for ``seconds`` (after finishing queued work) and return :func:`gpu_state` after."""
    import time
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if seconds > 0:
        time.sleep(seconds)
    return gpu_state()


def rotated_rounds(providers: Sequence[str], rounds: int):
    """(round, provider order) for ``rounds`` rounds; round r starts r places further along the list,
    so that the heating left by earlier providers (the GPUs run at their power cap, where clocks
    follow temperature) falls on every provider alike instead of always on the later ones."""
    providers = list(providers)
    for r in range(rounds):
        k = r % len(providers) if providers else 0
        yield r, providers[k:] + providers[:k]


def merge_rounds(rows: Sequence[dict], keys: Sequence[str]) -> list[dict]:
    """One row per provider (first-seen order) from the rows of several rounds: the median of each
    timing key, its per-round values as ``<key>_rounds``, other fields from the provider's first
    successful round; a provider that failed in every round keeps its error row."""
    import statistics
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["provider"], []).append(r)
    out = []
    for prov, rs in by.items():
        ok = [r for r in rs if all(k in r for k in keys)]
        if not ok:
            out.append(rs[0])
            continue
        row = dict(ok[0])
        for k in keys:
            vals = [r[k] for r in ok]
            row[k] = statistics.median(vals)
            row[k + "_rounds"] = vals
        for k in ("gpu_before", "gpu_after"):  # per-round GPU state where the bench recorded it
            if any(k in r for r in ok):
                row[k + "_rounds"] = [r.get(k) for r in ok]
        row["rounds_ok"] = len(ok)
        if len(ok) < len(rs):
            row["rounds_failed"] = len(rs) - len(ok)
        out.append(row)
    return out


def add_ratio(rows: Sequence[dict], key: str, base_provider: str, name: str) -> None:
    """rows[i][name] = rows[i][key] / (the base provider's key), where both exist."""
    base = next((r[key] for r in rows if r.get("provider") == base_provider and key in r), None)
    for r in rows:
        if key in r:
            r[name] = r[key] / base if base else None


def write_results(name: str, rows: list[dict], extra: dict | None = None,
                  out_dir: str | Path | None = None) -> Path:
    info = env_info()
    doc = {"benchmark": name, "env": info, **(extra or {}), "rows": rows}
    out = Path(out_dir or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    gpu = info.get("gpu", "cpu").replace(" ", "-").replace("/", "-")
    stamp = info["date"].replace(":", "").replace("-", "")[:15]
    path = out / f"{name}-{gpu}-{stamp}.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


def plain_doc(doc: str | None) -> str:
    """A module docstring as plain text for ``--help``: reST roles and inline-literal backticks
    removed (``x`` -> x, :func:`f` -> f)."""
    import re
    text = re.sub(r":(?:func|class|mod|meth|attr|data):`~?([^`]+)`", r"\1", doc or "")
    return text.replace("``", "")


def format_table(rows: Sequence[dict], columns: Iterable[str]) -> str:
    columns = list(columns)

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def time_us_on(device, fn: Callable[[], object], *, warmup_ms: int = 25, rep_ms: int = 200,
               cpu_reps: int = 5) -> float:
    """Median time of fn() in microseconds on ``device``: :func:`time_us` on CUDA; on CPU the
    median of ``cpu_reps`` wall-clock calls after one warm-up call (smoke runs, not numbers)."""
    import time
    if torch.device(device).type == "cuda":
        return time_us(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)
    fn()
    ts = []
    for _ in range(max(1, cpu_reps)):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return 1e6 * ts[len(ts) // 2]


_CPU_COPY_BW: float | None = None


def device_copy_bandwidth_bytes_per_s(device) -> float:
    """Copy rate (bytes read + written per second) of ``device``: :func:`copy_bandwidth_bytes_per_s`
    on CUDA; on CPU a 64 MiB tensor copy timed with the wall clock (best of 5), once per process."""
    global _CPU_COPY_BW
    if torch.device(device).type == "cuda":
        return copy_bandwidth_bytes_per_s()
    if _CPU_COPY_BW is None:
        import time
        n = 64 * 1024 * 1024
        src = torch.empty(n, dtype=torch.uint8).random_(0, 255)
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
        _CPU_COPY_BW = 2 * n / best
    return _CPU_COPY_BW
