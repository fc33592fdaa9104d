// GPU experiment (JIT-built by tools/cublaslt_probe.py, not part of the package):
//  - heur_count: how many cuBLASLt algorithms the heuristic offers for a bf16 GEMM with a given
//    pointer mode / epilogue / beta (is the gate-as-alpha-vector epilogue available on this GPU?);
//  - tune: time the top-N heuristic algorithms of out = x @ w^T (+bias, optional GELU) one by one.
// Uses its own cuBLASLt handle and workspace.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>

#include <vector>

namespace {

#define CK(expr)                                                                                   \
  do {                                                                                             \
    cublasStatus_t s_ = (expr);                                                                    \
    TORCH_CHECK(s_ == CUBLAS_STATUS_SUCCESS, #expr, ": ", cublasLtGetStatusString(s_));            \
  } while (0)

cublasLtHandle_t handle() {
  static cublasLtHandle_t h = [] {
    cublasLtHandle_t x;
    CK(cublasLtCreate(&x));
    return x;
  }();
  return h;
}

constexpr size_t kWs = 32u << 20;

struct Problem {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  // D[N, rows] = W[N, K] . X^T ; W row-major [N, K] (ld K), X row-major [rows, K] (ld K)
  Problem(int64_t N, int64_t rows, int64_t K, int pointer_mode, int epilogue, const void* bias, int bias_type) {
    CK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    int32_t pm = pointer_mode;
    CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_POINTER_MODE, &pm, sizeof(pm)));
    if (epilogue != CUBLASLT_EPILOGUE_DEFAULT) {
      cublasLtEpilogue_t ep = static_cast<cublasLtEpilogue_t>(epilogue);
      CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof(ep)));
      CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
      if (bias_type >= 0) {
        int32_t bt = bias_type;
        CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof(bt)));
      }
    }
    CK(cublasLtMatrixLayoutCreate(&a, CUDA_R_16BF, K, N, K));
    CK(cublasLtMatrixLayoutCreate(&b, CUDA_R_16BF, K, rows, K));
    CK(cublasLtMatrixLayoutCreate(&c, CUDA_R_16BF, N, rows, N));
    CK(cublasLtMatrixLayoutCreate(&d, CUDA_R_16BF, N, rows, N));
    CK(cublasLtMatmulPreferenceCreate(&pref));
    uint64_t ws = kWs;
    CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  }
  ~Problem() {
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(d);
    cublasLtMatrixLayoutDestroy(c);
    cublasLtMatrixLayoutDestroy(b);
    cublasLtMatrixLayoutDestroy(a);
    cublasLtMatmulDescDestroy(op);
  }
  std::vector<cublasLtMatmulHeuristicResult_t> heuristics(int n) {
    std::vector<cublasLtMatmulHeuristicResult_t> r(n);
    int found = 0;
    cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(handle(), op, a, b, c, d, pref, n, r.data(), &found);
    if (s != CUBLAS_STATUS_SUCCESS) found = 0;
    r.resize(found);
    return r;
  }
};

int64_t heur_count(int64_t N, int64_t rows, int64_t K, int64_t pointer_mode, int64_t epilogue, int64_t bias_type,
                   at::Tensor dummy_bias) {
  Problem p(N, rows, K, pointer_mode, epilogue, dummy_bias.data_ptr(), bias_type);
  return static_cast<int64_t>(p.heuristics(64).size());
}

// Times the first `topn` heuristic algorithms; returns [us per call] (-1: failed) per algorithm.
// Optional alpha_vec (fp32 [N], pointer mode ALPHA_DEVICE_VECTOR_BETA_HOST) and residual (beta = 1).
std::vector<double> tune(at::Tensor x, at::Tensor w, std::optional<at::Tensor> bias, int64_t epilogue, int64_t topn,
                         int64_t iters, at::Tensor out, std::optional<at::Tensor> alpha_vec,
                         std::optional<at::Tensor> residual, int64_t pick) {
  c10::cuda::CUDAGuard g(x.device());
  const int64_t rows = x.size(0), K = x.size(1), N = w.size(0);
  const bool vec = alpha_vec.has_value();
  const int pm = vec ? CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST : CUBLASLT_POINTER_MODE_HOST;
  const void* bp = bias.has_value() ? bias->data_ptr() : nullptr;
  const int bt = (bias.has_value() && bias->scalar_type() == at::kFloat) ? CUDA_R_32F : -1;
  Problem p(N, rows, K, pm, bias.has_value() ? epilogue : CUBLASLT_EPILOGUE_DEFAULT, bp, bt);
  auto hs = p.heuristics(static_cast<int>(topn));
  auto ws = at::empty({static_cast<int64_t>(kWs)}, x.options().dtype(at::kByte));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const float one = 1.f, zero = 0.f;
  const void* alpha = vec ? alpha_vec->data_ptr() : static_cast<const void*>(&one);
  const float* beta = residual.has_value() ? &one : &zero;
  const void* cptr = residual.has_value() ? residual->data_ptr() : out.data_ptr();
  std::vector<double> times;
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  for (size_t i = 0; i < hs.size(); ++i) {
    if (pick >= 0 && static_cast<int64_t>(i) != pick) {
      times.push_back(-2);
      continue;
    }
    auto run = [&] {
      return cublasLtMatmul(handle(), p.op, alpha, w.data_ptr(), p.a, x.data_ptr(), p.b, beta, cptr, p.c,
                            out.data_ptr(), p.d, &hs[i].algo, ws.data_ptr(), kWs, stream);
    };
    if (run() != CUBLAS_STATUS_SUCCESS) {
      times.push_back(-1);
      continue;
    }
    for (int k = 0; k < 3; ++k) run();
    cudaEventRecord(e0, stream);
    for (int k = 0; k < iters; ++k) run();
    cudaEventRecord(e1, stream);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    times.push_back(1000.0 * ms / iters);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return times;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("heur_count", &heur_count);
  m.def("tune", &tune);
}
