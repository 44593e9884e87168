// Counter-based standard normal noise, shared by the CPU and CUDA kernels and mirrored by the Triton
// kernel and genfast.reference.philox_normal: the same random bits and uniforms everywhere, so every
// backend draws the same eps from the same state (log/sin/cos may differ by an ulp between backends).
//
// Element i of a tensor (flattened, int64 index) takes lane i % 4 of the four normals made from one
// Philox4x32-10 call with key = seed and counter = (offset_lo, offset_hi, g_lo, g_hi), g = i / 4.
// Box-Muller turns the uniforms (u0, u1) into normals 0 and 1 and (u2, u3) into normals 2 and 3:
//   u = ((bits >> 8) + 0.5) * 2^-24 in fp32, in (0, 1] (past 2^23 the + 0.5 rounds to even);
//   r = sqrt(-2 ln u_even);  n = r cos(2 pi u_odd), r sin(2 pi u_odd) (on the GPU cospi(2 u_odd), sinpi(2 u_odd))
// The smallest u is 2^-25, so |n| <= 5.9 (P(|N(0,1)| > 5.9) is 4e-9: invisible in any test we run).
#pragma once

#include <ATen/core/PhiloxRNGEngine.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "common/cpu_capability.h"

namespace genfast {
GENFAST_CAPABILITY_NS_BEGIN  // genfast::<capability>:: in the kernel files (cpu_capability.h)

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

#ifdef __CUDACC__
// The four normals of group g = i / 4 under (seed, offset), on the device. cos(2 pi u) is cospif(2 u): the
// argument 2 u is exact (no rounding of 2 pi u), and sinpif/cospif reduce it without the Payne-Hanek branch
// of sinf/cosf, whose table put every sampling kernel in local memory (STACK:32). Triton's kernels call the
// same libdevice functions (genfast.triton._math), so both GPU backends draw the same eps.
__device__ inline Normal4 philox_normal4(uint64_t seed, uint64_t offset, uint64_t group) {
  const Bits4 drawn = philox_bits4(seed, offset, group);
  const uint32_t* bits = drawn.v;
  Normal4 out;
  for (int k = 0; k < 4; k += 2) {
    const float r = ::sqrtf(-2.0f * ::logf(philox_uniform(bits[k])));
    const float half_turns = 2.0f * philox_uniform(bits[k + 1]);
    out.v[k] = r * ::cospif(half_turns);
    out.v[k + 1] = r * ::sinpif(half_turns);
  }
  return out;
}
#endif

GENFAST_CAPABILITY_NS_END
}  // namespace genfast
