"""``python -m fused_dit_ops bench model``: the whole Qwen-Image-Edit-2511 transformer forward.

The model (60 layers by default, random bf16 weights, ~41 GB: fits an 80 GB H100) is built once;
each provider is applied to it in place and undone afterwards (no second copy of the weights):

- ``stock-eager``: diffusers as built;
- ``stock-compile``: ``model.compile_repeated_blocks(fullgraph=True)`` (one block compiled once,
  reused by all layers);
- ``patched-eager``: ``fused_dit_ops.patch(model)``;
- ``patched-compile``: patched, then ``compile_repeated_blocks(fullgraph=True)``;
- ``stock-cudagraphs`` / ``patched-cudagraphs`` (not in the default list): the whole transformer under
  ``torch.compile(model, mode="reduce-overhead")`` (CUDA graphs), for shapes where the eager forward
  is bound by host time (small images); each forward starts a new CUDA-graph step
  (``torch.compiler.cudagraph_mark_step_begin``).

A CFG step is two forwards, as the Edit pipeline runs them: the conditional one (text length
225 by default) and the unconditional one (208), each at the Edit image shape (target + reference,
4096 + 4096 tokens, zero_cond_t). As in a sampler, every step has its own timestep (a
descending schedule), shared by its two forwards: work that depends only on the timestep may be
reused within a step, never across steps (``patch``'s ``reuse_mod``: the uncond forward reuses
the cond forward's modulation GEMVs). Each provider: ``--warmup`` steps (compilation happens
in them; with two text lengths the compiled block is specialised once per length unless
``--dynamic``), then ``--steps`` timed steps (CUDA events). Reported: ms per forward (cond, uncond, mean), s per
CFG step, speedup over stock eager, warm-up seconds, and the output's max relative difference
from stock eager. Targets on an H100: forward <= 265 ms, i.e. <= 0.53 s per CFG step (published
best 0.63 s). ``--providers`` picks a subset (each compile provider costs a few minutes of
compilation); ``--device cpu --tiny`` is a smoke run of the same code.

``--model flux``: the whole FLUX.1-dev transformer (19 double-stream + 38 single-stream blocks, D
3072 = 24 x 128, MLP 12288, random bf16 weights, ~24 GB, one copy as above) at 1024 x 1024: 4096
image + 512 text tokens (``--tokens 4096,4096``: Kontext, target + reference; ``--tokens 1024``:
512 x 512). FLUX.1-dev is guidance-distilled: no CFG pair, one forward per step, called as the
pipelines call it (hidden_states, encoder_hidden_states, pooled_projections, timestep as sigma,
guidance 3.5, img_ids / txt_ids). Every step has its own timestep, so ``reuse_mod`` (on, as
``patch``'s default) never reuses and costs only its check. ``--layers N``: N double + 2N single
blocks (``--layers D,S``: D double + S single). Reported: ms per forward (= s per step), ratios,
warm-up seconds, the output's max relative difference from stock eager. No target for Flux.

``--model flux2``: the FLUX.2-dev transformer (8 double-stream + 48 single-stream blocks, C 6144 =
48 x 128, SwiGLU MLP 18432, random bf16 weights: ~32B parameters, ~64 GB, which leaves little room
on an 80 GB GPU: ``--layers N`` builds N double + 6N single blocks, ``--layers D,S`` D + S) at
1024 x 1024 (4096 image + 512 text tokens), one forward per step (guidance-distilled, guidance 4),
called as the pipeline calls it (hidden_states, encoder_hidden_states, timestep, img_ids / txt_ids
with four axes, guidance). Same rows as for Flux. No target.

``--model wan``: a Wan transformer of ``--layers`` N blocks (default 4 of the real 40; ``--config``
t2v-14b default, ti2v-5b, i2v-14b, t2v-1.3b, a14b) at 480p x 81 frames (32760 tokens), a CFG pair
of 512-token prompts per step. TI2V-5B passes a per-token timestep (0 on the conditioning frame);
the patched model collapses it to two parameter sets + a per-token index, and the provider
``patched-eager+nocollapse`` runs the patched model without that collapse (the timestep projected
per token, per-token modulation in torch): with ``--config ti2v-5b`` it is in the default provider
list, and a line states what the collapse saves per forward. The blocks' attention calls are also
timed alone at the model's shapes with the attention each provider calls (``fused_dit.attention``
for patched providers, diffusers' dispatch for stock ones): the rows get its backend, TFLOP/s
(4 B H Lq Lk D per call) and the share of the forward (layers x attention per block / forward;
``--attn-rep-ms 0``: off).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

from . import _attn_share, _configs, harness

PROVIDERS = ("stock-eager", "stock-compile", "patched-eager", "patched-compile")
NOCOLLAPSE = "patched-eager+nocollapse"  # Wan TI2V: patched without the two-set timestep collapse
TARGET_FORWARD_MS = 265.0
TARGET_STEP_S = 0.53
# the same against stock compile (318 ms, the H100 reference the target was set against): compares across GPUs
TARGET_RATIO = TARGET_FORWARD_MS / 318.0
BENCHMARK_SHAPE = {"config": "edit-2511", "layers": 60, "dtype": "torch.bfloat16", "img_tokens": 8192,
                   "img_shapes": [[1, 64, 64], [1, 64, 64]], "txt_len_cond": 225, "txt_len_uncond": 208}
REFERENCE_STEP_S = {"published best": 0.63}


class _Timer:
    """Elapsed milliseconds between marks: CUDA events on CUDA, the wall clock elsewhere."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b)
        return 1e3 * (b - a)


