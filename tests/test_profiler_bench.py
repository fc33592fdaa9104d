"""Layer profiler and end-to-end benchmarks (block / model): CPU runs on the tiny model.

The same code paths run on the GPU; here the "kernels" are CPU ops and the benchmarks run in
their ``--device cpu --tiny`` smoke mode. GPU-marked tests exercise the CUDA event path.
"""
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fused_dit_ops import profiler
from fused_dit_ops.bench import BENCHES, _configs, harness
from fused_dit_ops.models import build_qwen_image_transformer, make_qwen_inputs


@pytest.fixture(autouse=True)
def _diffusers_default_attention_backend():
    """diffusers keeps a process-wide active attention backend that ``set_attention_backend``
    changes and ``reset_attention_backend`` does not restore; earlier tests may leave it on a
    GPU-only backend. These tests run the models as built: put the default back around each."""
    try:
        from diffusers.models.attention_dispatch import DIFFUSERS_ATTN_BACKEND, AttentionBackendName
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry as reg
    except ImportError:
        yield
        return
    old = reg._active_backend
    reg._active_backend = AttentionBackendName(DIFFUSERS_ATTN_BACKEND)
    try:
        yield
    finally:
        reg._active_backend = old


def _check_profiles(profiles, names):
    assert len(profiles) == 2
    for p in profiles:
        assert p.kernels, "no kernels cut out of the block"
        assert p.total_us > 0 and p.range_us > 0
        assert p.total_us <= p.range_us * 1.05
        summary = p.summary()
        assert math.isclose(sum(g["share"] for g in summary.values()), 100.0, rel_tol=1e-6)
        assert all(g["us"] > 0 and g["count"] > 0 for g in summary.values())
    rows = profiler.comparison_rows(profiles, names, bandwidth=1e10, top=10)
    total = rows[-1]
    assert total["kernel"].startswith("TOTAL")
    for n, p in zip(names, profiles):
        assert total[f"{n} us"] == pytest.approx(p.total_us)
        shown = sum(r[f"{n} %"] or 0 for r in rows[:-1])
        assert shown == pytest.approx(100.0, rel=1e-6)  # top rows + the folded row cover everything
    return rows


