"""``bench block`` / ``bench model --model wan``: the attention calls timed alone (backend, TFLOP/s, share
of the block or forward) and, for TI2V-5B, the patched model without the two-set timestep collapse next
to patched and stock. CPU smoke runs on the tiny configs (wiring and arithmetic, not speed)."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

from fused_dit_ops.bench import _attn_share, block, model  # noqa: E402
from fused_dit_ops.models import build_wan_transformer, make_wan_inputs  # noqa: E402

from helpers import native_diffusers_backend  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("native_diffusers_backend")


def test_flops_and_calls():
    assert _attn_share.flops(1, 40, 32760, 32760, 128) == 4.0 * 40 * 32760 ** 2 * 128
    m = build_wan_transformer("tiny-i2v", num_layers=1)
    spec = _attn_share.wan_calls(m, make_wan_inputs(m, batch=2))
    assert (spec["batch"], spec["heads"], spec["head_dim"]) == (2, 3, 24)
    # I2V: the text context (512 tokens) and the image context (3 tiny tokens)
    assert spec["calls"] == [("self", 45, 45), ("cross_text", 45, 512), ("cross_image", 45, 3)]


def test_time_block_attention_cpu():
    spec = {"batch": 1, "heads": 3, "head_dim": 24, "calls": [("self", 45, 45), ("cross_text", 45, 7)]}
    for impl in ("patched", "stock"):
        a = _attn_share.time_block_attention(spec, impl, "cpu", torch.float32, rep_ms=1)
        assert set(a["calls"]) == {"self", "cross_text"} and a["backend"]
        assert a["block_ms"] == pytest.approx(sum(c["ms"] for c in a["calls"].values()))
        f = sum(_attn_share.flops(1, 3, c["lq"], c["lk"], 24) for c in a["calls"].values())
        assert a["block_gflop"] == pytest.approx(f / 1e9)
        assert a["tflops"] == pytest.approx(f / (a["block_ms"] * 1e-3) / 1e12)
        assert a["self_tflops"] == a["calls"]["self"]["tflops"] > 0
    assert _attn_share.time_block_attention(spec, "stock", "cpu", torch.float32, rep_ms=1)["backend"].startswith(
        "diffusers:")


def test_annotate_and_collapse_saving_arithmetic():
    attn = {"stock": {"backend": "diffusers:native", "block_ms": 2.0, "tflops": 100.0, "self_tflops": 110.0},
            "patched": {"backend": "fa3", "block_ms": 1.5, "tflops": 150.0, "self_tflops": 160.0}}
    rows = [{"provider": "stock-eager", "ms_forward": 40.0}, {"provider": "patched-eager", "ms_forward": 20.0},
            {"provider": "patched-eager+nocollapse", "ms_forward": 25.0}, {"provider": "stock-compile", "error": "x"}]
    _attn_share.annotate(rows, attn, "ms_forward", 4)
    assert rows[0]["attn_ms"] == 8.0 and rows[0]["attn_share_pct"] == pytest.approx(20.0)
    assert rows[1]["attn_backend"] == "fa3" and rows[1]["attn_share_pct"] == pytest.approx(30.0)
    assert rows[2]["attn_tflops"] == 150.0 and "attn_ms" not in rows[3]
    c = model.collapse_saving(rows)
    assert c["provider"] == "patched-eager" and c["nocollapse_provider"] == "patched-eager+nocollapse"
    assert c["saved_ms"] == pytest.approx(5.0) and c["saved_pct"] == pytest.approx(20.0)
    assert c["speedup"] == pytest.approx(1.25)
    assert model.collapse_saving(rows[:2]) is None


def test_default_providers():
    assert model.default_providers("wan", "ti2v-5b") == ("stock-eager", "stock-compile", "patched-eager",
                                                         "patched-eager+nocollapse", "patched-compile")
    assert model.default_providers("wan", None) == model.PROVIDERS
    assert model.default_providers("qwen", None) == model.PROVIDERS


def _doc(tmp_path, pattern):
    (path,) = tmp_path.glob(pattern)
    return json.loads(path.read_text())


def test_bench_model_wan_ti2v_collapse_and_attention(tmp_path, capsys):
    rc = model.main(["--model", "wan", "--config", "ti2v-5b", "--device", "cpu", "--tiny", "--layers", "2",
                     "--steps", "1", "--warmup", "1", "--attn-rep-ms", "1", "--out", str(tmp_path),
                     "--providers", "stock-eager,patched-eager,patched-eager+nocollapse"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "two-set timestep collapse" in text and "attention alone (patched" in text and "attn_share_pct" in text
    doc = _doc(tmp_path, "model-wan-tiny-*.json")
    assert doc["shape"]["per_token_timestep"]
    rows = {r["provider"]: r for r in doc["rows"]}
    assert set(rows) == {"stock-eager", "patched-eager", "patched-eager+nocollapse"}
    for r in rows.values():
        assert "error" not in r, r
        assert r["max_rel_diff_vs_stock"] < 1e-4
        assert r["attn_tflops"] > 0 and r["attn_share_pct"] > 0
        a = doc["attention"]["patched" if r["provider"].startswith("patched") else "stock"]
        assert r["attn_ms"] == pytest.approx(2 * a["block_ms"])
        assert r["attn_share_pct"] == pytest.approx(100 * r["attn_ms"] / r["ms_forward"])
    assert rows["patched-eager+nocollapse"]["patch_options"] == {"timestep_collapse": False}
    assert doc["attention"]["shapes"]["calls"] == [["self", 45, 45], ["cross_text", 45, 7]]
    c = doc["collapse_saving"]
    assert c["ms"] == rows["patched-eager"]["ms_forward"]
    assert c["nocollapse_ms"] == rows["patched-eager+nocollapse"]["ms_forward"]


def test_bench_model_wan_attention_off(tmp_path):
    rc = model.main(["--model", "wan", "--device", "cpu", "--tiny", "--layers", "1", "--steps", "1", "--warmup",
                     "0", "--attn-rep-ms", "0", "--providers", "patched-eager", "--out", str(tmp_path)])
    assert rc == 0
    doc = _doc(tmp_path, "model-wan-tiny-*.json")
    assert doc["attention"] is None and doc["collapse_saving"] is None
    assert "attn_share_pct" not in doc["rows"][0]


def test_bench_block_wan_attention(tmp_path, capsys):
    rc = block.main(["--model", "wan", "--device", "cpu", "--tiny", "--providers", "stock-eager,patched-eager",
                     "--rep-ms", "5", "--energy-s", "0", "--attn-rep-ms", "1", "--out", str(tmp_path)])
    assert rc == 0
    assert "attention alone (stock" in capsys.readouterr().out
    doc = _doc(tmp_path, "block-wan-tiny-*.json")
    for r in doc["rows"]:
        a = doc["attention"]["patched" if r["provider"].startswith("patched") else "stock"]
        assert r["attn_backend"] == a["backend"] and r["attn_ms"] == pytest.approx(a["block_ms"])
        assert r["attn_share_pct"] == pytest.approx(100 * a["block_ms"] / r["ms"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attention_alone_real_wan_shapes_gpu():
    spec = {"batch": 1, "heads": 40, "head_dim": 128, "calls": [("self", 8190, 8190), ("cross_text", 8190, 512)]}
    a = _attn_share.time_block_attention(spec, "patched", "cuda", torch.bfloat16, rep_ms=50)
    assert a["backend"] in ("fa3", "fa4", "cudnn", "fa2", "efficient", "math")
    assert 1 < a["self_tflops"] < 2000  # plausible for an H100 / H200
