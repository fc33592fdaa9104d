// fused_dit::linear_gate_residual on CUDA: out = residual + gate_sel * (x @ weight^T + bias) as ONE
// cuBLASLt matmul per (sample, gate segment). The gated residual rides in the GEMM epilogue:
//   alpha = gate row (a per-output-channel fp32 vector, CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST),
//   beta  = 1 with C = residual, bias = gate * bias (cuBLASLt adds the bias after the alpha scaling),
// so the projection output is never written to memory and read back by a separate gate-residual pass
// (saves one write + one read of an [L, N] activation per call, e.g. ~34 us at 8192 x 3072 bf16).
// The zero_cond_t index [0]*s + [1]*(L-s) selects a gate per contiguous row segment, so each segment
// is its own matmul with its own alpha vector; the split points come from the host (no sync).
//
// bf16/fp16 only on this path; fp32, and shapes for which cuBLASLt offers no algorithm (warned once),
// run at::addmm + at::addcmul_out per segment (same result, one more pass).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <tuple>
#include <vector>

namespace fused_dit {
namespace {

constexpr const char* kOp = "fused_dit.linear_gate_residual";
constexpr size_t kWorkspaceBytes = 32u << 20;  // cuBLASLt workspace (stream-K / split-K kernels)

#define FDO_LT_CHECK(expr)                                                                        \
  do {                                                                                            \
    cublasStatus_t st_ = (expr);                                                                  \
    TORCH_CHECK(st_ == CUBLAS_STATUS_SUCCESS, kOp, ": ", #expr, " failed: ",                      \
                cublasLtGetStatusString(st_));                                                    \
  } while (0)

// alpha[g, n] = gate[g, n] and beff[g, n] = gate[g, n] * bias[n], in fp32 (cuBLASLt's scale type).
template <typename T>
__global__ void gate_prep_kernel(const T* __restrict__ gate, int64_t gate_sr, const T* __restrict__ bias,
                                 int64_t G, int64_t N, float* __restrict__ alpha, float* __restrict__ beff) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= G * N) return;
  const int64_t g = i / N, n = i - g * N;
  const float a = static_cast<float>(gate[g * gate_sr + n]);
  alpha[i] = a;
  if (bias != nullptr) beff[i] = a * static_cast<float>(bias[n]);
}

int alignment_bytes(const void* p) {
  const auto v = reinterpret_cast<uintptr_t>(p);
  int a = 256;
  while (a > 1 && v % a) a >>= 1;
  return a;
}

// Everything that decides which cuBLASLt algorithm fits (the heuristic is cached per key; creating
// descriptors is cheap, asking the heuristic is not).
using AlgoKey = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, int, int, int, int, int>;

struct AlgoEntry {
  bool ok = false;
  cublasLtMatmulAlgo_t algo{};
};

std::mutex g_algo_mutex;
std::map<AlgoKey, AlgoEntry> g_algos;