def test_profile_stock_vs_patched_cli(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = profiler.main(["--device", "cpu", "--a", "stock", "--b", "patched", "--layers", "2", "--layer", "1",
                        "--warmup", "1",
                        "--trace", str(tmp_path / "tr"), "--json", str(out), "--png", str(tmp_path / "p.png")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "stock" in text and "patched" in text and "TOTAL" in text
    doc = json.loads(out.read_text())
    assert doc["names"] == ["stock", "patched"]
    for p in doc["profiles"]:
        assert p["kernels"] and p["total_us"] > 0
        shares = sum(k["us"] for k in p["kernels"]) / p["total_us"]
        assert shares == pytest.approx(1.0)
    # the patched block runs the fused ops, the stock one does not
    ops = [{k["op"] for k in p["kernels"]} for p in doc["profiles"]]
    assert not any(o.startswith("fused_dit::") for o in ops[0])
    assert any(o.startswith("fused_dit::") for o in ops[1])
    traces = sorted((tmp_path / "tr").glob("*.json"))
    assert len(traces) == 2 and all(t.stat().st_size > 0 for t in traces)


def test_profile_one_block_only_and_model_restored():
    model = build_qwen_image_transformer("tiny", num_layers=3)
    kw = make_qwen_inputs(model)
    blocks = list(model.transformer_blocks)
    p1 = profiler.profile_layer(lambda: model(**kw), model.transformer_blocks[1], model=model, warmup=1)
    assert list(model.transformer_blocks) == blocks  # wrapper removed
    # without the model: class-swap marking, restored afterwards
    cls = type(blocks[2])
    p2 = profiler.profile_layer(lambda: model(**kw), blocks[2], warmup=1)
    assert type(blocks[2]) is cls
    for p in (p1, p2):
        # one block: 7 Linear layers x 2 streams of addmm, one attention, no model-level ops
        names = {k.op for k in p.kernels}
        assert "aten::addmm" in names
        assert sum(1 for k in p.kernels if k.op == "aten::addmm") == 14
        whole = sum(1 for k in p.kernels if "scaled_dot_product" in k.op and "flash" not in k.op)
        assert whole <= 1


def test_profile_compiled_configs():
    profiles, names, meta = profiler.run_profile("stock", "stock-compile", layers=2, layer=0, warmup=1,
                                                 device="cpu")
    assert names == ["stock", "stock-compile"]
    _check_profiles(profiles, names)
    # the compiled block calls inductor's code, the eager one does not
    assert any("Compiled" in k.op or "Torch-Compiled" in k.op for k in profiles[1].kernels)


def test_format_comparison_and_png(tmp_path):
    model = build_qwen_image_transformer("tiny", num_layers=1)
    kw = make_qwen_inputs(model)
    a = profiler.profile_layer(lambda: model(**kw), model.transformer_blocks[0], model=model, warmup=1)
    b = profiler.profile_layer(lambda: model(**kw), model.transformer_blocks[0], model=model, warmup=1)
    rows = _check_profiles([a, b], ["x", "y"])
    text = profiler.format_comparison([a, b], ["x", "y"], bandwidth=1e10, top=5)
    assert "TOTAL" in text and "y vs x" in text
    assert len([r for r in rows if r["kernel"].startswith("(")]) == 1  # folded rest
    ok = profiler.write_png([a, b], ["x", "y"], tmp_path / "c.png")
    assert ok == (tmp_path / "c.png").exists()


def test_short_names_and_bytes():
    s = profiler.short_name
    assert s("void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<c10::BFloat16, "
             "c10::BFloat16, c10::BFloat16, at::native::binary_internal::MulFunctor<float> >, "
             "std::array<char*, 3ul> >(int, at::native::BinaryFunctor<c10::BFloat16, c10::BFloat16, "
             "c10::BFloat16, at::native::binary_internal::MulFunctor<float> >, std::array<char*, 3ul>)"
             ) == "vectorized_elementwise_kernel<MulFunctor>"
    assert s("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float, "
             "false>(int, float, c10::BFloat16 const*)") == "vectorized_layer_norm_kernel"
    assert s("triton_poi_fused_add_mul_0") == "triton_poi_fused_add_mul_0"
    assert len(s("sm90_xmma_gemm_" + "x" * 200)) <= 64
    assert profiler.kernel_is_memory_bound("triton_poi_fused_add_mul_0")
    assert not profiler.kernel_is_memory_bound("sm90_xmma_gemm_bf16bf16_bf16f32")
    assert not profiler.kernel_is_memory_bound("vectorized_elementwise_kernel", "aten::addmm")
    bf = "c10::BFloat16"
    # add: read two [8,4] bf16, write one
    assert profiler.op_min_bytes("aten::add", [[8, 4], [8, 4], []], [bf, bf, "Scalar"]) == 3 * 64
    assert profiler.op_min_bytes("aten::addmm", [[4], [8, 4], [4, 4]], [bf, bf, bf]) is None
    assert profiler.op_min_bytes("aten::cat", [[], []], ["TensorList", "Scalar"]) is None
    # fused gate_residual_norm_scale_shift: reads r, u (+ params), writes two activations
    n = profiler.op_min_bytes("fused_dit::gate_residual_norm_scale_shift", [[1, 8, 4], [1, 8, 4], [2, 4], [2, 4],
                              [2, 4], [1, 8], []], [bf, bf, bf, bf, bf, "int", "double"])
    assert n == (64 + 64 + 3 * 16 + 32) + 2 * 64
    # scale_shift_gate: reads x (+ params), writes y and the per-token gate (SPEC: 3x the activation)
    n = profiler.op_min_bytes("fused_dit::scale_shift_gate", [[1, 8, 4], [2, 4], [2, 4], [2, 4], [1, 8]],
                              [bf, bf, bf, bf, "int"])
    assert n == (64 + 3 * 16 + 32) + 2 * 64
    # dual: image [1, 8, 4] with an index, text [1, 3, 4] without; both streams' r and y written
    n = profiler.op_min_bytes("fused_dit::dual_gate_residual_norm_scale_shift",
                              [[1, 8, 4], [1, 8, 4], [2, 4], [2, 4], [2, 4], [1, 8], [],
                               [1, 3, 4], [1, 3, 4], [1, 4], [1, 4], [1, 4], [], []],
                              [bf, bf, bf, bf, bf, "int", "double", bf, bf, bf, bf, bf, "", "double"])
    assert n == (2 * 64 + 3 * 16 + 32 + 2 * 24 + 3 * 8) + 2 * 64 + 2 * 24


def test_extract_block_cuda_like_events():
    """The CUDA path on synthetic events: kernels whose launch lies in the range are picked."""
    from torch.autograd import DeviceType

    def ev(name, start, end, dev="CPU", id=0, linked=0, shapes=None, dtypes=None, thread=1):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                               device_type=getattr(DeviceType, dev), id=id, linked_correlation_id=linked,
                               input_shapes=shapes or [], input_dtypes=dtypes or [], thread=thread,
                               is_user_annotation=False, activity_type="", cpu_children=[])
    bf = "c10::BFloat16"
    events = [
        ev(profiler.MARK, 100, 200, id=1),
        ev("aten::add", 110, 120, id=2, shapes=[[1024], [1024], []], dtypes=[bf, bf, "Scalar"]),
        ev("cudaLaunchKernel", 112, 118, id=900, linked=2),
        ev("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16> >()",
           150, 160, dev="CUDA", id=900, linked=2),
        ev("aten::mm", 130, 140, id=3, shapes=[[8, 8], [8, 8]], dtypes=[bf, bf]),
        ev("cudaLaunchKernel", 131, 139, id=901, linked=3),
        ev("sm90_xmma_gemm_bf16", 160, 190, dev="CUDA", id=901, linked=3),
        ev("aten::add", 210, 220, id=4),
        ev("cudaLaunchKernel", 211, 219, id=902, linked=4),
        ev("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16> >()",
           190, 199, dev="CUDA", id=902, linked=4),  # runs inside the range but launched after it: excluded
        ev(profiler.MARK, 150, 195, dev="CUDA", id=903),  # GPU copy of the range: not a kernel
        ev("my_range", 140, 199, id=5),
        ev("my_range", 150, 199, dev="CUDA", id=904),  # GPU copy of a nested range: not a kernel
    ]
    events[-2].is_user_annotation = True
    p = profiler.extract_block(events)
    assert p.device == "cuda"
    assert [k.short for k in p.kernels] == ["vectorized_elementwise_kernel<CUDAFunctor_add>", "sm90_xmma_gemm_bf16"]
    assert p.total_us == pytest.approx(40.0)
    assert p.span_us == pytest.approx(40.0)
    add, mm = p.kernels
    assert add.op == "aten::add" and add.memory_bound and add.bytes == 3 * 2048
    assert mm.op == "aten::mm" and not mm.memory_bound and mm.bytes is None
    rows = profiler.comparison_rows([p, p], ["a", "b"], bandwidth=2048 * 3 / 5e-6)  # floor 5 us of 10 us
    assert rows[0]["kernel"] == "sm90_xmma_gemm_bf16" and rows[0]["a floor%"] is None
    assert rows[1]["a floor%"] == pytest.approx(50.0)


def test_extract_block_function_events_without_linked_ids():
    """torch's FunctionEvents: no linked ids; CPU ops list the kernels they launched (``.kernels``),
    launch events share the kernel's id. Kernels are attributed to ops by name in launch order."""
    from torch.autograd import DeviceType

    def ev(name, start, end, dev="CPU", id=0, kernels=(), shapes=None, dtypes=None):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                               device_type=getattr(DeviceType, dev), id=id, input_shapes=shapes or [],
                               input_dtypes=dtypes or [], thread=1, is_user_annotation=False, activity_type="",
                               cpu_children=[], kernels=[SimpleNamespace(name=k) for k in kernels])
    bf = "c10::BFloat16"
    add_k = "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16> >()"
    events = [
        ev(profiler.MARK, 100, 200, id=1),
        ev("aten::add", 110, 120, id=2, kernels=[add_k], shapes=[[1024], [1024], []], dtypes=[bf, bf, "Scalar"]),
        ev("cudaLaunchKernel", 112, 118, id=900),
        ev(add_k, 150, 160, dev="CUDA", id=900),
        ev("fused_dit::gate_residual", 125, 128, id=3, kernels=["gate_residual_kernel"]),
        ev("cuLaunchKernelEx", 126, 127, id=901),
        ev("gate_residual_kernel", 160, 170, dev="CUDA", id=901),
        ev("aten::add", 210, 220, id=4, kernels=[add_k]),
        ev("cudaLaunchKernel", 211, 219, id=902),
        ev(add_k, 190, 199, dev="CUDA", id=902),  # launched after the range: excluded
    ]
    p = profiler.extract_block(events)
    assert [k.op for k in p.kernels] == ["aten::add", "fused_dit::gate_residual"]
    assert p.kernels[0].memory_bound and p.kernels[0].bytes == 3 * 2048


def test_configs_normalize():
    assert _configs.normalize("stock-eager") == "stock"
    assert _configs.normalize("Patched_Compile") == "patched-compile"
    with pytest.raises(ValueError):
        _configs.normalize("fast")
    assert _configs.is_patched("patched-eager+noreuse") and not _configs.is_compiled("patched-eager+noreuse")
    assert _configs.parse_providers("stock,patched-eager+noreuse", "t") == ["stock", "patched-eager+noreuse"]


def test_provider_modifiers_are_patch_options():
    base, opts = _configs.split_modifiers("patched-eager+nopack+nomlp")
    assert base == "patched-eager"
    assert opts == {"pack_qkv": False, "ops": ("modulation", "qk_norm_rope", "attention")}
    assert _configs.split_modifiers("stock-compile") == ("stock-compile", {})
    with pytest.raises(ValueError, match=r"unknown provider modifier 'fast'.*\+nopack"):
        _configs.split_modifiers("patched-eager+fast")
    with pytest.raises(ValueError, match="patched providers only"):
        _configs.split_modifiers("stock-eager+nopack")
    with pytest.raises(ValueError):  # checked when the list is parsed, before any model is built
        _configs.parse_providers("stock,patched-eager+fast", "t")


def test_fp8_accumulation_modifiers():
    """+slowaccum (patched, with +fp8: patch's default is fast accumulation) and the recipe's two accumulations (stock only: +fp8recipe is
    torchao's fast accumulation, +fp8recipeslow without)."""
    assert _configs.split_modifiers("patched-eager+fp8+slowaccum") == (
        "patched-eager", {"precision": "fp8", "fp8_fast_accum": False})
    assert _configs.split_modifiers("stock-compile+fp8recipe") == ("stock-compile", {"fp8_recipe": True})
    assert _configs.split_modifiers("stock-compile+fp8recipeslow") == (
        "stock-compile", {"fp8_recipe": True, "fp8_recipe_fast_accum": False})
    with pytest.raises(ValueError, match="patched providers only"):
        _configs.split_modifiers("stock-eager+fp8+slowaccum")
    with pytest.raises(ValueError, match=r"\+slowaccum .*needs \+fp8"):
        _configs.split_modifiers("patched-eager+slowaccum")
    with pytest.raises(ValueError, match="stock providers only"):
        _configs.split_modifiers("patched-eager+fp8recipeslow")
    with pytest.raises(ValueError, match="stock providers only"):
        _configs.parse_providers("stock,patched-compile+fp8+fp8recipeslow", "t")


@pytest.mark.parametrize("mod,fast", [("fp8recipe", True), ("fp8recipeslow", False)])
def test_apply_installs_the_recipe_with_its_accumulation(mod, fast):
    from fused_dit_ops.bench import fp8_recipe
    m = build_qwen_image_transformer("tiny", num_layers=1, num_attention_heads=3)
    base, opts = _configs.split_modifiers(f"stock+{mod}")
    info = _configs.apply(m, base, **opts)
    lins = getattr(m, fp8_recipe.ATTR)
    assert lins and all(x._fp8_recipe_fast_accum is fast for x in lins)
    assert f"use_fast_accum={fast}" in info["fp8_recipe"]
    _configs.reset(m, base)
    assert not hasattr(m, fp8_recipe.ATTR) and not any(hasattr(x, "_fp8_recipe_fast_accum") for x in lins)


def test_energy_probe_without_nvml_or_cuda_is_none(monkeypatch):
    monkeypatch.setattr(harness, "_nvml_handle", lambda: None)
    assert harness.energy_per_call(lambda: None) is None


@pytest.mark.gpu
def test_energy_probe_on_gpu():
    x = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    e = harness.energy_per_call(lambda: x @ x, seconds=0.5)
    if e is None:
        pytest.skip("no NVML energy counter here (pynvml missing or GPU too old)")
    assert e["calls"] >= 3 and e["j_per_call"] > 0 and e["ms_per_call_b2b"] > 0
    assert 10 < e["avg_power_w"] < 2000, e  # a busy GPU draws tens to hundreds of watts


def test_bench_registered():
    assert BENCHES["block"] == "fused_dit_ops.bench.block"
    assert BENCHES["model"] == "fused_dit_ops.bench.model"


def test_bench_block_and_model_refuse_without_cuda_or_tiny(capsys):
    from fused_dit_ops.bench import block, model
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert block.main([]) == 2
    assert model.main(["--layers", "1"]) == 2
    assert block.main(["--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--tiny" in err


def test_bench_block_tiny_cpu(tmp_path):
    from fused_dit_ops.bench import block
    rc = block.main(["--device", "cpu", "--tiny", "--providers",
                     "stock-eager,patched-eager,patched-compile,patched-eager+nopack+nomlp", "--out", str(tmp_path)])
    assert rc == 0
    (path,) = tmp_path.glob("block-tiny-*.json")
    doc = json.loads(path.read_text())
    rows = {r["provider"]: r for r in doc["rows"]}
    assert set(rows) == {"stock-eager", "patched-eager", "patched-compile", "patched-eager+nopack+nomlp"}
    for r in rows.values():
        assert "error" not in r, r
        assert r["ms"] > 0
        assert r["max_rel_diff_vs_stock"] < 1e-3
    assert rows["patched-eager+nopack+nomlp"]["patch_options"] == {
        "pack_qkv": False, "ops": ["modulation", "qk_norm_rope", "attention"]}
    assert "patch_options" not in rows["patched-eager"]
    assert doc["shape"]["zero_cond_t"] and doc["shape"]["img_tokens"] == 32
    assert doc["target_met"] is None and "not the benchmark shape" in doc["target_basis"]  # a smoke run


def test_bench_model_tiny_cpu(tmp_path):
    from fused_dit_ops.bench import model
    rc = model.main(["--device", "cpu", "--tiny", "--providers",
                     "stock-eager,stock-compile,patched-eager,patched-eager+noreuse",
                     "--steps", "2", "--warmup", "1", "--out", str(tmp_path)])
    assert rc == 0
    (path,) = tmp_path.glob("model-tiny-*.json")
    doc = json.loads(path.read_text())
    rows = {r["provider"]: r for r in doc["rows"]}
    assert set(rows) == {"stock-eager", "stock-compile", "patched-eager", "patched-eager+noreuse"}
    assert rows["patched-eager+noreuse"]["patch_options"] == {"reuse_mod": False}
    for r in rows.values():
        assert "error" not in r, r
        assert r["ms_cond"] > 0 and r["ms_uncond"] > 0
        assert r["s_per_step"] * 1e3 >= 0.9 * (r["ms_cond"] + r["ms_uncond"]) * 0.5
        assert r["max_rel_diff_vs_stock"] < 1e-3
    assert doc["shape"]["txt_len_cond"] == 9 and doc["shape"]["txt_len_uncond"] == 7



def test_source_digest_follows_the_files(tmp_path, monkeypatch):
    """The benchmark JSON's ``source_digest`` hashes the package and csrc files that ran."""
    import shutil
    from fused_dit_ops.bench import harness
    d0 = harness.source_digest()
    assert len(d0) == 12 and int(d0, 16) >= 0
    assert harness.env_info()["source_digest"] == d0
    root = Path(harness.__file__).resolve().parents[2]
    copy = tmp_path / "tree"
    shutil.copytree(root / "fused_dit_ops", copy / "fused_dit_ops", ignore=shutil.ignore_patterns("__pycache__"))
    if (root / "csrc").is_dir():
        shutil.copytree(root / "csrc", copy / "csrc")
    fake = copy / "fused_dit_ops" / "bench" / "harness.py"
    monkeypatch.setattr(harness, "__file__", str(fake))
    monkeypatch.setattr(harness, "_SOURCE_DIGEST", None)
    assert harness.source_digest() == d0  # same files, same digest
    (copy / "fused_dit_ops" / "ops" / "attention.py").write_text("# changed\n")
    monkeypatch.setattr(harness, "_SOURCE_DIGEST", None)
    assert harness.source_digest() != d0

def test_rotated_rounds_and_merge():
    from fused_dit_ops.bench import harness
    orders = [o for _, o in harness.rotated_rounds(["a", "b", "c"], 4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    rows = [{"provider": "a", "ms": 3.0, "x": 1}, {"provider": "b", "error": "boom"},
            {"provider": "a", "ms": 1.0, "x": 2}, {"provider": "b", "error": "again"},
            {"provider": "a", "ms": 2.0, "x": 3}, {"provider": "c", "ms": 5.0}, {"provider": "c", "error": "e"}]
    m = {r["provider"]: r for r in harness.merge_rounds(rows, ["ms"])}
    assert m["a"]["ms"] == 2.0 and m["a"]["ms_rounds"] == [3.0, 1.0, 2.0] and m["a"]["x"] == 1
    assert m["b"] == {"provider": "b", "error": "boom"}
    assert m["c"]["ms"] == 5.0 and m["c"]["rounds_ok"] == 1 and m["c"]["rounds_failed"] == 1
    harness.add_ratio(list(m.values()), "ms", "c", "r")
    assert m["a"]["r"] == pytest.approx(0.4) and "r" not in m["b"]
    # the GPU state a CUDA bench records per round is kept per round
    g = [{"provider": "p", "ms": 1.0, "gpu_before": {"temp_c": 40}},
         {"provider": "p", "ms": 2.0, "gpu_before": {"temp_c": 60}}]
    (mp,) = harness.merge_rounds(g, ["ms"])
    assert mp["gpu_before_rounds"] == [{"temp_c": 40}, {"temp_c": 60}] and "gpu_after_rounds" not in mp


def test_gpu_state_parses_nvidia_smi(monkeypatch):
    import subprocess
    from fused_dit_ops.bench import harness
    monkeypatch.setattr(harness.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(harness.torch.cuda, "current_device", lambda: 0)
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 0, stdout="47, 1755, 312.40\n", stderr="")
    monkeypatch.setattr(harness.subprocess, "run", fake_run)
    assert harness.gpu_state() == {"temp_c": 47, "sm_mhz": 1755, "power_w": 312.4}
    assert "--id=0" in seen["cmd"]
    monkeypatch.setattr(harness.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError()))
    assert harness.gpu_state() is None  # no nvidia-smi: no state, no error


def test_bench_block_and_model_rounds_tiny_cpu(tmp_path):
    from fused_dit_ops.bench import block, model
    assert block.main(["--device", "cpu", "--tiny", "--providers", "patched-eager,stock-eager,stock-compile",
                       "--rounds", "2", "--rep-ms", "20", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("block-tiny-*.json")
    doc = json.loads(path.read_text())
    assert doc["rounds"] == 2
    rows = {r["provider"]: r for r in doc["rows"]}
    assert list(rows) == ["patched-eager", "stock-eager", "stock-compile"]
    for r in rows.values():
        assert len(r["ms_rounds"]) == 2 and min(r["ms_rounds"]) <= r["ms"] <= max(r["ms_rounds"])
        assert r["max_rel_diff_vs_stock"] is not None and r["max_rel_diff_vs_stock"] < 1e-3
    assert rows["stock-compile"]["ratio_vs_stock_compile"] == 1.0
    assert rows["stock-eager"]["speedup_vs_stock_eager"] == 1.0
    assert model.main(["--device", "cpu", "--tiny", "--providers", "stock-eager,patched-eager",
                       "--rounds", "2", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("model-tiny-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["provider"] for r in rows] == ["stock-eager", "patched-eager"]
    assert all(len(r["ms_forward_rounds"]) == 2 for r in rows)

@pytest.mark.gpu
def test_profile_cuda_small():
    profiles, names, _ = profiler.run_profile("stock", "patched", config="tiny", layers=2, layer=1,
                                              device="cuda", dtype="bf16", warmup=1)
    _check_profiles(profiles, names)
    for p in profiles:
        assert p.device == "cuda" and p.span_us and p.span_us > 0


def test_target_verdict_only_at_the_benchmark_shape():
    from fused_dit_ops.bench import _configs
    from fused_dit_ops.bench.block import BENCHMARK_SHAPE, TARGET_MS, TARGET_RATIO
    shape = dict(BENCHMARK_SHAPE, zero_cond_t=True)
    v = _configs.target_verdict
    assert v(shape, BENCHMARK_SHAPE, 4.2, 0.9, TARGET_MS, TARGET_RATIO, "NVIDIA H100 80GB HBM3")["target_met"] is True
    assert v(shape, BENCHMARK_SHAPE, 4.4, 0.8, TARGET_MS, TARGET_RATIO, "NVIDIA H100 80GB HBM3")["target_met"] is False
    # another GPU: the ratio to stock compile decides, not the H100's milliseconds
    r = v(shape, BENCHMARK_SHAPE, 4.2, 0.88, TARGET_MS, TARGET_RATIO, "NVIDIA H200")
    assert r["target_met"] is False and "ratio" in r["target_basis"]
    assert v(shape, BENCHMARK_SHAPE, 4.4, 0.86, TARGET_MS, TARGET_RATIO, "NVIDIA H200")["target_met"] is True
    assert v(shape, BENCHMARK_SHAPE, 4.2, None, TARGET_MS, TARGET_RATIO, "NVIDIA H200")["target_met"] is None
    # the printed line (CPU here: no GPU name, so no verdict at the benchmark shape)
    r = _configs.report_target({"ms": 4.2, "ratio_vs_stock_compile": 0.85}, "ms", shape, BENCHMARK_SHAPE,
                               TARGET_MS, TARGET_RATIO, "cpu", "patched eager <= 4.3 ms")
    assert r["target_met"] is None and "n/a on this device" in r["target_basis"]
    # off the benchmark shape: no verdict, whatever the time
    for change in ({"img_tokens": 2048}, {"txt_len": 50}, {"dtype": "torch.float16"}, {"config": "qwen-image"}):
        r = v(dict(shape, **change), BENCHMARK_SHAPE, 1.0, 0.5, TARGET_MS, TARGET_RATIO, "NVIDIA H100 80GB HBM3")
        assert r["target_met"] is None and "not the benchmark shape" in r["target_basis"], change



def test_plain_doc_strips_rest_markup():
    text = harness.plain_doc("Run ``bench block``; see :func:`profile_layer` and :class:`~a.b.C`.")
    assert text == "Run bench block; see profile_layer and a.b.C."
    assert harness.plain_doc(None) == ""


def test_quiet_profiler_logs_only_without_cuda(monkeypatch):
    monkeypatch.delenv("KINETO_LOG_LEVEL", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    profiler.quiet_profiler_logs()
    assert "KINETO_LOG_LEVEL" not in os.environ  # a GPU: kineto's own messages stay
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    profiler.quiet_profiler_logs()
    assert os.environ["KINETO_LOG_LEVEL"] == "6"
    monkeypatch.setenv("KINETO_LOG_LEVEL", "2")  # the user's choice wins
    profiler.quiet_profiler_logs()
    assert os.environ["KINETO_LOG_LEVEL"] == "2"


def test_every_benchmark_has_a_one_line_description():
    from fused_dit_ops.bench import DESCRIPTIONS
    assert set(DESCRIPTIONS) == set(BENCHES)
    assert all(d and "\n" not in d for d in DESCRIPTIONS.values())
