"""A patched model under ``torch.inference_mode()`` (inference tensors carry no version counter,
which the patched model's per-forward caches read): every family runs, matches stock, and a second
forward with the same timestep reuses nothing stale."""
from __future__ import annotations

import pytest
import torch

import fused_dit_ops as fdo
from fused_dit_ops.models import build_model_and_inputs
from helpers import rel_err

CASES = [("qwen", "tiny"), ("flux", "tiny"), ("flux2", "tiny"), ("wan", "tiny"), ("wan", "tiny-ti2v")]


@pytest.mark.parametrize("family,config", CASES)
def test_patched_model_under_inference_mode(family, config):
    model, kw = build_model_and_inputs(family, config, None, device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        ref = model(**kw)[0]
    report = fdo.patch(model)
    try:
        with torch.inference_mode():
            out1 = model(**kw)[0]
            out2 = model(**kw)[0]  # the same timestep: cached modulation and SiLU by identity
        assert rel_err(out1, ref) < 1e-5
        assert rel_err(out2, ref) < 1e-5
        # single-stream blocks find their joint input without _base (inference views carry none):
        # no cat, and the block-end look-ahead is taken, as under no_grad
        assert not report.runtime, dict(report.runtime)
    finally:
        fdo.unpatch(model)


def test_joint_of_hint_only_for_the_same_storage():
    """The hint stands in for a missing _base only where both halves are views of its storage."""
    from fused_dit_ops.integrations.single_stream import joint_of
    with torch.inference_mode():
        x = torch.randn(2, 13, 24)
        e, h = x[:, :5], x[:, 5:]
        assert e._base is None  # inference views carry no base
        assert joint_of(e, h) is None
        assert joint_of(e, h, x) is x
        other = torch.randn(2, 13, 24)
        assert joint_of(e, h, other) is None
        assert joint_of(h, e, x) is None  # halves swapped
        assert joint_of(e, x[:, 6:], x) is None  # not adjacent
    y = torch.randn(2, 13, 24)  # ordinary tensors: the base decides, the hint is not used
    assert joint_of(y[:, :5], y[:, 5:], x) is y
