// CPU backend of reparameterization sampling and the Gaussian KL (contract in reparam.h).
//
// Noise: eps[i] = lane i % 4 of the Philox group i / 4 (common/philox.h). kChunk elements at a time,
// the Philox bits of every group the chunk touches are made with scalar integer math, then Box-Muller
// runs on vectors (log, sqrt, sin, cos of at::vec, SLEEF at 1 ulp). The noise is a function of the
// element index alone, so neither the thread count nor the cut of the work changes a bit.
// Seed: one random64() draw from the CPU generator, under its lock; offset 0.
//
// Math in the math type (fp32, fp64 for fp64). KL: kl_row of common/cpu_math.h (terms and sum in
// double, each row in index order); long rows are not split (one thread a row).
// Bytes (e per element, n elements, r rows): forward reads 2en, writes en; backward reads 2en, writes
// en; kl_forward reads 2en, writes 8r; kl_backward reads 2en + 8r, writes 2en.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/Generator.h>
#include <c10/util/accumulate.h>

#include <mutex>

#include "common/checks.h"
#include "common/cpu_math.h"
#include "common/philox.h"
#include "reparam/reparam.h"

namespace genfast {
namespace {

using namespace cpu_math;
constexpr int64_t kGrainElements = 1 << 14;  // work per parallel task

struct NoiseState {
  uint64_t seed, offset;
};

// eps[first, first + len) (len <= kChunk) into buf (kChunk + 8 floats); returns where they start.
const float* fill_noise(NoiseState state, int64_t first, int64_t len, float* buf) {
  using V = Vectorized<float>;
  constexpr int64_t kPairs = kChunk / 2 + 4;  // Box-Muller pairs of the groups a chunk can touch
  float radius_u[kPairs], angle_u[kPairs], cos_part[kPairs], sin_part[kPairs];
  const int64_t g0 = first / 4, g1 = (first + len + 3) / 4;
  int64_t pairs = 0;
  for (int64_t g = g0; g < g1; ++g) {
    const Bits4 bits = philox_bits4(state.seed, state.offset, static_cast<uint64_t>(g));
    for (int k = 0; k < 4; k += 2, ++pairs) {
      radius_u[pairs] = philox_uniform(bits.v[k]);
      angle_u[pairs] = philox_uniform(bits.v[k + 1]);
    }
  }
  const V minus_two(-2.0f), two_pi(6.283185307179586f);
  for (int64_t p = 0; p < pairs; p += V::size()) {
    const int64_t m = std::min<int64_t>(V::size(), pairs - p);
    const V r = (minus_two * V::loadu(radius_u + p, m).log()).sqrt();  // unused lanes: log(0), never stored
    const V theta = two_pi * V::loadu(angle_u + p, m);
    (r * theta.cos()).store(cos_part + p, m);
    (r * theta.sin()).store(sin_part + p, m);
  }
  for (int64_t p = 0; p < pairs; ++p) buf[2 * p] = cos_part[p], buf[2 * p + 1] = sin_part[p];
  return buf + (first - 4 * g0);
}

// out[i] = f(a[i], logvar[i], eps[i]) for i in [first, first + len), in the math type.
template <typename scalar_t, typename F>
void map_with_noise(NoiseState state, const scalar_t* a, const scalar_t* logvar, scalar_t* out, int64_t first,
                    int64_t len, const F& f) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  float noise[kChunk + 8];
  acc_t abuf[kChunk], lbuf[kChunk], ebuf[kChunk], obuf[kChunk];
  for (int64_t j0 = first; j0 < first + len; j0 += kChunk) {
    const int64_t n = std::min(kChunk, first + len - j0);
    const acc_t* eps = as_math(fill_noise(state, j0, n, noise), ebuf, n, acc_t(1));
    const acc_t* as = as_math(a + j0, abuf, n, acc_t(1));
    const acc_t* ls = as_math(logvar + j0, lbuf, n, acc_t(1));
    acc_t* os = grad_slot<acc_t>(out + j0, obuf);
    for (int64_t j = 0; j < n; j += V::size()) {
      const int64_t m = std::min<int64_t>(V::size(), n - j);
      f(V::loadu(as + j, m), V::loadu(ls + j, m), V::loadu(eps + j, m)).store(os + j, m);
    }
    store_grad(obuf, out + j0, n);
  }
}

struct Sample {  // z = mu + exp(0.5 logvar) eps
  template <typename V>
  V operator()(V mu, V logvar, V eps) const {
    return mu + (V(0.5) * logvar).exp() * eps;
  }
};

struct SampleGradient {  // grad_logvar = 0.5 grad_z eps exp(0.5 logvar)
  template <typename V>
  V operator()(V grad_z, V logvar, V eps) const {
    return V(0.5) * grad_z * eps * (V(0.5) * logvar).exp();
  }
};

void check_pair(const at::Tensor& mu, const at::Tensor& logvar) {
  CHECK_CPU(mu);
  CHECK_CPU(logvar);
  CHECK_CONTIGUOUS(mu);
  CHECK_CONTIGUOUS(logvar);
  CHECK_FLOATING(mu);
  CHECK_SAME_DTYPE(mu, logvar);
  CHECK_SAME_SHAPE(mu, logvar);
}

void check_rows(const at::Tensor& mu) {
  TORCH_CHECK(mu.dim() >= 1, "mu must have at least one dimension (the latent one), got a scalar");
}

int64_t rows_of(const at::Tensor& mu) { return c10::multiply_integers(mu.sizes().begin(), mu.sizes().end() - 1); }

at::ScalarType kl_dtype(const at::Tensor&) { return at::kDouble; }  // reparam.h says why

// One seed from the generator (default: the CPU one) and an rng_state (seed, 0) for backward.
NoiseState draw_noise(const c10::optional<at::Generator>& generator, at::Tensor& rng_state) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  uint64_t seed;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed = gen->random64();
  }
  rng_state = at::empty({2}, at::kLong);
  rng_state.data_ptr<int64_t>()[0] = static_cast<int64_t>(seed);
  rng_state.data_ptr<int64_t>()[1] = 0;
  return {seed, 0};
}

