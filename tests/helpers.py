"""Shared test helpers: random inputs (never zeros), poisoned outputs, error metrics."""
from __future__ import annotations

import pytest
import torch

from fused_dit_ops._validation import FusedDitInputError

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error; NaN/inf in out never passes (returns inf)."""
    out64 = out.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return ((out64 - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def max_ulp_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |out - ref| in units of the last place of out's dtype at |ref| (elementwise)."""
    ref64 = ref.double()
    # 2**floor(log2|ref|), floored at the smallest normal: subnormals have the fixed spacing there.
    tiny = torch.finfo(out.dtype).tiny
    scale = torch.ldexp(torch.ones_like(ref64), torch.frexp(ref64.abs().clamp_min(tiny))[1] - 1)
    diff = (out.double() - ref64).abs() / (scale * ULP[out.dtype])
    if not torch.isfinite(out.double()).all():
        return float("inf")
    return diff.max().item() if diff.numel() else 0.0


def max_ulp_err_rowwise(out: torch.Tensor, ref: torch.Tensor, row: int) -> float:
    """Like :func:`max_ulp_err`, with each element's last place taken at the largest |ref| of its
    group of ``row`` consecutive elements (a head's row): for outputs that cancel (RoPE's
    x1 cos - x2 sin), whose error scales with the inputs' magnitude, not the output's."""
    ref64 = ref.double().reshape(-1, row)
    mag = ref64.abs().amax(-1, keepdim=True).expand_as(ref64)
    tiny = torch.finfo(out.dtype).tiny
    scale = torch.ldexp(torch.ones_like(ref64), torch.frexp(mag.clamp_min(tiny))[1] - 1)
    if not torch.isfinite(out.double()).all():
        return float("inf")
    diff = (out.double().reshape(-1, row) - ref64).abs() / (scale * ULP[out.dtype])
    return diff.max().item() if diff.numel() else 0.0


