"""The one place where every ``torch.ops.fused_dit`` schema is declared.

Implementations (CUDA via Triton or C++, CPU reference, fake) register against these names
elsewhere; C++ kernels in ``csrc/`` use ``TORCH_LIBRARY_IMPL(fused_dit, CUDA, m)`` against the
same schemas, so nothing here may be declared twice.
"""
import torch

NAMESPACE = "fused_dit"

SCHEMAS: dict[str, str] = {
    # -- adaLN modulation (issue 2) -------------------------------------------------------------
    "scale_shift_gate": "(Tensor x, Tensor shift, Tensor scale, Tensor gate, Tensor? index=None)"
    " -> (Tensor, Tensor)",
    "norm_scale_shift": "(Tensor x, Tensor shift, Tensor scale, Tensor? index=None, Tensor? weight=None,"
    " Tensor? bias=None, float eps=1e-06, str norm=\"layer\") -> Tensor",
    "gate_residual_norm_scale_shift": "(Tensor residual, Tensor update, Tensor gate, Tensor shift,"
    " Tensor scale, Tensor? index=None, float eps=1e-06) -> (Tensor, Tensor)",
    "gate_residual": "(Tensor residual, Tensor update, Tensor gate, Tensor? index=None) -> Tensor",
    # -- RoPE and the joint QKV path (issue 3) -------------------------------------------------
    # -- attention (issue 4) ---------------------------------------------------------------------
    "attention": "(Tensor q, Tensor k, Tensor v, float? softmax_scale=None, bool causal=False,"
    " str? backend=None) -> Tensor",
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)


def qualname(name: str) -> str:
    return f"{NAMESPACE}::{name}"