NoiseState read_noise(const at::Tensor& rng_state) {
  CHECK_CPU(rng_state);
  TORCH_CHECK(rng_state.scalar_type() == at::kLong, "rng_state must be int64, got ", rng_state.scalar_type());
  CHECK_SHAPE(rng_state, 2);
  const at::Tensor state = rng_state.contiguous();
  return {static_cast<uint64_t>(state.data_ptr<int64_t>()[0]), static_cast<uint64_t>(state.data_ptr<int64_t>()[1])};
}

// z (if given) and kl of every row; one task a block of rows.
void rows_pass(const at::Tensor& mu, const at::Tensor& logvar, at::Tensor* z, NoiseState state, at::Tensor& kl) {
  const int64_t cols = mu.size(-1), rows = rows_of(mu);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "kl_rows_cpu", [&] {
    const scalar_t* mp = mu.data_ptr<scalar_t>();
    const scalar_t* lp = logvar.data_ptr<scalar_t>();
    scalar_t* zp = z ? z->data_ptr<scalar_t>() : nullptr;
    double* kp = kl.data_ptr<double>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r) {
                         if (zp) map_with_noise(state, mp, lp, zp, r * cols, cols, Sample{});
                         kp[r] = kl_row(mp + r * cols, lp + r * cols, (scalar_t*)nullptr,
                                        (scalar_t*)nullptr, cols, 1.0);
                       }
                     });
  });
}

}  // namespace

