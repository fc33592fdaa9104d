// joint_qkv_cat kernel, free of torch headers so it can be compile-checked on its own.
//   out_j[b, t, h, :] = t < Lt ? txt_j[b, t, h, :] : img_j[b, t - Lt, h, :]   for j in {q, k, v}
// A bit-exact copy: elements are moved as raw bytes (ELT = 1, 2, 4 or 8 bytes), so any dtype works.
// Every tensor has its own batch/token/head strides (in elements; the last dim is contiguous), so a
// V that is a chunk of packed QKV (token stride 3*H*D) is read in place, never made contiguous.
// Grid: x = ceil(B * N / blockDim.y) token rows, y = 3 (q, k, v); blockDim = (threads_x, rows).
// A row is H*D elements in H head segments; threads stride over it in 16-byte vectors where the
// tensor's pointers and strides allow it (decided per tensor on the host), else element by element.
// Each thread issues UNROLL independent loads before its stores, to keep enough bytes in flight.
#pragma once
#include <cstdint>

namespace fused_dit {

struct JointCatTensor {
  const void* txt;
  const void* img;
  void* out;
  int64_t txt_sb, txt_sl, txt_sh;  // strides in elements
  int64_t img_sb, img_sl, img_sh;
  int64_t out_sb, out_sl, out_sh;
  int vec_ok;                      // 16-byte aligned pointers and strides, D % (16 / ELT) == 0
};

struct JointCatParams {
  JointCatTensor t[3];
  int64_t B, Lt, Li;
  int32_t H, D;
};

template <int ELT> struct EltType;
template <> struct EltType<1> { using type = uint8_t; };
template <> struct EltType<2> { using type = uint16_t; };
template <> struct EltType<4> { using type = uint32_t; };
template <> struct EltType<8> { using type = uint64_t; };

// Copy one row of H segments of D / VEC units of type U (U = uint4 for 16-byte vectors).
template <typename U, int UNROLL>
__device__ __forceinline__ void copy_row(const char* __restrict__ src, int64_t src_sh_bytes,
                                         char* __restrict__ dst, int64_t dst_sh_bytes,
                                         int32_t units_per_head, int32_t total_units) {
  for (int32_t base = threadIdx.x; base < total_units; base += UNROLL * blockDim.x) {
    U r[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int32_t i = base + u * static_cast<int32_t>(blockDim.x);
      if (i < total_units) {
        const int32_t h = i / units_per_head;
        const int32_t c = i - h * units_per_head;
        r[u] = *reinterpret_cast<const U*>(src + h * src_sh_bytes + static_cast<int64_t>(c) * sizeof(U));
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int32_t i = base + u * static_cast<int32_t>(blockDim.x);
      if (i < total_units) {
        const int32_t h = i / units_per_head;
        const int32_t c = i - h * units_per_head;
        *reinterpret_cast<U*>(dst + h * dst_sh_bytes + static_cast<int64_t>(c) * sizeof(U)) = r[u];
      }
    }
  }
}

template <int ELT, int UNROLL>
__global__ void joint_qkv_cat_kernel(const JointCatParams p) {
  const int64_t N = p.Lt + p.Li;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= p.B * N) return;
  // Select the tensor without indexing the parameter array dynamically (keeps it in param space).
  const JointCatTensor& T = blockIdx.y == 0 ? p.t[0] : (blockIdx.y == 1 ? p.t[1] : p.t[2]);
  const int64_t b = row / N;
  const int64_t tok = row - b * N;
  const char* src;
  int64_t src_sh;
  if (tok < p.Lt) {
    src = static_cast<const char*>(T.txt) + (b * T.txt_sb + tok * T.txt_sl) * ELT;
    src_sh = T.txt_sh * ELT;
  } else {
    src = static_cast<const char*>(T.img) + (b * T.img_sb + (tok - p.Lt) * T.img_sl) * ELT;
    src_sh = T.img_sh * ELT;
  }
  char* dst = static_cast<char*>(T.out) + (b * T.out_sb + tok * T.out_sl) * ELT;
  const int64_t dst_sh = T.out_sh * ELT;
  if (T.vec_ok) {
    constexpr int VEC = 16 / ELT;
    const int32_t units = p.D / VEC;
    copy_row<uint4, UNROLL>(src, src_sh, dst, dst_sh, units, units * p.H);
  } else {
    copy_row<typename EltType<ELT>::type, UNROLL>(src, src_sh, dst, dst_sh, p.D, p.D * p.H);
  }
}

}  // namespace fused_dit
