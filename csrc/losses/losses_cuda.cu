// CUDA backend of the fused losses (contract and math in losses.h). One kernel launch per loss, the
// reduction included, plus a 4-byte memset of the finishing counter for "mean"/"sum".
//
// ELBO: block b takes rows b, b + grid, ...; its threads stride over a row's features, so loads and
// stores are coalesced, each thread sums its terms in double, and a fixed-order block reduction gives
// the row's r and k. "none" writes them per row. "mean"/"sum": thread 0 adds its block's rows in row
// order, writes the block's partial sums, and the last block to finish (an integer atomic counter
// after a __threadfence) adds the partials in block order: no float atomics.
// GAN: a grid-stride loop over the elements of both tensors, per-thread double sums, block sums,
// the same last-block finish.
// The grid is a function of the shape only (never of the device), so every run groups the sums the
// same way: the same bits run to run. Indices are int64.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <type_traits>

#include "common/checks.h"
#include "losses/losses.h"

namespace genfast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = 2048;

// ---------------------------------------------------------------------------------------------------
// Elementwise math in the math type T (float, or double for double inputs); returns the loss and sets
// grad to its derivative. Comparisons are written so that NaN propagates (x < 0 ? 0 : x keeps NaN).

template <typename T>
__device__ __forceinline__ T relu(T x) {
  return x < T(0) ? T(0) : x;
}

template <typename T>
__device__ __forceinline__ T bce(T x, T t, T& grad) {
  const T e = exp(-fabs(x));  // in (0, 1]: never overflows
  grad = (x >= T(0) ? T(1) : e) / (T(1) + e) - t;
  return (T(1) - t) * x + relu(-x) + log1p(e);  // PyTorch's form: its NaN at infinite logits too
}

template <typename T>
__device__ __forceinline__ T gan_term(Term term, T x, T p, T& grad) {
  T loss;
  switch (term) {
    case Term::Bce: loss = bce(x, p, grad); break;
    case Term::Hinge: {
      const T h = T(1) + p * x;
      grad = h > T(0) ? p : T(0);
      loss = relu(h);
      break;
    }
    case Term::Square: grad = x - p, loss = T(0.5) * grad * grad; break;
    default: grad = p, loss = p * x; break;
  }
  if (x != x) grad = x;  // NaN in, NaN gradient
  return loss;
}

// ---------------------------------------------------------------------------------------------------
// Deterministic reductions

