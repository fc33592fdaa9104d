"""scripts/ab_old_new.py (old vs new patch code in one process) in its CPU smoke mode (--tiny)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
OLD_REF = "51f9368"


@pytest.mark.slow
def test_ab_old_new_tiny(tmp_path):
    """Both versions load side by side (the old one renamed), patch two identical tiny models, give
    the same outputs, and the JSON has the per-round medians and ratios (not a measurement)."""
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{OLD_REF}^{{commit}}"],
                      capture_output=True).returncode:
        pytest.skip(f"commit {OLD_REF} not in this clone")
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", OLD_REF, "fused_dit_ops"], check=True,
                         capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old_dir)], input=tar, check=True)
    out = tmp_path / "ab.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "ab_old_new.py"), "--tiny", "--old-dir", str(old_dir),
                        "--rounds", "3", "--steps", "1", "--warmup", "1", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["old"].startswith("dir ") and res["fused_dit_disable_c"] == "1"
    for part in ("block", "model"):
        p = res[part]
        assert len(p["round_ms"]["old"]) == len(p["round_ms"]["new"]) == 3 and len(p["round_ratios"]) == 3
        assert p["ratio_new_over_old"] == p["median_ms"]["new"] / p["median_ms"]["old"]
        assert p["rel_diff_new_vs_old"] < 1e-6, p  # the same math (CPU references)
    assert set(res["block"]["median_host_ms"]) == {"old", "new"} and "verdict" in res
    assert "new/old" in r.stdout
