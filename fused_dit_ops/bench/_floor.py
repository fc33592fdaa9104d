"""The measurement loop and report shared by the per-family op benchmarks (``bench wan-ops``,
``bench flux-ops``): each op at each shape, each provider timed in interleaved rounds, against the
bandwidth floor of the bytes the op must move, with every provider's output compared to eager."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import harness


@dataclass(frozen=True)
class Family:
    """What a family's op benchmark supplies: the diffusers expressions, the fused calls, the inputs,
    the arguments per provider, the byte counts, and the shape columns of a row."""
    eager: dict  # op -> the diffusers expression
    fused: Callable  # (op, shape) -> the op as the integration calls it
    make_inputs: Callable  # (op, shape, device, dtype, generator) -> dict of tensors
    args_for: Callable  # (op, provider, inputs, shape) -> arguments
    bytes_moved: Callable  # (op, shape, itemsize) -> bytes
    role: dict  # op -> what it is in the block
    columns: Callable  # shape -> {"shape": ..., and its sizes}


def flat(out) -> list:
    """The outputs as a list, [B, L, H, D] ones as [B, L, H * D]."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.flatten(2) if o.dim() == 4 else o for o in outs]


def max_rel_diff(out, ref) -> float:
    """Largest max |out - ref| / max |ref| over the outputs (fp32)."""
    errs = []
    for o, r in zip(flat(out), flat(ref)):
        o, r = o.float(), r.float()
        errs.append(float((o - r).abs().max() / r.abs().max().clamp_min(1e-12)))
    return max(errs)


def providers(fam: Family, op: str, names, shape) -> dict:
    out = {}
    for n in names:
        if n == "eager":
            out[n] = fam.eager[op]
        elif n == "compile":
            out[n] = torch.compile(fam.eager[op], dynamic=False)
        elif n == "fused":
            out[n] = fam.fused(op, shape)
        else:
            raise ValueError(f"unknown provider {n!r}; choose from eager, compile, fused")
    return out


def _time(fam, device, s, op, pname, fn, dtype, generator):
    if torch.device(device).type == "cuda":
        return harness.time_graph_us(lambda: fam.args_for(op, pname, fam.make_inputs(op, s, device, dtype), s), fn)
    a = fam.args_for(op, pname, fam.make_inputs(op, s, device, dtype, generator), s)
    return harness.time_us_on(device, lambda: fn(*a), cpu_reps=3)


def run(fam: Family, shapes, ops, names, rounds: int, device, dtype) -> list[dict]:
    """One row per (shape, op, provider): median time of the rounds, GB/s, floor, ratios, the output's
    difference from eager on one input set."""
    bw = harness.device_copy_bandwidth_bytes_per_s(device)
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for s in shapes:
        for op in ops:
            nbytes = fam.bytes_moved(op, s, torch.tensor([], dtype=dtype).element_size())
            floor_us = nbytes / bw * 1e6
            provs = providers(fam, op, names, s)
            # accuracy against eager on one input set (compile runs its first, compiling call here)
            d = fam.make_inputs(op, s, device, dtype, g)
            ref = fam.eager[op](*fam.args_for(op, "eager", d, s))
            err = {n: max_rel_diff(f(*fam.args_for(op, n, d, s)), ref) for n, f in provs.items()}
            del d, ref
            times = {n: [] for n in provs}
            for _, order in harness.rotated_rounds(list(provs), max(1, rounds)):
                for n in order:
                    times[n].append(_time(fam, device, s, op, n, provs[n], dtype, g))
            med = {n: sorted(v)[len(v) // 2] for n, v in times.items()}
            for n, us in med.items():
                rows.append({**fam.columns(s), "op": op, "role": fam.role[op], "provider": n, "us": us,
                             "us_rounds": times[n], "bytes": nbytes, "GB/s": nbytes / us / 1e3,
                             "floor_us": floor_us, "pct_floor": 100 * floor_us / us,
                             "x_vs_eager": med["eager"] / us if "eager" in med else None,
                             "x_vs_compile": med["compile"] / us if "compile" in med else None,
                             "max_rel_diff_vs_eager": err[n]})
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    return rows


def pick(spec: str, known, what: str) -> list[str]:
    """Names from a comma list, each one of ``known`` (SystemExit naming the unknown ones otherwise)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"--{what}: unknown {', '.join(bad)}; choose from {', '.join(known)}")
    return names


def add_run_args(ap, providers) -> None:
    """The options every op-vs-floor bench takes: --providers, --rounds, --device, --tiny, --out."""
    ap.add_argument("--providers", default=",".join(providers), help="comma list from: eager, compile, fused")
    ap.add_argument("--rounds", type=int, default=3,
                    help="timing rounds per provider, interleaved; the median is reported (default 3)")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu with --tiny")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run (CPU ok), not a measurement")
    ap.add_argument("--out", default=None, help="JSON directory (default bench/results)")


def main(fam: Family, name: str, shapes, ops, names, rounds: int, device, tiny: bool, shapes_extra: dict,
         out_dir) -> int:
    """Measure, print the table and the worst fused row, write ``name``'s JSON."""
    from .. import ops as _ops  # noqa: F401  (registers the ops)
    dtype = torch.bfloat16
    bw = harness.device_copy_bandwidth_bytes_per_s(device)
    where = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu"
    print(f"copy bandwidth (read+write): {bw / 1e12:.3f} TB/s on {where}")
    with torch.no_grad():
        rows = run(fam, shapes, ops, names, rounds, device, dtype)
    cols = ["shape", "op", "provider", "us", "GB/s", "floor_us", "pct_floor", "x_vs_eager", "x_vs_compile",
            "max_rel_diff_vs_eager"]
    if torch.device(device).type == "cuda":
        print("us: GPU time per call by CUDA-graph replay over rotating inputs > L2 (median of the rounds); floor: "
              "bytes moved / copy bandwidth; target pct_floor >= 87 (within 1.15x of the floor)")
    else:
        print("CPU smoke run: wall-clock times on tiny shapes, not a measurement")
    print(harness.format_table(rows, cols))
    fused = [r for r in rows if r["provider"] == "fused"]
    if fused and not tiny:
        worst = min(fused, key=lambda r: r["pct_floor"])
        print(f"fused: worst {worst['pct_floor']:.1f}% of the floor ({worst['shape']} {worst['op']}); "
              f"{sum(r['pct_floor'] >= 100 / 1.15 for r in fused)}/{len(fused)} rows within 1.15x")
    extra = {"copy_bandwidth_TBps": bw / 1e12, "dtype": str(dtype), "rounds": rounds, "device": device,
             "shapes": shapes_extra}
    path = harness.write_results(name + ("-tiny" if tiny else ""), rows, extra, out_dir)
    print(f"wrote {path}")
    return 0
