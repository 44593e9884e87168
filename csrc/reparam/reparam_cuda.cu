// CUDA backend of reparameterization sampling and the Gaussian KL (contract in reparam.h).
//
// Noise: eps[i] = lane i % 4 of philox_normal4(seed, offset, i / 4) (common/philox.h); one thread
// makes the four normals of a group of 4 elements with one Philox call. (seed, offset) come from
// philox_cuda_state(4) of the CUDA generator and are unpacked in the kernel, so a CUDA graph replays
// with the generator's state of each replay; the kernel writes them into rng_state for backward,
// which reads them from device memory (no host sync). PyTorch counts the generator's offset in 32-bit
// draws (curand's unit; increments are multiples of 4), the Philox counter in 128-bit blocks: the
// counter offset is philox offset / 4, which makes the one counter block per group that this call
// uses exactly the block its increment of 4 reserved. Counter offset = philox offset would reuse the
// counter blocks that later calls of PyTorch's own random ops (curand) draw from.
//
// Kernels (e = bytes per element of mu's dtype, n = numel, r = rows; math in fp32, double for double):
//   reparam_forward:   z = mu + exp(0.5 logvar) eps.                           reads 2en, writes en.
//   reparam_backward:  grad_logvar = 0.5 grad_z eps exp(0.5 logvar).           reads 2en, writes en.
//   kl_rows:           kl[r] = 0.5 sum_j (expm1(logvar) - logvar + mu^2), optionally z as above in the
//                      same pass (reparam_kl_forward).                          reads 2en, writes 8r (+ en);
//                      rows longer than kChunk add 16 bytes per chunk (fp64 partial sums, written and read).
//   kl_backward:       grad_mu = g[r] mu, grad_logvar = 0.5 g[r] expm1(logvar). reads 2en + 8r, writes 2en.
//                      With grad_z (reparam_kl_backward) plus the sampling gradient, eps drawn again.
//                                                                               reads 3en + 8r, writes 2en.
// expm1 instead of exp - 1: no cancellation for logvar near 0, where a VAE's posterior starts.
//
// KL reduction, deterministic and independent of the device and grid: a row is cut into chunks of
// kChunk elements; each (row, chunk) task is summed by a fixed power-of-two group of lanes of one
// warp (each lane in its fixed order, then a shuffle butterfly). Rows of one chunk write kl directly;
// longer rows write one partial per chunk, which a second kernel sums per row (one warp a row, same
// scheme). No float atomics. Each term is computed in fp32 (double for double) and summed in fp64
// (KlSum) and written in fp64 (reparam.h says why). An fp32 sum of a long row is off by
// several ulps, about as much as eager PyTorch's own sum, and on a few rows the tolerance rule (2x
// eager's error) would pass or fail by luck. One fp64 add per element is cheap in a memory-bound pass.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <ATen/cuda/PhiloxUtils.cuh>

#include <algorithm>
#include <mutex>
#include <type_traits>

#include "common/checks.h"
#include "common/philox.h"
#include "reparam/reparam.h"

namespace genfast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxBlocks = int64_t(1) << 16;  // grid-stride loops cover the rest
constexpr int64_t kChunk = 4096;                  // elements of a row summed by one group of lanes
using KlSum = double;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t blocks_for(int64_t threads) { return std::min(ceil_div(threads, kThreads), kMaxBlocks); }

// The 4 elements of one Philox group, loaded or stored as one vector where the pointer allows.
template <typename T>
struct alignas(4 * sizeof(T)) Group {
  T v[4];
};

// Elements 4g..4g+3 that lie in [lo, hi); the others are left as zero and must not be used.
template <bool kAligned, typename T>
__device__ __forceinline__ Group<T> load_group(const T* __restrict__ p, int64_t g, int64_t lo, int64_t hi) {
  const int64_t first = 4 * g;
  if (kAligned && first >= lo && first + 4 <= hi) return *reinterpret_cast<const Group<T>*>(p + first);
  Group<T> out;
#pragma unroll
  for (int k = 0; k < 4; ++k) out.v[k] = first + k >= lo && first + k < hi ? p[first + k] : static_cast<T>(0.f);
  return out;
}

template <bool kAligned, typename T>
__device__ __forceinline__ void store_group(T* __restrict__ p, int64_t g, int64_t lo, int64_t hi, const Group<T>& x) {
  const int64_t first = 4 * g;
  if (kAligned && first >= lo && first + 4 <= hi) {
    *reinterpret_cast<Group<T>*>(p + first) = x;
    return;
  }
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (first + k >= lo && first + k < hi) p[first + k] = x.v[k];
}

