// gate_residual kernel, free of torch headers so it can be compile-checked on its own.
//   out[b, l, :] = residual[b, l, :] + gate_sel[b, l, :] * update[b, l, :]
// gate_sel is gate row b, or row b + B when index[b, l] != 0 (zero_cond_t's per-token select).
// One block row of threads per token row: the row's parameter row is resolved once, then the
// threads stride over the row in 16-byte vectors (VEC elements), math in fp32, one rounding.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fused_dit {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

struct GateResidualParams {
  const void* residual;
  const void* update;
  const void* gate;
  const void* index;  // nullptr when there is no index
  void* out;
  int64_t B, L, C;
  int64_t res_sb, res_sl;    // residual strides (elements) for batch, token
  int64_t upd_sb, upd_sl;    // update strides
  int64_t gate_sr;           // gate row stride
  int64_t idx_sb, idx_sl;    // index strides
};

// Output lines are marked evict-first (st.global.cs): nothing re-reads them in this kernel, and
// streaming stores took the Triton kernels of this package 1-3% closer to the copy bandwidth.
template <typename V>
__device__ __forceinline__ void store_streaming(V* dst, const V& v) {
  if constexpr (sizeof(V) == 16) {
    __stcs(reinterpret_cast<int4*>(dst), *reinterpret_cast<const int4*>(&v));
  } else if constexpr (sizeof(V) == 8) {
    __stcs(reinterpret_cast<int2*>(dst), *reinterpret_cast<const int2*>(&v));
  } else if constexpr (sizeof(V) == 4) {
    __stcs(reinterpret_cast<int*>(dst), *reinterpret_cast<const int*>(&v));
  } else {
    *dst = v;
  }
}

// blockDim = (threads_x, rows_per_block); gridDim.x = ceil(B * L / rows_per_block).
// Each thread issues kUnroll independent 16-byte loads of each input before any math, so a
// row of C = 3072 bf16 (384 vectors) is read by 96 threads in one sweep, all loads in flight.
constexpr int kUnroll = 4;

template <typename T, int VEC, typename IndexT>
__global__ void gate_residual_kernel(GateResidualParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= p.B * p.L) return;
  const int64_t b = row / p.L;
  const int64_t l = row - b * p.L;
  int64_t prow = b;
  if (p.index != nullptr) {
    const IndexT sel = static_cast<const IndexT*>(p.index)[b * p.idx_sb + l * p.idx_sl];
    prow += (sel != 0) ? p.B : 0;
  }
  using V = Vec<T, VEC>;
  const V* __restrict__ res = reinterpret_cast<const V*>(static_cast<const T*>(p.residual) + b * p.res_sb + l * p.res_sl);
  const V* __restrict__ upd = reinterpret_cast<const V*>(static_cast<const T*>(p.update) + b * p.upd_sb + l * p.upd_sl);
  const V* __restrict__ gate = reinterpret_cast<const V*>(static_cast<const T*>(p.gate) + prow * p.gate_sr);
  V* __restrict__ out = reinterpret_cast<V*>(static_cast<T*>(p.out) + row * p.C);
  const int64_t nvec = p.C / VEC;
  for (int64_t base = threadIdx.x; base < nvec; base += static_cast<int64_t>(blockDim.x) * kUnroll) {
    V r[kUnroll], u[kUnroll], g[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t i = base + static_cast<int64_t>(j) * blockDim.x;
      if (i < nvec) {
        r[j] = res[i];
        u[j] = upd[i];
        g[j] = gate[i];  // the parameter row is shared by every token: L1/L2 hits
      }
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t i = base + static_cast<int64_t>(j) * blockDim.x;
      if (i < nvec) {
        V o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          o.v[k] = from_float<T>(fmaf(to_float<T>(g[j].v[k]), to_float<T>(u[j].v[k]), to_float<T>(r[j].v[k])));
        }
        store_streaming(out + i, o);
      }
    }
  }
}

}  // namespace fused_dit
