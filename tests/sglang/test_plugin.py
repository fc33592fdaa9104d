"""Plugin discovery through the entry point and SGLang's own plugin lifecycle (fresh processes).

Needs fused-dit-ops' distribution metadata (the entry point) on sys.path, e.g. the editable install
that scripts/sglang_env.sh makes.
On a CUDA machine the child process runs the layer on CUDA tensors.
"""
import pytest

from tests.sglang.conftest import SGLANG_CUDA_PLATFORM, skip_without_sglang, stub_pythonpath

skip_without_sglang()

import importlib.metadata as md  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


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
dev = "cuda" if torch.cuda.is_available() else "cpu"
x = torch.randn(1, 8, 64, device=dev); prm = [torch.randn(1, 64, device=dev) for _ in range(6)]
try:
    op(x, None, None, *prm, torch.ones(1, 8, dtype=torch.int32, device=dev), 1e-6)
    res["error"] = None
except Exception as e:  # CPU platform: SGLang's stock CUDA path names a kernel it never imported
    res["error"] = type(e).__name__ + ": " + str(e)[:200]
res["stats"] = p.stats()["ln_select01"]
print("RESULT" + json.dumps(res))
'''


@pytest.mark.parametrize("env,on", [({"SGLANG_PLUGINS": "fused_dit_ops"}, True),
                                    ({"FUSED_DIT_SGLANG": "1"}, True),
                                    ({}, False)])
def test_sglang_lifecycle_discovers_plugin(env, on, record_property):
    e = {k: v for k, v in os.environ.items() if k not in ("SGLANG_PLUGINS", "FUSED_DIT_SGLANG")}
    e.update(env)
    # the stubs this process uses, AFTER everything real (they must never shadow real packages)
    e["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), e.get("PYTHONPATH", ""), *stub_pythonpath()] if p)
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
        assert res["stats"]["handled"] == 0
        if not SGLANG_CUDA_PLATFORM:
            assert res["error"].startswith("NameError"), res  # the stock kernel name: CUDA-only import
        else:  # CUDA: SGLang's own select01 Triton kernel got the call (needs no sgl_kernel)
            record_property("stock_kernel_error", str(res["error"]))
