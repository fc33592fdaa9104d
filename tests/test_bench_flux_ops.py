"""``bench flux-ops``: the CPU smoke run (every op and provider, the fused outputs against the diffusers
expressions) and the byte counts of the floor."""
import json

import pytest
import torch

from fused_dit_ops.bench import BENCHES, flux_ops

SMALL = flux_ops.TINY["tiny-b"]  # B 2, 13 image + 5 text tokens, C 48, 2 heads of 24


def test_registered():
    assert BENCHES["flux-ops"] == "fused_dit_ops.bench.flux_ops"


def test_smoke_run_cpu(tmp_path, capsys):
    rc = flux_ops.main(["--device", "cpu", "--tiny", "--shapes", "tiny-b", "--rounds", "1", "--out", str(tmp_path)])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    (path,) = tmp_path.glob("flux-ops-tiny-*.json")
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "flux-ops-tiny" and doc["shapes"]["tiny-b"]["C"] == 48
    got = {(r["op"], r["provider"]) for r in doc["rows"]}
    assert got == {(op, p) for op in flux_ops.OPS for p in flux_ops.PROVIDERS}
    for r in doc["rows"]:
        assert r["us"] > 0 and r["bytes"] == flux_ops.bytes_moved(r["op"], SMALL)
        assert r["floor_us"] > 0 and r["pct_floor"] > 0
        assert r["max_rel_diff_vs_eager"] < 2e-2, r


@pytest.mark.parametrize("shape", list(flux_ops.TINY))
@pytest.mark.parametrize("op", flux_ops.OPS)
def test_fused_matches_eager(op, shape):
    """The fused op on the integration's arguments equals the diffusers expression (bf16), and the
    in-place QK op leaves the shared input untouched for the other providers."""
    s = flux_ops.TINY[shape]
    g = torch.Generator().manual_seed(5)
    d = flux_ops.make_inputs(op, s, "cpu", torch.bfloat16, g)
    before = {k: v.clone() for k, v in d.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        ref = flux_ops._outs(flux_ops.EAGER[op](*flux_ops.args_for(op, "eager", d, s)))
        out = flux_ops._outs(flux_ops.providers(op, ["fused"], s)["fused"](*flux_ops.args_for(op, "fused", d, s)))
    assert len(ref) == len(out) == {"dual_gate_residual_norm_scale_shift": 4, "gate_residual_norm_scale_shift": 2,
                                    "dual_norm_scale_shift": 2, "joint_qk_norm_rope": 2,
                                    "single_qk_norm_rope": 2}.get(op, 1)
    for o, r in zip(out, ref):
        assert o.dtype == torch.bfloat16 and o.shape == r.shape
        assert torch.isfinite(r.float()).all() and r.float().abs().max() > 0.1
        torch.testing.assert_close(o.float(), r.float(), rtol=1.6e-2, atol=2e-2)
    for k, v in before.items():
        assert torch.equal(d[k], v), k


def test_bytes_and_bad_arguments(tmp_path):
    s = flux_ops.SHAPES["flux1"]
    act = 1 * 4608 * 3072 * 2
    assert flux_ops.bytes_moved("dual_norm_scale_shift", s) == 2 * act
    assert flux_ops.bytes_moved("gate_residual", s) == 3 * act
    assert flux_ops.bytes_moved("joint_qk_norm_rope", s) == 4 * act + 4608 * 128 * 4
    for bad in (["--shapes", "wan14b"], ["--ops", "rope"], ["--providers", "flashinfer"]):
        with pytest.raises(SystemExit):
            flux_ops.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), *bad])
