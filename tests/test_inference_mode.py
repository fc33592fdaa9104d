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
    fdo.patch(model)
    try:
        with torch.inference_mode():
            out1 = model(**kw)[0]
            out2 = model(**kw)[0]  # the same timestep: cached modulation and SiLU by identity
        assert rel_err(out1, ref) < 1e-5
        assert rel_err(out2, ref) < 1e-5
    finally:
        fdo.unpatch(model)
