"""Plugin discovery through the entry point and SGLang's own plugin lifecycle (fresh processes)."""
import pytest

pytest.importorskip("sglang.multimodal_gen", reason="sglang not installed: run `bash tools/sglang_env.sh && make test-sglang`")

import importlib.metadata as md  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STUBS = Path(__file__).parent / "stubs"


def test_entry_point_declared():
    eps = [e for e in md.entry_points(group="sglang.multimodal_gen.plugins") if e.name == "fused_dit_ops"]
    assert len(eps) == 1
    assert eps[0].value == "fused_dit_ops.integrations.sglang_plugin:sglang_plugin"
    assert eps[0].dist.name == "fused-dit-ops"


def test_enabled_by_env(monkeypatch):
    from fused_dit_ops.integrations.sglang_plugin import enabled_by_env
    for env, want in [({}, False), ({"SGLANG_PLUGINS": "other"}, False),
                      ({"SGLANG_PLUGINS": "other, fused_dit_ops"}, True),
                      ({"FUSED_DIT_SGLANG": "1"}, True),
                      ({"FUSED_DIT_SGLANG": "0", "SGLANG_PLUGINS": "fused_dit_ops"}, False)]:
        monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
        monkeypatch.delenv("FUSED_DIT_SGLANG", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert enabled_by_env() is want, env


_CHILD = r'''
import json, sys
import torch
from sglang.multimodal_gen.runtime.platforms import plugins
from sglang.multimodal_gen.runtime.platforms.plugins import HookRegistry, load_plugins, apply_plugin_hooks
from fused_dit_ops.integrations import sglang_plugin as p
load_plugins(); apply_plugin_hooks()
res = {"registered": sorted(HookRegistry._hooks), "applied": {n: p.is_applied(n) for n in p.TARGETS}}
# A module built after the hooks, dispatched to forward_cuda as on a CUDA platform.
from sglang.multimodal_gen.runtime.layers.fused_scale_shift_gate import FusedLayerNormScaleShiftGateSelect01 as Op
op = Op(); op._forward_method = op.forward_cuda
x = torch.randn(1, 8, 64); prm = [torch.randn(1, 64) for _ in range(6)]
try:
    op(x, None, None, *prm, torch.ones(1, 8, dtype=torch.int32), 1e-6)
    res["error"] = None
except Exception as e:  # SGLang's stock CUDA path: its Triton kernel is not importable on CPU
    res["error"] = type(e).__name__
res["stats"] = p.stats()["ln_select01"]
print("RESULT" + json.dumps(res))
'''


@pytest.mark.parametrize("env,on", [({"SGLANG_PLUGINS": "fused_dit_ops"}, True),
                                    ({"FUSED_DIT_SGLANG": "1"}, True),
                                    ({}, False)])
def test_sglang_lifecycle_discovers_plugin(env, on):
    e = {k: v for k, v in os.environ.items() if k not in ("SGLANG_PLUGINS", "FUSED_DIT_SGLANG")}
    e.update(env)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(STUBS), e.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _CHILD], env=e, capture_output=True, text=True, timeout=240)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    res = json.loads(lines[-1][6:])
    from fused_dit_ops.integrations.sglang_plugin import TARGETS
    if on:
        assert res["registered"] == sorted(TARGETS.values())
        assert all(res["applied"].values()), res
        assert res["stats"]["handled"] == 1 and res["error"] is None
    else:
        assert res["registered"] == [] and not any(res["applied"].values())
        assert res["stats"]["handled"] == 0 and res["error"] == "NameError"  # stock kernel name
