"""torch.compile with per-request sizes: a new text length or image size must not cost a graph.

Sizes that differ per request (the text length above all) are ``SymInt`` in the schemas, so a
dynamic graph stays dynamic through the ops. The patched tiny Qwen-Image model is compiled the two
ways the README names (whole model, fullgraph and dynamic; ``compile_repeated_blocks``) and run over
11 text lengths and several image sizes: it may compile no more graphs than the stock model does
for the same requests.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import fused_dit_ops as fdo  # noqa: E402
from fused_dit_ops.models import build_qwen_image_transformer, make_qwen_inputs  # noqa: E402

from helpers import QWEN_CPU_FP32_REL, native_diffusers_backend, randn, rel_err  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("native_diffusers_backend")

# (text length, image token counts): 11 distinct text lengths, four image layouts
REQUESTS = [(5, (16, 16)), (6, (16, 16)), (7, (16, 16)), (9, (12, 16)), (11, (16,)), (13, (16, 16)),
            (17, (20, 16)), (19, (16, 16)), (23, (12, 16)), (29, (24,)), (31, (16, 16))]


def _graphs_over_requests(model, compile_how: str, backend: str):
    """Compile ``model`` as told, run every request (no_grad); (graph count, last output)."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters
    dynamo.reset()
    counters.clear()
    try:
        if compile_how == "model":
            fn = torch.compile(model, fullgraph=True, dynamic=True, backend=backend)
        else:
            model.compile_repeated_blocks(fullgraph=True, backend=backend)
            fn = model
        outs = []
        for i, (txt_len, img) in enumerate(REQUESTS):
            kw = make_qwen_inputs(model, img_tokens=img, txt_len=txt_len, seed=i)
            with torch.no_grad():
                outs.append(fn(**kw)[0])
        return counters["stats"]["unique_graphs"], outs
    finally:
        for b in model.transformer_blocks:
            b._compiled_call_impl = None
        dynamo.reset()


@pytest.mark.parametrize("compile_how,backend", [("model", "eager"), ("blocks", "aot_eager")])
def test_patched_model_compiles_no_more_graphs_than_stock(compile_how, backend):
    stock = build_qwen_image_transformer("tiny", seed=3)
    n_stock, _ = _graphs_over_requests(stock, compile_how, backend)
    patched = build_qwen_image_transformer("tiny", seed=3)
    fdo.patch(patched)
    n_patched, outs = _graphs_over_requests(patched, compile_how, backend)
    assert n_patched <= n_stock, (n_patched, n_stock)
    assert n_stock <= 6  # the stock model's own count stays small: the requests are not all new graphs
    # and the dynamic graphs compute the right thing (first and last request against stock eager)
    for i in (0, len(REQUESTS) - 1):
        txt_len, img = REQUESTS[i]
        kw = make_qwen_inputs(stock, img_tokens=img, txt_len=txt_len, seed=i)
        with torch.no_grad():
            ref = stock(**kw)[0]
        assert rel_err(outs[i], ref) < QWEN_CPU_FP32_REL


def _joint_inputs(B, Lt, Li, H=2, D=16):
    q, k = randn(B, Lt + Li, H, D), randn(B, Lt + Li, H, D)
    w = [randn(D) for _ in range(4)]
    return q, k, w, randn(Lt, D), randn(Li, D)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_joint_qk_norm_rope_txt_len_stays_symbolic(backend):
    """The op alone, dynamic: one graph for every (text, image) length pair, eager results."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    def f(q, k, w0, w1, w2, w3, tt, ti):
        q, k = q.clone(), k.clone()
        fdo.joint_qk_norm_rope_(q, k, tt.shape[0], w0, w1, w2, w3, tt, ti)
        return q, k

    dynamo.reset()
    counters.clear()
    cf = torch.compile(f, fullgraph=True, dynamic=True, backend=backend)
    try:
        with dynamo.config.patch(error_on_recompile=False):
            for Lt, Li in ((3, 5), (4, 5), (7, 9), (2, 11), (9, 4), (12, 6)):
                q, k, w, tt, ti = _joint_inputs(1, Lt, Li)
                got = cf(q, k, *w, tt, ti)
                want = f(q, k, *w, tt, ti)
                for g, e in zip(got, want):
                    torch.testing.assert_close(g, e)
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        dynamo.reset()


def test_schemas_take_per_request_sizes_as_symint():
    """No schema takes a plain ``int``: every integer argument the ops have is a size that can vary
    per request, and dynamo specialises a graph on an ``int`` (not on a ``SymInt``)."""
    import re
    from fused_dit_ops._schemas import SCHEMAS
    for name, schema in SCHEMAS.items():
        ints = re.findall(r"(?<!\w)int(?:\[\d*\])?\??\s+(\w+)", schema)
        assert not ints, f"{name}: {ints} declared int (dynamo specialises on it); use SymInt"
        assert str(getattr(torch.ops.fused_dit, name).default._schema).count("SymInt") == schema.count("SymInt")
