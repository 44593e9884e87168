// CPU backend of reparameterization sampling and the Gaussian KL (contract in reparam.h).
//
// Noise: eps[i] = lane i % 4 of the Philox group i / 4 (common/philox.h). kChunk elements at a time,
// the Philox bits of every group the chunk touches are made a vector's lane count of groups at a time (8
// on AVX2, 16 on AVX-512; the scalar engine of philox.h for the rest), then Box-Muller runs on vectors:
// log, sin and cos inline (cpu_math.h), sqrt in hardware. The noise is a function of the element index
// alone, so neither the thread count nor the cut of the work changes a bit. Seed: one random64() draw from the CPU
// generator, under its lock; offset 0.
//
// Math in the math type (fp32, fp64 for fp64). KL: kl_row of common/cpu_math.h (terms in the math type,
// compensated lane sums, each row in index order); long rows are not split (one thread a row).
// Bytes (e per element, n elements, r rows): forward reads 2en, writes en; backward reads 2en, writes
// en; kl_forward reads 2en, writes 8r; kl_backward reads 2en + 8r, writes 2en; reparam_kl_backward
// reads 3en + 8r, writes 2en.
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

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// Philox4x32-10 on as many groups at once as a Vectorized<float> has lanes (8 on AVX2, 16 on AVX-512):
// one 32-bit word of each group per integer lane.
#ifdef CPU_CAPABILITY_AVX512
using Words = __m512i;
inline Words splat(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
inline Words lane_index() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
inline Words add(Words a, Words b) { return _mm512_add_epi32(a, b); }
inline Words bit_xor(Words a, Words b) { return _mm512_xor_si512(a, b); }
inline void mulhilo(Words a, Words b, Words& hi, Words& lo) {       // the 32-bit halves of a * b in each lane
  const Words even = _mm512_mul_epu32(a, b);                        // lanes 0, 2, ... as 64-bit products
  const Words odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), b);  // lanes 1, 3, ...
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}
inline Vectorized<float> to_float(Words w) { return _mm512_cvtepi32_ps(_mm512_srli_epi32(w, 8)); }
#else
using Words = __m256i;
inline Words splat(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
inline Words lane_index() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
inline Words add(Words a, Words b) { return _mm256_add_epi32(a, b); }
inline Words bit_xor(Words a, Words b) { return _mm256_xor_si256(a, b); }
inline void mulhilo(Words a, Words b, Words& hi, Words& lo) {
  const Words even = _mm256_mul_epu32(a, b);
  const Words odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), b);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
inline Vectorized<float> to_float(Words w) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 8)); }
#endif
constexpr int64_t kGroupsAtOnce = Vectorized<float>::size();

inline Vectorized<float> uniform(Words bits) {  // philox_uniform of each lane, the same float operations
  using V = Vectorized<float>;
  return (to_float(bits) + V(0.5f)) * V(5.9604644775390625e-08f);
}

// Uniform pairs of groups g .. g + kGroupsAtOnce - 1 (philox_bits4 of each): pair 2j from words (0, 1) of
// group g + j, pair 2j + 1 from words (2, 3); radius uniforms to radius_u, angle uniforms to angle_u
// (2 kGroupsAtOnce each). Needs uint32(g) + kGroupsAtOnce - 1 not to wrap (the caller checks).
void philox_pairs(NoiseState state, uint64_t g, float* radius_u, float* angle_u) {
  Words c0 = splat(static_cast<uint32_t>(state.offset)), c1 = splat(static_cast<uint32_t>(state.offset >> 32));
  Words c2 = add(splat(static_cast<uint32_t>(g)), lane_index()), c3 = splat(static_cast<uint32_t>(g >> 32));
  uint32_t k0 = static_cast<uint32_t>(state.seed), k1 = static_cast<uint32_t>(state.seed >> 32);
  const Words multiplier_a = splat(0xD2511F53u), multiplier_b = splat(0xCD9E8D57u);
  for (int round = 0; round < 10; ++round, k0 += 0x9E3779B9u, k1 += 0xBB67AE85u) {
    Words hi0, lo0, hi1, lo1;
    mulhilo(c0, multiplier_a, hi0, lo0);
    mulhilo(c2, multiplier_b, hi1, lo1);
    c0 = bit_xor(bit_xor(hi1, c1), splat(k0));
    c1 = lo1;
    c2 = bit_xor(bit_xor(hi0, c3), splat(k1));
    c3 = lo0;
  }
  const auto store_pairs = [](Words first, Words second, float* out) {  // into pair order
    const auto [lo, hi] = at::vec::interleave2(uniform(first), uniform(second));
    lo.store(out);
    hi.store(out + kGroupsAtOnce);
  };
  store_pairs(c0, c2, radius_u);
  store_pairs(c1, c3, angle_u);
}
#endif

