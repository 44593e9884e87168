// The activations of the C++ and CUDA kernels: their one list and their one math, used by the cpu
// kernels (on at::vec::Vectorized lanes, csrc/common/cpu_math.h's VecMath) and the cuda kernels (on
// float or double, ScalarMath, host and device). The codes mirror the one table in
// genfast/activations.py (tests/test_build.py checks they agree). Half/bfloat16 callers convert to float
// first. Adding an activation here: one line in GENFAST_ACTIVATIONS, its forward and derivative below.
#pragma once

#include <cmath>
#include <type_traits>

#include "common/cpu_capability.h"

#ifdef __CUDACC__
#define GENFAST_HD __host__ __device__ __forceinline__
#else
#define GENFAST_HD inline
#endif

namespace genfast {
GENFAST_CAPABILITY_NS_BEGIN  // genfast::<capability>:: in the kernel files (cpu_capability.h)

// X(enumerator, code, name in genfast/activations.py, what backward saves).
#define GENFAST_ACTIVATIONS(X)        \
  X(None, 0, "none", None)            \
  X(Relu, 1, "relu", Mask)            \
  X(LeakyRelu, 2, "leaky_relu", Mask) \
  X(Gelu, 3, "gelu", Preact)          \
  X(GeluTanh, 4, "gelu_tanh", Preact) \
  X(Silu, 5, "silu", Preact)          \
  X(Sigmoid, 6, "sigmoid", Output)    \
  X(Tanh, 7, "tanh", Output)          \
  X(Softplus, 8, "softplus", Preact)  \
  X(Mish, 9, "mish", Preact)

#define GENFAST_ACT_ENUM(e, code, name, saves) e = code,
enum class Act : int { GENFAST_ACTIVATIONS(GENFAST_ACT_ENUM) };
#undef GENFAST_ACT_ENUM

#define GENFAST_ACT_COUNT(e, code, name, saves) +1
constexpr int kNumActivations = 0 GENFAST_ACTIVATIONS(GENFAST_ACT_COUNT);
#undef GENFAST_ACT_COUNT

// What backward needs, by activation (Activation.saves in Python): nothing, one bit per element (set
// where the gradient passes unscaled), the output y, or the pre-activation z.
enum class Saves : int { None = 0, Mask = 1, Output = 2, Preact = 3 };

GENFAST_HD constexpr Saves saves_of(Act a) {
#define GENFAST_ACT_SAVES(e, code, name, saves) \
  if (a == Act::e) return Saves::saves;
  GENFAST_ACTIVATIONS(GENFAST_ACT_SAVES)
#undef GENFAST_ACT_SAVES
  return Saves::None;
}

template <Act A>
using ActTag = std::integral_constant<Act, A>;

// Calls f(ActTag<a>{}): each activation gets its own instantiation of a loop or kernel (host code).
template <typename F>
void dispatch_act(Act a, F&& f) {
  switch (a) {
#define GENFAST_ACT_CASE(e, code, name, saves) \
  case Act::e: return f(ActTag<Act::e>{});
    GENFAST_ACTIVATIONS(GENFAST_ACT_CASE)
#undef GENFAST_ACT_CASE
  }
}

// The math functions an activation uses, on float or double (host and device). cpu_math.h's VecMath
// gives the same functions on Vectorized lanes, so the formulas below serve both.
struct ScalarMath {
  template <typename T>
  static GENFAST_HD T exp(T x) {
    return ::exp(x);
  }
  template <typename T>
  static GENFAST_HD T log1p_unit(T x) {  // log(1 + x) for x in [0, 1]
    return ::log1p(x);
  }
  template <typename T>
  static GENFAST_HD T erf(T x) {
    return ::erf(x);
  }
  template <typename T>
  static GENFAST_HD T tanh(T x) {
    return ::tanh(x);
  }
  template <typename T>
  static GENFAST_HD T select(bool c, T a, T b) {
    return c ? a : b;
  }
};

// softplus with PyTorch's defaults (beta 1, threshold 20): z itself above the threshold, where
// log1p(exp(z)) equals z to double precision (and exp(z) could overflow); below it the stable form
// max(z, 0) + log1p(exp(-|z|)), whose log1p argument lies in (0, 1] (a cheap series on the CPU).
constexpr double kSoftplusThreshold = 20.0;

template <typename M, typename T>
GENFAST_HD T softplus(T z) {
  const T zero(0), minus_abs = M::select(z > zero, zero - z, z);  // NaN: z, so NaN out
  return M::select(z > T(kSoftplusThreshold), z, M::select(z > zero, z, zero) + M::log1p_unit(M::exp(minus_abs)));
}

// mish from one exp and one division (the CUDA kernels' IEEE division is a subroutine call: more of
// them spilled registers to the stack). With e = e^z: tanh(softplus(z)) = n / (n + 2), n = e (e + 2);
// 1 - tanh^2 = d (2 - d), d = 2 / (n + 2), without the cancellation of 1 - t^2 near t = 1. z is clamped
// at kMishClamp, past which t is 1 to double precision (the derivative takes 1 there).
constexpr double kMishClamp = 20.0;

template <typename M, typename T>
GENFAST_HD T mish_exp(T z) {
  return M::exp(M::select(z > T(kMishClamp), T(kMishClamp), z));
}

template <typename M, typename T>
GENFAST_HD T mish(T z) {
  const T e = mish_exp<M>(z), n = e * (e + T(2));
  return z * (n / (n + T(2)));
}

// d mish / dz = t + z sigmoid(z) (1 - t^2), t = tanh(softplus(z)), as eager's mish_backward; 1 / (n + 2)
// and 1 / (e + 1) from one division of their product (at most ~1e26 at the clamp: finite in float).
template <typename M, typename T>
GENFAST_HD T mish_derivative(T z) {
  const T e = mish_exp<M>(z), n = e * (e + T(2)), a = n + T(2), b = e + T(1);
  const T inv = T(1) / (a * b), d = T(2) * (b * inv);
  const T t = n * (b * inv), sigmoid = e * (a * inv);
  return M::select(z > T(kMishClamp), T(1), t + z * sigmoid * (d * (T(2) - d)));
}

// y = act(z). NaN stays NaN (relu: "z < 0" is false for NaN), as in eager PyTorch.
template <typename M = ScalarMath, typename T>
GENFAST_HD T act_forward(Act a, T z, T slope) {
  const T half(0.5), one(1), zero(0);
  switch (a) {
    case Act::Relu: return M::select(z < zero, zero, z);
    case Act::LeakyRelu: return M::select(z > zero, z, z * slope);
    case Act::Gelu: return half * z * (one + M::erf(z * T(0.70710678118654752440)));
    case Act::GeluTanh: return half * z * (one + M::tanh(T(0.79788456080286535588) * (z + T(0.044715) * z * z * z)));
    case Act::Silu: return z / (one + M::exp(zero - z));
    case Act::Sigmoid: return one / (one + M::exp(zero - z));
    case Act::Tanh: return M::tanh(z);
    case Act::Softplus: return softplus<M>(z);
    case Act::Mish: return mish<M>(z);
    default: return z;
  }
}

// The mask bit of relu/leaky_relu: set where the gradient passes unscaled. Eager PyTorch's comparisons:
// relu's threshold_backward zeroes where z <= 0 (a NaN z passes the gradient), leaky_relu's backward
// passes where z > 0 (a NaN z gets the slope).
template <typename T>
GENFAST_HD bool mask_bit(Act a, T z) {
  return a == Act::Relu ? !(z <= T(0)) : z > T(0);
}

// dy/dz from what was saved: `s` is z (Preact), y (Output) or 1/0 for the mask bit (Mask).
template <typename M = ScalarMath, typename T>
GENFAST_HD T act_derivative(Act a, T s, T slope) {
  const T half(0.5), one(1), zero(0);
  switch (a) {
    case Act::Relu: return M::select(s != zero, one, zero);
    case Act::LeakyRelu: return M::select(s != zero, one, slope);
    case Act::Gelu: {
      const T cdf = half * (one + M::erf(s * T(0.70710678118654752440)));
      return cdf + s * M::exp(zero - half * s * s) * T(0.39894228040143267794);
    }
    case Act::GeluTanh: {
      const T k(0.79788456080286535588), c(0.044715);
      const T t = M::tanh(k * (s + c * s * s * s));
      return half * (one + t) + half * s * (one - t * t) * k * (one + T(3) * c * s * s);
    }
    case Act::Silu: {
      const T sig = one / (one + M::exp(zero - s));
      return sig * (one + s * (one - sig));
    }
    case Act::Sigmoid: return s * (one - s);
    case Act::Tanh: return one - s * s;
    case Act::Softplus: {  // eager's softplus_backward: e^z / (e^z + 1) below the threshold
      const T e = M::exp(s);
      return M::select(s > T(kSoftplusThreshold), one, e / (e + one));
    }
    case Act::Mish: return mish_derivative<M>(s);
    default: return one;
  }
}

// Bytes per row of the packed relu mask: one bit per output feature, rows padded to 128 bits
// (the layout cuBLASLt's RELU_AUX epilogues use), bit j of a row in byte j / 8, bit j % 8.
GENFAST_HD constexpr long long mask_row_bytes(long long n) {
  return (n + 127) / 128 * 16;
}

GENFAST_CAPABILITY_NS_END
}  // namespace genfast