// Sum over the block of one double per thread, in a fixed order; valid in thread 0. Every thread of
// the block must call it.
__device__ double block_sum(double v, double* shared) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // shared may still be read from the previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = 0;
  if (warp == 0) {
    v = lane < kWarps ? shared[lane] : 0.0;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Thread 0 has written this block's partial sums; true in the one block that finishes last, which
// then sees every block's partials. Every thread of the block must call it.
__device__ bool is_last_block(unsigned int* counter) {
  __shared__ bool last;
  __threadfence();  // this block's partials are visible device-wide before it is counted
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  return last;
}

// Sums of the blocks' partial pairs (a, b), in block order: valid in thread 0 of the last block.
__device__ void sum_partials(const double* partial, double* shared, double& a, double& b) {
  a = 0, b = 0;
  for (int64_t p = threadIdx.x; p < gridDim.x; p += blockDim.x) {
    a += __ldcg(partial + 2 * p);  // written by other blocks: read past L1
    b += __ldcg(partial + 2 * p + 1);
  }
  a = block_sum(a, shared);
  b = block_sum(b, shared);
}

// ---------------------------------------------------------------------------------------------------
// ELBO

template <typename scalar_t>
struct ElboOut {
  scalar_t *grad_x, *grad_mu, *grad_lv;  // null without need_grad
  scalar_t *loss, *r, *k;                // (B,) for None, one element for Mean/Sum
};

template <Recon R, typename scalar_t, typename target_t>
__global__ void __launch_bounds__(kThreads)
    elbo_kernel(const scalar_t* __restrict__ x, const target_t* __restrict__ t, const scalar_t* __restrict__ mu,
                const scalar_t* __restrict__ lv, ElboOut<scalar_t> out, double* partial, unsigned int* counter,
                int64_t b, int64_t d, int64_t l, double beta, at::opmath_type<scalar_t> tscale,
                at::opmath_type<scalar_t> gscale, double out_scale, bool per_sample) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ double shared[kWarps];
  double block_r = 0, block_k = 0;  // thread 0: this block's rows, in row order
  for (int64_t i = blockIdx.x; i < b; i += gridDim.x) {
    double r = 0, k = 0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      const int64_t idx = i * d + j;
      const acc_t xv = static_cast<acc_t>(x[idx]), tv = static_cast<acc_t>(t[idx]) * tscale;
      acc_t grad;
      if constexpr (R == Recon::Bce) {
        r += bce(xv, tv, grad);
      } else {
        const double d = static_cast<double>(xv) - static_cast<double>(tv);  // fp64: exact for fp32 inputs
        grad = static_cast<acc_t>(2 * d);
        r += d * d;
      }
      if (out.grad_x) out.grad_x[idx] = static_cast<scalar_t>(grad * gscale);
    }
    for (int64_t j = threadIdx.x; j < l; j += blockDim.x) {  // in double: latent rows are short
      const int64_t idx = i * l + j;
      const double m = static_cast<double>(mu[idx]), v = static_cast<double>(lv[idx]);
      const double em1 = expm1(v);  // exp(logvar) - 1 without cancellation near 0
      k += em1 - v + m * m;
      if (out.grad_mu) {
        out.grad_mu[idx] = static_cast<scalar_t>(out_scale * m);
        out.grad_lv[idx] = static_cast<scalar_t>(out_scale * 0.5 * em1);
      }
    }
    r = block_sum(r, shared);
    k = 0.5 * block_sum(k, shared);
    if (threadIdx.x == 0) {
      if (per_sample) {
        out.loss[i] = static_cast<scalar_t>(r + beta * k);
        out.r[i] = static_cast<scalar_t>(r);
        out.k[i] = static_cast<scalar_t>(k);
      } else {
        block_r += r, block_k += k;
      }
    }
  }
  if (per_sample) return;  // the same for every block
  if (threadIdx.x == 0) partial[2 * blockIdx.x] = block_r, partial[2 * blockIdx.x + 1] = block_k;
  if (!is_last_block(counter)) return;
  double rs, ks;
  sum_partials(partial, shared, rs, ks);
  if (threadIdx.x == 0) {  // out_scale: 1/B (Mean) or 1 (Sum)
    out.loss[0] = static_cast<scalar_t>((rs + beta * ks) * out_scale);
    out.r[0] = static_cast<scalar_t>(rs * out_scale);
    out.k[0] = static_cast<scalar_t>(ks * out_scale);
  }
}

// ---------------------------------------------------------------------------------------------------
// GAN