// eps[first, first + len) (len <= kChunk) into buf (kChunk + 8 floats); returns where they start.
const float* fill_noise(NoiseState state, int64_t first, int64_t len, float* buf) {
  using V = Vectorized<float>;
  constexpr int64_t kPairs = kChunk / 2 + 2 * V::size();  // Box-Muller pairs of the groups a chunk touches
  float radius_u[kPairs], angle_u[kPairs];
  const int64_t g0 = first / 4, g1 = (first + len + 3) / 4;
  int64_t g = g0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  for (; g + kGroupsAtOnce <= g1 && static_cast<uint32_t>(g) <= 0xFFFFFFFFu - (kGroupsAtOnce - 1); g += kGroupsAtOnce)
    philox_pairs(state, static_cast<uint64_t>(g), radius_u + 2 * (g - g0), angle_u + 2 * (g - g0));
#endif
  for (; g < g1; ++g) {
    const Bits4 bits = philox_bits4(state.seed, state.offset, static_cast<uint64_t>(g));
    for (int k = 0; k < 4; k += 2) {
      radius_u[2 * (g - g0) + k / 2] = philox_uniform(bits.v[k]);
      angle_u[2 * (g - g0) + k / 2] = philox_uniform(bits.v[k + 1]);
    }
  }
  // Box-Muller on vectors of pairs; normals 2p and 2p + 1 from pair p, interleaved into buf.
  const int64_t pairs = 2 * (g1 - g0);
  for (int64_t p = 0; p < pairs; p += V::size()) {
    const int64_t m = std::min<int64_t>(V::size(), pairs - p);
    const V radius = (V(-2.0f) * log_positive(V::loadu(radius_u + p, m))).sqrt();  // lanes past m: never stored
    V cos_theta, sin_theta;
    sincos_circle(V(6.283185307179586f) * V::loadu(angle_u + p, m), cos_theta, sin_theta);
    const auto [lo, hi] = at::vec::interleave2(radius * cos_theta, radius * sin_theta);
    lo.store(buf + 2 * p, std::min<int64_t>(2 * m, V::size()));
    if (2 * m > V::size()) hi.store(buf + 2 * p + V::size(), 2 * m - V::size());
  }
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

// Both gradients of reparam_kl for elements [first, first + len) (flat index; the row of element i is
// i / cols, its KL gradient g = grad_kl[row]): grad_mu = grad_z + g mu, grad_logvar = 0.5 (grad_z eps
// exp(0.5 logvar) + g expm1(logvar)), in the math type, each rounded once. One pass where the sampling
// and KL backward kernels and two adds took five; cut by elements, not rows, so short rows (a latent of
// 20) still draw their noise a vector of Philox groups at a time.
template <typename scalar_t>
void sample_kl_gradients(NoiseState state, const scalar_t* grad_z, const double* grad_kl, const scalar_t* mu,
                         const scalar_t* logvar, scalar_t* grad_mu, scalar_t* grad_logvar, int64_t cols, int64_t first,
                         int64_t len) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  const V half(acc_t(0.5));
  float noise[kChunk + 8];
  acc_t gzbuf[kChunk], mbuf[kChunk], lbuf[kChunk], ebuf[kChunk], gbuf[kChunk], gmbuf[kChunk], glbuf[kChunk];
  int64_t row = first / cols, col = first - row * cols;  // of element j0 + j, advanced as j runs
  for (int64_t j0 = first; j0 < first + len; j0 += kChunk) {
    const int64_t n = std::min(kChunk, first + len - j0);
    for (int64_t j = 0; j < n;) {  // a run of one row's g at a time
      const int64_t run = std::min(n - j, cols - col);
      std::fill(gbuf + j, gbuf + j + run, static_cast<acc_t>(grad_kl[row]));
      j += run, col += run;
      if (col == cols) col = 0, ++row;
    }
    const acc_t* eps = as_math(fill_noise(state, j0, n, noise), ebuf, n, acc_t(1));
    const acc_t* gzs = as_math(grad_z + j0, gzbuf, n, acc_t(1));
    const acc_t* ms = as_math(mu + j0, mbuf, n, acc_t(1));
    const acc_t* ls = as_math(logvar + j0, lbuf, n, acc_t(1));
    acc_t* gm = grad_slot<acc_t>(grad_mu + j0, gmbuf);
    acc_t* gl = grad_slot<acc_t>(grad_logvar + j0, glbuf);
    for (int64_t j = 0; j < n; j += V::size()) {
      const int64_t m = std::min<int64_t>(V::size(), n - j);
      const V gz = V::loadu(gzs + j, m), lv = V::loadu(ls + j, m), g = V::loadu(gbuf + j, m);
      (gz + g * V::loadu(ms + j, m)).store(gm + j, m);
      (half * (gz * V::loadu(eps + j, m) * cpu_math::exp(half * lv) + g * expm1(lv))).store(gl + j, m);
    }
    store_grad(gmbuf, grad_mu + j0, n);
    store_grad(glbuf, grad_logvar + j0, n);
  }
}

