// CUDA backend of the fused dense layer (contract in dense.h).
//
// Forward, z = x @ weight^T + bias (fp32 accumulation, z rounded once to the dtype):
//   y = act(z); aux = mask bits mask_bit(act, z) (relu, leaky_relu), z (gelu, gelu_tanh, silu) or nothing.
//   One cuBLASLt GEMM computes y^T = W x^T in column-major terms, which is y (M, N) row-major. Its
//   epilogue adds the bias, and for the tanh GELU in half/bfloat16 applies it too (GELU_AUX(_BIAS)
//   writes z). Every other case, and any shape cuBLASLt has no algorithm for (then ATen's GEMM), gets
//   one elementwise pass over z. Not relu's RELU_AUX epilogue: it computes max(z, 0), which turns NaN
//   into 0 where torch.relu keeps it, and its documentation does not say which bit it sets at z == 0
//   or NaN; genfast's own mask pass costs relu what it costs leaky_relu, e (2MN) bytes more.
// Backward: dz = grad_y * act'(saved); grad_x = dz @ W; grad_weight = dz^T @ x; grad_bias = sum_i dz[i, :].
//   One pass computes dz and column sums per fixed block of rows; a small kernel adds those sums in a
//   fixed order (deterministic, no float atomics). The two GEMMs are plain cuBLASLt calls.
// Bytes (e = bytes per element, mask = M * ceil(N / 128) * 16):
//   forward: e (MK + NK + N + MN) + (mask or e MN for z); the elementwise pass adds e 2MN (+ mask or e MN).
//   backward: e MN (grad_y) + (mask, e MN or 0 for saved) + e MN (dz, not written when only the bias
//   gradient is needed) + 4 min(M/64, 2^20/N) N (partial sums); then e (MN + NK + MK) per GEMM.
#include <ATen/Context.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>

#include <algorithm>
#include <type_traits>

#include "common/activations.h"
#include "common/checks.h"
#include "dense/dense.h"

#define LT_CHECK(expr)                                                                                     \
  do {                                                                                                     \
    const cublasStatus_t status_ = (expr);                                                                 \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, "genfast dense: cuBLASLt call ", #expr, " failed with ", \
                cublasLtGetStatusName(status_), ": ", cublasLtGetStatusString(status_));                   \
  } while (0)

namespace genfast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 16;  // grid-stride loops cover the rest
constexpr int kTileCols = 32, kTileRows = 8;      // backward block: one warp per row, 8 rows at a time
constexpr int64_t kMinRowsPerBlock = 64;
constexpr int64_t kMaxPartials = int64_t(1) << 20;  // bias-gradient partial sums kept (4 MiB in fp32)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t grid_for(int64_t work) { return std::min(ceil_div(work, kThreads), kMaxBlocks); }

// ---------------------------------------------------------------------------------------------------
// cuBLASLt

template <typename T, cublasStatus_t (*Destroy)(T)>
struct LtObject {  // destroys the descriptor on every path out, TORCH_CHECK throws included
  T handle = nullptr;
  LtObject() = default;
  LtObject(const LtObject&) = delete;
  LtObject& operator=(const LtObject&) = delete;
  ~LtObject() {
    if (handle) Destroy(handle);
  }
};
using MatmulDesc = LtObject<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy>;
using Layout = LtObject<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy>;
using Preference = LtObject<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy>;

template <typename V>
void set_attribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const V& value) {
  LT_CHECK(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)));
}

template <typename V>
void set_preference(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr, const V& value) {
  LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)));
}

// The largest power of two (up to 256) dividing the address: heuristics must not assume more.
uint32_t alignment_of(const void* ptr) {
  const auto address = reinterpret_cast<uintptr_t>(ptr);
  uint32_t alignment = 256;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return alignment;
}