struct NoiseState {
  uint64_t seed, offset;
};

// This call's (seed, counter offset); thread 0 of the grid records them for backward.
__device__ __forceinline__ NoiseState unpack_noise(const at::PhiloxCudaState& philox, int64_t* rng_state) {
  const auto unpacked = at::cuda::philox::unpack(philox);
  const NoiseState state{std::get<0>(unpacked), std::get<1>(unpacked) / 4};
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    rng_state[0] = static_cast<int64_t>(state.seed);
    rng_state[1] = static_cast<int64_t>(state.offset);
  }
  return state;
}

template <typename T>
__device__ __forceinline__ at::opmath_type<T> sample(T mu, T logvar, float eps) {
  using acc_t = at::opmath_type<T>;
  return static_cast<acc_t>(mu) + exp(acc_t(0.5) * static_cast<acc_t>(logvar)) * static_cast<acc_t>(eps);
}

// One thread per group of 4 elements (one Philox call), grid-stride.
template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    reparam_forward_kernel(const T* __restrict__ mu, const T* __restrict__ logvar, T* __restrict__ z, int64_t n,
                           at::PhiloxCudaState philox, int64_t* __restrict__ rng_state) {
  const NoiseState noise = unpack_noise(philox, rng_state);
  const int64_t groups = ceil_div(n, 4);
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups; g += int64_t(gridDim.x) * blockDim.x) {
    const Group<T> m = load_group<kAligned>(mu, g, 0, n), lv = load_group<kAligned>(logvar, g, 0, n);
    const Normal4 eps = philox_normal4(noise.seed, noise.offset, g);
    Group<T> out;
#pragma unroll
    for (int k = 0; k < 4; ++k) out.v[k] = static_cast<T>(sample(m.v[k], lv.v[k], eps.v[k]));
    store_group<kAligned>(z, g, 0, n, out);
  }
}

// Same groups as the forward; eps regenerated from the (seed, offset) the forward recorded.
template <typename T, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    reparam_backward_kernel(const T* __restrict__ grad_z, const T* __restrict__ logvar, T* __restrict__ grad_logvar,
                            int64_t n, const int64_t* __restrict__ rng_state) {
  using acc_t = at::opmath_type<T>;
  const uint64_t seed = static_cast<uint64_t>(rng_state[0]), offset = static_cast<uint64_t>(rng_state[1]);
  const int64_t groups = ceil_div(n, 4);
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups; g += int64_t(gridDim.x) * blockDim.x) {
    const Group<T> gz = load_group<kAligned>(grad_z, g, 0, n), lv = load_group<kAligned>(logvar, g, 0, n);
    const Normal4 eps = philox_normal4(seed, offset, g);
    Group<T> out;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const acc_t sigma = exp(acc_t(0.5) * static_cast<acc_t>(lv.v[k]));
      out.v[k] = static_cast<T>(acc_t(0.5) * static_cast<acc_t>(gz.v[k]) * static_cast<acc_t>(eps.v[k]) * sigma);
    }
    store_group<kAligned>(grad_logvar, g, 0, n, out);
  }
}