def run_provider(model, cond: dict, uncond: dict | None, provider: str, device: str, *, warmup: int, steps: int,
                 dynamic: bool, cooldown_s: float = 0.0) -> tuple[dict, torch.Tensor]:
    """``provider`` over ``warmup`` + ``steps`` steps of the descending timestep schedule: (row, output).
    A step is a CFG pair (``cond`` then ``uncond``), or one forward of ``cond`` where ``uncond`` is
    None (guidance-distilled models: Flux.1-dev)."""
    base, opts = _configs.split_modifiers(provider)  # e.g. "patched-eager+noreuse", for A/B runs
    name = _configs.normalize(base)
    timer = _Timer(device)
    ctx = contextlib.nullcontext()
    if (_configs.is_compiled(name) or _configs.is_cudagraphs(name)) and not dynamic:
        ctx = torch._dynamo.config.patch(automatic_dynamic_shapes=False)
    info = _configs.apply(model, name, **{"reuse_mod": True, **opts})
    compiled = model
    if _configs.is_cudagraphs(name):
        def model(**kw):  # noqa: F811  (one CUDA-graph step per forward)
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(**kw)
    # one timestep per step (descending, as a sampler's), the same tensor for cond and uncond
    t0v = float(cond["timestep"].flatten()[0])
    # (scaled, not filled: a per-token timestep keeps its zeros, Wan2.2 TI2V's conditioning frame)
    ts = [cond["timestep"] * (1 - 0.9 * i / (warmup + steps)) for i in range(warmup + steps)]
    step_kw = [(dict(cond, timestep=t), dict(uncond, timestep=t) if uncond is not None else None) for t in ts]
    try:
        with ctx, torch.no_grad():
            t0 = time.perf_counter()
            for kc, ku in step_kw[:warmup]:
                model(**kc)
                if ku is not None:
                    model(**ku)
            _configs.synchronize(device)
            warm_s = time.perf_counter() - t0
            gpu = {}
            if torch.device(device).type == "cuda":
                gpu["gpu_before"] = harness.cool_down(cooldown_s)
            marks = []
            for kc, ku in step_kw[warmup:]:
                a = timer.mark()
                model(**kc)
                b = timer.mark()
                if ku is None:
                    marks.append((a, b, b))
                    continue
                model(**ku)
                c = timer.mark()
                marks.append((a, b, c))
            _configs.synchronize(device)
            if torch.device(device).type == "cuda":
                gpu["gpu_after"] = harness.gpu_state()
            cond_ms = [timer.ms(a, b) for a, b, _ in marks]
            uncond_ms = [timer.ms(b, c) for _, b, c in marks]
            step_ms = [timer.ms(a, c) for a, _, c in marks]
            out = model(**cond)[0].detach().clone()  # (a CUDA graph's output is overwritten by its next replay)
            _configs.synchronize(device)
    finally:
        _configs.reset(compiled, name)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    med = statistics.median
    if uncond is None:
        return ({"provider": provider, "ms_forward": med(cond_ms), "s_per_step": med(cond_ms) / 1e3,
                 "warmup_s": warm_s, "compile": info.get("compile", ""), **_configs.options_row(opts), **gpu}, out)
    row = {"provider": provider, "ms_cond": med(cond_ms), "ms_uncond": med(uncond_ms),
           "ms_forward": 0.5 * (med(cond_ms) + med(uncond_ms)), "s_per_step": med(step_ms) / 1e3,
           "warmup_s": warm_s, "compile": info.get("compile", ""), **_configs.options_row(opts), **gpu}
    return row, out