// Row-major c = op(a) @ op(b) (op = transpose where asked) with a cuBLASLt epilogue. A row-major
// (r, c) tensor is a column-major (c, r) matrix, so cuBLASLt computes c^T = op(b)^T op(a)^T.
// Returns false, having launched nothing, where cuBLASLt offers no algorithm (the caller falls back).
bool lt_matmul(const at::Tensor& a, bool trans_a, const at::Tensor& b, bool trans_b, at::Tensor& c,
               cublasLtEpilogue_t epilogue, const void* bias, void* aux, int64_t aux_ld) {
  const at::ScalarType dtype = c.scalar_type();
  cudaDataType_t type;
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  switch (dtype) {
    case at::kFloat:
      type = CUDA_R_32F;
      if (at::globalContext().allowTF32CuBLAS()) compute = CUBLAS_COMPUTE_32F_FAST_TF32;
      break;
    case at::kHalf: type = CUDA_R_16F; break;
    case at::kBFloat16: type = CUDA_R_16BF; break;
    default: return false;  // double: ATen's GEMM
  }
  const int64_t m = c.size(1), n = c.size(0), k = trans_a ? a.size(0) : a.size(1);
  if (m == 0 || n == 0 || k == 0) return false;

  MatmulDesc desc;
  LT_CHECK(cublasLtMatmulDescCreate(&desc.handle, compute, CUDA_R_32F));
  set_attribute(desc.handle, CUBLASLT_MATMUL_DESC_TRANSA, int32_t(trans_b ? CUBLAS_OP_T : CUBLAS_OP_N));
  set_attribute(desc.handle, CUBLASLT_MATMUL_DESC_TRANSB, int32_t(trans_a ? CUBLAS_OP_T : CUBLAS_OP_N));
  set_attribute(desc.handle, CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue);
  if (bias) set_attribute(desc.handle, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias);
  if (aux) {
    set_attribute(desc.handle, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, aux);
    set_attribute(desc.handle, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, aux_ld);
  }
  Layout layout_a, layout_b, layout_c;  // column-major as stored: (cols, rows) of the row-major tensor
  LT_CHECK(cublasLtMatrixLayoutCreate(&layout_a.handle, type, b.size(1), b.size(0), b.size(1)));
  LT_CHECK(cublasLtMatrixLayoutCreate(&layout_b.handle, type, a.size(1), a.size(0), a.size(1)));
  LT_CHECK(cublasLtMatrixLayoutCreate(&layout_c.handle, type, c.size(1), c.size(0), c.size(1)));

  // fp32 accumulation; split-K partial sums as ATen's own GEMMs (and the at::mm fallback) reduce them:
  // in fp16/bf16 only where PyTorch's flag for the dtype allows it
  // (torch.backends.cuda.matmul.allow_fp16/bf16_reduced_precision_reduction), else in the compute type.
  Preference pref;
  LT_CHECK(cublasLtMatmulPreferenceCreate(&pref.handle));
  set_preference(pref.handle, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                 uint64_t(at::cuda::getCUDABlasLtWorkspaceSize()));
  const at::CuBLASReductionOption reduction = dtype == at::kHalf ? at::globalContext().allowFP16ReductionCuBLAS()
                                              : dtype == at::kBFloat16
                                                  ? at::globalContext().allowBF16ReductionCuBLAS()
                                                  : at::CuBLASReductionOption::AllowReducedPrecisionWithSplitK;
  if (reduction == at::CuBLASReductionOption::DisallowReducedPrecisionAllowSplitK) {
    set_preference(pref.handle, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                   uint32_t(CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE));
  } else if (reduction == at::CuBLASReductionOption::DisallowReducedPrecisionDisallowSplitK) {
    set_preference(pref.handle, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, uint32_t(CUBLASLT_REDUCTION_SCHEME_NONE));
  }
  set_preference(pref.handle, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment_of(b.data_ptr()));
  set_preference(pref.handle, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment_of(a.data_ptr()));
  set_preference(pref.handle, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment_of(c.data_ptr()));
  set_preference(pref.handle, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment_of(c.data_ptr()));

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t status =
      cublasLtMatmulAlgoGetHeuristic(handle, desc.handle, layout_a.handle, layout_b.handle, layout_c.handle,
                                     layout_c.handle, pref.handle, 1, &result, &found);
  if (status != CUBLAS_STATUS_SUCCESS || found == 0) return false;  // unsupported shape/alignment/epilogue

  // Workspace from the caching allocator, stream-ordered: freed to the cache when this call returns.
  const at::Tensor workspace = at::empty({int64_t(result.workspaceSize)}, c.options().dtype(at::kByte));
  const float alpha = 1.f, beta = 0.f;  // beta = 0: C is not read; it is given as D
  LT_CHECK(cublasLtMatmul(handle, desc.handle, &alpha, b.data_ptr(), layout_a.handle, a.data_ptr(), layout_b.handle,
                          &beta, c.data_ptr(), layout_c.handle, c.data_ptr(), layout_c.handle, &result.algo,
                          result.workspaceSize ? workspace.data_ptr() : nullptr, result.workspaceSize,
                          at::cuda::getCurrentCUDAStream()));
  return true;
}

