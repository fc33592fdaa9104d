"""Benchmarks: ``python -m fused_dit_ops bench <name>``. Each module has ``main(argv) -> int``."""
BENCHES = {
    "modulation": "fused_dit_ops.bench.modulation",
    # -- RoPE / joint QKV (issue 3) --
    "rope": "fused_dit_ops.bench.rope",
    "qkv": "fused_dit_ops.bench.qkv",
    # -- attention (issue 4) --
    "attention": "fused_dit_ops.bench.attention",
    # -- end to end (issue 7): one block, the whole transformer --
    "block": "fused_dit_ops.bench.block",
    "model": "fused_dit_ops.bench.model",
}
