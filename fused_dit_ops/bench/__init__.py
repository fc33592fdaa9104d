"""Benchmarks: ``python -m fused_dit_ops bench <name>``. Each module has ``main(argv) -> int``."""
BENCHES = {
    "modulation": "fused_dit_ops.bench.modulation",
    "rope": "fused_dit_ops.bench.rope",
    "qkv": "fused_dit_ops.bench.qkv",
    "swiglu": "fused_dit_ops.bench.swiglu",
    "attention": "fused_dit_ops.bench.attention",
    "block": "fused_dit_ops.bench.block",
    "model": "fused_dit_ops.bench.model",
    "fp8": "fused_dit_ops.bench.fp8",
    "parallel": "fused_dit_ops.bench.parallel",
    "wan-ops": "fused_dit_ops.bench.wan_ops",
    "flux-ops": "fused_dit_ops.bench.flux_ops",
}

# one line each, for `python -m fused_dit_ops bench` (the modules' --help say more)
DESCRIPTIONS = {
    "modulation": "the four adaLN modulation ops vs eager and torch.compile (GPU)",
    "rope": "RoPE on q and k of both streams: eager, compile, FlashInfer, fused (GPU)",
    "qkv": "joint QKV path: concat, QK-norm + RoPE + concat, q/k/v projections (GPU)",
    "swiglu": "the SwiGLU MLP input projection: GEMM with the SwiGLU epilogue vs F.linear + silu * mul (GPU)",
    "attention": "every attention backend, the automatic choice and the shim's overhead (GPU)",
    "block": "one Qwen-Image-Edit-2511 block (--model flux / flux2: a Flux.1 / FLUX.2 double and single block): "
             "stock/patched x eager/compile (GPU; --device cpu --tiny: smoke run)",
    "model": "the 60-layer transformer, one CFG step per iteration (GPU, ~41 GB; --model flux: FLUX.1-dev, one "
             "forward, ~24 GB; --model flux2: FLUX.2-dev, ~64 GB, --layers N for N double + 6N single; "
             "--device cpu --tiny: smoke run)",
    "fp8": "the FP8 ops at the Qwen-Image-Edit block shapes: quantising norm ops vs bf16 + unfused quantisation, "
           "the eight block GEMMs bf16 vs fp8_linear (GPU; --device cpu --tiny: smoke run)",
    "parallel": "the patched model under diffusers' context parallelism: --degree1 (one GPU: degree 1 vs none) or "
                "--ulysses U --ring R (U x R GPUs: stock vs patched, both parallel; --device cpu --tiny: smoke run)",
    "wan-ops": "the memory-bound ops of a patched Wan block (bf16, fp32 modulation) at Wan's widths vs eager, "
               "torch.compile and the bandwidth floor (GPU; --device cpu --tiny: smoke run)",
    "flux-ops": "the memory-bound ops of patched Flux.1 / FLUX.2 blocks (C 3072 / 6144, 4096 + 512 tokens) vs "
                "eager, torch.compile and the bandwidth floor (GPU; --device cpu --tiny: smoke run)",
}