// Per (row, chunk) task, `lanes` lanes (a power of two dividing 32) sum the KL terms of elements
// [lo, hi), lane l taking the groups lo/4 + l, lo/4 + l + lanes, ...; with kSample they also write z
// (a group cut by a task boundary is drawn by both tasks, each writing its own elements). The loop
// runs over the tasks of whole warps, so every lane reaches the shuffles.
template <typename T, bool kAligned, bool kSample>
__global__ void __launch_bounds__(kThreads)
    kl_rows_kernel(const T* __restrict__ mu, const T* __restrict__ logvar, T* __restrict__ z, KlSum* __restrict__ kl,
                   KlSum* __restrict__ partial, int64_t rows, int64_t cols, int64_t chunks, int lanes,
                   at::PhiloxCudaState philox, int64_t* __restrict__ rng_state) {
  using acc_t = at::opmath_type<T>;
  NoiseState noise{0, 0};
  if constexpr (kSample) noise = unpack_noise(philox, rng_state);
  const int lane = threadIdx.x % kWarp, per_warp = kWarp / lanes;
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / kWarp, tasks = rows * chunks;
  for (int64_t base = warp * per_warp; base < tasks; base += warps * per_warp) {
    const int64_t task = base + lane / lanes;
    KlSum sum = 0;
    if (task < tasks) {
      const int64_t row = task / chunks, chunk = task % chunks;
      const int64_t lo = row * cols + chunk * kChunk, hi = row * cols + std::min(cols, (chunk + 1) * kChunk);
      for (int64_t g = lo / 4 + lane % lanes; 4 * g < hi; g += lanes) {
        const Group<T> m = load_group<kAligned>(mu, g, lo, hi), lv = load_group<kAligned>(logvar, g, lo, hi);
        Normal4 eps;
        if constexpr (kSample) eps = philox_normal4(noise.seed, noise.offset, g);
        Group<T> out;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (4 * g + k < lo || 4 * g + k >= hi) continue;
          const acc_t a = static_cast<acc_t>(m.v[k]), b = static_cast<acc_t>(lv.v[k]);
          sum += static_cast<KlSum>((expm1(b) - b) + a * a);
          if constexpr (kSample) out.v[k] = static_cast<T>(sample(m.v[k], lv.v[k], eps.v[k]));
        }
        if constexpr (kSample) store_group<kAligned>(z, g, lo, hi, out);
      }
    }
    for (int o = lanes / 2; o > 0; o /= 2) sum += __shfl_xor_sync(kFullMask, sum, o);
    if (task < tasks && lane % lanes == 0) {
      if (chunks == 1) kl[task] = 0.5 * sum;
      else partial[task] = sum;
    }
  }
}

// kl[r] = 0.5 * sum of row r's chunk partials: one warp per row, lane l summing chunks l, l + 32, ...
__global__ void __launch_bounds__(kThreads)
    kl_partials_kernel(const KlSum* __restrict__ partial, KlSum* __restrict__ kl, int64_t rows, int64_t chunks) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / kWarp;
  for (int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp; row < rows; row += warps) {
    KlSum sum = 0;
    for (int64_t c = lane; c < chunks; c += kWarp) sum += partial[row * chunks + c];
    for (int o = kWarp / 2; o > 0; o /= 2) sum += __shfl_xor_sync(kFullMask, sum, o);
    if (lane == 0) kl[row] = 0.5 * sum;
  }
}

// Elementwise over groups of 4; each element's row from a running (row, column) pair: one division a group.
// With kSample (reparam_kl_backward) the sampling gradient is added before the one rounding: grad_mu +=
// grad_z, grad_logvar = 0.5 (grad_z eps exp(0.5 logvar) + g expm1(logvar)), eps drawn again as the
// forward drew it (group g of the flat index).
template <typename T, bool kAligned, bool kSample>
__global__ void __launch_bounds__(kThreads)
    kl_backward_kernel(const KlSum* __restrict__ grad_kl, const T* __restrict__ mu, const T* __restrict__ logvar,
                       const T* __restrict__ grad_z, const int64_t* __restrict__ rng_state, T* __restrict__ grad_mu,
                       T* __restrict__ grad_logvar, int64_t n, int64_t cols) {
  using acc_t = at::opmath_type<T>;
  uint64_t seed = 0, offset = 0;
  if constexpr (kSample) seed = static_cast<uint64_t>(rng_state[0]), offset = static_cast<uint64_t>(rng_state[1]);
  const int64_t groups = ceil_div(n, 4);
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups; g += int64_t(gridDim.x) * blockDim.x) {
    const Group<T> m = load_group<kAligned>(mu, g, 0, n), lv = load_group<kAligned>(logvar, g, 0, n);
    Group<T> gz{};
    Normal4 eps{};
    if constexpr (kSample) {
      gz = load_group<kAligned>(grad_z, g, 0, n);
      eps = philox_normal4(seed, offset, g);
    }
    int64_t row = 4 * g / cols, col = 4 * g - row * cols;
    Group<T> dm, dlv;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (4 * g + k >= n) break;
      const acc_t gk = static_cast<acc_t>(grad_kl[row]), a = static_cast<acc_t>(m.v[k]),
                  b = static_cast<acc_t>(lv.v[k]);
      if constexpr (kSample) {
        const acc_t dz = static_cast<acc_t>(gz.v[k]);
        dm.v[k] = static_cast<T>(dz + gk * a);
        dlv.v[k] =
            static_cast<T>(acc_t(0.5) * (dz * static_cast<acc_t>(eps.v[k]) * exp(acc_t(0.5) * b) + gk * expm1(b)));
      } else {
        dm.v[k] = static_cast<T>(gk * a);
        dlv.v[k] = static_cast<T>(acc_t(0.5) * gk * expm1(b));
      }
      if (++col == cols) col = 0, ++row;
    }
    store_group<kAligned>(grad_mu, g, 0, n, dm);
    store_group<kAligned>(grad_logvar, g, 0, n, dlv);
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side