// ---------------------------------------------------------------------------------------------------
// Forward epilogue kernels (the GEMM wrote z)

// y = act(z), element by element; y may be z.
template <typename scalar_t, Act A>
__global__ void activation_kernel(const scalar_t* z, scalar_t* y, int64_t numel, at::opmath_type<scalar_t> slope) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = static_cast<scalar_t>(act_forward(A, static_cast<acc_t>(z[i]), slope));
}

// One thread per mask byte, padding bytes included (they are written as 0): the byte's 8 features of
// z, in place in y, become act(z) and their bits mask_bit(A, z), feature j in bit j % 8.
template <typename scalar_t, Act A>
__global__ void mask_activation_kernel(scalar_t* zy, uint8_t* mask, int64_t m, int64_t n, int64_t row_bytes,
                                       at::opmath_type<scalar_t> slope) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < m * row_bytes;
       t += int64_t(gridDim.x) * blockDim.x) {
    scalar_t* row = zy + (t / row_bytes) * n;
    const int64_t first = (t % row_bytes) * 8;
    const int count = static_cast<int>(std::min<int64_t>(8, std::max<int64_t>(0, n - first)));
    uint32_t bits = 0;
    for (int b = 0; b < count; ++b) {
      const acc_t z = static_cast<acc_t>(row[first + b]);
      bits |= uint32_t(mask_bit(A, z)) << b;
      row[first + b] = static_cast<scalar_t>(act_forward(A, z, slope));
    }
    mask[t] = static_cast<uint8_t>(bits);
  }
}

void forward_epilogue(at::Tensor& z, at::Tensor& y, at::Tensor& aux, Act act, double slope) {
  const int64_t m = z.size(0), n = z.size(1);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "dense_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_act(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      if constexpr (saves_of(A) == Saves::Mask) {
        const int64_t row_bytes = mask_row_bytes(n);
        mask_activation_kernel<scalar_t, A><<<grid_for(m * row_bytes), kThreads, 0, stream>>>(
            z.data_ptr<scalar_t>(), aux.data_ptr<uint8_t>(), m, n, row_bytes, static_cast<acc_t>(slope));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else if constexpr (A != Act::None) {
        activation_kernel<scalar_t, A><<<grid_for(m * n), kThreads, 0, stream>>>(
            z.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), m * n, static_cast<acc_t>(slope));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------------
// Backward kernels

// Block (32, 8) over 32 columns and rows_per_block rows: dz = g * act'(s), s the mask bit (1/0), z or y.
// dz is written if asked; its column sums over the block's rows go to partial[row block, column]. Half
// and bfloat16 sum dz as stored (rounded), as the sum of the dz tensor would.
template <typename scalar_t, Act A>
__global__ void __launch_bounds__(kTileCols* kTileRows)
    dz_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ s, const uint8_t* __restrict__ mask,
              scalar_t* __restrict__ dz, at::opmath_type<scalar_t>* __restrict__ partial, int64_t m, int64_t n,
              int64_t rows_per_block, int64_t col_tiles, at::opmath_type<scalar_t> slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row_block = blockIdx.x / col_tiles;
  const int64_t j = (blockIdx.x % col_tiles) * kTileCols + threadIdx.x;
  const int64_t row_end = std::min(m, (row_block + 1) * rows_per_block), row_bytes = mask_row_bytes(n);
  acc_t sum = 0;
  if (j < n) {
    for (int64_t i = row_block * rows_per_block + threadIdx.y; i < row_end; i += kTileRows) {
      const int64_t idx = i * n + j;
      acc_t d = static_cast<acc_t>(g[idx]);
      if constexpr (saves_of(A) == Saves::Mask)
        d *= act_derivative(A, acc_t((mask[i * row_bytes + j / 8] >> (j % 8)) & 1), slope);
      else if constexpr (saves_of(A) != Saves::None) d *= act_derivative(A, static_cast<acc_t>(s[idx]), slope);
      const scalar_t stored = static_cast<scalar_t>(d);
      if (dz) dz[idx] = stored;
      sum += static_cast<acc_t>(stored);
    }
  }
  if (!partial) return;  // uniform over the block
  __shared__ acc_t column_sums[kTileRows][kTileCols];
  column_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && j < n) {
    acc_t total = 0;
    for (int r = 0; r < kTileRows; ++r) total += column_sums[r][threadIdx.x];
    partial[row_block * n + j] = total;
  }
}

