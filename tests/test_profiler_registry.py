"""The profiler's write rules of the fused_dit ops come from the op schemas (no second registry)."""
from __future__ import annotations

from fused_dit_ops import profiler
from fused_dit_ops._schemas import SCHEMAS

# the hand-kept table the schema-derived rules replaced (in place on q, k: ("inplace", (0, 1)))
_FORMER = {
    "scale_shift_gate": 2, "norm_scale_shift": 1, "gate_residual_norm_scale_shift": 2, "gate_residual": 1,
    "rope": ("inplace", (0, 1)), "joint_qkv_cat": "sum", "joint_qkv_cat_out": 0, "qk_norm_rope_cat": "sum",
    "qk_norm_rope_cat_out": 0, "joint_qk_norm_rope_": ("inplace", (0, 1)),
    "dual_norm_scale_shift": "3d", "dual_gate_residual_norm_scale_shift": "3d",
}


def test_every_op_is_classified():
    for name in SCHEMAS:
        assert (name in profiler._FUSED_WRITES) != (name in profiler._COMPUTE_BOUND), name
        assert profiler.op_is_memory_bound(f"fused_dit::{name}") == (name not in profiler._COMPUTE_BOUND)


def test_derived_rules_match_the_former_table():
    for name, w in _FORMER.items():
        assert profiler._FUSED_WRITES[name] == w, name


def test_a_new_op_gets_a_rule_from_its_schema():
    assert profiler._writes_of("(Tensor x, Tensor w) -> (Tensor, Tensor, Tensor)") == 3
    assert profiler._writes_of("(Tensor(a!) x, Tensor y) -> ()") == ("inplace", (0,))
    assert profiler._writes_of("(Tensor x, Tensor(a!) x_out) -> ()") == 0
    assert profiler._writes_of("(Tensor x_a, Tensor x_b) -> (Tensor, Tensor)") == "3d"


def test_min_bytes_in_place_and_out():
    bf = "c10::BFloat16"
    q = [1, 8, 2, 16]
    n = 8 * 2 * 16 * 2
    w, t = [16], [8, 16]
    shapes, dtypes = [q, q, [], w, w, w, w, t, t], [bf, bf, "int", bf, bf, bf, bf, "float", "float"]
    reads = 2 * n + 4 * 32 + 2 * 8 * 16 * 4
    assert profiler.op_min_bytes("fused_dit::joint_qk_norm_rope_", shapes, dtypes) == reads + 2 * n