// f(std::true_type{}) or f(std::false_type{}): a runtime flag as a template argument.
template <typename F>
void dispatch_flag(bool flag, F&& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

// Whether every pointer allows the vector access of a Group<T> (null pointers do).
template <typename T>
bool group_aligned(std::initializer_list<const void*> pointers) {
  return std::all_of(pointers.begin(), pointers.end(),
                     [](const void* p) { return reinterpret_cast<uintptr_t>(p) % sizeof(Group<T>) == 0; });
}

void check_pair(const at::Tensor& mu, const at::Tensor& logvar) {
  CHECK_CUDA(mu);
  CHECK_CUDA(logvar);
  CHECK_CONTIGUOUS(mu);
  CHECK_CONTIGUOUS(logvar);
  CHECK_FLOATING(mu);
  CHECK_SAME_DTYPE(mu, logvar);
  CHECK_SAME_DEVICE(mu, logvar);
  CHECK_SAME_SHAPE(mu, logvar);
}

void check_rows(const at::Tensor& mu) {
  TORCH_CHECK(mu.dim() >= 1, "mu must have at least one dimension (the latent one), got a scalar");
}

int64_t rows_of(const at::Tensor& mu) { return c10::multiply_integers(mu.sizes().begin(), mu.sizes().end() - 1); }

// Reserves this call's noise: one 128-bit counter block per group (increment 4, see the top).
at::PhiloxCudaState reserve_noise(const c10::optional<at::Generator>& generator, const at::Tensor& mu) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(mu.device().index()));
  TORCH_CHECK(gen->device() == mu.device(), "generator is on ", gen->device(), ", mu on ", mu.device());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->philox_cuda_state(4);
}