std::vector<at::Tensor> reparam_forward_cpu(const at::Tensor& mu, const at::Tensor& logvar,
                                            c10::optional<at::Generator> generator) {
  check_pair(mu, logvar);
  at::Tensor z = at::empty_like(mu);
  const int64_t n = mu.numel();
  if (n == 0) return {z, at::zeros({2}, at::kLong)};  // no noise drawn
  at::Tensor rng_state;
  const NoiseState state = draw_noise(generator, rng_state);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparam_forward_cpu", [&] {
    const scalar_t* mp = mu.data_ptr<scalar_t>();
    const scalar_t* lp = logvar.data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrainElements, [&](int64_t begin, int64_t end) {
      map_with_noise(state, mp, lp, zp, begin, end - begin, Sample{});
    });
  });
  return {z, rng_state};
}

at::Tensor reparam_backward_cpu(const at::Tensor& grad_z, const at::Tensor& logvar, const at::Tensor& rng_state) {
  check_pair(grad_z, logvar);
  const NoiseState state = read_noise(rng_state);
  at::Tensor grad_logvar = at::empty_like(logvar);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logvar.scalar_type(), "reparam_backward_cpu", [&] {
    const scalar_t* gp = grad_z.data_ptr<scalar_t>();
    const scalar_t* lp = logvar.data_ptr<scalar_t>();
    scalar_t* op = grad_logvar.data_ptr<scalar_t>();
    at::parallel_for(0, logvar.numel(), kGrainElements, [&](int64_t begin, int64_t end) {
      map_with_noise(state, gp, lp, op, begin, end - begin, SampleGradient{});
    });
  });
  return grad_logvar;
}

at::Tensor kl_forward_cpu(const at::Tensor& mu, const at::Tensor& logvar) {
  check_pair(mu, logvar);
  check_rows(mu);
  at::Tensor kl = at::empty({rows_of(mu)}, mu.options().dtype(kl_dtype(mu)));
  if (mu.numel() == 0) return kl.zero_();
  rows_pass(mu, logvar, nullptr, {}, kl);
  return kl;
}

std::vector<at::Tensor> kl_backward_cpu(const at::Tensor& grad_kl, const at::Tensor& mu, const at::Tensor& logvar) {
  check_pair(mu, logvar);
  check_rows(mu);
  CHECK_CPU(grad_kl);
  CHECK_CONTIGUOUS(grad_kl);
  TORCH_CHECK(grad_kl.scalar_type() == kl_dtype(mu), "grad_kl must be ", kl_dtype(mu), ", got ",
              grad_kl.scalar_type());
  const int64_t cols = mu.size(-1), rows = rows_of(mu);
  CHECK_SHAPE(grad_kl, rows);
  at::Tensor grad_mu = at::empty_like(mu), grad_logvar = at::empty_like(logvar);
  if (mu.numel() == 0) return {grad_mu, grad_logvar};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "kl_backward_cpu", [&] {
    const double* gp = grad_kl.data_ptr<double>();
    const scalar_t* mp = mu.data_ptr<scalar_t>();
    const scalar_t* lp = logvar.data_ptr<scalar_t>();
    scalar_t* gmp = grad_mu.data_ptr<scalar_t>();
    scalar_t* glp = grad_logvar.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        kl_row(mp + r * cols, lp + r * cols, gmp + r * cols, glp + r * cols, cols, gp[r]);
    });
  });
  return {grad_mu, grad_logvar};
}

std::vector<at::Tensor> reparam_kl_forward_cpu(const at::Tensor& mu, const at::Tensor& logvar,
                                               c10::optional<at::Generator> generator) {
  check_pair(mu, logvar);
  check_rows(mu);
  at::Tensor z = at::empty_like(mu);
  at::Tensor kl = at::empty({rows_of(mu)}, mu.options().dtype(kl_dtype(mu)));
  if (mu.numel() == 0) return {z, at::zeros({2}, at::kLong), kl.zero_()};  // no noise drawn
  at::Tensor rng_state;
  const NoiseState state = draw_noise(generator, rng_state);
  rows_pass(mu, logvar, &z, state, kl);
  return {z, rng_state, kl};
}

}  // namespace genfast
