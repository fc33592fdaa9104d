"""``bench wan-ops``: the CPU smoke run (every op and provider, the fused outputs against the diffusers
expressions), the byte counts of the floor, and the eager RoPE table against diffusers' own."""
import dataclasses
import json

import pytest
import torch

from fused_dit_ops.bench import BENCHES, wan_ops

SMALL = wan_ops.TINY["tiny-b"]  # B 2, L 13, C 48, 2 heads of 24, 5 text tokens


def test_registered():
    assert BENCHES["wan-ops"] == "fused_dit_ops.bench.wan_ops"


def test_smoke_run_cpu(tmp_path, capsys):
    rc = wan_ops.main(["--device", "cpu", "--tiny", "--shapes", "tiny-b", "--rounds", "1", "--out", str(tmp_path)])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    (path,) = tmp_path.glob("wan-ops-tiny-*.json")
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "wan-ops-tiny" and doc["shapes"]["tiny-b"]["C"] == 48
    got = {(r["op"], r["provider"]) for r in doc["rows"]}
    assert got == {(op, p) for op in wan_ops.OPS for p in wan_ops.PROVIDERS}
    for r in doc["rows"]:
        assert r["us"] > 0 and r["bytes"] == wan_ops.bytes_moved(r["op"], SMALL)
        assert r["floor_us"] > 0 and r["pct_floor"] > 0
        assert r["max_rel_diff_vs_eager"] < 2e-2, r


def _cases():
    for shape in ("tiny-a", "tiny-b"):
        for op in wan_ops.OPS:
            yield op, shape, False
        for op in wan_ops.MOD_OPS:
            yield op, shape, True


@pytest.mark.parametrize("op,shape,per_token", list(_cases()))
def test_fused_matches_eager(op, shape, per_token):
    """The fused op on the integration's arguments equals the diffusers expression (bf16, one rounding);
    per_token: two parameter sets + index against the stock per-token parameters."""
    s = dataclasses.replace(wan_ops.TINY[shape], per_token=per_token)
    g = torch.Generator().manual_seed(3)
    d = wan_ops.make_inputs(op, s, "cpu", torch.bfloat16, g)
    with torch.no_grad():
        ref = wan_ops.EAGER[op](*wan_ops.args_for(op, "eager", d, s))
        out = wan_ops.providers(op, ["fused"])["fused"](*wan_ops.args_for(op, "fused", d, s))
    refs, outs = wan_ops._flat(ref), wan_ops._flat(out)
    assert len(refs) == len(outs) == (2 if op not in ("norm_scale_shift", "gate_residual") else 1)
    for o, r in zip(outs, refs):
        assert o.dtype == torch.bfloat16 and o.shape == r.shape
        assert torch.isfinite(r.float()).all() and r.float().abs().max() > 0.1
        torch.testing.assert_close(o.float(), r.float(), rtol=1.6e-2, atol=2e-2)