def _run_rounds(model, cond, uncond, providers, args, device: str, merged, summary) -> list[dict]:
    """Every provider ``args.rounds`` times (the order rotated each round) on ``model``: one row each
    (a failed provider keeps an ``error`` row; the others go on), its output's difference from the first
    stock provider's, ``summary(row)`` printed; with several rounds the ``merged`` columns' medians in one
    row per provider; then the speedup over stock eager and the ratio to stock compile."""
    rows, ref = [], None
    for rnd, order in harness.rotated_rounds(providers, args.rounds):
        if args.rounds > 1:
            print(f" round {rnd + 1}/{args.rounds}: {', '.join(order)}", flush=True)
        for p in order:
            try:
                row, out = run_provider(model, cond, uncond, p, device, warmup=args.warmup, steps=args.steps,
                                        dynamic=args.dynamic, cooldown_s=args.cooldown)
            except Exception as e:  # keep the other providers' numbers
                print(f"  {p}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
                rows.append({"provider": p, "error": f"{type(e).__name__}: {e}"[:500], "round": rnd})
                _configs.uncompile(model)
                continue
            row["round"] = rnd
            if ref is None and _configs.normalize(p.partition("+")[0]) == "stock":
                ref = out
            row["max_rel_diff_vs_stock"] = _configs.rel_err(out, ref) if ref is not None else None
            rows.append(row)
            print(f"  {p}: {summary(row)}", flush=True)
    if args.rounds > 1:
        rows = harness.merge_rounds(rows, merged)
    base = next((r["ms_forward"] for r in rows if r.get("provider") == "stock-eager" and "ms_forward" in r), None)
    for r in rows:
        if "ms_forward" in r:
            r["speedup_vs_stock_eager"] = base / r["ms_forward"] if base else None
    harness.add_ratio(rows, "ms_forward", "stock-compile", "ratio_vs_stock_compile")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fused_dit_ops bench model",
                                 description=harness.plain_doc(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--providers", default=None,
                    help=f"comma list from {', '.join(PROVIDERS)}, stock-cudagraphs, patched-cudagraphs "
                         "(default: the first four; wan ti2v-5b: also "
                         "patched-eager+nocollapse); a patched one may end in patch options "
                         f"({', '.join('+' + m for m in _configs.MODIFIERS)}, e.g. '+noreuse': "
                         "patch(reuse_mod=False)); a name may repeat (interleaved A/B)")
    ap.add_argument("--model", default="qwen", choices=("qwen", "flux", "flux2", "wan"),
                    help="qwen (Qwen-Image-Edit-2511, default), flux (FLUX.1-dev) or flux2 (FLUX.2-dev), one "
                         "forward per step; wan (Wan2.1/2.2 14B: CFG pair of 512-token prompts; --layers N of "
                         "40, default 4)")
    ap.add_argument("--layers", default=None,
                    help="model depth (default 60; --tiny: 2); flux: N = N double + 2N single blocks, or D,S "
                         "(default 19,38; --tiny: 2,2); flux2: N = N double + 6N single blocks, or D,S "
                         "(default 8,48; --tiny: 2,2)")
    ap.add_argument("--config", default=None, help="model config (default edit-2511; flux: dev or schnell, "
                                                   "default dev)")
    ap.add_argument("--tokens", "--img-tokens", dest="tokens", default=None,
                    help="image tokens, target first (default 4096,4096; flux: 4096, Kontext 4096,4096, "
                         "512 x 512 1024)")
    ap.add_argument("--txt-len", default=None, help="text tokens of the cond,uncond forwards (default 225,208; "
                                                    "--tiny: 9,7); flux: one length (default 512; --tiny: 7)")
    ap.add_argument("--steps", type=int, default=5, help="timed CFG steps per provider (default 5; flux: "
                                                          "timed forwards)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up CFG steps per provider (default 2; flux: "
                                                          "forwards)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the providers this many times, the order rotated each round; report medians "
                         "(with --rounds > 1 a repeated provider name is merged into one row)")
    ap.add_argument("--dynamic", action="store_true",
                    help="let dynamo mark the text length dynamic (default: one static graph per length)")
    ap.add_argument("--dtype", default="bf16", help="bf16 (default), fp16; fp32 with --tiny on CPU")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu with --tiny")
    ap.add_argument("--tiny", action="store_true", help="tiny config: a smoke run (CPU ok), not a measurement")
    ap.add_argument("--cooldown", type=float, default=0.0,
                    help="seconds of GPU idle between a provider's warm-up and its timed steps (default 0); "
                         "the GPU's temperature and SM clock before and after the timed steps are recorded "
                         "either way")
    ap.add_argument("--attn-rep-ms", type=int, default=200,
                    help="wan: time the blocks' attention calls alone at the model's shapes this long each "
                         "(TFLOP/s and share of the forward; 0: off)")
    ap.add_argument("--out", default=None, help="JSON directory (default bench/results)")
    args = ap.parse_args(argv)
    device = _configs.resolve_device(args.device, args.tiny, "bench model")
    if device is None:
        return 2
    if args.providers is None:
        args.providers = ",".join(default_providers(args.model, args.config))
    providers = _configs.parse_providers(args.providers, "bench model")
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    if args.model in ("flux", "flux2"):
        return _main_flux(args, device, providers)
    if args.model == "wan":
        return _main_wan(args, device, providers)

    from ..models import build_qwen_image_transformer, make_qwen_inputs
    from ..profiler import _dtype
    config = "tiny" if args.tiny else (args.config or "edit-2511")
    try:
        layers = (int(args.layers) if args.layers else 0) or (2 if args.tiny else 60)
    except ValueError:
        raise SystemExit(f"--layers takes one number for qwen, got {args.layers!r}") from None
    dtype = torch.float32 if (args.tiny and torch.device(device).type == "cpu") else _dtype(args.dtype)
    txt = _configs.parse_tokens(args.txt_len) or ((9, 7) if args.tiny else (225, 208))
    if len(txt) != 2:
        raise SystemExit("--txt-len takes two lengths: cond,uncond")
    t0 = time.perf_counter()
    model = build_qwen_image_transformer(config, num_layers=layers, device=device, dtype=dtype)
    _configs.synchronize(device)
    build_s = time.perf_counter() - t0
    tokens = _configs.parse_tokens(args.tokens)
    cond = make_qwen_inputs(model, img_tokens=tokens, txt_len=txt[0], seed=1)
    uncond = make_qwen_inputs(model, img_tokens=tokens, txt_len=txt[1], seed=2)
    uncond["hidden_states"] = cond["hidden_states"]  # CFG: same latents, two prompts
    n_params = sum(p.numel() for p in model.parameters())
    shape = {"config": config, "layers": layers, "dtype": str(dtype), "params": n_params,
             "weights_gb": round(n_params * dtype.itemsize / 1e9, 2),
             "img_tokens": cond["hidden_states"].shape[1], "img_shapes": [list(s) for s in cond["img_shapes"][0]],
             "txt_len_cond": txt[0], "txt_len_uncond": txt[1], "zero_cond_t": bool(model.config.zero_cond_t)}
    print(f"bench model: {shape}, device {device}, built in {build_s:.1f} s")

    rows = _run_rounds(model, cond, uncond, providers, args, device,
                       ["ms_cond", "ms_uncond", "ms_forward", "s_per_step"],
                       lambda row: f"{row['ms_forward']:.1f} ms/forward, {row['s_per_step']:.3f} s/step "
                                   f"(warm-up {row['warmup_s']:.1f} s)")
    print(harness.format_table(rows, ["provider", "ms_cond", "ms_uncond", "ms_forward", "s_per_step",
                                      "speedup_vs_stock_eager", "ratio_vs_stock_compile", "warmup_s",
                                      "max_rel_diff_vs_stock", "error"]))
    # the target is for patched eager with the default options (A/B modifiers are not candidates)
    b = next((r for r in rows if "+" not in r["provider"] and _configs.normalize(r["provider"]) == "patched"
              and "ms_forward" in r), None)
    v = _configs.report_target(b, "ms_forward", shape, BENCHMARK_SHAPE, TARGET_FORWARD_MS, TARGET_RATIO, device,
                               f"patched eager forward <= {TARGET_FORWARD_MS:.0f} ms (<= {TARGET_STEP_S} s per "
                               "CFG step)", quiet=args.tiny)
    verdict = v["target_met"]
    if torch.device(device).type == "cuda":
        shape["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    path = harness.write_results("model" + ("-tiny" if args.tiny else ""), rows,
                                 extra={"shape": shape, "device": device, "build_s": build_s,
                                        "steps": args.steps, "warmup": args.warmup, "dynamic": args.dynamic,
                                        "rounds": args.rounds, "cooldown_s": args.cooldown,
                                        "target_forward_ms": TARGET_FORWARD_MS, "target_step_s": TARGET_STEP_S,
                                        "target_met": verdict, "target_basis": v["target_basis"],
                                        "reference_step_s": REFERENCE_STEP_S},
                                 out_dir=args.out)
    print(f"results: {path}")
    return 0


def flux_layers(spec, tiny: bool, model: str = "flux") -> tuple[int, int]:
    """(double, single) block counts from ``--layers``: None -> the real model (flux 19, 38; flux2
    8, 48; tiny: 2, 2); "N" -> N, 2N (flux) or N, 6N (flux2): the real model's ratio; "D,S" -> D, S."""
    ratio, full = (6, (8, 48)) if model == "flux2" else (2, (19, 38))
    if not spec:
        return (2, 2) if tiny else full
    try:
        v = _configs.parse_tokens(spec)
    except ValueError:
        v = ()
    if len(v) == 1 and v[0] >= 1:
        return v[0], ratio * v[0]
    if len(v) == 2 and v[0] >= 0 and v[1] >= 0 and sum(v) >= 1:
        return v[0], v[1]
    raise SystemExit(f"--layers for {model}: N (N double + {ratio}N single blocks) or D,S; got {spec!r}")


def _main_flux(args, device: str, providers: list[str]) -> int:
    """``--model flux`` / ``flux2``: the Flux.1 / FLUX.2 transformer forward, one forward per step."""
    from ..profiler import _dtype
    from .block import flux_family
    configs, build, make_inputs, label = flux_family(args.model)
    if args.config is not None and args.config not in configs:
        raise SystemExit(f"--config {args.config!r} is not a {label} config; choose from "
                         f"{', '.join(c for c in configs if c != 'tiny')}")
    config = "tiny" if args.tiny else (args.config or "dev")
    n_double, n_single = flux_layers(args.layers, args.tiny, args.model)
    dtype = torch.float32 if (args.tiny and torch.device(device).type == "cpu") else _dtype(args.dtype)
    txt = _configs.parse_tokens(args.txt_len)
    if txt is not None and len(txt) != 1:
        raise SystemExit(f"--txt-len takes one length for {args.model} (no CFG pair)")
    t0 = time.perf_counter()
    model = build(config, num_layers=n_double, num_single_layers=n_single, device=device,
                                   dtype=dtype)
    _configs.synchronize(device)
    build_s = time.perf_counter() - t0
    tokens = _configs.parse_tokens(args.tokens)
    inputs = make_inputs(model, img_tokens=tokens, txt_len=txt[0] if txt else None, seed=1)
    n_img = inputs["img_ids"].shape[0]
    n_params = sum(p.numel() for p in model.parameters())
    shape = {"model": args.model, "config": config, "double_layers": n_double, "single_layers": n_single,
             "dtype": str(dtype), "params": n_params, "weights_gb": round(n_params * dtype.itemsize / 1e9, 2),
             "img_tokens": n_img, "images": list(tokens) if tokens else [n_img],
             "txt_len": inputs["encoder_hidden_states"].shape[1],
             "guidance": float(inputs["guidance"][0]) if inputs["guidance"] is not None else None}
    print(f"bench model: {args.model} {config}, {n_double} double + {n_single} single blocks, {shape}, device {device}, "
          f"built in {build_s:.1f} s")

    rows = _run_rounds(model, inputs, None, providers, args, device, ["ms_forward", "s_per_step"],
                       lambda row: f"{row['ms_forward']:.1f} ms/forward (warm-up {row['warmup_s']:.1f} s)")
    print(harness.format_table(rows, ["provider", "ms_forward", "speedup_vs_stock_eager", "ratio_vs_stock_compile",
                                      "warmup_s", "max_rel_diff_vs_stock", "error"]))
    if torch.device(device).type == "cuda":
        shape["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    path = harness.write_results(f"model-{args.model}" + ("-tiny" if args.tiny else ""), rows,
                                 extra={"model": args.model, "shape": shape, "device": device, "build_s": build_s,
                                        "steps": args.steps, "warmup": args.warmup, "dynamic": args.dynamic,
                                        "rounds": args.rounds, "cooldown_s": args.cooldown},
                                 out_dir=args.out)
    print(f"results: {path}")
    return 0


def default_providers(model: str, config: str | None) -> tuple[str, ...]:
    """The four providers; for Wan TI2V-5B also the patched model without the timestep collapse."""
    if model == "wan" and config == "ti2v-5b":
        return PROVIDERS[:3] + (NOCOLLAPSE,) + PROVIDERS[3:]
    return PROVIDERS


def collapse_saving(rows) -> dict | None:
    """What the two-set collapse saves per forward: the first patched provider with "+nocollapse"
    against the same provider without it, where both have a time; else None."""
    by = {r["provider"]: r for r in rows if "ms_forward" in r}
    for name, r in by.items():
        if "+nocollapse" not in name:
            continue
        base = by.get("+".join(m for m in name.split("+") if m != "nocollapse"))
        if base is None:
            continue
        saved = r["ms_forward"] - base["ms_forward"]
        return {"provider": base["provider"], "ms": base["ms_forward"], "nocollapse_provider": name,
                "nocollapse_ms": r["ms_forward"], "saved_ms": saved, "saved_pct": 100.0 * saved / r["ms_forward"],
                "speedup": r["ms_forward"] / base["ms_forward"]}
    return None


def _main_wan(args, device: str, providers: list[str]) -> int:
    """``--model wan``: the Wan transformer forward, a CFG pair per step (two 512-token prompts)."""
    from ..models import WAN_CONFIGS, build_wan_transformer, make_wan_inputs
    from ..profiler import _dtype
    if args.config is not None and args.config not in WAN_CONFIGS:
        raise SystemExit(f"--config {args.config!r} is not a Wan config; choose from "
                         f"{', '.join(c for c in WAN_CONFIGS if not c.startswith('tiny'))}")
    config = ("tiny-ti2v" if args.config == "ti2v-5b" else "tiny") if args.tiny else (args.config or "t2v-14b")
    try:
        layers = (int(args.layers) if args.layers else 0) or (2 if args.tiny else 4)
    except ValueError:
        raise SystemExit(f"--layers takes one number for wan, got {args.layers!r}") from None
    dtype = torch.float32 if (args.tiny and torch.device(device).type == "cpu") else _dtype(args.dtype)
    txt = _configs.parse_tokens(args.txt_len)
    if txt is not None and len(txt) != 1:
        raise SystemExit("--txt-len takes one length for wan (both prompts are padded to it)")
    latent = _configs.parse_tokens(args.tokens)
    if latent is not None and len(latent) != 3:
        raise SystemExit("--tokens for wan is the latent frames,height,width (default 21,60,104: 480p, 81 frames)")
    t0 = time.perf_counter()
    model = build_wan_transformer(config, num_layers=layers, device=device, dtype=dtype)
    _configs.synchronize(device)
    build_s = time.perf_counter() - t0
    per_token = config.endswith("ti2v") or None
    cond = make_wan_inputs(model, latent=latent, txt_len=txt[0] if txt else None, seed=1, per_token=per_token)
    uncond = make_wan_inputs(model, latent=latent, txt_len=txt[0] if txt else None, seed=2, per_token=per_token)
    uncond["hidden_states"] = cond["hidden_states"]  # CFG: same latents, two prompts
    x = cond["hidden_states"]
    pt, ph, pw = model.config.patch_size
    n_tok = (x.shape[2] // pt) * (x.shape[3] // ph) * (x.shape[4] // pw)
    n_params = sum(p.numel() for p in model.parameters())
    shape = {"model": "wan", "config": config, "layers": layers, "dtype": str(dtype), "params": n_params,
             "weights_gb": round(n_params * dtype.itemsize / 1e9, 2), "latent": list(x.shape[2:]),
             "tokens": n_tok, "txt_len": cond["encoder_hidden_states"].shape[1],
             "per_token_timestep": cond["timestep"].dim() == 2}
    print(f"bench model: wan {config}, {layers} blocks, {shape}, device {device}, built in {build_s:.1f} s")

    rows = _run_rounds(model, cond, uncond, providers, args, device,
                       ["ms_cond", "ms_uncond", "ms_forward", "s_per_step"],
                       lambda row: f"{row['ms_forward']:.1f} ms/forward, {row['s_per_step']:.3f} s/step "
                                   f"(warm-up {row['warmup_s']:.1f} s)")
    attn = None
    if args.attn_rep_ms > 0:
        attn = _attn_share.measure(model, cond, providers, device, rep_ms=args.attn_rep_ms)
        _attn_share.annotate(rows, attn, "ms_forward", layers)
        print(_attn_share.describe(attn))
    print(harness.format_table(rows, ["provider", "ms_cond", "ms_uncond", "ms_forward", "s_per_step",
                                      "speedup_vs_stock_eager", "ratio_vs_stock_compile", "attn_backend",
                                      "attn_tflops", "attn_share_pct", "warmup_s", "max_rel_diff_vs_stock",
                                      "error"]))
    collapse = collapse_saving(rows)
    if collapse:
        print(f"two-set timestep collapse: {collapse['nocollapse_provider']} {collapse['nocollapse_ms']:.1f} ms -> "
              f"{collapse['provider']} {collapse['ms']:.1f} ms per forward: saves {collapse['saved_ms']:.1f} ms "
              f"({collapse['saved_pct']:.1f}%)")
    if torch.device(device).type == "cuda":
        shape["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    path = harness.write_results("model-wan" + ("-tiny" if args.tiny else ""), rows,
                                 extra={"model": "wan", "shape": shape, "device": device, "build_s": build_s,
                                        "steps": args.steps, "warmup": args.warmup, "dynamic": args.dynamic,
                                        "rounds": args.rounds, "cooldown_s": args.cooldown,
                                        "attention": attn, "collapse_saving": collapse},
                                 out_dir=args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