def poison_(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan"))


def randn(*shape, dtype=torch.float32, device="cpu", std=1.0):
    return torch.randn(*shape, dtype=torch.float32, device=device).mul_(std).to(dtype)


def strided_rows(B, L, C, *, dtype, device="cpu", pad=8):
    """[B, L, C] view with a row stride of C + pad (a slice of a wider buffer)."""
    return randn(B, L, C + pad, dtype=dtype, device=device)[..., :C]


def expect_input_error(fn, *match):
    """fn() raises FusedDitInputError whose message contains every string in ``match``."""
    with pytest.raises(FusedDitInputError) as e:
        fn()
    for m in match:
        assert m in str(e.value), str(e.value)


# patched vs stock tiny Qwen-Image model, CPU fp32: measured rel_fro ~2.5e-7, max_abs ~7e-6 at |out| ~15
QWEN_CPU_FP32_REL = 2e-6


@pytest.fixture
def tiny():
    """A tiny random diffusers Qwen-Image transformer (CPU, fp32)."""
    from fused_dit_ops.models import build_qwen_image_transformer
    return build_qwen_image_transformer("tiny", seed=3)


def cuda_fp8() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


# FP8 GPU tests: torch._scaled_mm's e4m3 GEMM needs compute capability 8.9+ (Ada, Hopper)
needs_fp8_gpu = pytest.mark.skipif(not cuda_fp8(), reason="needs a CUDA GPU with compute capability 8.9+")


def tiny_fp8_qwen(num_layers=3, **kw):
    """The tiny Qwen-Image model of the FP8 tests (3 heads, widths multiples of 16)."""
    from fused_dit_ops.models import build_qwen_image_transformer
    return build_qwen_image_transformer("tiny", seed=3, num_layers=num_layers, num_attention_heads=3, **kw)


def tiny_fp8_qwen_inputs(m, seed=1, **kw):
    """Its inputs: 13 + 7 image tokens (two parameter sets), 5 text tokens."""
    from fused_dit_ops.models import make_qwen_inputs
    return make_qwen_inputs(m, img_tokens=(13, 7), txt_len=5, seed=seed, **kw)


def run_blocks_compiled(model, blocks, kw, kw_next=None, backend="aot_eager"):
    """(output on ``kw``, output on ``kw_next``) with each of ``blocks`` compiled (fullgraph,
    ``backend``; "inductor" on a GPU); the second call must not recompile (``error_on_recompile``;
    None without ``kw_next``). Undone afterwards."""
    import torch._dynamo as dynamo
    from fused_dit_ops.demo import uncompile_blocks
    dynamo.reset()
    try:
        for b in blocks:
            b.compile(fullgraph=True, backend=backend)
        got = run_no_grad(model, kw)
        got_next = None
        if kw_next is not None:
            with dynamo.config.patch(error_on_recompile=True):
                got_next = run_no_grad(model, kw_next)
    finally:
        uncompile_blocks(model)
        dynamo.reset()
    return got, got_next


def spy_fp8_gemms(monkeypatch) -> list:
    """[(function, its fast_accum)] of each FP8 GEMM the integrations call from now on (``_eager``'s
    ``fp8_linear_unchecked`` / ``joint_fp8_linear_unchecked``, which still run)."""
    from fused_dit_ops.ops import _eager
    calls = []
    for name in ("fp8_linear_unchecked", "joint_fp8_linear_unchecked"):
        real = getattr(_eager, name)

        def spy(*a, _n=name, _f=real, fast_accum=False, **k):
            calls.append((_n, fast_accum))
            return _f(*a, fast_accum=fast_accum, **k)
        monkeypatch.setattr(_eager, name, spy)
    return calls


def fp8_fast_accum_errors(model, kw, truth, run, linears=None) -> tuple[float, float]:
    """(recipe error, fused FP8 error) against ``truth`` with fast accumulation on both sides: the
    per-row recipe (on ``linears``, default every block Linear) and ``patch(precision="fp8")`` with
    their defaults (torchao's). Prints both; leaves ``model`` unpatched."""
    import fused_dit_ops as fdo
    from fused_dit_ops.bench import fp8_recipe
    fp8_recipe.install(model, linears=linears)
    e_recipe = rel_err(run(model, kw), truth)
    fp8_recipe.remove(model)
    r = fdo.patch(model, precision="fp8")
    e_ours = rel_err(run(model, kw), truth)
    print(f"fast accumulation: per-row FP8 recipe {e_recipe:.3e}, fused FP8 {e_ours:.3e}")
    assert not r.runtime, r.runtime
    fdo.unpatch(model)
    return e_recipe, e_ours


def tiny_bench_block_rows(tmp_path, providers: str, *flags) -> dict:
    """``bench block --device cpu --tiny --precision fp8 FLAGS`` on ``providers``: its JSON rows by
    provider (the run must succeed)."""
    import json
    from fused_dit_ops.bench import block
    rc = block.main(["--device", "cpu", "--tiny", "--providers", providers, "--precision", "fp8", *flags,
                     "--rep-ms", "5", "--energy-s", "0", "--out", str(tmp_path)])
    assert rc == 0
    (path,) = tmp_path.glob("block-tiny-*.json")
    return {r["provider"]: r for r in json.loads(path.read_text())["rows"]}


def run_no_grad(model, kw):
    """A diffusers transformer's first output, under torch.no_grad() (as pipelines call it)."""
    with torch.no_grad():
        return model(**kw)[0]


@pytest.fixture
def native_diffusers_backend():
    """``model.set_attention_backend`` sets a process-wide active backend in diffusers (a test in
    test_attention.py leaves "_flash_3" active); a stock reference must run diffusers' default.
    Test modules that compare against stock use it autouse (``pytestmark``)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    old = _AttentionBackendRegistry._active_backend
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)
    yield
    _AttentionBackendRegistry.set_active_backend(old)