def test_per_token_smoke_run_and_arguments(tmp_path):
    rc = wan_ops.main(["--device", "cpu", "--tiny", "--per-token", "--shapes", "tiny-a", "--providers", "eager,fused",
                       "--rounds", "1", "--out", str(tmp_path)])
    assert rc == 0
    (path,) = tmp_path.glob("wan-ops-tiny-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert {(r["shape"], r["op"]) for r in rows} == {("tiny-a+index", op) for op in wan_ops.MOD_OPS}
    assert all(r["max_rel_diff_vs_eager"] < 2e-2 for r in rows)
    s = dataclasses.replace(wan_ops.TINY["tiny-a"], per_token=True)  # grid 3 x 3 x 5: 15 tokens per frame
    d = wan_ops.make_inputs("norm_scale_shift", s, "cpu")
    x, sh, sc, index = wan_ops.args_for("norm_scale_shift", "fused", d, s)
    assert sh.shape == (2, s.C) and index.dtype == torch.int32 and index.shape == (1, 45)
    assert index[0, :15].eq(0).all() and index[0, 15:].eq(1).all()
    _, sh_tok, _ = wan_ops.args_for("norm_scale_shift", "eager", d, s)
    assert sh_tok.shape == (1, 45, s.C) and sh_tok.dtype == torch.float32
    torch.testing.assert_close(sh_tok[0, 3], sh[0])
    torch.testing.assert_close(sh_tok[0, 20], sh[1])
    assert wan_ops.bytes_moved("gate_residual", s) == 3 * 45 * 72 * 2 + 45 * 4
    assert wan_ops.bytes_moved("qk_norm_rope_across_heads", s) == wan_ops.bytes_moved(
        "qk_norm_rope_across_heads", wan_ops.TINY["tiny-a"])


def test_fused_arguments_are_the_integrations():
    """fp32 [B, C] column views of the [B, 6, C] sum, a stride-0 ones gate, q/k views of q|k|v."""
    s = SMALL
    d = wan_ops.make_inputs("gate_residual_norm_scale_shift", s, "cpu")
    x, u, gate, shift, scale = wan_ops.args_for("gate_residual_norm_scale_shift", "fused", d, s)
    assert gate.dtype == torch.float32 and gate.stride() == (0, 1) and bool((gate == 1).all())
    assert shift.shape == (s.B, s.C) and shift.stride() == (6 * s.C, 1) and shift.dtype == torch.float32
    _, sh, _ = wan_ops.args_for("norm_scale_shift", "eager", wan_ops.make_inputs("norm_scale_shift", s, "cpu"), s)
    assert sh.shape == (s.B, 1, s.C)
    d = wan_ops.make_inputs("qk_norm_rope_across_heads", s, "cpu")
    q, k, wq, wk, table, heads = wan_ops.args_for("qk_norm_rope_across_heads", "fused", d, s)
    assert q.stride() == (s.L * 3 * s.C, 3 * s.C, 1) and k.data_ptr() == q.data_ptr() + s.C * q.element_size()
    assert table.shape == (s.L, s.C // s.heads) and table.dtype == torch.float32 and heads == 2


def test_byte_counts():
    s = SMALL
    act = 2 * 13 * 48 * 2  # B L C, bf16
    assert wan_ops.bytes_moved("norm_scale_shift", s) == 2 * act
    assert wan_ops.bytes_moved("gate_residual", s) == 3 * act
    for op in ("gate_residual_layer_norm", "gate_residual_norm_scale_shift", "block_end_lookahead"):
        assert wan_ops.bytes_moved(op, s) == 4 * act
    assert wan_ops.bytes_moved("qk_norm_rope_across_heads", s) == 4 * act + 13 * 24 * 4
    assert wan_ops.bytes_moved("qk_norm_across_heads_cross", s) == 2 * act + 2 * (2 * 5 * 48 * 2)
    w = wan_ops.wan_shape(wan_ops.STREAMS["wan14b"])
    assert (w.L, w.C, w.heads) == (32760, 5120, 40)
    assert wan_ops.bytes_moved("gate_residual", w) == 3 * 32760 * 5120 * 2


def test_rope_table_is_diffusers():
    """The eager (cos, sin) are WanRotaryPosEmbed's for the same latent grid."""
    tw = pytest.importorskip("diffusers.models.transformers.transformer_wan")
    D, grid = 24, (3, 3, 5)
    rope = tw.WanRotaryPosEmbed(D, (1, 2, 2), 64)
    cos_ref, sin_ref = rope(torch.empty(1, 0, grid[0], 2 * grid[1], 2 * grid[2]))
    cos, sin = wan_ops.wan_rope(grid, D, "cpu")
    assert cos.shape == cos_ref.shape == (1, 45, 1, D)
    torch.testing.assert_close(cos, cos_ref.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_ref.float(), rtol=0, atol=1e-6)
    assert [a * b * c for a, b, c in wan_ops.GRIDS.values()] == list(wan_ops.GRIDS)


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        wan_ops.main(["--device", "cpu", "--tiny", "--ops", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        wan_ops.main(["--device", "cpu", "--tiny", "--shapes", "nope", "--out", str(tmp_path)])
    assert wan_ops.main(["--device", "cpu", "--out", str(tmp_path)]) == 2  # real shapes need CUDA


@pytest.mark.interpret
@pytest.mark.parametrize("op,per_token", [(op, False) for op in wan_ops.OPS] + [(op, True) for op in wan_ops.MOD_OPS])
def test_fused_kernel_path_interpreted(op, per_token, monkeypatch):
    """The ``fused`` provider as it runs on CUDA (the eager fast path: input check, then the Triton
    kernel), here on CPU tensors under the Triton interpreter, against the diffusers expression."""
    from fused_dit_ops.ops import _eager
    monkeypatch.setattr(_eager, "fast", lambda x: True)
    s = dataclasses.replace(wan_ops.TINY["tiny-a"], per_token=per_token)
    d = wan_ops.make_inputs(op, s, "cpu", torch.bfloat16, torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = wan_ops.EAGER[op](*wan_ops.args_for(op, "eager", d, s))
        out = wan_ops.providers(op, ["fused"])["fused"](*wan_ops.args_for(op, "fused", d, s))
    for o, r in zip(wan_ops._flat(out), wan_ops._flat(ref)):
        assert o.dtype == torch.bfloat16 and o.shape == r.shape
        torch.testing.assert_close(o.float(), r.float(), rtol=1.6e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_run_one_shape(tmp_path):
    """The CUDA path (graph replay, the kernels) at a real Wan shape, every op, eager and fused."""
    rc = wan_ops.main(["--shapes", "wan1.3b", "--providers", "eager,fused", "--rounds", "1", "--out", str(tmp_path)])
    assert rc == 0
    (path,) = tmp_path.glob("wan-ops-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert {(r["op"], r["provider"]) for r in rows} == {(op, p) for op in wan_ops.OPS for p in ("eager", "fused")}
    for r in rows:
        assert r["us"] > 0 and 0 < r["pct_floor"] < 150, r
        assert r["max_rel_diff_vs_eager"] < 2e-2, r
