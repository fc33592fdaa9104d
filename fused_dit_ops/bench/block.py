"""``python -m fused_dit_ops bench block``: one Qwen-Image-Edit-2511 transformer block, four ways.

The block is called exactly as the model calls it: a 1-layer model (random bf16 weights, real
dims) runs one forward at the Edit shape (target + reference image: L_img 4096 + 4096 with the
zero_cond_t 0/1 modulation index, L_txt 208), a pre-hook captures the block's arguments (temb for
[t, 0], image_rotary_emb, modulate_index, ...) and stops the forward, and the block is then timed
on them alone. Providers:

- ``stock-eager``: the diffusers block;
- ``stock-compile``: that block regionally compiled (``compile_repeated_blocks(fullgraph=True)``);
- ``patched-eager``: after ``fused_dit_ops.patch(model)`` (arguments captured again, patched);
- ``patched-compile``: patched, then compiled.

``--precision fp8`` adds each patched provider with ``+fp8`` (FP8 e4m3 block GEMMs); ``--fp8-attention``
adds ``+fp8attn`` (the joint attention on e4m3 q/k/v through FlashAttention-3), so that
``--providers patched-eager --precision fp8 --fp8-attention`` times ``patched-eager``,
``patched-eager+fp8``, ``patched-eager+fp8attn`` and ``patched-eager+fp8+fp8attn`` in one run.
``--fp8-slow-accum`` (with ``--precision fp8``) adds each ``+fp8`` provider with ``+slowaccum`` (the FP8
GEMMs without ``torch._scaled_mm``'s fast accumulation, which ``patch`` uses by default) and, next to
``stock-compile+fp8recipe`` (the recipe with fast accumulation, torchao's default),
``stock-compile+fp8recipeslow`` (without).

Reported: median ms (``triton.testing.do_bench``, L2 flushed), speedup over stock eager,
``host_ms`` (CPU time per call while the GPU is busy: where it is close to ``ms`` the call is bound
by the host, and ``ms`` is the host's time, not the GPU's), the first-call (compile) seconds, the max relative difference of the image output from stock
eager and, where NVML is importable, joules per call and average power over ``--energy-s``
seconds of back-to-back calls (an H100 or H200 runs this block at its power cap, where time
follows energy). ``--providers patched-eager+nopack`` and the like time ``patch`` options
against each other (``_configs.MODIFIERS``). Targets on an H100: patched eager <= 4.3 ms (stock
eager 6.54, stock compile 4.93, fastest published framework 5.1). ``--device cpu --tiny``: a
smoke run of the same code.

``--model flux``: Flux.1 (FLUX.1-dev dims, D 3072 = 24 x 128, MLP 12288, random bf16 weights): a
model of one double-stream and one single-stream block runs one forward at 1024 x 1024 (4096
image + 512 text tokens; ``--tokens 4096,4096``: Kontext, target + reference), the pre-hooks
capture both blocks' arguments (temb from timestep, guidance and pooled text, the joint RoPE
table), and each block is timed alone with the same providers: one row per (block, provider),
ratios against stock compile of the same block. No target for Flux.

``--model flux2``: FLUX.2-dev dims (C 6144 = 48 x 128, SwiGLU MLP 18432, random bf16 weights), the
same way: a model of one double-stream and one single-stream block (~3 GB) runs one forward at
1024 x 1024 (4096 image + 512 text tokens), both blocks' arguments are captured (the model-level
modulation outputs, the joint RoPE (cos, sin)) and each block is timed alone. No target.

``--model wan``: block 0 of a 1-block Wan model (``--config`` t2v-14b default, ti2v-5b, i2v-14b, ...)
at 480p x 81 frames (32760 tokens) + 512 text tokens, one timestep per batch row. The block's
attention calls (self-attention, cross-attention to the text; I2V: to the image context) are also
timed alone at its shapes, with the attention each provider's block calls (``fused_dit.attention``
for patched providers, diffusers' dispatch for stock ones): the rows get the backend, its TFLOP/s
(4 B H Lq Lk D per call) and the attention's share of the block (``--attn-rep-ms 0``: off).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import _attn_share, _configs, harness

PROVIDERS = ("stock-eager", "stock-compile", "patched-eager", "patched-compile")
TARGET_MS = 4.3  # patched eager, H100
TARGET_RATIO = 4.3 / 4.93  # the same against stock compile (4.93 ms on the H100): compares across GPUs
BENCHMARK_SHAPE = {"config": "edit-2511", "dtype": "torch.bfloat16", "img_tokens": 8192,
                   "img_shapes": [[1, 64, 64], [1, 64, 64]], "txt_len": 208}
REFERENCE_MS = {"stock-eager (H100, published)": 6.54, "stock-compile (H100, published)": 4.93,
                "fastest published framework": 5.1}


class _Captured(Exception):
    pass


def capture_block_call(model, inputs: dict, index: int = 0):
    """Run ``model(**inputs)`` until block ``index`` is called; return (block, args, kwargs) of
    that call (the forward stops there)."""
    block = model.transformer_blocks[index]
    try:
        (args, kwargs), = capture_block_calls(model, inputs, [block])
    except RuntimeError:
        raise RuntimeError(f"transformer_blocks[{index}] was not called by the forward") from None
    return block, args, kwargs


def capture_block_calls(model, inputs: dict, blocks) -> list[tuple]:
    """Run ``model(**inputs)`` until every module of ``blocks`` has been called once; return the
    (args, kwargs) of each one's first call, in the order of ``blocks`` (the forward stops at the
    last of them to be called)."""
    got: dict = {}
    handles = []

    def make_hook(i):
        def hook(mod, args, kwargs):
            if i not in got:
                got[i] = (args, dict(kwargs))
            if len(got) == len(blocks):
                raise _Captured
        return hook

    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(make_hook(i), with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs)
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in range(len(blocks)) if i not in got]
    if missing:
        raise RuntimeError(f"blocks {missing} were not called by the forward")
    return [got[i] for i in range(len(blocks))]


def _clone(v):
    return v.clone() if isinstance(v, torch.Tensor) else v


def run_provider(model, inputs: dict, provider: str, device: str, rep_ms: int,
                 cooldown_s: float = 0.0, energy_s: float = 0.0) -> tuple[dict, torch.Tensor]:
    """Block 0 of ``model.transformer_blocks`` in configuration ``provider``: (row, image output)."""
    return run_provider_blocks(model, inputs, provider, device, rep_ms, cooldown_s, energy_s,
                               blocks=lambda m: [m.transformer_blocks[0]])[0]


def run_provider_blocks(model, inputs: dict, provider: str, device: str, rep_ms: int,
                        cooldown_s: float = 0.0, energy_s: float = 0.0, *, blocks) -> list[tuple[dict, torch.Tensor]]:
    """Each block of ``blocks(model)`` (a function: the model's blocks once configured) timed alone
    on the arguments one forward passes it, in configuration ``provider`` (applied and compiled
    once for all of them): [(row, image output)] in the order of the blocks."""
    base_name, opts = _configs.split_modifiers(provider)  # e.g. "patched-eager+nopack"
    name = _configs.normalize(base_name)
    _configs.whole_model_only(name, "bench block")
    base = "patched" if _configs.is_patched(name) else "stock"
    _configs.apply(model, base, **opts)
    try:
        mods = list(blocks(model))
        calls = capture_block_calls(model, inputs, mods)
        how = _configs.compile_blocks(model) if _configs.is_compiled(name) else ""
        out = [_time_block(block, args, kwargs, provider, device, rep_ms, cooldown_s, energy_s, how, opts)
               for block, (args, kwargs) in zip(mods, calls)]
        if opts.get("precision") == "fp8":
            for block, (row, _) in zip(mods, out):
                row["fp8"] = fp8_coverage(model, block)
                if row["fp8"] != "fp8":
                    print(f"  {provider}: block not on FP8 GEMMs: {row['fp8']}", file=sys.stderr)
        return out
    finally:
        _configs.reset(model, name)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def fp8_coverage(model, block) -> str:
    """"fp8" when ``block`` holds FP8 weights and ran without a runtime fallback, else why not (the
    patch report's FP8 reasons and runtime fallbacks)."""
    st = model.__dict__.get("_fused_dit_state")
    if st is None:
        return "not patched"
    rep = st.report
    why = [f"{k}: {v}" for k, v in rep.stock.items() if k.startswith(("fp8", "precision"))]
    if not any(n.startswith("_fused_dit_fp8_") for n in block._buffers):
        return "; ".join(why) or "no FP8 weights on this block"
    fall = [f"{k} ({v})" for k, v in rep.runtime.items() if k.startswith("fp8")]
    return "; ".join(fall) if fall else "fp8"


def _time_block(block, args, kwargs, provider, device, rep_ms, cooldown_s, energy_s, how, opts):
    def call(a=args, kw=kwargs):
        with torch.no_grad():
            return block(*a, **kw)

    t0 = time.perf_counter()
    call()
    _configs.synchronize(device)
    first_s = time.perf_counter() - t0
    gpu = {}
    if torch.device(device).type == "cuda":
        gpu["gpu_before"] = harness.cool_down(cooldown_s)
    us = harness.time_us_on(device, call, rep_ms=rep_ms)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        gpu["gpu_after"] = harness.gpu_state()
        # CPU time per call with the GPU busy (10 calls: their launches fit in the launch queue, so the
        # host never waits for the GPU): when it reaches ``ms``, eager calls are bound by the host
        gpu["host_ms"] = harness.host_us_per_call(call, n=10) / 1e3
        energy = harness.energy_per_call(call, energy_s)
        if energy is not None:
            gpu.update(energy)
    # output on fresh copies of the inputs (a block may update its inputs in place)
    out = call(tuple(_clone(a) for a in args), {k: _clone(v) for k, v in kwargs.items()})
    img = out[1] if isinstance(out, (tuple, list)) else out
    return ({"provider": provider, "ms": us / 1e3, "first_call_s": first_s, "compile": how,
             **_configs.options_row(opts), **gpu},
            img.detach())


def _energy_note(row) -> str:
    """The energy part of a provider's progress line ("" when it was not measured)."""
    return (f"; {row['j_per_call']:.2f} J/call at {row['avg_power_w']:.0f} W back to back"
            if row.get("j_per_call") is not None else "")


def _fp8_columns(rows) -> list[str]:
    """The FP8 ratio columns, where the rows have them."""
    return [c for c in ("ratio_vs_patched_eager", "ratio_vs_fp8recipe") if any(r.get(c) is not None for r in rows)]


def _summarize(rows, rounds: int) -> list[dict]:
    """One block's rows: with several rounds, each provider's medians in one row (the energy columns
    too when every timed row has them); then the speedup over stock eager and the time and energy
    ratios to stock compile."""
    if rounds > 1:
        rows = harness.merge_rounds(rows, ["ms"] + (["j_per_call", "avg_power_w", "ms_per_call_b2b"]
                                                    if all("j_per_call" in r for r in rows if "ms" in r) else []))
    base = next((r["ms"] for r in rows if r.get("provider") == "stock-eager" and "ms" in r), None)
    for r in rows:
        if "ms" in r:
            r["speedup_vs_stock_eager"] = base / r["ms"] if base else None
    harness.add_ratio(rows, "ms", "stock-compile", "ratio_vs_stock_compile")
    harness.add_ratio(rows, "j_per_call", "stock-compile", "energy_ratio_vs_stock_compile")
    # FP8 rows: against our bf16 patched eager and against the baseline FP8 recipe (compiled)
    if any("+fp8" in str(r.get("provider", "")) for r in rows):
        harness.add_ratio(rows, "ms", "patched-eager", "ratio_vs_patched_eager")
        harness.add_ratio(rows, "ms", "stock-compile+fp8recipe", "ratio_vs_fp8recipe")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fused_dit_ops bench block",
                                 description=harness.plain_doc(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--providers", default=",".join(PROVIDERS),
                    help=f"comma list from {', '.join(PROVIDERS)}; a patched one may end in patch options "
                         f"({', '.join('+' + m for m in _configs.MODIFIERS)}), e.g. patched-eager+nopack")
    ap.add_argument("--model", default="qwen", choices=("qwen", "flux", "flux2", "wan"),
                    help="qwen (Qwen-Image-Edit-2511, default), flux (Flux.1) or flux2 (FLUX.2): one "
                         "double-stream and one single-stream block, each timed; wan (Wan2.1/2.2 14B: one "
                         "self + cross attention block at 480p x 81 frames, 32760 tokens + 512 text)")
    ap.add_argument("--config", default=None, help="model config (default edit-2511; flux: dev or schnell, "
                                                   "default dev)")
    ap.add_argument("--tokens", "--img-tokens", dest="tokens", default=None,
                    help="image tokens, target first (default 4096,4096; flux: 4096, Kontext 4096,4096, "
                         "512 x 512 1024)")
    ap.add_argument("--txt-len", type=int, default=None, help="text tokens (default 208; flux 512)")
    ap.add_argument("--dtype", default="bf16", help="bf16 (default), fp16; fp32 with --tiny")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu with --tiny")
    ap.add_argument("--tiny", action="store_true", help="tiny config: a smoke run (CPU ok), not a measurement")
    ap.add_argument("--rep-ms", type=int, default=500, help="do_bench repetition time per provider")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the providers this many times, the order rotated each round; report medians")
    ap.add_argument("--cooldown", type=float, default=0.0,
                    help="seconds of GPU idle before timing each provider (default 0: each provider "
                         "starts as warm as the previous one left the GPU); the GPU's temperature and "
                         "SM clock before and after each timing are recorded either way")
    ap.add_argument("--energy-s", type=float, default=2.0,
                    help="after each timing, call the block back to back this long and record joules per "
                         "call and average power from the GPU's energy counter (NVML; 0: off)")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp8"),
                    help="fp8: every patched provider also runs as '<provider>+fp8' (FP8 e4m3 block GEMMs, "
                         "patch(precision='fp8')), next to its bf16 row, and with stock-compile among the "
                         "providers, stock-compile+fp8recipe (the baseline FP8 recipe: torchao's per-row "
                         "dynamic scheme in plain PyTorch with its fast accumulation, compiled); ratios against "
                         "patched-eager and against the recipe are added")
    ap.add_argument("--attn-rep-ms", type=int, default=200,
                    help="wan: time the block's attention calls alone at its shapes this long each (TFLOP/s "
                         "and share of the block; 0: off)")
    ap.add_argument("--fp8-attention", action="store_true",
                    help="also run every patched provider as '<provider>+fp8attn' (the double-stream joint "
                         "attention on e4m3 q/k/v, patch(attention_precision='fp8'); FlashAttention-3 on CUDA) and, "
                         "with --precision fp8, as '<provider>+fp8+fp8attn': one run shows bf16, FP8 GEMMs and FP8 "
                         "GEMMs + FP8 attention")
    ap.add_argument("--fp8-slow-accum", action="store_true",
                    help="with --precision fp8: also run every '+fp8' patched provider as '<provider>+slowaccum' "
                         "(the FP8 GEMMs without torch._scaled_mm's fast accumulation, patch(fp8_fast_accum=False); "
                         "the default is fast accumulation) and, next to stock-compile+fp8recipe (fast "
                         "accumulation, torchao's default), stock-compile+fp8recipeslow (without)")
    ap.add_argument("--out", default=None, help="JSON directory (default bench/results)")
    args = ap.parse_args(argv)
    device = _configs.resolve_device(args.device, args.tiny, "bench block")
    if device is None:
        return 2
    providers = _configs.parse_providers(args.providers, "bench block")
    for p in providers:
        try:
            _configs.whole_model_only(_configs.normalize(p.partition("+")[0]), "bench block")
        except ValueError as e:
            ap.error(str(e))
    if args.precision == "fp8":
        providers = providers + [p + "+fp8" for p in providers
                                 if _configs.is_patched(_configs.normalize(p.partition("+")[0]))
                                 and "+fp8" not in p and p + "+fp8" not in providers]
        if "stock-compile" in providers and "stock-compile+fp8recipe" not in providers:
            providers.append("stock-compile+fp8recipe")  # the baseline FP8 recipe, compiled
    if args.fp8_slow_accum:
        if args.precision != "fp8":
            ap.error("--fp8-slow-accum needs --precision fp8 (it adds '+slowaccum' to the '+fp8' providers)")
        fp8 = [p for p in providers if _configs.is_patched(_configs.normalize(p.partition("+")[0]))
               and "fp8" in p.split("+")[1:] and "slowaccum" not in p.split("+")[1:]]
        providers = providers + [p + "+slowaccum" for p in fp8 if p + "+slowaccum" not in providers]
        if "stock-compile+fp8recipe" in providers and "stock-compile+fp8recipeslow" not in providers:
            providers.append("stock-compile+fp8recipeslow")  # the recipe without fast accumulation
    if args.fp8_attention:
        patched = [p for p in providers if _configs.is_patched(_configs.normalize(p.partition("+")[0]))
                   and "+fp8attn" not in p]
        providers = providers + [p + "+fp8attn" for p in patched if p + "+fp8attn" not in providers]
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    if args.model in ("flux", "flux2"):
        return _main_flux(args, device, providers)
    if args.model == "wan":
        return _main_wan(args, device, providers)

    from ..models import build_qwen_image_transformer, make_qwen_inputs
    from ..profiler import _dtype
    config = "tiny" if args.tiny else (args.config or "edit-2511")
    dtype = torch.float32 if (args.tiny and torch.device(device).type == "cpu") else _dtype(args.dtype)
    model = build_qwen_image_transformer(config, num_layers=1, device=device, dtype=dtype)
    inputs = make_qwen_inputs(model, img_tokens=_configs.parse_tokens(args.tokens), txt_len=args.txt_len)
    shape = {"config": config, "dtype": str(dtype), "img_tokens": inputs["hidden_states"].shape[1],
             "img_shapes": [list(s) for s in inputs["img_shapes"][0]],
             "txt_len": inputs["encoder_hidden_states"].shape[1],
             "zero_cond_t": bool(model.config.zero_cond_t)}
    print(f"bench block: {shape}, device {device}")

    rows, ref, pending = [], None, {}
    for rnd, order in harness.rotated_rounds(providers, args.rounds):
        if args.rounds > 1:
            print(f" round {rnd + 1}/{args.rounds}: {', '.join(order)}")
        for p in order:
            try:
                row, img = run_provider(model, inputs, p, device, args.rep_ms, args.cooldown, args.energy_s)
            except Exception as e:  # keep the other providers' numbers
                print(f"  {p}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
                rows.append({"provider": p, "error": f"{type(e).__name__}: {e}", "round": rnd})
                continue
            row["round"] = rnd
            if ref is None and _configs.normalize(p.partition("+")[0]) == "stock":
                ref = img
                for r_, im in pending.values():  # providers timed before the first stock one
                    r_["max_rel_diff_vs_stock"] = _configs.rel_err(im, ref)
                pending.clear()
            if ref is None:
                pending[id(row)] = (row, img)
            row["max_rel_diff_vs_stock"] = _configs.rel_err(img, ref) if ref is not None else None
            rows.append(row)
            g = row.get("gpu_before")
            at = f", GPU {g['temp_c']} C / {g['sm_mhz']} MHz at start" if g else ""
            print(f"  {p}: {row['ms']:.3f} ms (first call {row['first_call_s']:.1f} s{at}{_energy_note(row)})")
    pending.clear()
    rows = _summarize(rows, args.rounds)
    print(harness.format_table(rows, ["provider", "ms", "speedup_vs_stock_eager", "ratio_vs_stock_compile",
                                      *_fp8_columns(rows),
                                      "j_per_call", "avg_power_w", "energy_ratio_vs_stock_compile",
                                      "host_ms", "first_call_s", "max_rel_diff_vs_stock", "error"]))
    pe = next((r for r in rows if r.get("provider") == "patched-eager" and "ms" in r), None)
    v = _configs.report_target(pe, "ms", shape, BENCHMARK_SHAPE, TARGET_MS, TARGET_RATIO, device,
                               f"patched eager <= {TARGET_MS} ms", quiet=args.tiny)
    verdict = v["target_met"]
    path = harness.write_results("block" + ("-tiny" if args.tiny else ""), rows,
                                 extra={"shape": shape, "device": device, "target_ms_patched_eager": TARGET_MS,
                                        "target_met": verdict, "target_basis": v["target_basis"],
                                        "reference_ms": REFERENCE_MS,
                                        "rounds": args.rounds, "rep_ms": args.rep_ms, "energy_s": args.energy_s,
                                        "cooldown_s": args.cooldown},
                                 out_dir=args.out)
    print(f"results: {path}")
    return 0


FLUX_KINDS = (("double", "transformer_blocks"), ("single", "single_transformer_blocks"))


def flux_family(name: str):
    """(configs, build, make_inputs, label) of ``--model flux`` / ``flux2``."""
    from .. import models as M
    if name == "flux2":
        return M.FLUX2_CONFIGS, M.build_flux2_transformer, M.make_flux2_inputs, "FLUX.2"
    return M.FLUX_CONFIGS, M.build_flux_transformer, M.make_flux_inputs, "Flux"


def _main_flux(args, device: str, providers: list[str]) -> int:
    """``--model flux`` / ``flux2``: a double-stream and a single-stream block of one forward, timed alone."""
    from ..profiler import _dtype
    configs, build, make_inputs, label = flux_family(args.model)
    if args.config is not None and args.config not in configs:
        raise SystemExit(f"--config {args.config!r} is not a {label} config; choose from "
                         f"{', '.join(c for c in configs if c != 'tiny')}")
    config = "tiny" if args.tiny else (args.config or "dev")
    dtype = torch.float32 if (args.tiny and torch.device(device).type == "cpu") else _dtype(args.dtype)
    model = build(config, num_layers=1, num_single_layers=1, device=device, dtype=dtype)
    tokens = _configs.parse_tokens(args.tokens)
    inputs = make_inputs(model, img_tokens=tokens, txt_len=args.txt_len)
    n_img = inputs["img_ids"].shape[0]
    shape = {"model": args.model, "config": config, "dtype": str(dtype), "img_tokens": n_img,
             "images": list(tokens) if tokens else [n_img], "txt_len": inputs["encoder_hidden_states"].shape[1],
             "guidance_embeds": bool(model.config.guidance_embeds)}
    print(f"bench block: {shape}, device {device}; blocks: transformer_blocks[0] (double), "
          "single_transformer_blocks[0] (single) of a 1 + 1 block model")

    def blocks(m):
        return [getattr(m, attr)[0] for _, attr in FLUX_KINDS]

    kinds = [k for k, _ in FLUX_KINDS]
    rows: dict[str, list] = {k: [] for k in kinds}
    refs: dict = {}
    pending: dict[str, list] = {k: [] for k in kinds}
    for rnd, order in harness.rotated_rounds(providers, args.rounds):
        if args.rounds > 1:
            print(f" round {rnd + 1}/{args.rounds}: {', '.join(order)}")
        for p in order:
            try:
                results = run_provider_blocks(model, inputs, p, device, args.rep_ms, args.cooldown, args.energy_s,
                                              blocks=blocks)
            except Exception as e:  # keep the other providers' numbers
                print(f"  {p}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
                for k in kinds:
                    rows[k].append({"provider": p, "error": f"{type(e).__name__}: {e}", "round": rnd})
                continue
            for k, (row, img) in zip(kinds, results):
                row["round"] = rnd
                if k not in refs and _configs.normalize(p.partition("+")[0]) == "stock":
                    refs[k] = img
                    for r_, im in pending[k]:  # providers timed before the first stock one
                        r_["max_rel_diff_vs_stock"] = _configs.rel_err(im, img)
                    pending[k].clear()
                if k not in refs:
                    pending[k].append((row, img))
                row["max_rel_diff_vs_stock"] = _configs.rel_err(img, refs[k]) if k in refs else None
                rows[k].append(row)
                print(f"  {p} {k}: {row['ms']:.3f} ms (first call {row['first_call_s']:.1f} s{_energy_note(row)})")
    pending.clear()
    out_rows = []
    for k in kinds:
        out_rows += [{"block": k, **r} for r in _summarize(rows[k], args.rounds)]
    print(harness.format_table(out_rows, ["block", "provider", "ms", "speedup_vs_stock_eager", "ratio_vs_stock_compile",
                                          *_fp8_columns(out_rows),
                                          "j_per_call", "avg_power_w", "energy_ratio_vs_stock_compile",
                                          "host_ms", "first_call_s", "max_rel_diff_vs_stock", "fp8", "error"]))
    path = harness.write_results(f"block-{args.model}" + ("-tiny" if args.tiny else ""), out_rows,
                                 extra={"model": args.model, "shape": shape, "device": device,
                                        "rounds": args.rounds, "rep_ms": args.rep_ms, "energy_s": args.energy_s,
                                        "cooldown_s": args.cooldown},
                                 out_dir=args.out)
    print(f"results: {path}")
    return 0


def _main_wan(args, device: str, providers: list[str]) -> int:
    """``--model wan``: block 0 of a 1-block Wan model, on the arguments one forward passes it."""
    from ..models import WAN_CONFIGS, build_wan_transformer, make_wan_inputs
    from ..profiler import _dtype
    if args.config is not None and args.config not in WAN_CONFIGS:
        raise SystemExit(f"--config {args.config!r} is not a Wan config; choose from "
                         f"{', '.join(c for c in WAN_CONFIGS if not c.startswith('tiny'))}")
    config = ("tiny-ti2v" if args.config == "ti2v-5b" else "tiny") if args.tiny else (args.config or "t2v-14b")
    dtype = torch.float32 if (args.tiny and torch.device(device).type == "cpu") else _dtype(args.dtype)
    model = build_wan_transformer(config, num_layers=1, device=device, dtype=dtype)
    latent = _configs.parse_tokens(args.tokens)
    if latent is not None and len(latent) != 3:
        raise SystemExit("--tokens for wan is the latent frames,height,width (default 21,60,104: 480p, 81 frames)")
    # one timestep per batch row (TI2V-5B too): a block called alone has no per-token index; the
    # per-token path (two parameter sets + index) is timed by ``bench model --model wan --config ti2v-5b``
    inputs = make_wan_inputs(model, latent=latent, txt_len=args.txt_len, per_token=False)
    x = inputs["hidden_states"]
    pt, ph, pw = model.config.patch_size
    shape = {"model": "wan", "config": config, "dtype": str(dtype), "latent": list(x.shape[2:]),
             "tokens": (x.shape[2] // pt) * (x.shape[3] // ph) * (x.shape[4] // pw),
             "txt_len": inputs["encoder_hidden_states"].shape[1],
             "per_token_timestep": inputs["timestep"].dim() == 2}
    print(f"bench block: {shape}, device {device}; block: blocks[0] of a 1-block model")
    rows, ref, pending = [], None, []
    for rnd, order in harness.rotated_rounds(providers, args.rounds):
        if args.rounds > 1:
            print(f" round {rnd + 1}/{args.rounds}: {', '.join(order)}")
        for p in order:
            try:
                (row, out), = run_provider_blocks(model, inputs, p, device, args.rep_ms, args.cooldown,
                                                  args.energy_s, blocks=lambda m: [m.blocks[0]])
            except Exception as e:  # keep the other providers' numbers
                print(f"  {p}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
                rows.append({"provider": p, "error": f"{type(e).__name__}: {e}", "round": rnd})
                continue
            row["round"] = rnd
            if ref is None and _configs.normalize(p.partition("+")[0]) == "stock":
                ref = out
                for r_, o in pending:  # providers timed before the first stock one
                    r_["max_rel_diff_vs_stock"] = _configs.rel_err(o, ref)
                pending.clear()
            if ref is None:
                pending.append((row, out))
            row["max_rel_diff_vs_stock"] = _configs.rel_err(out, ref) if ref is not None else None
            rows.append(row)
            print(f"  {p}: {row['ms']:.3f} ms (first call {row['first_call_s']:.1f} s{_energy_note(row)})")
    pending.clear()
    rows = _summarize(rows, args.rounds)
    attn = None
    if args.attn_rep_ms > 0:
        attn = _attn_share.measure(model, inputs, providers, device, rep_ms=args.attn_rep_ms)
        _attn_share.annotate(rows, attn, "ms", 1)
        print(_attn_share.describe(attn))
    print(harness.format_table(rows, ["provider", "ms", "speedup_vs_stock_eager", "ratio_vs_stock_compile",
                                      *_fp8_columns(rows),
                                      "attn_backend", "attn_tflops", "attn_share_pct",
                                      "j_per_call", "avg_power_w", "energy_ratio_vs_stock_compile",
                                      "host_ms", "first_call_s", "max_rel_diff_vs_stock", "fp8", "error"]))
    path = harness.write_results("block-wan" + ("-tiny" if args.tiny else ""), rows,
                                 extra={"model": "wan", "shape": shape, "device": device, "rounds": args.rounds,
                                        "rep_ms": args.rep_ms, "energy_s": args.energy_s,
                                        "cooldown_s": args.cooldown, "attention": attn},
                                 out_dir=args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
