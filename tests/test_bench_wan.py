"""``demo``, ``bench block`` and ``bench model`` with ``--model wan``: CPU smoke runs on the tiny Wan
configs (3 heads x 24, C 72). They check the commands' wiring (argument capture, providers, the
JSON, the per-token timestep of TI2V), not speed."""
import json

import pytest

pytest.importorskip("diffusers")

from fused_dit_ops import demo  # noqa: E402
from fused_dit_ops.bench import block, model  # noqa: E402

from helpers import native_diffusers_backend  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("native_diffusers_backend")


def test_bench_block_wan_tiny_cpu(tmp_path, capsys):
    rc = block.main(["--model", "wan", "--device", "cpu", "--tiny", "--providers", "stock-eager,patched-eager",
                     "--rep-ms", "10", "--energy-s", "0", "--out", str(tmp_path)])
    assert rc == 0
    assert "results:" in capsys.readouterr().out
    (path,) = tmp_path.glob("block-wan-tiny-*.json")
    doc = json.loads(path.read_text())
    assert doc["model"] == "wan" and doc["shape"]["tokens"] == 45 and doc["shape"]["txt_len"] == 7
    rows = {r["provider"]: r for r in doc["rows"]}
    assert set(rows) == {"stock-eager", "patched-eager"}
    for r in rows.values():
        assert "error" not in r, r
        assert r["ms"] > 0 and r["max_rel_diff_vs_stock"] < 1e-4


@pytest.mark.parametrize("config", [None, "ti2v-5b"])
def test_bench_model_wan_tiny_cpu(tmp_path, capsys, config):
    argv = ["--model", "wan", "--device", "cpu", "--tiny", "--layers", "2", "--steps", "1", "--warmup", "1",
            "--providers", "stock-eager,patched-eager", "--out", str(tmp_path)]
    rc = model.main(argv + (["--config", config] if config else []))
    assert rc == 0
    (path,) = tmp_path.glob("model-wan-tiny-*.json")
    doc = json.loads(path.read_text())
    assert doc["shape"]["per_token_timestep"] == (config == "ti2v-5b")
    rows = {r["provider"]: r for r in doc["rows"]}
    for r in rows.values():
        assert "error" not in r, r
        assert r["ms_forward"] > 0
    assert rows["patched-eager"]["max_rel_diff_vs_stock"] < 1e-4


def test_bench_wan_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        model.main(["--model", "wan", "--device", "cpu", "--tiny", "--config", "edit-2511", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        block.main(["--model", "wan", "--device", "cpu", "--tiny", "--tokens", "45", "--out", str(tmp_path)])


def test_demo_wan_tiny_cpu(capsys):
    rows = demo.run_demo(device="cpu", model="wan", iters=1, warmup=0, compile_=False, quiet=True)
    assert [r["variant"] for r in rows] == ["stock eager", "patched eager"]
    assert rows[1]["rel_err"] < 1e-5
    assert demo.main(["--model", "wan", "--device", "cpu", "--tiny", "--config", "ti2v-5b", "--no-compile",
                      "--iters", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "wan tiny-ti2v transformer" in out and "patched eager" in out
