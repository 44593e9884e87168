// Activation functors shared by the CPU and CUDA kernels. The codes mirror the one table in
// genfast/activations.py (tests/test_build.py checks they agree). Math is done in float (or
// double for double inputs): callers convert half/bfloat16 to float first.
#pragma once

#include <cmath>
#include <type_traits>

#ifdef __CUDACC__
#define GENFAST_HD __host__ __device__ __forceinline__
#else
#define GENFAST_HD inline
#endif

namespace genfast {

enum class Act : int {
  None = 0,
  Relu = 1,
  LeakyRelu = 2,
  Gelu = 3,
  GeluTanh = 4,
  Silu = 5,
  Sigmoid = 6,
  Tanh = 7,
};
constexpr int kNumActivations = 8;

// What backward needs, by activation (same as Activation.saves in Python).
enum class Saves : int { None = 0, Mask = 1, Output = 2, Preact = 3 };

GENFAST_HD constexpr Saves saves_of(Act a) {
  switch (a) {
    case Act::Relu:
    case Act::LeakyRelu: return Saves::Mask;
    case Act::Sigmoid:
    case Act::Tanh: return Saves::Output;
    case Act::Gelu:
    case Act::GeluTanh:
    case Act::Silu: return Saves::Preact;
    default: return Saves::None;
  }
}

template <typename T>
GENFAST_HD T act_forward(Act a, T z, T slope) {
  const T half = T(0.5), one = T(1);
  switch (a) {
    case Act::Relu: return z > T(0) ? z : T(0);
    case Act::LeakyRelu: return z > T(0) ? z : z * slope;
    case Act::Gelu: return half * z * (one + erf(z * T(0.70710678118654752440)));
    case Act::GeluTanh: {
      const T inner = T(0.79788456080286535588) * (z + T(0.044715) * z * z * z);
      return half * z * (one + tanh(inner));
    }
    case Act::Silu: return z / (one + exp(-z));
    case Act::Sigmoid: return one / (one + exp(-z));
    case Act::Tanh: return tanh(z);
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
template <typename T>
GENFAST_HD T act_derivative(Act a, T s, T slope) {
  const T half = T(0.5), one = T(1);
  switch (a) {
    case Act::Relu: return s != T(0) ? one : T(0);
    case Act::LeakyRelu: return s != T(0) ? one : slope;
    case Act::Gelu: {
      const T cdf = half * (one + erf(s * T(0.70710678118654752440)));
      const T pdf = exp(-half * s * s) * T(0.39894228040143267794);
      return cdf + s * pdf;
    }
    case Act::GeluTanh: {
      const T k = T(0.79788456080286535588), c = T(0.044715);
      const T t = tanh(k * (s + c * s * s * s));
      return half * (one + t) + half * s * (one - t * t) * k * (one + T(3) * c * s * s);
    }
    case Act::Silu: {
      const T sig = one / (one + exp(-s));
      return sig * (one + s * (one - sig));
    }
    case Act::Sigmoid: return s * (one - s);
    case Act::Tanh: return one - s * s;
    default: return one;
  }
}

template <Act A>
using ActTag = std::integral_constant<Act, A>;

// Calls f(ActTag<a>{}): each activation gets its own instantiation of a loop or kernel (host code).
template <typename F>
void dispatch_act(Act a, F&& f) {
  switch (a) {
    case Act::Relu: return f(ActTag<Act::Relu>{});
    case Act::LeakyRelu: return f(ActTag<Act::LeakyRelu>{});
    case Act::Gelu: return f(ActTag<Act::Gelu>{});
    case Act::GeluTanh: return f(ActTag<Act::GeluTanh>{});
    case Act::Silu: return f(ActTag<Act::Silu>{});
    case Act::Sigmoid: return f(ActTag<Act::Sigmoid>{});
    case Act::Tanh: return f(ActTag<Act::Tanh>{});
    default: return f(ActTag<Act::None>{});
  }
}

// Bytes per row of the packed relu mask: one bit per output feature, rows padded to 128 bits
// (the layout cuBLASLt's RELU_AUX epilogues use), bit j of a row in byte j / 8, bit j % 8.
GENFAST_HD constexpr long long mask_row_bytes(long long n) { return (n + 127) / 128 * 16; }

}  // namespace genfast
