"""The command line: env and check run and report every op (CPU here; the GPU tier on CUDA)."""
import pytest
import torch

from fused_dit_ops.__main__ import main
from fused_dit_ops._schemas import SCHEMAS


def test_env_lists_every_op(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for name in SCHEMAS:
        assert (name in out) != name.startswith("_"), name  # private C++ entry points not listed
    assert "fused_dit_ops._C" in out and "attention backends" in out


def test_check_passes_on_cpu(capsys):
    assert main(["check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for op in ("scale_shift_gate", "norm_scale_shift", "gate_residual_norm_scale_shift", "gate_residual",
               "rope", "joint_qkv_cat", "qk_norm_rope_cat", "joint_linear", "attention"):
        assert f"{op} " in out and "FAIL" not in out and "ERROR" not in out
    assert "11 passed, 0 failed" in out


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_check_passes_on_gpu(capsys, device):
    assert main(["check", "--device", device]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "[1,8192,3072]" in out  # the GPU shapes for "cuda:0" too


def test_check_without_cuda_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["check", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().out


def test_unknown_bench_is_an_error(capsys):
    assert main(["bench", "nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
