"""The one place where every ``torch.ops.fused_dit`` schema is declared.

Implementations (CUDA via Triton or C++, CPU reference, fake) register against these names
elsewhere; C++ kernels in ``csrc/`` use ``TORCH_LIBRARY_IMPL(fused_dit, CUDA, m)`` against the
same schemas, so nothing here may be declared twice.
"""
import torch

NAMESPACE = "fused_dit"

SCHEMAS: dict[str, str] = {
    # -- adaLN modulation -------------------------------------------------------------
    "scale_shift_gate": "(Tensor x, Tensor shift, Tensor scale, Tensor gate, Tensor? index=None)"
    " -> (Tensor, Tensor)",
    "norm_scale_shift": "(Tensor x, Tensor shift, Tensor scale, Tensor? index=None, Tensor? weight=None,"
    " Tensor? bias=None, float eps=1e-06, str norm=\"layer\") -> Tensor",
    "gate_residual_norm_scale_shift": "(Tensor residual, Tensor update, Tensor gate, Tensor shift,"
    " Tensor scale, Tensor? index=None, float eps=1e-06) -> (Tensor, Tensor)",
    "gate_residual": "(Tensor residual, Tensor update, Tensor gate, Tensor? index=None) -> Tensor",
    # two streams (image + text of a dual-stream block) in one launch; same B, C and dtype
    "dual_norm_scale_shift": "(Tensor x_a, Tensor shift_a, Tensor scale_a, Tensor? index_a, float eps_a,"
    " Tensor x_b, Tensor shift_b, Tensor scale_b, Tensor? index_b, float eps_b, str norm=\"layer\")"
    " -> (Tensor, Tensor)",
    "dual_gate_residual_norm_scale_shift": "(Tensor residual_a, Tensor update_a, Tensor gate_a,"
    " Tensor shift_a, Tensor scale_a, Tensor? index_a, float eps_a, Tensor residual_b, Tensor update_b,"
    " Tensor gate_b, Tensor shift_b, Tensor scale_b, Tensor? index_b, float eps_b)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
    # -- RoPE and the joint QKV path -------------------------------------------------
    "rope": "(Tensor(a!) q, Tensor(b!) k, Tensor cos_sin_cache, Tensor? positions=None,"
    " bool interleaved=True, str? backend=None) -> ()",
    "joint_qkv_cat": "(Tensor txt_q, Tensor txt_k, Tensor txt_v, Tensor img_q, Tensor img_k,"
    " Tensor img_v) -> (Tensor, Tensor, Tensor)",
    "joint_qkv_cat_out": "(Tensor txt_q, Tensor txt_k, Tensor txt_v, Tensor img_q, Tensor img_k,"
    " Tensor img_v, Tensor(a!) q_out, Tensor(b!) k_out, Tensor(c!) v_out) -> ()",
    "qk_norm_rope_cat": "(Tensor txt_q, Tensor txt_k, Tensor txt_v, Tensor img_q, Tensor img_k,"
    " Tensor img_v, Tensor txt_q_weight, Tensor txt_k_weight, Tensor img_q_weight, Tensor img_k_weight,"
    " Tensor txt_cos_sin, Tensor img_cos_sin, float eps=1e-06, bool interleaved=True)"
    " -> (Tensor, Tensor, Tensor)",
    "qk_norm_rope_cat_out": "(Tensor txt_q, Tensor txt_k, Tensor txt_v, Tensor img_q, Tensor img_k,"
    " Tensor img_v, Tensor txt_q_weight, Tensor txt_k_weight, Tensor img_q_weight, Tensor img_k_weight,"
    " Tensor txt_cos_sin, Tensor img_cos_sin, Tensor(a!) q_out, Tensor(b!) k_out, Tensor(c!) v_out,"
    " float eps=1e-06, bool interleaved=True) -> ()",
    "joint_qk_norm_rope_": "(Tensor(a!) q, Tensor(b!) k, SymInt txt_len, Tensor txt_q_weight,"
    " Tensor txt_k_weight, Tensor img_q_weight, Tensor img_k_weight, Tensor txt_cos_sin,"
    " Tensor img_cos_sin, float eps=1e-06, bool interleaved=True) -> ()",
    # residual + gate * update, then an affine LayerNorm of the result (weight/bias any float dtype)
    "gate_residual_layer_norm": "(Tensor residual, Tensor update, Tensor gate, Tensor? index=None,"
    " Tensor? weight=None, Tensor? bias=None, float eps=1e-06) -> (Tensor, Tensor)",
    # RMSNorm of q and k over all heads (C = heads x head_dim), then RoPE per head (no table: norm only)
    "qk_norm_rope_across_heads": "(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, Tensor? cos_sin,"
    " SymInt heads, float eps=1e-06, bool interleaved=True) -> (Tensor, Tensor)",
    # two token streams, each through its own (possibly packed) projection, written into one joint
    # [B, Lt + Li, N] buffer (the joint Q/K/V of a double-stream block without a cat)
    "joint_linear": "(Tensor txt, Tensor img, Tensor[] txt_weights, Tensor?[] txt_biases,"
    " Tensor[] img_weights, Tensor?[] img_biases) -> Tensor",
    # -- FP8 (float8_e4m3fn, row-wise scales): the norm ops above writing e4m3 values plus one fp32
    # scale per token, row quantisation, and the FP8 GEMMs they feed
    "norm_scale_shift_fp8": "(Tensor x, Tensor shift, Tensor scale, Tensor? index=None, float eps=1e-06,"
    " str norm=\"layer\") -> (Tensor, Tensor)",
    "dual_norm_scale_shift_fp8": "(Tensor x_a, Tensor shift_a, Tensor scale_a, Tensor? index_a, float eps_a,"
    " Tensor x_b, Tensor shift_b, Tensor scale_b, Tensor? index_b, float eps_b, str norm=\"layer\")"
    " -> (Tensor, Tensor, Tensor, Tensor)",
    "gate_residual_norm_scale_shift_fp8": "(Tensor residual, Tensor update, Tensor gate, Tensor shift,"
    " Tensor scale, Tensor? index=None, float eps=1e-06) -> (Tensor, Tensor, Tensor)",
    "dual_gate_residual_norm_scale_shift_fp8": "(Tensor residual_a, Tensor update_a, Tensor gate_a,"
    " Tensor shift_a, Tensor scale_a, Tensor? index_a, float eps_a, Tensor residual_b, Tensor update_b,"
    " Tensor gate_b, Tensor shift_b, Tensor scale_b, Tensor? index_b, float eps_b)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "quantize_fp8": "(Tensor x, Tensor? bias=None, str activation=\"none\") -> (Tensor, Tensor)",
    # fast_accum: torch._scaled_mm's use_fast_accum on CUDA (Hopper: the tensor-core partial sums are not
    # promoted to fp32 periodically; faster, less accurate); the CPU reference accumulates in fp32 either way
    "fp8_linear": "(Tensor x, Tensor x_scale, Tensor weight, Tensor weight_scale, Tensor? bias,"
    " ScalarType out_dtype, str activation=\"none\", bool fast_accum=False) -> Tensor",
    "joint_fp8_linear": "(Tensor txt, Tensor txt_scale, Tensor img, Tensor img_scale, Tensor txt_weight,"
    " Tensor txt_weight_scale, Tensor? txt_bias, Tensor img_weight, Tensor img_weight_scale,"
    " Tensor? img_bias, ScalarType out_dtype, bool fast_accum=False) -> Tensor",
    # one e4m3 row per token over two inputs side by side, [a | act(b)] (a single-stream block's output
    # projection input [attention | activated MLP] without the cat); act: none, gelu_tanh or swiglu
    # (silu(b[..., :F]) * b[..., F:], half of b's width); a None: act(b) alone (a SwiGLU MLP's fc2 input)
    "quantize_fp8_cat": "(Tensor? a, Tensor b, str activation_b=\"none\") -> (Tensor, Tensor)",
    # gate_residual_layer_norm with the affine LayerNorm's output quantised (a Wan block's norm2 feeding
    # the cross-attention q projection)
    "gate_residual_layer_norm_fp8": "(Tensor residual, Tensor update, Tensor gate, Tensor? index=None,"
    " Tensor? weight=None, Tensor? bias=None, float eps=1e-06) -> (Tensor, Tensor, Tensor)",
    # FP8 attention inputs (float8_e4m3fn, one fp32 descale per (batch, head)): the joint QK RMSNorm +
    # RoPE of joint_qk_norm_rope_ written as e4m3 with a static per-tensor bound (no reduction), and v
    # quantised with its per-(batch, head) amax over the tokens; then attention on them (FA3 on CUDA)
    "joint_qk_norm_rope_fp8": "(Tensor q, Tensor k, Tensor v, SymInt txt_len, Tensor txt_q_weight,"
    " Tensor txt_k_weight, Tensor img_q_weight, Tensor img_k_weight, Tensor txt_cos_sin,"
    " Tensor img_cos_sin, float eps=1e-06, bool interleaved=True)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "attention_fp8": "(Tensor q, Tensor k, Tensor v, Tensor q_descale, Tensor k_descale, Tensor v_descale,"
    " float? softmax_scale=None, bool causal=False, ScalarType out_dtype=bfloat16) -> Tensor",
    # x [B, N, H, D] as e4m3 with one fp32 descale per (batch, head): its amax over N and D / 448
    # (q, k or v of an attention whose QK norm is not per head, e.g. Wan's across all heads)
    "quantize_fp8_heads": "(Tensor x) -> (Tensor, Tensor)",
    # -- MLP -----------------------------------------------------------------------------
    # y = x @ weight.T (+ bias) over [2F, K] weights; out = silu(y[..., :F]) * y[..., F:] ([.., F]);
    # backend "triton" (the GEMM with the SwiGLU epilogue) or "cublas" (GEMM, then the elementwise kernel)
    "swiglu_linear": "(Tensor x, Tensor weight, Tensor? bias=None, str? backend=None) -> Tensor",
    # -- attention ---------------------------------------------------------------------
    "attention": "(Tensor q, Tensor k, Tensor v, float? softmax_scale=None, bool causal=False,"
    " str? backend=None) -> Tensor",
}
# Private ops: the C++ kernels of fused_dit_ops._C (csrc/), registered for CUDA only. The public op's
# CUDA implementation runs the Python input checks (FusedDitInputError, the same message eagerly
# and while tracing) and then calls them; never called directly, never traced (no fake).
PRIVATE_CPP = {"gate_residual": "_gate_residual_cuda", "joint_qkv_cat": "_joint_qkv_cat_cuda",
               "joint_qkv_cat_out": "_joint_qkv_cat_out_cuda"}
for _public, _private in PRIVATE_CPP.items():
    SCHEMAS[_private] = SCHEMAS[_public]

_lib = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)


def qualname(name: str) -> str:
    return f"{NAMESPACE}::{name}"
