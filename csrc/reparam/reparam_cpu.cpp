// CPU backend of reparameterization sampling and the Gaussian KL (contract in reparam.h).
//
// Noise: eps[i] = lane i % 4 of the Philox group i / 4 (common/philox.h). kChunk elements at a time,
// the Philox bits of every group the chunk touches are made 8 groups at a time (AVX2 integer lanes; the
// scalar engine of philox.h for the rest), then Box-Muller runs on vectors (log, sqrt, sin, cos of at::vec, SLEEF at 1
// ulp). The noise is a function of the element index alone, so neither the thread count nor the cut of the work changes
// a bit. Seed: one random64() draw from the CPU generator, under its lock; offset 0.
//
// Math in the math type (fp32, fp64 for fp64). KL: kl_row of common/cpu_math.h (terms in the math type,
// compensated lane sums, each row in index order); long rows are not split (one thread a row).
// Bytes (e per element, n elements, r rows): forward reads 2en, writes en; backward reads 2en, writes
// en; kl_forward reads 2en, writes 8r; kl_backward reads 2en + 8r, writes 2en.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/Generator.h>
#include <c10/util/accumulate.h>

#include <mutex>

#include "common/checks.h"
#include "common/cpu_capability.h"
#include "common/cpu_math.h"
#include "common/philox.h"
#include "reparam/reparam.h"

namespace genfast {
GENFAST_CAPABILITY_NS_BEGIN  // genfast::<capability>:: in the kernel files (cpu_capability.h)
namespace {
using namespace cpu_math;
constexpr int64_t kGrainElements = 1 << 14;  // work per parallel task

struct NoiseState {
  uint64_t seed, offset;
};

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)  // 8 lanes of AVX2 integers
// (hi, lo): the 32-bit halves of a * b in each of 8 lanes (b: the same 32-bit constant in every lane).
inline void mulhilo8(__m256i a, __m256i b, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, b);                        // lanes 0, 2, 4, 6, as 64-bit products
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), b);  // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

inline __m256 uniform8(__m256i bits) {  // philox_uniform of each lane, the same float operations
  const __m256 integer = _mm256_cvtepi32_ps(_mm256_srli_epi32(bits, 8));
  return _mm256_mul_ps(_mm256_add_ps(integer, _mm256_set1_ps(0.5f)), _mm256_set1_ps(5.9604644775390625e-08f));
}

// Uniform pairs of groups g .. g + 7 (philox_bits4 of each, 8 at a time): pair 2j from words (0, 1) of
// group g + j, pair 2j + 1 from words (2, 3), radius and angle uniforms at radius_u[0, 16), angle_u[0, 16).
// Needs uint32(g) + 7 not to wrap (the caller checks).
void philox_pairs8(NoiseState state, uint64_t g, float* radius_u, float* angle_u) {
  __m256i c0 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(state.offset)));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(state.offset >> 32)));
  __m256i c2 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g))),
                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c3 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32)));
  uint32_t k0 = static_cast<uint32_t>(state.seed), k1 = static_cast<uint32_t>(state.seed >> 32);
  const __m256i multiplier_a = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i multiplier_b = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int round = 0; round < 10; ++round, k0 += 0x9E3779B9u, k1 += 0xBB67AE85u) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(c0, multiplier_a, hi0, lo0);
    mulhilo8(c2, multiplier_b, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
  }
  // Interleave words 0 and 2 (radius), 1 and 3 (angle) into pair order.
  const auto store_pairs = [](__m256 first, __m256 second, float* out) {
    const __m256 lo = _mm256_unpacklo_ps(first, second), hi = _mm256_unpackhi_ps(first, second);
    _mm256_storeu_ps(out, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  };
  store_pairs(uniform8(c0), uniform8(c2), radius_u);
  store_pairs(uniform8(c1), uniform8(c3), angle_u);
}
#endif

// eps[first, first + len) (len <= kChunk) into buf (kChunk + 8 floats); returns where they start.
const float* fill_noise(NoiseState state, int64_t first, int64_t len, float* buf) {
  using V = Vectorized<float>;
  constexpr int64_t kPairs = kChunk / 2 + 16;  // Box-Muller pairs of the groups a chunk can touch, rounded up
  float radius_u[kPairs], angle_u[kPairs], cos_part[kPairs], sin_part[kPairs];
  const int64_t g0 = first / 4, g1 = (first + len + 3) / 4;
  int64_t g = g0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)  // 8 lanes of AVX2 integers
  for (; g + 8 <= g1 && static_cast<uint32_t>(g) <= 0xFFFFFFF8u; g += 8)
    philox_pairs8(state, static_cast<uint64_t>(g), radius_u + 2 * (g - g0), angle_u + 2 * (g - g0));
#endif
  for (; g < g1; ++g) {
    const Bits4 bits = philox_bits4(state.seed, state.offset, static_cast<uint64_t>(g));
    for (int k = 0; k < 4; k += 2) {
      radius_u[2 * (g - g0) + k / 2] = philox_uniform(bits.v[k]);
      angle_u[2 * (g - g0) + k / 2] = philox_uniform(bits.v[k + 1]);
    }
  }
  const int64_t pairs = 2 * (g1 - g0);
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
    at::parallel_for(
        0, rows, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(cols, 1)), [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            if (zp) map_with_noise(state, mp, lp, zp, r * cols, cols, Sample{});
            kp[r] = kl_row(mp + r * cols, lp + r * cols, (scalar_t*)nullptr, (scalar_t*)nullptr, cols, 1.0);
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
  TORCH_CHECK(grad_kl.scalar_type() == kl_dtype(mu), "grad_kl must be ", kl_dtype(mu), ", got ", grad_kl.scalar_type());
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
        kl_row(mp + r * cols, lp + r * cols, gmp + r * cols, glp + r * cols, cols, gp[r], /*want_sum=*/false);
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

GENFAST_CAPABILITY_NS_END
}  // namespace genfast
