"""Benchmarks: ``python -m fused_dit_ops bench <name>``. Each module has ``main(argv) -> int``."""
BENCHES = {
    "modulation": "fused_dit_ops.bench.modulation",
    "rope": "fused_dit_ops.bench.rope",
    "qkv": "fused_dit_ops.bench.qkv",
    "attention": "fused_dit_ops.bench.attention",
    "block": "fused_dit_ops.bench.block",
    "model": "fused_dit_ops.bench.model",
    "fp8": "fused_dit_ops.bench.fp8",
}

# one line each, for `python -m fused_dit_ops bench` (the modules' --help say more)
DESCRIPTIONS = {
    "modulation": "the four adaLN modulation ops vs eager and torch.compile (GPU)",
    "rope": "RoPE on q and k of both streams: eager, compile, FlashInfer, fused (GPU)",
    "qkv": "joint QKV path: concat, QK-norm + RoPE + concat, q/k/v projections (GPU)",
    "attention": "every attention backend, the automatic choice and the shim's overhead (GPU)",
    "block": "one Qwen-Image-Edit-2511 block (--model flux: a Flux.1 double and single block): stock/patched x "
             "eager/compile (GPU; --device cpu --tiny: smoke run)",
    "model": "the 60-layer transformer, one CFG step per iteration (GPU, ~41 GB; --model flux: FLUX.1-dev, one "
             "forward, ~24 GB; --device cpu --tiny: smoke run)",
    "fp8": "the FP8 ops at the Qwen-Image-Edit block shapes: quantising norm ops vs bf16 + unfused quantisation, "
           "the eight block GEMMs bf16 vs fp8_linear (GPU; --device cpu --tiny: smoke run)",
}
