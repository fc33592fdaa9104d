// torch binding of joint_qkv_cat / joint_qkv_cat_out: the private fused_dit::_joint_qkv_cat_cuda /
// _joint_qkv_cat_out_cuda (TORCH_LIBRARY_IMPL), which the public ops' CUDA implementations call
// after the Python input checks (argument-naming FusedDitInputError). The TORCH_CHECKs here only
// keep a direct call of the private ops from ever reading or writing out of bounds.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <tuple>

#include "joint_qkv_cat_kernel.cuh"

namespace fused_dit {
namespace {

constexpr const char* kOp = "fused_dit.joint_qkv_cat";

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void check_heads(const at::Tensor& t, const char* name, const at::Tensor& ref, int64_t L) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), kOp, ": '", name, "' must be on ", ref.device(),
              ", got ", t.device());
  TORCH_CHECK(t.dim() == 4, kOp, ": '", name, "' must be 4-D [B, L, H, D], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), kOp, ": '", name, "' must have dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.size(0) == ref.size(0) && t.size(1) == L && t.size(2) == ref.size(2) && t.size(3) == ref.size(3),
              kOp, ": '", name, "' must have shape [", ref.size(0), ", ", L, ", ", ref.size(2), ", ",
              ref.size(3), "], got ", t.sizes());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, kOp, ": '", name,
              "' must have a contiguous last dimension, got strides ", t.strides());
}

void fill(JointCatTensor& T, const at::Tensor& txt, const at::Tensor& img, const at::Tensor& out, int64_t vec) {
  T.txt = txt.data_ptr();
  T.img = img.data_ptr();
  T.out = out.data_ptr();
  T.txt_sb = txt.stride(0); T.txt_sl = txt.stride(1); T.txt_sh = txt.stride(2);
  T.img_sb = img.stride(0); T.img_sl = img.stride(1); T.img_sh = img.stride(2);
  T.out_sb = out.stride(0); T.out_sl = out.stride(1); T.out_sh = out.stride(2);
  bool ok = aligned16(T.txt) && aligned16(T.img) && aligned16(T.out) && txt.size(3) % vec == 0;
  for (int64_t s : {T.txt_sb, T.txt_sl, T.txt_sh, T.img_sb, T.img_sl, T.img_sh, T.out_sb, T.out_sl, T.out_sh})
    ok = ok && (s % vec == 0);
  T.vec_ok = ok ? 1 : 0;
}

template <int ELT>
void launch_elt(const JointCatParams& p, cudaStream_t stream) {
  constexpr int kUnroll = 4;
  const int64_t N = p.Lt + p.Li;
  const int64_t rows = p.B * N;
  // Threads along a row: enough for its 16-byte units in about one unrolled sweep.
  const int64_t units = static_cast<int64_t>(p.H) * p.D * ELT / 16;
  int threads_x = 32;
  while (threads_x < 256 && threads_x * kUnroll < units) threads_x *= 2;
  const int rows_per_block = 256 / threads_x;
  const dim3 block(threads_x, rows_per_block);
  const dim3 grid(static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block), 3);
  joint_qkv_cat_kernel<ELT, kUnroll><<<grid, block, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run(const at::Tensor& tq, const at::Tensor& tk, const at::Tensor& tv, const at::Tensor& iq,
         const at::Tensor& ik, const at::Tensor& iv, const at::Tensor& oq, const at::Tensor& ok,
         const at::Tensor& ov) {
  const int64_t Lt = tq.size(1), Li = iq.size(1);
  if (oq.numel() == 0) return;
  const int64_t esize = tq.element_size();
  TORCH_CHECK(esize == 1 || esize == 2 || esize == 4 || esize == 8, kOp, ": unsupported element size ", esize);
  TORCH_CHECK(tq.size(2) * tq.size(3) < (int64_t(1) << 31), kOp, ": H * D must fit in int32");
  JointCatParams p;
  const int64_t vec = 16 / esize;
  fill(p.t[0], tq, iq, oq, vec);
  fill(p.t[1], tk, ik, ok, vec);
  fill(p.t[2], tv, iv, ov, vec);
  p.B = tq.size(0); p.Lt = Lt; p.Li = Li;
  p.H = static_cast<int32_t>(tq.size(2)); p.D = static_cast<int32_t>(tq.size(3));
  c10::cuda::CUDAGuard guard(tq.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (esize) {
    case 1: launch_elt<1>(p, stream); break;
    case 2: launch_elt<2>(p, stream); break;
    case 4: launch_elt<4>(p, stream); break;
    default: launch_elt<8>(p, stream); break;
  }
}

void check_inputs(const at::Tensor& tq, const at::Tensor& tk, const at::Tensor& tv, const at::Tensor& iq,
                  const at::Tensor& ik, const at::Tensor& iv) {
  TORCH_CHECK(tq.is_cuda() && tq.dim() == 4, kOp, ": 'txt_q' must be a 4-D [B, L, H, D] CUDA tensor, got ",
              tq.sizes(), " on ", tq.device());
  check_heads(tq, "txt_q", tq, tq.size(1));
  check_heads(tk, "txt_k", tq, tq.size(1));
  check_heads(tv, "txt_v", tq, tq.size(1));
  TORCH_CHECK(iq.dim() == 4, kOp, ": 'img_q' must be 4-D [B, L, H, D], got ", iq.sizes());
  check_heads(iq, "img_q", tq, iq.size(1));
  check_heads(ik, "img_k", tq, iq.size(1));
  check_heads(iv, "img_v", tq, iq.size(1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> joint_qkv_cat_cuda(
    const at::Tensor& tq, const at::Tensor& tk, const at::Tensor& tv, const at::Tensor& iq,
    const at::Tensor& ik, const at::Tensor& iv) {
  check_inputs(tq, tk, tv, iq, ik, iv);
  const int64_t N = tq.size(1) + iq.size(1);
  auto opts = tq.options();
  auto oq = at::empty({tq.size(0), N, tq.size(2), tq.size(3)}, opts);
  auto ok = at::empty_like(oq);
  auto ov = at::empty_like(oq);
  run(tq, tk, tv, iq, ik, iv, oq, ok, ov);
  return {oq, ok, ov};
}

void joint_qkv_cat_out_cuda(const at::Tensor& tq, const at::Tensor& tk, const at::Tensor& tv,
                            const at::Tensor& iq, const at::Tensor& ik, const at::Tensor& iv,
                            const at::Tensor& oq, const at::Tensor& ok, const at::Tensor& ov) {
  check_inputs(tq, tk, tv, iq, ik, iv);
  const int64_t N = tq.size(1) + iq.size(1);
  check_heads(oq, "q_out", tq, N);
  check_heads(ok, "k_out", tq, N);
  check_heads(ov, "v_out", tq, N);
  run(tq, tk, tv, iq, ik, iv, oq, ok, ov);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_dit, CUDA, m) {
  m.impl("_joint_qkv_cat_cuda", &joint_qkv_cat_cuda);
  m.impl("_joint_qkv_cat_out_cuda", &joint_qkv_cat_out_cuda);
}

}  // namespace fused_dit
