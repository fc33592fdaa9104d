"""``python -m fused_dit_ops demo``: stock vs fused diffusers Qwen-Image-Edit transformer, end to end.

Builds a Qwen-Image-Edit-2511 transformer from its config with random weights (std 0.02, no
download) and times four variants of the same forward: stock eager, stock + torch.compile
(``compile_repeated_blocks(fullgraph=True)``), patched eager (``fused_dit_ops.patch``), patched +
compile. Prints ms per forward and per layer, speedups and the output error against stock eager.

GPU default: 4 real layers (``--layers 60`` for the whole model), bf16, L_img 8192 (4096 target +
4096 reference tokens, the zero_cond_t 0/1 index) + L_txt 208, CUDA-event timing (median of
``--iters`` forwards after warm-up). CPU (or ``--device cpu``): the tiny config, fp32, wall-clock
timing with torch.compile's ``aot_eager`` backend. On the CPU every fused op runs its PyTorch
reference implementation, so the CPU run checks that the patched model computes what the stock
one does; its timings say nothing about GPU speed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

CPU_NOTE = ("note: CPU run of the tiny config. It checks that the patched model matches the stock one "
            "(rel_err); the timings say nothing about GPU speed (on the CPU the fused ops run their "
            "PyTorch reference code). Run it on a CUDA GPU for the speed comparison.")


def _progress(total, desc):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
    except Exception:  # noqa: BLE001
        class _Simple:
            def __init__(self):
                self.n = 0

            def update(self, k=1):
                self.n += k
                print(f"  {desc}: {self.n}/{total}", file=sys.stderr, flush=True)

            def set_description(self, d):
                pass

            def close(self):
                pass
        return _Simple()


def _blocks(model):
    """Every repeated block: ``transformer_blocks`` (and ``single_transformer_blocks`` where present),
    or ``blocks`` (Wan)."""
    if not hasattr(model, "transformer_blocks"):
        return list(model.blocks)
    return [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", ())]


def compile_blocks(model, **kw):
    """``model.compile_repeated_blocks(**kw)`` (diffusers) or the same by hand."""
    if hasattr(model, "compile_repeated_blocks"):
        model.compile_repeated_blocks(**kw)
    else:
        for b in _blocks(model):
            b.compile(**kw)


def uncompile_blocks(model):
    """Drop what ``nn.Module.compile`` installed on the blocks (eager again)."""
    for b in _blocks(model):
        if getattr(b, "_compiled_call_impl", None) is not None:
            b._compiled_call_impl = None


def _token_count(model, kw) -> int:
    """Image (video) tokens of the inputs: [B, L, C] activations, or a Wan latent [B, C, F, H, W] in patches."""
    x = kw["hidden_states"]
    if x.dim() != 5:
        return x.shape[1]
    pt, ph, pw = model.config.patch_size
    return (x.shape[2] // pt) * (x.shape[3] // ph) * (x.shape[4] // pw)


def _time_forward(fn, device, warmup, iters, bar):
    for _ in range(warmup):
        fn()
        bar.update(1)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
            bar.update(1)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            bar.update(1)
    return statistics.median(times)


def _err(out, ref):
    d = out.double() - ref.double()
    return (d.norm() / ref.double().norm().clamp_min(1e-30)).item(), d.abs().max().item()


def run_demo(device=None, layers=None, config="edit-2511", img_tokens=None, txt_len=None, iters=None,
             warmup=None, compile_=True, compile_backend=None, attention_backend=None, dtype=None,
             out_dir=None, quiet=False, model="qwen", precision="bf16") -> list[dict]:
    from . import patch, unpatch
    from .bench.harness import format_table
    from .models import build_model_and_inputs

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if not gpu and not config.startswith("tiny"):
        config = "tiny-ti2v" if model == "wan" and config == "ti2v-5b" else "tiny"
    elif model in ("flux", "flux2") and config == "edit-2511":
        config = "dev"
    elif model == "wan" and config == "edit-2511":
        config = "t2v-14b"
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    layers = layers or ((1 if model == "flux2" else 4) if gpu else None)
    iters = iters or (10 if gpu else 3)
    warmup = warmup if warmup is not None else (3 if gpu else 1)
    compile_backend = compile_backend or ("inductor" if gpu else "aot_eager")

    if gpu:
        from . import warmup_attention, warmup_rope
        warmup_rope(device, dtype)
    family = model
    model, kw = build_model_and_inputs(family, config, layers, img_tokens, txt_len, device, dtype)
    n_layers = len(_blocks(model))
    L_img, L_txt = _token_count(model, kw), kw["encoder_hidden_states"].shape[1]
    if gpu:
        H, hd = model.config.num_attention_heads, model.config.attention_head_dim
        warmup_attention(seq_lens=(L_img + L_txt,), heads=H, head_dim=hd, dtype=dtype, device=device)
    if not quiet and not gpu:
        print(CPU_NOTE)
    if not quiet:
        print(f"demo: {family} {config} transformer, {n_layers} layers, {str(dtype).replace('torch.', '')}, {device}; "
              f"L_img {L_img}, L_txt {L_txt}; "
              f"{iters} timed forwards after {warmup} warm-up, compile backend {compile_backend}")

    if precision not in ("bf16", "fp8"):
        raise ValueError(f"precision must be 'bf16' or 'fp8', got {precision!r}")
    # (name, patch precision or None for stock, compiled)
    variants = [("stock eager", None, False)]
    if compile_:
        variants.append(("stock compile", None, True))
    for prec in ("bf16", "fp8") if precision == "fp8" else ("bf16",):
        tag = "" if prec == "bf16" else " fp8"
        variants.append((f"patched{tag} eager", prec, False))
        if compile_:
            variants.append((f"patched{tag} compile", prec, True))

    bar = _progress(len(variants) * (warmup + iters), "demo")
    rows, ref, report, reports, patched_as = [], None, None, [], None
    try:
        for name, prec, compiled in variants:
            bar.set_description(name)
            torch._dynamo.reset()
            uncompile_blocks(model)
            if prec != patched_as:
                if patched_as is not None:
                    unpatch(model)
                report = patch(model, attention_backend=attention_backend, reuse_mod=False,  # one forward, repeated
                               **({"precision": "fp8"} if prec == "fp8" else {}))
                reports.append(report)
                patched_as = prec
            if compiled:
                compile_blocks(model, fullgraph=True, backend=compile_backend)

            def fwd():
                with torch.no_grad():
                    return model(**kw)[0]

            ms = _time_forward(fwd, device, warmup, iters, bar)
            out = fwd()
            if ref is None:
                ref = out.clone()
            rel, mx = _err(out, ref)
            rows.append(dict(variant=name, ms_forward=ms, ms_per_layer=ms / n_layers, rel_err=rel, max_abs_err=mx))
    finally:
        bar.close()
        uncompile_blocks(model)
        unpatch(model)
    base = rows[0]["ms_forward"]
    comp = next((r["ms_forward"] for r in rows if r["variant"] == "stock compile"), None)
    for r in rows:
        r["speedup_vs_eager"] = base / r["ms_forward"]
        r["speedup_vs_compile"] = comp / r["ms_forward"] if comp else None
    if not quiet:
        print(format_table(rows, ["variant", "ms_forward", "ms_per_layer", "speedup_vs_eager",
                                  "speedup_vs_compile", "rel_err", "max_abs_err"]))
        print("ms_per_layer = forward time / layers (embeddings and the output head included); "
              "rel_err = Frobenius relative error of the output vs stock eager")
        for r in reports:
            print(r)
        if not gpu:
            print(CPU_NOTE)
    if out_dir:
        from .bench.harness import write_results
        extra = dict(model=family, config=config, layers=n_layers, dtype=str(dtype), L_img=L_img, L_txt=L_txt, iters=iters,
                     compile_backend=compile_backend, attention_backend=attention_backend or "auto",
                     precision=precision, patch_report="\n".join(str(r) for r in reports))
        path = write_results("demo", rows, extra, out_dir)
        if not quiet:
            print(f"wrote {path}")
    return rows


def _tokens(s):
    return tuple(int(v) for v in s.split(",") if v.strip())


def main(argv=None) -> int:
    from .bench.harness import plain_doc
    p = argparse.ArgumentParser(prog="python -m fused_dit_ops demo",
                                description=plain_doc(__doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen", choices=("qwen", "flux", "flux2", "wan"),
                   help="qwen (Qwen-Image-Edit, default), flux (Flux.1: --layers N = N double + 2N single "
                        "blocks, 19 = whole model; default 2), flux2 (FLUX.2-dev: --layers N = N double + 6N "
                        "single blocks, 8 = whole model, ~64 GB; default 1); flux, flux2: tokens default 4096 "
                        "image + 512 text; or wan (Wan2.1/2.2 T2V-14B, --config t2v-14b | i2v-14b | ti2v-5b | "
                        "t2v-1.3b; --layers of 40, default 4; --img-tokens F,H,W latent, default 21,60,104 = "
                        "480p x 81 frames, 32760 tokens, + 512 text)")
    p.add_argument("--device", default=None, help="cuda or cpu (cpu: tiny config)")
    p.add_argument("--tiny", action="store_true", help="the tiny config (the CPU default; a smoke run on a GPU)")
    p.add_argument("--layers", type=int, default=None, help="transformer layers (GPU default 4; 60 = whole model)")
    p.add_argument("--config", default="edit-2511", help="edit-2511 | edit-2509 | edit | qwen-image (GPU)")
    p.add_argument("--img-tokens", type=_tokens, default=None, help="image token counts, e.g. 4096,4096")
    p.add_argument("--txt-len", type=int, default=None, help="text tokens (default 208)")
    p.add_argument("--iters", type=int, default=None, help="timed forwards per variant")
    p.add_argument("--warmup", type=int, default=None, help="warm-up forwards per variant")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (GPU inductor, CPU aot_eager)")
    p.add_argument("--attention-backend", default=None, help="fused_dit.attention backend (default auto)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp8"),
                   help="fp8: also run the model patched with precision='fp8' (FP8 e4m3 block GEMMs), eager "
                        "and compiled, next to the bf16 rows")
    p.add_argument("--out", default=None, help="write JSON results into this directory")
    a = p.parse_args(argv)
    if a.tiny and a.model == "wan":
        a.config = "tiny-ti2v" if a.config == "ti2v-5b" else "tiny"
    elif a.tiny:
        a.config = "tiny"
    run_demo(device=a.device, layers=a.layers, config=a.config, img_tokens=a.img_tokens, txt_len=a.txt_len,
             iters=a.iters, warmup=a.warmup, compile_=not a.no_compile, compile_backend=a.compile_backend,
             attention_backend=a.attention_backend, out_dir=a.out, model=a.model, precision=a.precision)
    return 0


if __name__ == "__main__":
    sys.exit(main())
