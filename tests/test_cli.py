"""The command line: help texts, env, check, bench, demo and profile (CPU; the GPU tier on CUDA)."""
import re

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
               "rope", "joint_qkv_cat", "qk_norm_rope_cat", "joint_linear", "swiglu_linear", "attention"):
        assert f"{op} " in out and "FAIL" not in out and "ERROR" not in out
    assert "12 passed, 0 failed" in out


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


def test_top_level_help_lists_every_command(capsys):
    from fused_dit_ops.__main__ import COMMANDS
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("env", "check", "bench", "profile", "demo"):
        assert f"\n  {name} " in out, name  # one line per command in the description
    assert {n for n, _ in COMMANDS} == {"env", "check", "bench", "profile", "demo"}
    assert "``" not in out and ":func:" not in out  # plain text, no reST markup
    assert main([]) == 2  # no command: the same help, on stderr
    assert "profile" in capsys.readouterr().err


def test_bench_without_a_name_lists_the_benchmarks(capsys):
    from fused_dit_ops.bench import BENCHES, DESCRIPTIONS
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert "required: name" not in err
    for name in BENCHES:
        assert f"  {name}  " in err or f"  {name} " in err, name
        assert DESCRIPTIONS[name] in err
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in BENCHES)
    assert main(["bench", "nope"]) == 2
    assert "modulation" in capsys.readouterr().err  # the list again


def test_subcommand_help_is_plain_text(capsys):
    for argv in (["demo", "--help"], ["profile", "--help"], ["bench", "block", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage:" in out and "``" not in out and ":func:" not in out, argv
        assert "SPEC" not in out and not re.search(r"\bhere\b", out), argv


def test_demo_on_cpu_says_cpu_timings_mean_nothing_for_gpus(capsys):
    assert main(["demo", "--device", "cpu", "--iters", "1", "--warmup", "0", "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "patched eager" in out
    assert "say nothing about GPU speed" in out
    assert out.rstrip().endswith("for the speed comparison.")  # the note is the last thing on screen


def test_demo_precision_fp8_adds_fp8_rows(capsys):
    """demo --precision fp8: the patched model also runs with FP8 block GEMMs (the CPU reference
    implementations here), next to the bf16 rows, with a small but nonzero error against stock."""
    assert main(["demo", "--device", "cpu", "--iters", "1", "--warmup", "0", "--no-compile",
                 "--precision", "fp8"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("patched fp8 eager"))
    rel = float(row.split()[-2])
    assert 0 < rel < 0.1, row
    assert "precision=fp8" in out and "FP8 e4m3 GEMMs" in out


def test_bench_fp8_tiny_smoke_writes_every_row(tmp_path, capsys):
    """bench fp8 --tiny on the CPU: every case runs (the norm ops, the quantisations, the wide-row and
    cat quantisations, the GEMMs) and lands in the JSON with its FP8 / bf16 ratio where it has one."""
    import json
    assert main(["bench", "fp8", "--device", "cpu", "--tiny", "--rep-ms", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("fp8-tiny-*.json")).read_text())["rows"]
    cases = [r["case"] for r in rows]
    for want in ("dual_norm_scale_shift_fp8", "dual_gate_residual_norm_scale_shift_fp8", "attention output: quantize_fp8",
                 "fc1 output: quantize_fp8(bias, gelu_tanh)", "Wan gate_residual_layer_norm_fp8",
                 "eight GEMMs fp8_linear (sum)"):
        assert want in cases, cases
    assert sum("quantize_fp8_cat" in c for c in cases) == 2
    assert all(r["us"] > 0 for r in rows)
    assert all(r["ratio_vs_bf16"] > 0 for r in rows if "fp8" in r["case"] and "torch" not in r["case"])


def test_profile_on_cpu_prints_no_kineto_log_lines(tmp_path):
    """libkineto (torch.profiler) logs from C++ straight to the terminal: on a machine without a GPU
    a CUDA build of torch prints "gpuGetDeviceCount failed with code 35", a CPU build its USDT/STAGE
    lines. The CPU profile sets KINETO_LOG_LEVEL (unless the user did) so that none appear."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU, even where there is one
    r = subprocess.run([sys.executable, "-m", "fused_dit_ops", "profile", "--layers", "2", "--layer", "1",
                        "--warmup", "0", "--top", "5"], capture_output=True, text=True, env=env, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "gpuGetDeviceCount" not in out
    assert not re.search(r"^(ERROR|WARNING|INFO|STAGE|USDT):", out, re.M), out
    assert "says nothing about GPU kernels" in r.stdout
    assert "TOTAL" in r.stdout
