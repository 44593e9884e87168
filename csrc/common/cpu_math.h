// Vectorized helpers of the CPU kernels (dense, losses, reparam): the activations' math functions on
// Vectorized lanes, conversion to the math type in small buffers, lane-wise sums (in double, or compensated
// in the math type), and the Gaussian KL of one row with its gradient.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common/cpu_capability.h"

namespace genfast {
GENFAST_CAPABILITY_NS_BEGIN  // genfast::<capability>:: in the kernel files (cpu_capability.h)
namespace cpu_math {
using at::vec::Vectorized;
constexpr int64_t kChunk = 256;  // elements per conversion buffer (half, bfloat16, uint8 -> float)

template <typename V>
C10_ALWAYS_INLINE V log1p_unit(const V& e);  // below

// activations.h's math functions on Vectorized<float> or Vectorized<double> lanes (SLEEF where ATen uses
// it), so act_forward<VecMath> / act_derivative<VecMath> run the one formula of each activation on vectors.
struct VecMath {
  template <typename V>
  static V exp(const V& x) {
    return x.exp();
  }
  template <typename V>
  static V log1p_unit(const V& x) {
    return cpu_math::log1p_unit(x);
  }
  template <typename V>
  static V erf(const V& x) {
    return x.erf();
  }
  template <typename V>
  static V tanh(const V& x) {
    return x.tanh();
  }
  template <typename V>
  static V select(const V& c, const V& a, const V& b) {
    return V::blendv(b, a, c);
  }  // c: a comparison's lanes
};

// `len` values of src in the math type: src itself when it already is, else converted into buf and
// multiplied by scale (uint8 pixels 0..255 -> 0..1 with scale 1/255).
template <typename acc_t, typename src_t>
const acc_t* as_math(const src_t* src, acc_t* buf, int64_t len, acc_t scale) {
  if constexpr (std::is_same_v<src_t, acc_t>) {
    return src;
  } else {
    at::vec::convert(src, buf, len);
    const Vectorized<acc_t> vscale(scale);
    if (scale != acc_t(1)) at::vec::map([vscale](Vectorized<acc_t> v) { return v * vscale; }, buf, buf, len);
    return buf;
  }
}

// Where a chunk's gradient goes: straight into out when it is in the math type, else into buf first.
template <typename acc_t, typename scalar_t>
acc_t* grad_slot(scalar_t* out, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) return out;
  else return out ? buf : nullptr;
}

template <typename acc_t, typename scalar_t>
void store_grad(const acc_t* buf, scalar_t* out, int64_t len) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    if (out) at::vec::convert(buf, out, len);
  }
}

template <typename V>
double lanes_sum(const V& v) {
  typename V::value_type lanes[V::size()];
  v.store(lanes);
  double total = 0;
  for (int t = 0; t < V::size(); ++t) total += lanes[t];
  return total;
}

// Lane-wise sums in double of vectors of float or double, in the order they are added.
class Fp64Sum {
 public:
  void add(const Vectorized<double>& v) { lo_ += v; }
  void add(const Vectorized<float>& v) {
#ifdef CPU_CAPABILITY_AVX2
    lo_ += Vectorized<double>(_mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    hi_ += Vectorized<double>(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
#elif defined(CPU_CAPABILITY_AVX512)
    lo_ += Vectorized<double>(_mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    hi_ += Vectorized<double>(_mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)));
#else
    float lanes[Vectorized<float>::size()];
    v.store(lanes);
    for (float lane : lanes) rest_ += lane;
#endif
  }
  double total() const { return lanes_sum(lo_) + lanes_sum(hi_) + rest_; }

 private:
  Vectorized<double> lo_{0}, hi_{0};
  double rest_ = 0;
};

// Kahan sums of vectors, lane by lane, in the vectors' type: close to double sums at the full width of
// the math type (fp32 lanes are twice as many as double ones). total() adds the lanes in double.
// (No -ffast-math here: it would optimise the compensation away.) An infinite term makes the carry NaN
// (inf - inf): a plain sum beside it gives the total then, inf or NaN as eager's sum would.
template <typename V>
class CompensatedSum {
 public:
  void add(const V& v) {
    const V y = v - carry_;
    const V t = sum_ + y;
    carry_ = (t - sum_) - y;
    sum_ = t;
    plain_ = plain_ + v;
  }
  double total() const {
    const double plain = lanes_sum(plain_);
    return std::isfinite(plain) ? lanes_sum(sum_) - lanes_sum(carry_) : plain;
  }

