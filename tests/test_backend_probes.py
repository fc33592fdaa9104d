"""Probing an attention backend never raises: a backend whose probe raises is reported
unavailable, with the exception as the reason, and ``python -m fused_dit_ops env`` still prints.

The probes that raise in the field: under a CUDA build of torch on a machine without a driver,
``torch.backends.cuda.can_use_*_attention`` raise ``torch.AcceleratorError`` ("CUDA driver version
is insufficient for CUDA runtime version") while ``torch.cuda.is_available()`` is False; device
queries (``torch.cuda.current_device``, ``get_device_capability``) raise too. Here each is
monkeypatched to raise.
"""
from __future__ import annotations

import pytest
import torch

import fused_dit_ops
from fused_dit_ops import attention_dispatch as disp
from fused_dit_ops.attention_dispatch import Capabilities

BF16 = torch.bfloat16
DRIVER = "CUDA driver version is insufficient for CUDA runtime version"
H100 = Capabilities("cuda", (9, 0), cudnn=True, missing=(("fa3", "not importable: nope"),
                                                          ("fa4", "not importable: nope")))


def _raise(*_a, **_k):
    raise RuntimeError(DRIVER)


@pytest.fixture(autouse=True)
def _fresh_probes():
    disp.clear_cache()
    yield
    disp.clear_cache()


def _qkv(S=16, H=4, D=64):
    return (torch.empty(1, S, H, D, dtype=BF16), torch.empty(1, S, H, D, dtype=BF16),
            torch.empty(1, S, H, D, dtype=BF16))


@pytest.mark.parametrize("name", ["cudnn", "fa2", "efficient"])
def test_sdpa_check_that_raises_is_an_unavailable_reason(monkeypatch, name):
    monkeypatch.setattr(torch.backends.cuda, disp._SDPA_CHECK[name], _raise)
    q, k, v = _qkv()
    r = disp._sdpa_reason(name, q, k, v, False)
    assert r is not None and r.kind == "probe"
    assert r.text.startswith(f"{name}:") and DRIVER in r.text and "RuntimeError" in r.text
    # the selection on a (pretend) H100 skips it with that reason and picks the next one
    r = disp.runtime_reason(name, H100, q, k, v, False)
    assert r is not None and DRIVER in r.text


def test_listing_reports_a_raising_probe_and_env_still_prints(monkeypatch):
    monkeypatch.setattr(disp, "runtime_capabilities", lambda device=None: H100)
    monkeypatch.setattr(disp, "_probe_tensors",  # CPU stand-ins for the probe tensors
                        lambda dev, dtype, S, H, Hkv, D: (torch.empty(1, S, H, D, dtype=dtype),
                                                          torch.empty(1, S, Hkv, D, dtype=dtype),
                                                          torch.empty(1, S, Hkv, D, dtype=dtype)))
    monkeypatch.setattr(torch.backends.cuda, "can_use_cudnn_attention", _raise)
    rows = {r.name: r for r in fused_dit_ops.attention_backends()}
    assert list(rows) == list(disp.BACKENDS)
    assert not rows["cudnn"].available and DRIVER in rows["cudnn"].reason
    assert rows["cudnn"].reason.startswith("cudnn: torch.backends.cuda.can_use_cudnn_attention raised")
    assert rows["math"].available
    from fused_dit_ops.env import _attention_sections, report
    sections = dict(_attention_sections())
    fp8 = [t for t in sections if t.startswith("FP8 attention")]
    assert len(fp8) == 1 and dict(sections.pop(fp8[0]))["CPU"] == "reference"
    for title, lines in sections.items():
        assert title.startswith("attention backends (")
        assert [n for n, _ in lines] == list(disp.BACKENDS), lines  # per-backend rows, not one "error" row
        assert dict(lines)["cudnn"].startswith("no: cudnn:") and DRIVER in dict(lines)["cudnn"]
    assert DRIVER in report()


@pytest.mark.parametrize("probe", ["get_device_capability", "current_device"])
def test_device_query_that_raises_makes_every_cuda_backend_unavailable(monkeypatch, probe):
    monkeypatch.setattr(torch.cuda, probe, _raise)
    if probe == "get_device_capability":
        caps = disp._runtime_caps("cuda", 0)
    else:
        caps = disp.runtime_capabilities("cuda")
    assert caps.device_type == "cuda" and DRIVER in caps.device_error and probe in caps.device_error
    for name in disp.BACKENDS[:-1]:
        r = disp.static_reason(name, caps, BF16, 128, False, False)
        assert r is not None and r.kind == "probe" and DRIVER in r.text
    assert disp.static_reason("math", caps, BF16, 128, False, False) is None


def test_listing_for_a_cuda_device_that_cannot_be_probed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", _raise)
    rows = fused_dit_ops.attention_backends(device="cuda")
    assert [r.name for r in rows] == list(disp.BACKENDS)
    for r in rows:  # nothing runs on a device that cannot be probed, math included
        assert not r.available and r.reason.startswith(f"{r.name}: the CUDA device could not be probed")
        assert DRIVER in r.reason


def test_listing_when_probe_tensors_cannot_be_made(monkeypatch):
    monkeypatch.setattr(disp, "runtime_capabilities", lambda device=None: H100)
    monkeypatch.setattr(disp, "_probe_tensors", _raise)
    rows = fused_dit_ops.attention_backends(device="cuda")
    assert all(not r.available and DRIVER in r.reason for r in rows)


def test_package_probe_that_raises(monkeypatch):
    """A package whose import (or attribute lookup) raises anything is not importable, with why."""
    class Weird:
        def __getattr__(self, name):
            return _raise()
    monkeypatch.setattr(disp, "_import", lambda name: (Weird(), ""))
    assert disp._fa3_module() is None and disp._fa4_module() is None and disp._fa2_module() is None


def test_cpu_ops_run_with_every_cuda_probe_raising(monkeypatch):
    """What a CUDA build of torch without a driver does on CPU tensors: the ops, selection, explain,
    warm-up and the env report never call a CUDA probe that could raise, or survive it."""
    for name in ("current_device", "get_device_capability", "get_device_properties", "synchronize",
                 "is_current_stream_capturing"):
        monkeypatch.setattr(torch.cuda, name, _raise)
    for name in disp._SDPA_CHECK.values():
        monkeypatch.setattr(torch.backends.cuda, name, _raise)
    monkeypatch.setattr(torch._C, "_cuda_getDevice", _raise, raising=False)
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    assert fused_dit_ops.attention(q, k, v).shape == q.shape
    assert disp.explain(q, k, v)["chosen"] == "math"
    assert fused_dit_ops.warmup_attention(seq_lens=(4,), heads=2, head_dim=16, dtype=torch.float32,
                                          device="cpu") == ["math"]
    assert [r.name for r in fused_dit_ops.attention_backends() if r.available] == ["math"]
    x = torch.randn(1, 4, 2, 16)
    fused_dit_ops.rope(x, x.clone(), torch.randn(4, 16))
    from fused_dit_ops.env import report
    assert "attention backends" in report()