// z and kl (and rng_state with sampling) of a non-empty mu: the row kernel, then the partial sums.
void launch_kl_rows(const at::Tensor& mu, const at::Tensor& logvar, at::Tensor* z, at::Tensor& kl,
                    const at::PhiloxCudaState& philox, at::Tensor* rng_state) {
  const int64_t cols = mu.size(-1), rows = rows_of(mu), chunks = ceil_div(cols, kChunk);
  // Lanes per task: a power of two covering the groups a chunk can touch (rows start mid-group when
  // cols % 4 != 0).
  const int64_t groups = ceil_div(std::min(cols, kChunk) + (cols % 4 != 0 ? 3 : 0), 4);
  int lanes = 1;
  while (lanes < kWarp && lanes < groups) lanes *= 2;
  const int64_t warps = ceil_div(rows * chunks, kWarp / lanes);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "kl_rows_cuda", [&] {
    at::Tensor partial;
    if (chunks > 1) partial = at::empty({rows * chunks}, kl.options().dtype(at::kDouble));
    KlSum* partial_ptr = chunks > 1 ? partial.data_ptr<KlSum>() : nullptr;
    scalar_t* z_ptr = z ? z->data_ptr<scalar_t>() : nullptr;
    const bool aligned = group_aligned<scalar_t>({mu.data_ptr(), logvar.data_ptr(), z_ptr});
    dispatch_flag(aligned, [&](auto kAligned) {
      dispatch_flag(z != nullptr, [&](auto kSample) {
        constexpr bool kA = decltype(kAligned)::value, kS = decltype(kSample)::value;
        kl_rows_kernel<scalar_t, kA, kS><<<blocks_for(warps * kWarp), kThreads, 0, stream>>>(
            mu.data_ptr<scalar_t>(), logvar.data_ptr<scalar_t>(), z_ptr, kl.data_ptr<KlSum>(), partial_ptr, rows, cols,
            chunks, lanes, philox, rng_state ? rng_state->data_ptr<int64_t>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    if (chunks > 1) {
      kl_partials_kernel<<<blocks_for(rows * kWarp), kThreads, 0, stream>>>(partial_ptr, kl.data_ptr<KlSum>(), rows,
                                                                            chunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

at::Tensor new_rng_state(const at::Tensor& mu) { return at::empty({2}, mu.options().dtype(at::kLong)); }

// kl is in the math type: float64 for float64 inputs, float32 for the others.
at::ScalarType kl_dtype(const at::Tensor&) { return at::kDouble; }

void check_grad_kl(const at::Tensor& grad_kl, const at::Tensor& mu) {
  CHECK_CUDA(grad_kl);
  CHECK_CONTIGUOUS(grad_kl);
  CHECK_SAME_DEVICE(grad_kl, mu);
  CHECK_SHAPE(grad_kl, rows_of(mu));
  TORCH_CHECK(grad_kl.scalar_type() == kl_dtype(mu), "grad_kl must be ", kl_dtype(mu), ", got ", grad_kl.scalar_type());
}

void check_rng_state(const at::Tensor& rng_state, const at::Tensor& like) {
  CHECK_CUDA(rng_state);
  CHECK_CONTIGUOUS(rng_state);
  CHECK_SAME_DEVICE(rng_state, like);
  CHECK_SHAPE(rng_state, 2);
  TORCH_CHECK(rng_state.scalar_type() == at::kLong, "rng_state must be int64, got ", rng_state.scalar_type());
}

// {grad_mu, grad_logvar} of the KL, plus the sampling gradient when grad_z and rng_state are given.
std::vector<at::Tensor> launch_kl_backward(const at::Tensor& grad_kl, const at::Tensor& mu, const at::Tensor& logvar,
                                           const at::Tensor* grad_z, const at::Tensor* rng_state) {
  const at::cuda::OptionalCUDAGuard guard(mu.device());
  at::Tensor grad_mu = at::empty_like(mu), grad_logvar = at::empty_like(logvar);
  const int64_t n = mu.numel();
  if (n == 0) return {grad_mu, grad_logvar};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "kl_backward_cuda", [&] {
    const scalar_t* gz_ptr = grad_z ? grad_z->data_ptr<scalar_t>() : nullptr;
    const bool aligned =
        group_aligned<scalar_t>({mu.data_ptr(), logvar.data_ptr(), gz_ptr, grad_mu.data_ptr(), grad_logvar.data_ptr()});
    dispatch_flag(aligned, [&](auto kAligned) {
      dispatch_flag(grad_z != nullptr, [&](auto kSample) {
        // No fp64 kernel with sampling: reparam_kl_backward_cuda takes another path for fp64 (it says why).
        constexpr bool kA = decltype(kAligned)::value,
                       kS = decltype(kSample)::value && !std::is_same_v<scalar_t, double>;
        TORCH_INTERNAL_ASSERT(kS == (grad_z != nullptr), "no fused fp64 kl_backward_kernel with sampling");
        kl_backward_kernel<scalar_t, kA, kS><<<blocks_for(ceil_div(n, 4)), kThreads, 0, stream>>>(
            grad_kl.data_ptr<KlSum>(), mu.data_ptr<scalar_t>(), logvar.data_ptr<scalar_t>(), gz_ptr,
            rng_state ? rng_state->data_ptr<int64_t>() : nullptr, grad_mu.data_ptr<scalar_t>(),
            grad_logvar.data_ptr<scalar_t>(), n, mu.size(-1));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {grad_mu, grad_logvar};
}

}  // namespace

std::vector<at::Tensor> reparam_forward_cuda(const at::Tensor& mu, const at::Tensor& logvar,
                                             c10::optional<at::Generator> generator) {
  check_pair(mu, logvar);
  const at::cuda::OptionalCUDAGuard guard(mu.device());
  at::Tensor z = at::empty_like(mu);
  const int64_t n = mu.numel();
  if (n == 0) return {z, at::zeros({2}, mu.options().dtype(at::kLong))};  // no noise drawn
  at::Tensor rng_state = new_rng_state(mu);
  const at::PhiloxCudaState philox = reserve_noise(generator, mu);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparam_forward_cuda", [&] {
    const bool aligned = group_aligned<scalar_t>({mu.data_ptr(), logvar.data_ptr(), z.data_ptr()});
    dispatch_flag(aligned, [&](auto kAligned) {
      constexpr bool kA = decltype(kAligned)::value;
      reparam_forward_kernel<scalar_t, kA><<<blocks_for(ceil_div(n, 4)), kThreads, 0, stream>>>(
          mu.data_ptr<scalar_t>(), logvar.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), n, philox,
          rng_state.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {z, rng_state};
}

at::Tensor reparam_backward_cuda(const at::Tensor& grad_z, const at::Tensor& logvar, const at::Tensor& rng_state) {
  check_pair(grad_z, logvar);
  check_rng_state(rng_state, logvar);
  const at::cuda::OptionalCUDAGuard guard(logvar.device());
  at::Tensor grad_logvar = at::empty_like(logvar);
  const int64_t n = logvar.numel();
  if (n == 0) return grad_logvar;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logvar.scalar_type(), "reparam_backward_cuda", [&] {
    const bool aligned = group_aligned<scalar_t>({grad_z.data_ptr(), logvar.data_ptr(), grad_logvar.data_ptr()});
    dispatch_flag(aligned, [&](auto kAligned) {
      constexpr bool kA = decltype(kAligned)::value;
      reparam_backward_kernel<scalar_t, kA><<<blocks_for(ceil_div(n, 4)), kThreads, 0, stream>>>(
          grad_z.data_ptr<scalar_t>(), logvar.data_ptr<scalar_t>(), grad_logvar.data_ptr<scalar_t>(), n,
          rng_state.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_logvar;
}

at::Tensor kl_forward_cuda(const at::Tensor& mu, const at::Tensor& logvar) {
  check_pair(mu, logvar);
  check_rows(mu);
  const at::cuda::OptionalCUDAGuard guard(mu.device());
  if (mu.numel() == 0) return at::zeros({rows_of(mu)}, mu.options().dtype(kl_dtype(mu)));  // empty sums are 0
  at::Tensor kl = at::empty({rows_of(mu)}, mu.options().dtype(kl_dtype(mu)));
  launch_kl_rows(mu, logvar, nullptr, kl, at::PhiloxCudaState(), nullptr);
  return kl;
}

std::vector<at::Tensor> kl_backward_cuda(const at::Tensor& grad_kl, const at::Tensor& mu, const at::Tensor& logvar) {
  check_pair(mu, logvar);
  check_rows(mu);
  check_grad_kl(grad_kl, mu);
  return launch_kl_backward(grad_kl, mu, logvar, nullptr, nullptr);
}

std::vector<at::Tensor> reparam_kl_forward_cuda(const at::Tensor& mu, const at::Tensor& logvar,
                                                c10::optional<at::Generator> generator) {
  check_pair(mu, logvar);
  check_rows(mu);
  const at::cuda::OptionalCUDAGuard guard(mu.device());
  at::Tensor z = at::empty_like(mu);
  if (mu.numel() == 0) {
    return {z, at::zeros({2}, mu.options().dtype(at::kLong)),
            at::zeros({rows_of(mu)}, mu.options().dtype(kl_dtype(mu)))};
  }
  at::Tensor rng_state = new_rng_state(mu), kl = at::empty({rows_of(mu)}, mu.options().dtype(kl_dtype(mu)));
  launch_kl_rows(mu, logvar, &z, kl, reserve_noise(generator, mu), &rng_state);
  return {z, rng_state, kl};
}

std::vector<at::Tensor> reparam_kl_backward_cuda(const at::Tensor& grad_z, const at::Tensor& grad_kl,
                                                 const at::Tensor& mu, const at::Tensor& logvar,
                                                 const at::Tensor& rng_state) {
  check_pair(mu, logvar);
  CHECK_CUDA(grad_z);
  CHECK_SAME_DEVICE(grad_z, mu);
  CHECK_CONTIGUOUS(grad_z);
  CHECK_SAME_DTYPE(grad_z, mu);
  CHECK_SAME_SHAPE(grad_z, mu);
  check_rows(mu);
  check_grad_kl(grad_kl, mu);
  check_rng_state(rng_state, mu);
  if (mu.scalar_type() == at::kDouble) {
    // fp64: the KL kernel, the sampling kernel and two adds. One fp64 kernel computing both exp and
    // expm1 of double needs a stack frame on sm_80/sm_90 (tests/test_build.py refuses those), and fp64
    // VAEs are rare enough not to be worth a kernel shaped around it.
    std::vector<at::Tensor> grads = launch_kl_backward(grad_kl, mu, logvar, nullptr, nullptr);
    grads[0].add_(grad_z);
    grads[1].add_(reparam_backward_cuda(grad_z, logvar, rng_state));
    return grads;
  }
  return launch_kl_backward(grad_kl, mu, logvar, &grad_z, &rng_state);
}

}  // namespace genfast
