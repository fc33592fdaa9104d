"""fused-dit-ops: fused Triton/CUDA kernels for diffusion-transformer inference.

Importing the package declares and registers every ``torch.ops.fused_dit.*`` op.
"""
from . import _schemas  # noqa: F401  (declares the schemas, once)
from . import _extension  # noqa: F401  (loads the C++/CUDA kernels, if built)
from . import ops  # noqa: F401  (registers CUDA / CPU / fake implementations)
from ._validation import FusedDitInputError
from .ops.modulation import (dual_gate_residual_norm_scale_shift, dual_norm_scale_shift, gate_residual,
                             gate_residual_norm_scale_shift, norm_scale_shift, scale_shift_gate)
from .ops.attention import attention
from .attention_dispatch import (AttentionBackendError, AttentionFallbackWarning, attention_backend,
                                 attention_backends, warmup_attention)
from .ops.linear import joint_linear
from .ops.qkv_cat import joint_qkv_cat
from .ops.swiglu import swiglu_linear
from .ops.rope import joint_qk_norm_rope_, qk_norm_rope_cat, rope, warmup_rope
from .ops.qk_norm_across_heads import qk_norm_rope_across_heads
from .ops.gate_residual_norm import gate_residual_layer_norm
from .rope_tables import cos_sin_from_complex, flux_ids, flux_rope_table, qwen_image_rope_tables
from .integrations.engine import PatchReport, patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "FusedDitInputError",
    "scale_shift_gate",
    "norm_scale_shift",
    "gate_residual_norm_scale_shift",
    "gate_residual",
    "dual_norm_scale_shift",
    "dual_gate_residual_norm_scale_shift",
    "attention",
    "attention_backend",
    "attention_backends",
    "warmup_attention",
    "AttentionBackendError",
    "AttentionFallbackWarning",
    "rope",
    "joint_qkv_cat",
    "qk_norm_rope_cat",
    "joint_qk_norm_rope_",
    "qk_norm_rope_across_heads",
    "gate_residual_layer_norm",
    "joint_linear",
    "swiglu_linear",
    "warmup_rope",
    "qwen_image_rope_tables",
    "cos_sin_from_complex",
    "flux_rope_table",
    "flux_ids",
    "patch",
    "unpatch",
    "PatchReport",
]