struct Sample {  // z = mu + exp(0.5 logvar) eps
  template <typename V>
  V operator()(V mu, V logvar, V eps) const {
    return mu + cpu_math::exp(V(0.5) * logvar) * eps;
  }
};

struct SampleGradient {  // grad_logvar = 0.5 grad_z eps exp(0.5 logvar)
  template <typename V>
  V operator()(V grad_z, V logvar, V eps) const {
    return V(0.5) * grad_z * eps * cpu_math::exp(V(0.5) * logvar);
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

void check_grad_kl(const at::Tensor& grad_kl, const at::Tensor& mu) {
  CHECK_CPU(grad_kl);
  CHECK_CONTIGUOUS(grad_kl);
  TORCH_CHECK(grad_kl.scalar_type() == kl_dtype(mu), "grad_kl must be ", kl_dtype(mu), ", got ", grad_kl.scalar_type());
  CHECK_SHAPE(grad_kl, rows_of(mu));
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
          // z of the whole block in one call: short rows (a latent of 20) would each draw fewer
          // Philox groups than a vector holds, and the block's mu and logvar are still in cache for the KL.
          if (zp) map_with_noise(state, mp, lp, zp, begin * cols, (end - begin) * cols, Sample{});
          for (int64_t r = begin; r < end; ++r)
            kp[r] = kl_row(mp + r * cols, lp + r * cols, (scalar_t*)nullptr, (scalar_t*)nullptr, cols, 1.0);
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
  check_grad_kl(grad_kl, mu);
  const int64_t cols = mu.size(-1), rows = rows_of(mu);
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

std::vector<at::Tensor> reparam_kl_backward_cpu(const at::Tensor& grad_z, const at::Tensor& grad_kl,
                                                const at::Tensor& mu, const at::Tensor& logvar,
                                                const at::Tensor& rng_state) {
  check_pair(mu, logvar);
  CHECK_CPU(grad_z);
  CHECK_CONTIGUOUS(grad_z);
  CHECK_SAME_DTYPE(grad_z, mu);
  CHECK_SAME_SHAPE(grad_z, mu);
  check_rows(mu);
  check_grad_kl(grad_kl, mu);
  const NoiseState state = read_noise(rng_state);
  const int64_t cols = mu.size(-1);
  at::Tensor grad_mu = at::empty_like(mu), grad_logvar = at::empty_like(logvar);
  if (mu.numel() == 0) return {grad_mu, grad_logvar};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparam_kl_backward_cpu", [&] {
    const double* gp = grad_kl.data_ptr<double>();
    const scalar_t* gzp = grad_z.data_ptr<scalar_t>();
    const scalar_t* mp = mu.data_ptr<scalar_t>();
    const scalar_t* lp = logvar.data_ptr<scalar_t>();
    scalar_t* gmp = grad_mu.data_ptr<scalar_t>();
    scalar_t* glp = grad_logvar.data_ptr<scalar_t>();
    at::parallel_for(0, mu.numel(), kGrainElements, [&](int64_t begin, int64_t end) {
      sample_kl_gradients(state, gzp, gp, mp, lp, gmp, glp, cols, begin, end - begin);
    });
  });
  return {grad_mu, grad_logvar};
}

GENFAST_CAPABILITY_NS_END
}  // namespace genfast