template <typename T>
struct GanSide {
  Term term;
  T param, gscale;  // gradient = gscale * f'(x)
  double scale;     // of this side's sum in the loss: 1/N (Mean) or 1
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    gan_kernel(const scalar_t* __restrict__ x0, const scalar_t* __restrict__ x1, scalar_t* g0, scalar_t* g1,
               scalar_t* out, double* partial, unsigned int* counter, int64_t n0, int64_t n1, GanSide<double> s0,
               GanSide<double> s1, bool per_element) {
  using acc_t = double;  // a GAN loss is a scalar of a few logits, correctly rounded only from fp64 terms
  __shared__ double shared[kWarps];
  const int64_t n = n0 > n1 ? n0 : n1, stride = int64_t(gridDim.x) * blockDim.x;
  double sum0 = 0, sum1 = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += stride) {
    acc_t each = 0, grad;
    if (i < n0) {
      const acc_t f = gan_term(s0.term, static_cast<acc_t>(x0[i]), s0.param, grad);
      sum0 += f, each += f;
      if (g0) g0[i] = static_cast<scalar_t>(grad * s0.gscale);
    }
    if (i < n1) {
      const acc_t f = gan_term(s1.term, static_cast<acc_t>(x1[i]), s1.param, grad);
      sum1 += f, each += f;
      if (g1) g1[i] = static_cast<scalar_t>(grad * s1.gscale);
    }
    if (per_element && i < n0) out[i] = static_cast<scalar_t>(each);
  }
  if (per_element) return;  // the same for every block
  sum0 = block_sum(sum0, shared);
  sum1 = block_sum(sum1, shared);
  if (threadIdx.x == 0) partial[2 * blockIdx.x] = sum0, partial[2 * blockIdx.x + 1] = sum1;
  if (!is_last_block(counter)) return;
  sum_partials(partial, shared, sum0, sum1);
  if (threadIdx.x == 0) out[0] = static_cast<scalar_t>(sum0 * s0.scale + sum1 * s1.scale);
}

// ---------------------------------------------------------------------------------------------------
// Host side

int64_t grid_for(int64_t work) { return std::min(std::max<int64_t>(work, 1), kMaxBlocks); }

// Partial sums (two doubles per block) and the finishing counter, zeroed by a memset.
struct Workspace {
  at::Tensor storage;
  double* partial;
  unsigned int* counter;
};

Workspace workspace(int64_t grid, const at::Tensor& like, cudaStream_t stream) {
  Workspace w;
  w.storage = at::empty({int64_t(2 * grid * sizeof(double) + sizeof(unsigned int))}, like.options().dtype(at::kByte));
  w.partial = reinterpret_cast<double*>(w.storage.data_ptr());
  w.counter = reinterpret_cast<unsigned int*>(w.partial + 2 * grid);
  C10_CUDA_CHECK(cudaMemsetAsync(w.counter, 0, sizeof(unsigned int), stream));
  return w;
}

}  // namespace

std::vector<at::Tensor> losses_elbo_forward_cuda(const at::Tensor& recon, const at::Tensor& target,
                                                 const at::Tensor& mu, const at::Tensor& logvar, double beta,
                                                 int64_t recon_kind, int64_t reduction, double target_scale,
                                                 bool need_grad) {
  CHECK_CUDA(recon);
  CHECK_CUDA(target);
  CHECK_CUDA(mu);
  CHECK_CUDA(logvar);
  CHECK_SAME_DEVICE(recon, target);  // one kernel reads them all: one GPU (a direct _C call can mix them)
  CHECK_SAME_DEVICE(recon, mu);
  CHECK_SAME_DEVICE(recon, logvar);
  check_elbo_inputs(recon, target, mu, logvar, recon_kind, reduction, target_scale);
  const c10::cuda::CUDAGuard guard(recon.device());
  const int64_t b = recon.size(0), d = recon.size(1), l = mu.size(1);
  const Reduction red = static_cast<Reduction>(reduction);
  const bool per_sample = red == Reduction::None;
  const double gscale = red == Reduction::Mean ? 1.0 / b : 1.0;
  std::vector<at::Tensor> out;  // the kernel writes every output; zeros only for a "sum" over no rows
  for (int o = 0; o < 3; ++o) {
    out.push_back(per_sample ? at::empty({b}, recon.options())
                             : (b > 0 ? at::empty({}, recon.options()) : at::zeros({}, recon.options())));
  }
  out.push_back(need_grad ? at::empty_like(recon) : at::empty({0}, recon.options()));
  out.push_back(need_grad ? at::empty_like(mu) : at::empty({0}, recon.options()));
  out.push_back(need_grad ? at::empty_like(logvar) : at::empty({0}, recon.options()));
  if (b == 0) return out;  // an empty batch: zeros ("sum") or empty tensors, no launch
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t grid = grid_for(b);
  const Workspace w = per_sample ? Workspace{} : workspace(grid, recon, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, recon.scalar_type(), "losses_elbo_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ElboOut<scalar_t> o{need_grad ? out[3].data_ptr<scalar_t>() : nullptr,
                              need_grad ? out[4].data_ptr<scalar_t>() : nullptr,
                              need_grad ? out[5].data_ptr<scalar_t>() : nullptr,
                              out[0].data_ptr<scalar_t>(),
                              out[1].data_ptr<scalar_t>(),
                              out[2].data_ptr<scalar_t>()};
    auto launch = [&](auto recon_tag, auto* target_ptr) {
      constexpr Recon R = decltype(recon_tag)::value;
      using target_t = std::remove_const_t<std::remove_pointer_t<decltype(target_ptr)>>;
      elbo_kernel<R, scalar_t, target_t><<<grid, kThreads, 0, stream>>>(
          recon.data_ptr<scalar_t>(), target_ptr, mu.data_ptr<scalar_t>(), logvar.data_ptr<scalar_t>(), o, w.partial,
          w.counter, b, d, l, beta, static_cast<acc_t>(target_scale), static_cast<acc_t>(gscale), gscale, per_sample);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto by_target = [&](auto recon_tag) {
      if (target.scalar_type() == at::kByte) launch(recon_tag, target.data_ptr<uint8_t>());
      else launch(recon_tag, target.data_ptr<scalar_t>());
    };
    if (static_cast<Recon>(recon_kind) == Recon::Bce) by_target(std::integral_constant<Recon, Recon::Bce>{});
    else by_target(std::integral_constant<Recon, Recon::Mse>{});
  });
  return out;
}

