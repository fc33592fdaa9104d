"""``bench block``, ``bench model`` and ``profile`` with ``--model flux`` (and ``bench block`` /
``bench model`` with ``--model flux2``): CPU smoke runs on the tiny Flux.1 and FLUX.2 configs
(3 heads x 24, D 72). They check the commands' wiring (argument capture, providers,
rounds, ratios, the JSON), not speed."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

from fused_dit_ops import profiler  # noqa: E402
from fused_dit_ops.bench import block, model  # noqa: E402
from fused_dit_ops.models import build_flux_transformer, make_flux_inputs  # noqa: E402

from helpers import native_diffusers_backend  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("native_diffusers_backend")


def test_capture_block_calls_flux_both_kinds():
    m = build_flux_transformer("tiny", num_layers=1, num_single_layers=2)
    kw = make_flux_inputs(m)
    (a0, k0), (a1, k1) = block.capture_block_calls(m, kw, [m.transformer_blocks[0], m.single_transformer_blocks[1]])
    D = m.config.num_attention_heads * m.config.attention_head_dim
    for k in (k0, k1):  # called as the model calls them: keywords, temb [B, D], the RoPE (cos, sin)
        assert k["hidden_states"].shape == (1, 15, D) and k["encoder_hidden_states"].shape == (1, 7, D)
        assert k["temb"].shape == (1, D) and isinstance(k["image_rotary_emb"], tuple)
    assert not a0 and not a1
    assert not any(b._forward_pre_hooks for b in m.modules() if hasattr(b, "_forward_pre_hooks"))
    with pytest.raises(RuntimeError, match="not called"):
        block.capture_block_calls(m, kw, [torch.nn.Linear(2, 2)])


def _bench_json(main, argv, tmp_path, pattern):
    """Runs a bench command (exit status 0) and returns its one result file matching ``pattern``, loaded."""
    assert main(argv + ["--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob(pattern)
    return json.loads(path.read_text())


@pytest.mark.parametrize("name,tol", [("flux", 1e-3), ("flux2", 1e-4)])
def test_bench_block_flux_tiny_cpu(tmp_path, capsys, name, tol):
    doc = _bench_json(block.main, ["--model", name, "--device", "cpu", "--tiny", "--providers",
                                   "patched-eager,stock-eager,patched-eager+nopack", "--rounds", "2", "--rep-ms", "10"],
                      tmp_path, f"block-{name}-tiny-*.json")
    text = capsys.readouterr().out
    assert "single" in text and "double" in text and "results:" in text
    assert doc["model"] == name and doc["rounds"] == 2 and doc["shape"]["model"] == name
    assert doc["shape"]["img_tokens"] == 15 and doc["shape"]["txt_len"] == 7 and doc["shape"]["guidance_embeds"]
    rows = {(r["block"], r["provider"]): r for r in doc["rows"]}
    assert list(rows) == [(k, p) for k in ("double", "single")
                          for p in ("patched-eager", "stock-eager", "patched-eager+nopack")]
    for r in rows.values():
        assert "error" not in r, r
        assert r["ms"] > 0 and len(r["ms_rounds"]) == 2
        assert r["max_rel_diff_vs_stock"] is not None and r["max_rel_diff_vs_stock"] < tol
    for k in ("double", "single"):
        assert rows[(k, "stock-eager")]["speedup_vs_stock_eager"] == 1.0
        assert rows[(k, "stock-eager")]["max_rel_diff_vs_stock"] == 0.0
    assert rows[("single", "patched-eager+nopack")]["patch_options"] == {"pack_qkv": False}
    assert "target_met" not in doc


@pytest.mark.parametrize("name,layers,providers,steps,rounds,guidance,tol", [
    ("flux", "1", ["stock-eager", "patched-eager", "patched-eager+noreuse"], 2, 2, 3.5, 1e-3),
    ("flux2", "1,2", ["stock-eager", "patched-eager", "stock-compile", "patched-compile"], 1, None, 4.0, 1e-4),
])
def test_bench_model_flux_tiny_cpu(tmp_path, capsys, name, layers, providers, steps, rounds, guidance, tol):
    doc = _bench_json(model.main, ["--model", name, "--device", "cpu", "--tiny", "--layers", layers, "--img-tokens",
                                   "16,9", "--providers", ",".join(providers), "--steps", str(steps),
                                   "--warmup", "1"] + (["--rounds", str(rounds)] if rounds else []),
                      tmp_path, f"model-{name}-tiny-*.json")
    text = capsys.readouterr().out
    assert "1 double + 2 single blocks" in text and "ratio_vs_stock_compile" in text
    assert doc["model"] == name and "target_met" not in doc
    s = doc["shape"]
    assert (s["double_layers"], s["single_layers"]) == (1, 2)
    assert s["images"] == [16, 9] and s["img_tokens"] == 25 and s["txt_len"] == 7 and s["guidance"] == guidance
    rows = {r["provider"]: r for r in doc["rows"]}
    assert list(rows) == providers
    for p, r in rows.items():
        assert "error" not in r, r
        assert r["ms_forward"] > 0 and r["s_per_step"] == pytest.approx(r["ms_forward"] / 1e3)
        assert (len(r["ms_forward_rounds"]) == rounds) if rounds else ("ms_forward_rounds" not in r)
        assert r["max_rel_diff_vs_stock"] < tol, (p, r["max_rel_diff_vs_stock"])
        assert "ms_cond" not in r  # one forward per step: no CFG pair
    if name == "flux":
        assert rows["patched-eager+noreuse"]["patch_options"] == {"reuse_mod": False}


def test_bench_model_flux_ratio_to_stock_compile(tmp_path):
    doc = _bench_json(model.main, ["--model", "flux", "--device", "cpu", "--tiny", "--providers",
                                   "stock-compile,patched-eager", "--steps", "1", "--warmup", "1"],
                      tmp_path, "model-flux-tiny-*.json")
    rows = {r["provider"]: r for r in doc["rows"]}
    assert rows["stock-compile"]["compile"] == "compile_repeated_blocks"
    assert rows["stock-compile"]["ratio_vs_stock_compile"] == 1.0
    pe = rows["patched-eager"]
    assert pe["ratio_vs_stock_compile"] == pytest.approx(pe["ms_forward"] / rows["stock-compile"]["ms_forward"])
    assert pe["max_rel_diff_vs_stock"] is None  # the reference is stock eager, not run here


def test_flux_layers_and_bad_arguments(tmp_path):
    assert model.flux_layers(None, tiny=False) == (19, 38)
    assert model.flux_layers(None, tiny=True) == (2, 2)
    assert model.flux_layers("4", tiny=False) == (4, 8)
    assert model.flux_layers("2,5", tiny=False) == (2, 5)
    for bad in ("0", "a", "1,2,3"):
        with pytest.raises(SystemExit):
            model.flux_layers(bad, tiny=False)
    for bench in (model, block):
        with pytest.raises(SystemExit, match="not a Flux config"):
            bench.main(["--model", "flux", "--device", "cpu", "--tiny", "--config", "edit-2511",
                        "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="one length"):
        model.main(["--model", "flux", "--device", "cpu", "--tiny", "--txt-len", "9,7", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="one number"):
        model.main(["--device", "cpu", "--tiny", "--layers", "2,4", "--out", str(tmp_path)])


def test_profile_flux_single_block_cpu(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = profiler.main(["--model", "flux", "--kind", "single", "--layers", "1", "--layer", "1", "--device", "cpu",
                        "--warmup", "1", "--top", "8", "--json", str(out)])
    assert rc == 0
    assert "single_transformer_blocks[1] of 1 double + 2 single blocks" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["meta"]["block"] == "single_transformer_blocks[1]" and doc["meta"]["model"] == "flux"
    ops = [{k["op"] for k in p["kernels"]} for p in doc["profiles"]]
    assert not any(o.startswith("fused_dit::") for o in ops[0])
    assert "fused_dit::joint_qk_norm_rope_" in ops[1] and "fused_dit::attention" in ops[1]
    with pytest.raises(SystemExit, match="outside"):
        profiler.run_profile(model="flux", kind="double", layers=1, layer=1, device="cpu")


def test_bench_model_cudagraphs_providers_tiny_cpu(tmp_path):
    """``*-cudagraphs``: the whole model under torch.compile(mode="reduce-overhead") (on the CPU the
    compile runs without CUDA graphs); the output is taken before the next replay can overwrite it.
    ``bench block`` and ``profile`` run one block alone and refuse these configurations by name."""
    doc = _bench_json(model.main, ["--model", "flux", "--device", "cpu", "--tiny", "--layers", "1", "--providers",
                                   "stock-eager,patched-cudagraphs", "--steps", "2", "--warmup", "1"],
                      tmp_path, "model-flux-tiny-*.json")
    rows = {r["provider"]: r for r in doc["rows"]}
    pc = rows["patched-cudagraphs"]
    assert "error" not in pc, pc
    assert pc["compile"] == 'torch.compile(model, mode="reduce-overhead")'
    assert pc["ms_forward"] > 0 and pc["max_rel_diff_vs_stock"] < 1e-3
    with pytest.raises(SystemExit):
        block.main(["--model", "flux", "--device", "cpu", "--tiny", "--providers", "patched-cudagraphs",
                    "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="whole forwards only"):
        profiler.main(["--model", "flux", "--layers", "1", "--device", "cpu", "--a", "stock",
                       "--b", "patched-cudagraphs"])
