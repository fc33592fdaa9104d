// torch binding of gate_residual: the private fused_dit::_gate_residual_cuda (TORCH_LIBRARY_IMPL),
// which fused_dit::gate_residual's CUDA implementation calls after the Python input checks
// (argument-naming FusedDitInputError). The TORCH_CHECKs here only keep a direct call of the
// private op from ever reading out of bounds.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>

#include "gate_residual_kernel.cuh"

namespace fused_dit {
namespace {

template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };
template <> struct CudaType<at::Half> { using type = __half; };

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int VEC, typename IndexT>
void launch(const GateResidualParams& p, cudaStream_t stream) {
  const int64_t nvec = p.C / VEC;
  // One sweep of kUnroll vectors per thread covers the row; whole warps; ~256 threads a block.
  const int64_t per_thread = (nvec + kUnroll - 1) / kUnroll;
  int threads_x = static_cast<int>(std::min<int64_t>(1024, ((per_thread + 31) / 32) * 32));
  const int rows_per_block = std::max(1, 256 / threads_x);
  const int64_t rows = p.B * p.L;
  const dim3 block(threads_x, rows_per_block);
  const dim3 grid(static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block));
  gate_residual_kernel<T, VEC, IndexT><<<grid, block, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename IndexT>
void dispatch_vec(const GateResidualParams& p, bool vec_ok, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (vec_ok) launch<T, kVec, IndexT>(p, stream);
  else launch<T, 1, IndexT>(p, stream);
}

void check_act(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), "fused_dit.gate_residual: '", name,
              "' must be on ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 3 && t.sizes() == ref.sizes(), "fused_dit.gate_residual: '", name,
              "' must have shape ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fused_dit.gate_residual: '", name,
              "' must have dtype ", ref.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.stride(2) == 1, "fused_dit.gate_residual: '", name,
              "' must have a contiguous last dimension, got strides ", t.strides());
}

at::Tensor gate_residual_cuda(const at::Tensor& residual, const at::Tensor& update, const at::Tensor& gate,
                              const std::optional<at::Tensor>& index) {
  TORCH_CHECK(residual.is_cuda() && residual.dim() == 3, "fused_dit.gate_residual: 'residual' must be a 3-D CUDA tensor");
  TORCH_CHECK(residual.stride(2) == 1, "fused_dit.gate_residual: 'residual' must have a contiguous last dimension");
  const int64_t B = residual.size(0), L = residual.size(1), C = residual.size(2);
  TORCH_CHECK(C % 8 == 0, "fused_dit.gate_residual: C must be a multiple of 8, got ", C);
  check_act(update, "update", residual);
  const bool has_index = index.has_value();
  TORCH_CHECK(gate.device() == residual.device() && gate.scalar_type() == residual.scalar_type() &&
                  gate.dim() == 2 && gate.size(0) == (has_index ? 2 * B : B) && gate.size(1) == C &&
                  gate.stride(1) == 1,
              "fused_dit.gate_residual: 'gate' must be [", has_index ? 2 * B : B, ", ", C,
              "] with a contiguous last dim, dtype and device of 'residual'; got ", gate.sizes());
  if (has_index) {
    const auto& idx = *index;
    TORCH_CHECK(idx.device() == residual.device() && idx.dim() == 2 && idx.size(0) == B && idx.size(1) == L &&
                    (idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong),
                "fused_dit.gate_residual: 'index' must be an int32/int64 [", B, ", ", L, "] tensor on ",
                residual.device());
  }

  c10::cuda::CUDAGuard guard(residual.device());
  auto out = at::empty({B, L, C}, residual.options());
  if (out.numel() == 0) return out;

  GateResidualParams p;
  p.residual = residual.data_ptr();
  p.update = update.data_ptr();
  p.gate = gate.data_ptr();
  p.index = has_index ? index->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.B = B; p.L = L; p.C = C;
  p.res_sb = residual.stride(0); p.res_sl = residual.stride(1);
  p.upd_sb = update.stride(0); p.upd_sl = update.stride(1);
  p.gate_sr = gate.stride(0);
  p.idx_sb = has_index ? index->stride(0) : 0;
  p.idx_sl = has_index ? index->stride(1) : 0;

  const int64_t vec = 16 / residual.element_size();
  const bool vec_ok = aligned16(p.residual) && aligned16(p.update) && aligned16(p.gate) &&
                      p.res_sb % vec == 0 && p.res_sl % vec == 0 && p.upd_sb % vec == 0 &&
                      p.upd_sl % vec == 0 && p.gate_sr % vec == 0 && C % vec == 0;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool idx64 = has_index && index->scalar_type() == at::kLong;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual.scalar_type(), "gate_residual", [&] {
    using T = typename CudaType<scalar_t>::type;
    if constexpr (!std::is_same_v<T, double>) {
      if (idx64) dispatch_vec<T, int64_t>(p, vec_ok, stream);
      else dispatch_vec<T, int32_t>(p, vec_ok, stream);
    } else {
      TORCH_CHECK(false, "fused_dit.gate_residual: float64 is not supported on CUDA");
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_dit, CUDA, m) {
  m.impl("_gate_residual_cuda", &gate_residual_cuda);
}

}  // namespace fused_dit