// grad_bias[j] = sum over row blocks of partial[., j], always in the same order.
template <typename scalar_t>
__global__ void bias_grad_kernel(const at::opmath_type<scalar_t>* __restrict__ partial, scalar_t* __restrict__ out,
                                 int64_t row_blocks, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < n; j += int64_t(gridDim.x) * blockDim.x) {
    acc_t total = 0;
    for (int64_t r = 0; r < row_blocks; ++r) total += partial[r * n + j];
    out[j] = static_cast<scalar_t>(total);
  }
}

// dz (if given) and grad_bias (if given). Row blocks depend on (M, N) only, never on the device, so
// the bias gradient is the same run to run.
void backward_epilogue(const at::Tensor& g, const at::Tensor& saved, at::Tensor* dz, at::Tensor* grad_b, Act act,
                       double slope) {
  const int64_t m = g.size(0), n = g.size(1);
  const int64_t max_row_blocks = std::max<int64_t>(1, kMaxPartials / n);
  const int64_t rows_per_block = ceil_div(m, std::min(ceil_div(m, kMinRowsPerBlock), max_row_blocks));
  const int64_t row_blocks = ceil_div(m, rows_per_block), col_tiles = ceil_div(n, kTileCols);
  const Saves saves = saves_of(act);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "dense_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partial;
    if (grad_b) partial = at::empty({row_blocks, n}, g.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const scalar_t* s = saves == Saves::Preact || saves == Saves::Output ? saved.data_ptr<scalar_t>() : nullptr;
    const uint8_t* mask = saves == Saves::Mask ? saved.data_ptr<uint8_t>() : nullptr;
    dispatch_act(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      dz_kernel<scalar_t, A><<<row_blocks * col_tiles, dim3(kTileCols, kTileRows), 0, stream>>>(
          g.data_ptr<scalar_t>(), s, mask, dz ? dz->data_ptr<scalar_t>() : nullptr,
          grad_b ? partial.data_ptr<acc_t>() : nullptr, m, n, rows_per_block, col_tiles, static_cast<acc_t>(slope));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (grad_b) {
      bias_grad_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(partial.data_ptr<acc_t>(),
                                                                       grad_b->data_ptr<scalar_t>(), row_blocks, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

// Row-major op(a) @ b through cuBLASLt, or ATen's GEMM where cuBLASLt has no algorithm.
at::Tensor matmul(const at::Tensor& a, bool trans_a, const at::Tensor& b) {
  at::Tensor c = at::empty({trans_a ? a.size(1) : a.size(0), b.size(1)}, b.options());
  if (!lt_matmul(a, trans_a, b, false, c, CUBLASLT_EPILOGUE_DEFAULT, nullptr, nullptr, 0))
    at::mm_out(c, trans_a ? a.t() : a, b);
  return c;
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, int64_t act) {
  CHECK_CUDA(x);
  CHECK_CUDA(weight);
  CHECK_CONTIGUOUS(x);
  CHECK_CONTIGUOUS(weight);
  CHECK_DIM(x, 2);
  CHECK_DIM(weight, 2);
  CHECK_SAME_DTYPE(x, weight);
  CHECK_ACTIVATION(act);
  TORCH_CHECK(x.device() == weight.device(), "x is on ", x.device(), ", weight on ", weight.device());
  TORCH_CHECK(x.size(1) == weight.size(1), "x has ", x.size(1), " features, weight expects ", weight.size(1));
}

void check_operand(const at::Tensor& t, const at::Tensor& x) {
  CHECK_CUDA(t);
  CHECK_CONTIGUOUS(t);
  TORCH_CHECK(t.device() == x.device(), "tensors must be on one device: ", t.device(), " and ", x.device());
}

}  // namespace

std::vector<at::Tensor> dense_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                           const c10::optional<at::Tensor>& bias, int64_t act, double slope) {
  check_inputs(x, weight, act);
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const Act a = static_cast<Act>(act);
  const Saves saves = saves_of(a);
  const int64_t m = x.size(0), n = weight.size(0);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = *bias;
    check_operand(b, x);
    CHECK_SAME_DTYPE(x, b);
    CHECK_SHAPE(b, n);
  }
  at::Tensor y = at::empty({m, n}, x.options());
  at::Tensor aux = saves == Saves::Mask     ? at::empty({m, mask_row_bytes(n)}, x.options().dtype(at::kByte))
                   : saves == Saves::Preact ? at::empty({m, n}, x.options())
                                            : at::empty({0}, x.options());
  if (m == 0 || n == 0) return {y, aux};
  const void* bias_ptr = b.defined() ? b.data_ptr() : nullptr;

  // cuBLASLt's tanh GELU epilogue writes z too (ld in elements, a multiple of 8). Only for half/bfloat16:
  // its tanh may be a fast approximation, hidden there by the output's rounding but not in fp32.
  if (a == Act::GeluTanh && n % 8 == 0 && x.scalar_type() != at::kFloat) {
    const cublasLtEpilogue_t epilogue = b.defined() ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
    if (lt_matmul(x, false, weight, true, y, epilogue, bias_ptr, aux.data_ptr(), n)) return {y, aux};
  }
  // z = x W^T + b where backward wants it (aux for Preact), else straight into y; then one pass.
  at::Tensor z = saves == Saves::Preact ? aux : y;
  const cublasLtEpilogue_t epilogue = b.defined() ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  if (!lt_matmul(x, false, weight, true, z, epilogue, bias_ptr, nullptr, 0)) {
    if (b.defined()) at::addmm_out(z, b, x, weight.t());
    else at::mm_out(z, x, weight.t());
  }
  if (a != Act::None) forward_epilogue(z, y, aux, a, slope);
  return {y, aux};
}

std::vector<at::Tensor> dense_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                            const at::Tensor& saved, int64_t act, double slope, bool need_x,
                                            bool need_w, bool need_b) {
  check_inputs(x, weight, act);
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const Act a = static_cast<Act>(act);
  const Saves saves = saves_of(a);
  const int64_t m = x.size(0), n = weight.size(0), k = x.size(1);
  check_operand(grad_y, x);
  CHECK_SHAPE(grad_y, m, n);
  CHECK_SAME_DTYPE(grad_y, x);
  if (saves != Saves::None) check_operand(saved, x);
  if (saves == Saves::Mask) {
    CHECK_SHAPE(saved, m, mask_row_bytes(n));
    TORCH_CHECK(saved.scalar_type() == at::kByte, "saved mask must be uint8, got ", saved.scalar_type());
  } else if (saves != Saves::None) {
    CHECK_SHAPE(saved, m, n);
    CHECK_SAME_DTYPE(saved, x);
  }
  // A distinct empty tensor for each gradient not needed: a custom op's outputs may not alias.
  const auto empty = [&] { return at::empty({0}, x.options()); };
  if (m == 0 || n == 0) {  // nothing to reduce: the gradients are zero (or empty)
    return {need_x ? at::zeros({m, k}, x.options()) : empty(), need_w ? at::zeros({n, k}, x.options()) : empty(),
            need_b ? at::zeros({n}, x.options()) : empty()};
  }
  const bool write_dz = (need_x || need_w) && saves != Saves::None;  // for "none", dz is grad_y itself
  at::Tensor dz = write_dz ? at::empty_like(grad_y) : grad_y;
  at::Tensor grad_b = need_b ? at::empty({n}, x.options()) : empty();
  if (write_dz || need_b)
    backward_epilogue(grad_y, saved, write_dz ? &dz : nullptr, need_b ? &grad_b : nullptr, a, slope);
  return {need_x ? matmul(dz, false, weight) : empty(), need_w ? matmul(dz, true, x) : empty(), grad_b};
}

}  // namespace genfast
