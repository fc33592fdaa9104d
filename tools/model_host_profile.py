"""Python-side cost of one model forward, stock vs patched (diagnostic, GPU only).

Prints the wall time per forward (back to back, synchronised at the end) and a cProfile of three
forwards (function-call counts and own time). A host-only timing behind a busy GPU
(``torch.cuda._sleep``) does not work for zero_cond_t models: diffusers' forward copies the
modulation index from a Python list to the GPU (``torch.tensor(..., device=...)``), which waits for
the GPU once per forward. Usage: python tools/model_host_profile.py [--layers 4] [--tokens 256]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch


def wall_ms(call, n=5):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        call()
    dt = (time.perf_counter() - t) / n * 1e3
    torch.cuda.synchronize()
    return dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    import fused_dit_ops as fdo
    from fused_dit_ops.models import build_qwen_image_transformer, make_qwen_inputs
    model = build_qwen_image_transformer("edit-2511", num_layers=args.layers, device="cuda", dtype=torch.bfloat16)
    kw = make_qwen_inputs(model, img_tokens=(args.tokens, args.tokens))

    def call():
        with torch.no_grad():
            return model(**kw)

    for name in ("stock", "patched"):
        if name == "patched":
            fdo.patch(model, reuse_mod=False)
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        print(f"{name}: {wall_ms(call):.2f} ms per forward, wall ({args.layers} layers, "
              f"{args.tokens}+{args.tokens} tokens)")
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        ka = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in ka if e.self_device_time_total > 0 and e.device_type
                     == torch.autograd.DeviceType.CUDA)
        print(f"{name}: GPU kernel time {gpu_us / 1e3:.2f} ms in one profiled forward; top GPU ops:")
        print(ka.table(sort_by="self_cuda_time_total", row_limit=12))
        torch.cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(3):
            call()
        pr.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
        print(s.getvalue()[:6000])
    fdo.unpatch(model)


if __name__ == "__main__":
    main()