struct LtDescs {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtDescs() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

// D[N, rows] (column-major view of the row-major [rows, N] output) =
//   alpha .* (W[N, K] x X^T[K, rows]) + 1 * C + beff.
// Returns false when cuBLASLt has no algorithm for it.
bool lt_matmul(cudaDataType_t dt, int64_t N, int64_t rows, int64_t K, const void* w, int64_t ldw, const void* x,
               int64_t ldx, const void* c, int64_t ldc, void* d, int64_t ldd, const float* alpha, const float* beff,
               void* workspace, cudaStream_t stream) {
  LtDescs s;
  FDO_LT_CHECK(cublasLtMatmulDescCreate(&s.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  FDO_LT_CHECK(cublasLtMatmulDescSetAttribute(s.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  FDO_LT_CHECK(cublasLtMatmulDescSetAttribute(s.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  const int32_t pm = CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST;
  FDO_LT_CHECK(cublasLtMatmulDescSetAttribute(s.op, CUBLASLT_MATMUL_DESC_POINTER_MODE, &pm, sizeof(pm)));
  if (beff != nullptr) {
    const cublasLtEpilogue_t ep = CUBLASLT_EPILOGUE_BIAS;
    FDO_LT_CHECK(cublasLtMatmulDescSetAttribute(s.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof(ep)));
    FDO_LT_CHECK(cublasLtMatmulDescSetAttribute(s.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &beff, sizeof(beff)));
    const int32_t bt = CUDA_R_32F;
    FDO_LT_CHECK(cublasLtMatmulDescSetAttribute(s.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof(bt)));
  }
  FDO_LT_CHECK(cublasLtMatrixLayoutCreate(&s.a, dt, K, N, ldw));
  FDO_LT_CHECK(cublasLtMatrixLayoutCreate(&s.b, dt, K, rows, ldx));
  FDO_LT_CHECK(cublasLtMatrixLayoutCreate(&s.c, dt, N, rows, ldc));
  FDO_LT_CHECK(cublasLtMatrixLayoutCreate(&s.d, dt, N, rows, ldd));

  const int al_a = alignment_bytes(w), al_b = alignment_bytes(x), al_c = alignment_bytes(c),
            al_d = alignment_bytes(d), al_bias = beff ? alignment_bytes(beff) : 256;
  const AlgoKey key{static_cast<int>(dt), N, rows, K, ldw, ldx, ldc * 1000003 + ldd, beff != nullptr,
                    al_a, al_b, al_c, al_d, al_bias};
  AlgoEntry entry;
  bool cached = false;
  {
    std::lock_guard<std::mutex> lock(g_algo_mutex);
    auto it = g_algos.find(key);
    if (it != g_algos.end()) {
      entry = it->second;
      cached = true;
    }
  }
  if (!cached) {
    FDO_LT_CHECK(cublasLtMatmulPreferenceCreate(&s.pref));
    const uint64_t ws = kWorkspaceBytes;
    FDO_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(s.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    const uint32_t aa = al_a, ab = al_b, ac = al_c, ad = al_d;
    FDO_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(s.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aa, sizeof(aa)));
    FDO_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(s.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab, sizeof(ab)));
    FDO_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(s.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ac, sizeof(ac)));
    FDO_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(s.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ad, sizeof(ad)));
    cublasLtMatmulHeuristicResult_t res{};
    int found = 0;
    cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
    const cublasStatus_t st =
        cublasLtMatmulAlgoGetHeuristic(handle, s.op, s.a, s.b, s.c, s.d, s.pref, 1, &res, &found);
    entry.ok = st == CUBLAS_STATUS_SUCCESS && found > 0;
    if (entry.ok) entry.algo = res.algo;
    std::lock_guard<std::mutex> lock(g_algo_mutex);
    g_algos[key] = entry;
  }
  if (!entry.ok) return false;
  const float beta = 1.0f;
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  FDO_LT_CHECK(cublasLtMatmul(handle, s.op, alpha, w, s.a, x, s.b, &beta, c, s.c, d, s.d, &entry.algo, workspace,
                              kWorkspaceBytes, stream));
  return true;
}

void check_2d(const at::Tensor& t, const char* name, const at::Tensor& ref, int64_t r, int64_t c) {
  TORCH_CHECK(t.device() == ref.device() && t.scalar_type() == ref.scalar_type(), kOp, ": '", name,
              "' must have the device and dtype of 'x'");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == r && t.size(1) == c && (c <= 1 || t.stride(1) == 1), kOp, ": '",
              name, "' must be [", r, ", ", c, "] with a contiguous last dim, got ", t.sizes(), " strides ",
              t.strides());
}

at::Tensor linear_gate_residual_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                     const at::Tensor& residual, const at::Tensor& gate,
                                     at::OptionalIntArrayRef index_split) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 3 && (x.size(2) <= 1 || x.stride(2) == 1), kOp,
              ": 'x' must be a 3-D CUDA tensor with a contiguous last dim");
  const int64_t B = x.size(0), L = x.size(1), K = x.size(2);
  const int64_t N = weight.size(0);
  check_2d(weight, "weight", x, N, K);
  TORCH_CHECK(residual.device() == x.device() && residual.scalar_type() == x.scalar_type() && residual.dim() == 3 &&
                  residual.size(0) == B && residual.size(1) == L && residual.size(2) == N &&
                  (N <= 1 || residual.stride(2) == 1),
              kOp, ": 'residual' must be [", B, ", ", L, ", ", N, "] with a contiguous last dim, got ", residual.sizes());
  const bool split = index_split.has_value();
  check_2d(gate, "gate", x, split ? 2 * B : B, N);
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == x.scalar_type() && bias->dim() == 1 &&
                    bias->size(0) == N && (N <= 1 || bias->stride(0) == 1),
                kOp, ": 'bias' must be a contiguous [", N, "] tensor of the dtype and device of 'x'");
  }
  std::vector<int64_t> splits(B, L);
  if (split) {
    TORCH_CHECK(static_cast<int64_t>(index_split->size()) == B, kOp, ": 'index_split' must have B = ", B,
                " entries, got ", index_split->size());
    for (int64_t b = 0; b < B; ++b) {
      splits[b] = (*index_split)[b];
      TORCH_CHECK(splits[b] >= 0 && splits[b] <= L, kOp, ": 'index_split' entries must lie in [0, L = ", L,
                  "], got ", splits[b]);
    }
  }

  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({B, L, N}, residual.options());
  if (out.numel() == 0) return out;
  // (sample, gate row, first row, row count) of every matmul
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> segs;
  for (int64_t b = 0; b < B; ++b) {
    if (splits[b] > 0) segs.emplace_back(b, b, 0, splits[b]);
    if (split && splits[b] < L) segs.emplace_back(b, B + b, splits[b], L - splits[b]);
  }
  const auto dtype = x.scalar_type();
  at::Tensor y;  // composite path: GEMM, then one fused elementwise pass per segment (fp32 math in addcmul)
  auto composite = [&](int64_t b, int64_t g, int64_t r0, int64_t n) {
    if (!y.defined()) y = at::linear(x, weight, bias);
    auto rows = [&](const at::Tensor& t) { return t.select(0, b).narrow(0, r0, n); };
    auto o = rows(out);
    at::addcmul_out(o, rows(residual), rows(y), gate.select(0, g));
  };
  const bool lt_dtype = dtype == at::kBFloat16 || dtype == at::kHalf;
  const int64_t es = x.element_size();
  const bool lt_shape = K % 8 == 0 && N % 8 == 0 && x.stride(1) % 8 == 0 && residual.stride(1) % 8 == 0 &&
                        weight.stride(0) % 8 == 0 && (B == 1 || (x.stride(0) % 8 == 0 && residual.stride(0) % 8 == 0));
  if (!lt_dtype || !lt_shape || K == 0) {
    for (auto& [b, g, r0, n] : segs) composite(b, g, r0, n);
    return out;
  }
  const int64_t G = gate.size(0);
  auto alpha = at::empty({G, N}, x.options().dtype(at::kFloat));
  auto beff = bias.has_value() ? at::empty({G, N}, x.options().dtype(at::kFloat)) : at::Tensor();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  {
    const int threads = 256;
    const int64_t total = G * N;
    const dim3 grid(static_cast<unsigned>((total + threads - 1) / threads));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "linear_gate_residual_prep", [&] {
      gate_prep_kernel<scalar_t><<<grid, threads, 0, stream>>>(
          gate.data_ptr<scalar_t>(), gate.stride(0), bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, G, N,
          alpha.data_ptr<float>(), bias.has_value() ? beff.data_ptr<float>() : nullptr);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto workspace = at::empty({static_cast<int64_t>(kWorkspaceBytes)}, x.options().dtype(at::kByte));
  const cudaDataType_t dt = dtype == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  const char* xp = static_cast<const char*>(x.data_ptr());
  const char* rp = static_cast<const char*>(residual.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  for (const auto& [b, g, r0, n] : segs) {
    const bool ok = lt_matmul(dt, N, n, K, weight.data_ptr(), weight.stride(0),
                              xp + (b * x.stride(0) + r0 * x.stride(1)) * es, x.stride(1),
                              rp + (b * residual.stride(0) + r0 * residual.stride(1)) * es, residual.stride(1),
                              op + (b * out.stride(0) + r0 * out.stride(1)) * es, out.stride(1),
                              alpha.data_ptr<float>() + g * N,
                              bias.has_value() ? beff.data_ptr<float>() + g * N : nullptr,
                              workspace.data_ptr(), stream);
    if (!ok) {
      TORCH_WARN_ONCE(kOp, ": cuBLASLt offers no algorithm with the gated-residual epilogue for N=", N,
                      " K=", K, " rows=", n, " (", dtype, "); that segment runs GEMM + a separate gate-residual pass");
      composite(b, g, r0, n);
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_dit, CUDA, m) {
  m.impl("linear_gate_residual", &linear_gate_residual_cuda);
}

}  // namespace fused_dit