 private:
  V sum_{0}, carry_{0}, plain_{0};
};

// CompensatedSum of a buffer's values, four vectors a step into four independent sums: one sum's chain of
// dependent adds (four a vector) would otherwise bound the loop. Values past len count 0.
template <typename V>
class BufferSum {
 public:
  void add(const typename V::value_type* values, int64_t len) {
    constexpr int64_t w = V::size();
    int64_t j = 0;
    for (; j + 4 * w <= len; j += 4 * w) {
      sums_[0].add(V::loadu(values + j));
      sums_[1].add(V::loadu(values + j + w));
      sums_[2].add(V::loadu(values + j + 2 * w));
      sums_[3].add(V::loadu(values + j + 3 * w));
    }
    for (; j < len; j += w) sums_[0].add(V::loadu(values + j, std::min(w, len - j)));
  }
  double total() const { return (sums_[0].total() + sums_[1].total()) + (sums_[2].total() + sums_[3].total()); }

 private:
  CompensatedSum<V> sums_[4];
};

// Three functions whose SLEEF versions cost ~4x exp's (measured: expm1 1.7 ns, log1p 1.1 ns, exp 0.3 ns an
// element on AVX-512), the inner operations of the KL and the BCE, and exp itself (reparameterization's
// std, BCE's exp(-|x|)). In float lanes they are computed here by short series, inline, within twice the
// error of PyTorch's float32 functions over the whole range (tests/test_cpu_math.py); double lanes keep
// SLEEF's.

// These are inline in the loops that call them, with no call out of line even for rare lanes: a SLEEF
// fallback call in exp and expm1 made the compiler keep the loops' constants in memory and left exp out of
// line; without it the BCE row runs ~25% and the KL row ~30% faster (AVX2, measured).

// x = k ln2 + r for x in [-104, 89] (Cody-Waite, |r| <= ln2/2): expm1(r), by its Taylor series to r^8/8!
// (the truncation is below 2^-30 of it), and 2^k as two factors 2^(k/2) 2^(k - k/2), each a normal float
// for k in [-150, 129].
C10_ALWAYS_INLINE void split_exp(const Vectorized<float>& x, Vectorized<float>& two_k1, Vectorized<float>& two_k2,
                                 Vectorized<float>& expm1_r) {
  using V = Vectorized<float>;
  using I = Vectorized<int32_t>;
  const V k = (x * V(1.44269504088896341f)).round();
  const V r = at::vec::fmadd(k, V(2.12194440e-4f), at::vec::fmadd(k, V(-0.693359375f), x));
  V q(1.f / 40320);
  for (const float c : {1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f}) q = at::vec::fmadd(q, r, V(c));
  expm1_r = at::vec::fmadd(r * r, q, r);
  const I ki = at::vec::convert_to_int_of_same_size(k);
  const I k1 = ki >> I(1);
  two_k1 = at::vec::cast<float>((k1 + I(127)) << I(23));
  two_k2 = at::vec::cast<float>((ki - k1 + I(127)) << I(23));
}

// exp(x) - 1 = 2^k expm1(r) + (2^k - 1) in one FMA: k = 0 gives expm1(r) itself, so no cancellation near 0.
// Below -87 exp underflows: -1. Lanes above 88 (2^k past float's exponents) take 2^(k/2) (1 + expm1(r))
// 2^(k - k/2): finite up to ln(FLT_MAX), inf beyond. NaN stays NaN (clamp keeps it).
template <typename V>
C10_ALWAYS_INLINE V expm1(const V& x) {
  if constexpr (std::is_same_v<typename V::value_type, double>) {
    return x.expm1();
  } else {
    const V c = at::vec::clamp(x, V(-87.f), V(89.f));
    V f1, f2, p;
    split_exp(c, f1, f2, p);
    const V two_k = f1 * f2;  // inf for k = 128: those lanes are above 88
    return V::blendv(at::vec::fmadd(two_k, p, two_k - V(1)), at::vec::fmadd(f1, p, f1) * f2, c > V(88.f));
  }
}

// exp(x) = 2^k expm1(r) + 2^k, as 2^(k/2) (1 + expm1(r)) 2^(k - k/2): the same bits as one FMA by 2^k
// where the result is a normal float; a subnormal one is rounded once more, by the last product. x
// clamped to [-104, 89] (beyond, exp is 0 or inf in float); NaN stays NaN.
template <typename V>
C10_ALWAYS_INLINE V exp(const V& x) {
  if constexpr (std::is_same_v<typename V::value_type, double>) {
    return x.exp();
  } else {
    V f1, f2, p;
    split_exp(at::vec::clamp(x, V(-104.f), V(89.f)), f1, f2, p);
    return at::vec::fmadd(f1, p, f1) * f2;
  }
}

// log(1 + e) for e in [0, 1] (log(1 + exp(-|x|)) of the BCE): 2 atanh(s) with s = e / (2 + e) in [0, 1/3],
// its odd series s (1 + s^2/3 + ... + s^14/15) (the next term is below 2^-28 of the result). NaN stays NaN.
template <typename V>
C10_ALWAYS_INLINE V log1p_unit(const V& e) {
  if constexpr (std::is_same_v<typename V::value_type, double>) {
    return e.log1p();
  } else {
    const V s = e / (V(2) + e), s2 = s * s;
    V p(1.f / 15);
    for (const float c : {1.f / 13, 1.f / 11, 1.f / 9, 1.f / 7, 1.f / 5, 1.f / 3}) p = at::vec::fmadd(p, s2, V(c));
    return V(2) * at::vec::fmadd(s * s2, p, s);
  }
}

// Box-Muller's functions (reparam's noise), in float lanes: these in place of SLEEF's log, sin and cos
// (with the vectorised interleave) made the sampling backward 2.1x faster on AVX2; the noise stays within
// twice the error of PyTorch's float32 evaluation (tests/test_cpu_math.py: 1.9-2.1 ulp of the radius,
// PyTorch's 1.9).

// log(x) for positive normal floats (Box-Muller's uniforms, [2^-25, 1]): x = 2^k m with m in
// [sqrt(1/2), sqrt(2)) (the bits of x offset by those of sqrt(1/2)), log m = 2 atanh(s), s = (m-1)/(m+1)
// in [-0.172, 0.172], by its odd series to s^9 (the next term is below 2^-28 of it), + k ln 2 in two parts.
inline Vectorized<float> log_positive(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  using I = Vectorized<int32_t>;
  const I sqrt_half(0x3f3504f3);
  const I shifted = at::vec::cast<int32_t>(x) - sqrt_half;
  const V k = at::vec::convert_to_fp_of_same_size<float>(shifted >> I(23));
  const V f = at::vec::cast<float>((shifted & I(0x7fffff)) + sqrt_half) - V(1.f);  // m - 1, exact
  const V s = f / (V(2.f) + f), s2 = s * s;
  V p(1.f / 9);
  for (const float c : {1.f / 7, 1.f / 5, 1.f / 3}) p = at::vec::fmadd(p, s2, V(c));
  const V log_m = at::vec::fmadd(V(2.f) * s * s2, p, V(2.f) * s);
  return at::vec::fmadd(k, V(0.693359375f), at::vec::fmadd(k, V(-2.12194440e-4f), log_m));
}

// cos and sin of theta in [0, 2 pi] (Box-Muller's angle): theta = q pi/2 + r (Cody-Waite in three parts,
// exact for q <= 4), |r| <= pi/4, sin r and cos r by their Taylor series to r^9 and r^10 (truncation
// below 2^-28), then the quadrant q mod 4 swaps them and sets their signs.
inline void sincos_circle(const Vectorized<float>& theta, Vectorized<float>& cos_out, Vectorized<float>& sin_out) {
  using V = Vectorized<float>;
  const V q = (theta * V(0.636619772f)).round();
  V r = at::vec::fmadd(q, V(-1.5703125f), theta);
  r = at::vec::fmadd(q, V(-4.837512969970703125e-4f), r);
  r = at::vec::fmadd(q, V(-7.549789954891882e-8f), r);
  const V r2 = r * r;
  V ps(1.f / 362880);
  for (const float c : {-1.f / 5040, 1.f / 120, -1.f / 6}) ps = at::vec::fmadd(ps, r2, V(c));
  const V sin_r = at::vec::fmadd(r * r2, ps, r);
  V pc(-1.f / 3628800);
  for (const float c : {1.f / 40320, -1.f / 720, 1.f / 24, -0.5f}) pc = at::vec::fmadd(pc, r2, V(c));
  const V cos_r = at::vec::fmadd(r2, pc, V(1.f));
  const V quadrant = q - V(4.f) * (q * V(0.25f)).floor();  // 0, 1, 2 or 3
  const V odd = (quadrant == V(1.f)) | (quadrant == V(3.f));
  const V c = V::blendv(cos_r, sin_r, odd), s = V::blendv(sin_r, cos_r, odd);
  cos_out = V::blendv(c, c.neg(), (quadrant == V(1.f)) | (quadrant == V(2.f)));
  sin_out = V::blendv(s, s.neg(), quadrant >= V(2.f));
}

// KL(N(mu, exp(logvar)) || N(0, I)) of one row (0 when !want_sum); its gradient times gscale goes to gmu,
// glv (if given). Terms expm1(logvar) - logvar + mu^2 (expm1: exp(logvar) - 1 without cancellation near
// logvar = 0) in the math type (fp32 for float16/bfloat16/float32), summed with compensation (BufferSum):
// one pass over the row at the full vector width.
template <typename scalar_t>
double kl_row(const scalar_t* mu, const scalar_t* lv, scalar_t* gmu, scalar_t* glv, int64_t n, double gscale,
              bool want_sum = true) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  acc_t mbuf[kChunk], lbuf[kChunk], gmbuf[kChunk], glbuf[kChunk], terms[kChunk];
  const V vg(static_cast<acc_t>(gscale)), vg_half(static_cast<acc_t>(0.5 * gscale));
  BufferSum<V> sum;
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t len = std::min(kChunk, n - j0);
    const acc_t* ms = as_math(mu + j0, mbuf, len, acc_t(1));
    const acc_t* ls = as_math(lv + j0, lbuf, len, acc_t(1));
    acc_t* gm = grad_slot<acc_t>(gmu ? gmu + j0 : nullptr, gmbuf);
    acc_t* gl = grad_slot<acc_t>(glv ? glv + j0 : nullptr, glbuf);
    constexpr int64_t w = V::size();
    int64_t j = 0;
    for (; j + 2 * w <= len; j += 2 * w) {  // two vectors an iteration: their chains overlap
      const V m0 = V::loadu(ms + j), m1 = V::loadu(ms + j + w), l0 = V::loadu(ls + j), l1 = V::loadu(ls + j + w);
      const V e0 = expm1(l0), e1 = expm1(l1);
      if (want_sum) {
        (e0 - l0 + m0 * m0).store(terms + j);
        (e1 - l1 + m1 * m1).store(terms + j + w);
      }
      if (gm) {
        (vg * m0).store(gm + j);
        (vg * m1).store(gm + j + w);
        (vg_half * e0).store(gl + j);
        (vg_half * e1).store(gl + j + w);
      }
    }
    for (; j < len; j += w) {
      const int64_t m = std::min<int64_t>(w, len - j);
      const V mv = V::loadu(ms + j, m), lvv = V::loadu(ls + j, m), em1 = expm1(lvv);
      if (want_sum) (em1 - lvv + mv * mv).store(terms + j, m);
      if (gm) {
        (vg * mv).store(gm + j, m);
        (vg_half * em1).store(gl + j, m);
      }
    }
    if (want_sum) sum.add(terms, len);
    store_grad(gmbuf, gmu ? gmu + j0 : nullptr, len);
    store_grad(glbuf, glv ? glv + j0 : nullptr, len);
  }
  return 0.5 * sum.total();
}

}  // namespace cpu_math
GENFAST_CAPABILITY_NS_END
}  // namespace genfast
