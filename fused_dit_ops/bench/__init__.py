"""Benchmarks: ``python -m fused_dit_ops bench <name>``. Each module has ``main(argv) -> int``."""
BENCHES = {
    "modulation": "fused_dit_ops.bench.modulation",
    # -- RoPE / joint QKV (issue 3) --
    # -- attention (issue 4) --
    "attention": "fused_dit_ops.bench.attention",
}
