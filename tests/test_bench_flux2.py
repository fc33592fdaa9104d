"""``demo``, ``bench block`` and ``bench model`` with ``--model flux2``: CPU smoke runs on the tiny
FLUX.2 config (3 heads x 24, C 72). They check the commands' wiring (argument capture, layer counts,
bad arguments, the demo), not speed; the ``bench block`` / ``bench model`` runs of both Flux families
are in test_bench_flux.py."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

from fused_dit_ops.bench import block, model  # noqa: E402
from fused_dit_ops.models import build_flux2_transformer, build_model_and_inputs, make_flux2_inputs  # noqa: E402

from helpers import native_diffusers_backend  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("native_diffusers_backend")


def test_capture_block_calls_flux2_both_kinds():
    m = build_flux2_transformer("tiny", num_layers=1, num_single_layers=2)
    kw = make_flux2_inputs(m)
    (a0, k0), (a1, k1) = block.capture_block_calls(m, kw, [m.transformer_blocks[0], m.single_transformer_blocks[1]])
    D = m.inner_dim
    # as the model calls them: the model-level modulation outputs, the RoPE (cos, sin) over the joint sequence
    assert k0["hidden_states"].shape == (1, 15, D) and k0["encoder_hidden_states"].shape == (1, 7, D)
    assert k0["temb_mod_img"].shape == (1, 6 * D) and k0["temb_mod_txt"].shape == (1, 6 * D)
    assert k1["hidden_states"].shape == (1, 22, D) and k1["encoder_hidden_states"] is None
    assert k1["temb_mod"].shape == (1, 3 * D)
    for k in (k0, k1):
        cos, sin = k["image_rotary_emb"]
        assert cos.shape == sin.shape == (22, 24)
    assert not a0 and not a1


def test_flux2_layers_and_bad_arguments(tmp_path):
    assert model.flux_layers(None, tiny=False, model="flux2") == (8, 48)
    assert model.flux_layers("2", tiny=False, model="flux2") == (2, 12)
    assert model.flux_layers("1,3", tiny=False, model="flux2") == (1, 3)
    assert model.flux_layers("2", tiny=False) == (2, 4)  # flux unchanged
    with pytest.raises(SystemExit, match="flux2: N"):
        model.flux_layers("x", tiny=False, model="flux2")
    for bench in (model, block):
        with pytest.raises(SystemExit, match="not a FLUX.2 config"):
            bench.main(["--model", "flux2", "--device", "cpu", "--tiny", "--config", "schnell",
                        "--out", str(tmp_path)])


def test_build_model_and_inputs_flux2_ratio():
    m, kw = build_model_and_inputs("flux2", "tiny", 1)
    assert len(m.transformer_blocks) == 1 and len(m.single_transformer_blocks) == 6
    assert kw["img_ids"].shape[1] == 4 and kw["txt_ids"].shape[1] == 4


def test_demo_flux2_cpu(tmp_path, capsys):
    from fused_dit_ops.demo import main
    assert main(["--model", "flux2", "--device", "cpu", "--iters", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Flux2Transformer2DModel" in out and "patched compile" in out
    (path,) = tmp_path.glob("demo-*.json")
    doc = json.loads(path.read_text())
    assert doc["model"] == "flux2"
    for r in doc["rows"]:
        assert r["rel_err"] < 1e-4, r
    assert torch.isfinite(torch.tensor([r["ms_forward"] for r in doc["rows"]])).all()
