// Counter-based standard normal noise, shared by the CPU and CUDA kernels and mirrored by the Triton
// kernel and genfast.reference.philox_normal: the same random bits and uniforms everywhere, so every
// backend draws the same eps from the same state (log/sin/cos may differ by an ulp between backends).
//
// Element i of a tensor (flattened, int64 index) takes lane i % 4 of the four normals made from one
// Philox4x32-10 call with key = seed and counter = (offset_lo, offset_hi, g_lo, g_hi), g = i / 4.
// Box-Muller turns the uniforms (u0, u1) into normals 0 and 1 and (u2, u3) into normals 2 and 3:
//   u = ((bits >> 8) + 0.5) * 2^-24 in fp32, in (0, 1] (past 2^23 the + 0.5 rounds to even);
//   r = sqrt(-2 ln u_even);  n = r cos(2 pi u_odd), r sin(2 pi u_odd)
// The smallest u is 2^-25, so |n| <= 5.9 (P(|N(0,1)| > 5.9) is 4e-9: invisible in any test we run).
#pragma once

#include <ATen/core/PhiloxRNGEngine.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace genfast {

struct Normal4 {
  float v[4];
};

C10_HOST_DEVICE inline float philox_uniform(uint32_t bits) {
  return (static_cast<float>(bits >> 8) + 0.5f) * 5.9604644775390625e-08f;  // 2^-24
}

struct Bits4 {
  uint32_t v[4];
};

// The 128 random bits of group g = i / 4 under (seed, offset).
C10_HOST_DEVICE inline Bits4 philox_bits4(uint64_t seed, uint64_t offset, uint64_t group) {
  at::Philox4_32 engine(seed, /*subsequence=*/group, /*offset=*/offset);
  Bits4 out;
  for (int k = 0; k < 4; ++k) out.v[k] = engine();
  return out;
}

namespace detail {

// IEEE fp32 operations rounded once, to nearest even, on the host and the device alike (so that
// sincosf_cody_waite can be checked on the host against libdevice's code).
C10_HOST_DEVICE inline float fma_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

C10_HOST_DEVICE inline float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

C10_HOST_DEVICE inline int round_to_int(float x) {
#ifdef __CUDA_ARCH__
  return __float2int_rn(x);
#else
  return static_cast<int>(std::nearbyint(x));
#endif
}

// sin(t + q pi/2) for |t| <= pi/4, t2 = t * t: libdevice's minimax polynomials, odd q taking the cosine one.
C10_HOST_DEVICE inline float sin_quadrant(float t, float t2, int q) {
  const bool odd = q & 1;
  const float p = odd ? 1.0f : t;
  const float z = fma_rn(t2, p, 0.0f);
  float r = odd ? fma_rn(0x1.9758p-16f, t2, -0x1.6c0fdap-10f) : -0x1.9a82a6p-13f;
  r = fma_rn(r, t2, odd ? 0x1.555576p-5f : 0x1.110bc8p-7f);
  r = fma_rn(r, t2, odd ? -0x1.fffffep-2f : -0x1.55555p-3f);
  r = fma_rn(r, z, p);
  return q & 2 ? fma_rn(r, -1.0f, 0.0f) : r;
}

}  // namespace detail

struct SinCos {
  float sin, cos;
};

// sinf(x) and cosf(x) of CUDA's libdevice (__nv_sinf, __nv_cosf of CUDA 13.0) bit for bit, for |x| < 105615:
// the same three-part Cody-Waite reduction by pi/2 and the same polynomials, one reduction for both. What it
// leaves out is libdevice's Payne-Hanek branch for |x| >= 105615, whose 7-word array put every sampling
// kernel in local memory (STACK:32 in cuobjdump) although the Box-Muller angle is in (0, 2 pi]. Checked on
// the host against libdevice's bitcode (compiled for x86): equal on all 2^24 angles philox_normal4 forms and
// on every float with |x| <= 8.
C10_HOST_DEVICE inline SinCos sincosf_cody_waite(float x) {
  const int q = detail::round_to_int(detail::mul_rn(x, 0x1.45f306p-1f));  // x * 2/pi
  const float j = static_cast<float>(q);
  float t = detail::fma_rn(j, -0x1.921fb4p+0f, x);  // x - j pi/2, pi/2 in three parts
  t = detail::fma_rn(j, -0x1.4442dp-24f, t);
  t = detail::fma_rn(j, -0x1.84698ap-48f, t);
  const float t2 = detail::mul_rn(t, t);
  return {detail::sin_quadrant(t, t2, q), detail::sin_quadrant(t, t2, q + 1)};
}

// The four normals of group g = i / 4 under (seed, offset).
C10_HOST_DEVICE inline Normal4 philox_normal4(uint64_t seed, uint64_t offset, uint64_t group) {
  const Bits4 drawn = philox_bits4(seed, offset, group);
  const uint32_t* bits = drawn.v;
  Normal4 out;
  constexpr float two_pi = 6.283185307179586f;
  for (int k = 0; k < 4; k += 2) {
    float r = ::sqrtf(-2.0f * ::logf(philox_uniform(bits[k])));
    const SinCos angle = sincosf_cody_waite(two_pi * philox_uniform(bits[k + 1]));
    out.v[k] = r * angle.cos;
    out.v[k + 1] = r * angle.sin;
  }
  return out;
}

}  // namespace genfast