std::vector<at::Tensor> losses_gan_forward_cuda(const at::Tensor& first, const at::Tensor& second, int64_t term0,
                                                double param0, int64_t term1, double param1, int64_t reduction,
                                                bool need_grad) {
  CHECK_CUDA(first);
  CHECK_CUDA(second);
  CHECK_SAME_DEVICE(first, second);
  check_gan_inputs(first, second, term0, term1, reduction);
  const c10::cuda::CUDAGuard guard(first.device());
  const Reduction red = static_cast<Reduction>(reduction);
  const bool per_element = red == Reduction::None;
  const int64_t n0 = first.numel(), n1 = second.numel(), n = std::max(n0, n1);
  at::Tensor loss = per_element ? at::empty(first.sizes(), first.options())
                                : (n > 0 ? at::empty({}, first.options()) : at::zeros({}, first.options()));
  at::Tensor g0 = need_grad ? at::empty_like(first) : at::empty({0}, first.options());
  at::Tensor g1 = need_grad ? at::empty_like(second) : at::empty({0}, first.options());
  if (n == 0) return {loss, g0, g1};  // nothing to add: 0 ("sum") or an empty tensor, no launch
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t grid = grid_for((n + kThreads - 1) / kThreads);
  const Workspace w = per_element ? Workspace{} : workspace(grid, first, stream);
  const auto scale = [&](int64_t count) { return red == Reduction::Mean && count > 0 ? 1.0 / count : 1.0; };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "losses_gan_forward_cuda", [&] {
    const GanSide<double> s0{static_cast<Term>(term0), param0, scale(n0), scale(n0)};
    const GanSide<double> s1{static_cast<Term>(term1), param1, scale(n1), scale(n1)};
    gan_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        first.data_ptr<scalar_t>(), second.data_ptr<scalar_t>(), need_grad ? g0.data_ptr<scalar_t>() : nullptr,
        need_grad ? g1.data_ptr<scalar_t>() : nullptr, loss.data_ptr<scalar_t>(), w.partial, w.counter, n0, n1, s0, s1,
        per_element);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, g0, g1};
}

}  // namespace genfast
