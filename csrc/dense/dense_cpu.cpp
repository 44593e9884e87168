// CPU backend of the fused dense layer (contract and math in dense.h).
// The GEMM, bias included, goes through ATen (MKL/oneDNN). The epilogue, activation + mask bits, is
// one vectorized pass over the GEMM's output, row by row (in place unless z must be kept), with the
// activation math of common/activations.h on Vectorized lanes.
// Backward computes dz = grad_y * act'(saved) and the bias gradient in one pass (rows summed in fixed
// blocks, so the bias gradient never depends on the threads); then the two GEMMs through ATen.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

#include "common/activations.h"
#include "common/checks.h"
#include "common/cpu_capability.h"
#include "common/cpu_math.h"
#include "dense/dense.h"

namespace genfast {
GENFAST_CAPABILITY_NS_BEGIN  // genfast::<capability>:: in the kernel files (cpu_capability.h)
namespace {
using at::vec::Vectorized;
using cpu_math::VecMath;
constexpr int64_t kChunk = 512;    // half/bf16 columns converted to float at a time (multiple of 8)
constexpr int64_t kRowBlock = 64;  // rows per bias-gradient partial sum: fixed, never the thread count

// Bit t of the result is mask_bit(A, lane t of z) (activations.h): relu's "not z <= 0" sets it for
// NaN, leaky_relu's "z > 0" does not. Lanes holding 0 give 0 either way.
template <Act A, typename acc_t>
uint32_t mask_bits(const Vectorized<acc_t>& z) {
  acc_t lanes[Vectorized<acc_t>::size()];
  z.store(lanes);
  uint32_t bits = 0;
  for (int t = 0; t < Vectorized<acc_t>::size(); ++t) bits |= uint32_t(mask_bit(A, lanes[t])) << t;
  return bits;
}

// Lane t is 1 where bit (first + t) of the mask row is set, `otherwise` elsewhere.
template <typename acc_t>
Vectorized<acc_t> mask_factor(const uint8_t* row, int64_t first, acc_t otherwise) {
  acc_t lanes[Vectorized<acc_t>::size()];
  for (int t = 0; t < Vectorized<acc_t>::size(); ++t) {
    const int64_t j = first + t;
    lanes[t] = (row[j / 8] >> (j % 8)) & 1 ? acc_t(1) : otherwise;
  }
  return Vectorized<acc_t>::loadu(lanes);
}

#ifdef CPU_CAPABILITY_AVX2
template <>
uint32_t mask_bits<Act::Relu, float>(const Vectorized<float>& z) {
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(__m256(z), _mm256_setzero_ps(), _CMP_NLE_UQ)));
}

template <>
uint32_t mask_bits<Act::LeakyRelu, float>(const Vectorized<float>& z) {
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(__m256(z), _mm256_setzero_ps(), _CMP_GT_OQ)));
}

template <>
Vectorized<float> mask_factor<float>(const uint8_t* row, int64_t first, float otherwise) {
  // first is a multiple of 8 here (8 lanes): the lanes are exactly the bits of one byte.
  const __m256i select = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(row[first / 8]), select), select);
  return _mm256_blendv_ps(_mm256_set1_ps(otherwise), _mm256_set1_ps(1.f), _mm256_castsi256_ps(set));
}
#endif

#ifdef CPU_CAPABILITY_AVX512
// fp32 relu/leaky_relu rows in AVX-512, in the AVX512 variant (cpu_capability.h; chosen where ATen itself
// runs AVX-512, at::get_cpu_capability, which honours ATEN_CPU_CAPABILITY): there eager's relu has 16
// lanes, and an 8-lane pass would lose to it. The compare yields the 16 mask bits of a vector directly (mask_bit's
// rule: NaN sets relu's bit, not leaky_relu's). Lanes past n load as 0 (bit clear); max(0, NaN) / NaN * slope keep
// the NaN, as eager does.
constexpr bool use_avx512() { return true; }  // the AVX512 variant (cpu_capability.h)

// 16 lanes from j on; `lanes` selects those below n. Masked loads and stores only on a row's tail:
// on Zen 4 they are several times slower than plain ones.
__attribute__((target("avx512f"))) inline __m512 load16(const float* p, __mmask16 lanes) {
  return lanes == __mmask16(0xFFFF) ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(lanes, p);
}

__attribute__((target("avx512f"))) inline void store16(float* p, __mmask16 lanes, __m512 v) {
  if (lanes == __mmask16(0xFFFF)) _mm512_storeu_ps(p, v);
  else _mm512_mask_storeu_ps(p, lanes, v);
}

__attribute__((target("avx512f"))) void relu_row_avx512(const float* z, uint8_t* mask, int64_t mask_bytes, float* y,
                                                        int64_t n, float slope, bool leaky) {
  const __m512 zero = _mm512_setzero_ps(), vslope = _mm512_set1_ps(slope);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 v = load16(z + j, lanes);
    const __mmask16 positive = _mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ);
    const __mmask16 bits = leaky ? positive : _mm512_cmp_ps_mask(v, zero, _CMP_NLE_UQ);
    store16(y + j, lanes, leaky ? _mm512_mask_mov_ps(_mm512_mul_ps(v, vslope), positive, v) : _mm512_max_ps(zero, v));
    mask[j / 8] = uint8_t(bits);  // bit k of the pair of bytes = lane k
    if (n - j > 8) mask[j / 8 + 1] = uint8_t(bits >> 8);
  }
  std::fill(mask + (n + 7) / 8, mask + mask_bytes, uint8_t(0));
}

// dz = g where the mask bit is set, else 0 (relu) or slope * g (leaky_relu); added to partial if given.
__attribute__((target("avx512f"))) void relu_grad_row_avx512(const float* g, const uint8_t* mask, float* dz,
                                                             float* partial, int64_t n, float slope, bool leaky) {
  const __m512 vslope = _mm512_set1_ps(slope);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __mmask16 bits = __mmask16(mask[j / 8] | (n - j > 8 ? mask[j / 8 + 1] << 8 : 0));
    const __m512 d = load16(g + j, lanes);
    const __m512 out = leaky ? _mm512_mask_mov_ps(_mm512_mul_ps(d, vslope), bits, d) : _mm512_maskz_mov_ps(bits, d);
    if (dz) store16(dz + j, lanes, out);
    if (partial) store16(partial + j, lanes, _mm512_add_ps(load16(partial + j, lanes), out));
  }
}
#else
constexpr bool use_avx512() { return false; }
void relu_row_avx512(const float*, uint8_t*, int64_t, float*, int64_t, float, bool) {}
void relu_grad_row_avx512(const float*, const uint8_t*, float*, float*, int64_t, float, bool) {}
#endif

// One row of the forward epilogue of relu/leaky_relu in the math type: the mask bits (all the
// row's bytes, padding included, are written) and y = act(z). y may be z (in place).
template <Act A, typename acc_t>
void forward_row(const acc_t* z_in, uint8_t* mask, int64_t mask_bytes, acc_t* y, int64_t n, acc_t slope) {
  using V = Vectorized<acc_t>;
  if constexpr (V::size() > 8) {  // 16 fp32 lanes (the AVX512 variant): the AVX-512 pass
    static_assert(std::is_same_v<acc_t, float> && (A == Act::Relu || A == Act::LeakyRelu));
    relu_row_avx512(z_in, mask, mask_bytes, y, n, slope, A == Act::LeakyRelu);
    return;
  }
  static_assert(V::size() > 8 || 8 % V::size() == 0, "a mask byte must hold whole vectors");
  constexpr int64_t lanes = V::size();
  const V vslope(slope);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {  // whole mask bytes of full vectors: the hot loop
    uint32_t bits = 0;
    for (int64_t k = 0; k < 8; k += lanes) {
      const V z = V::loadu(z_in + j + k);
      bits |= mask_bits<A>(z) << k;
      act_forward<VecMath>(A, z, vslope).store(y + j + k);
    }
    mask[j / 8] = uint8_t(bits);
  }
  if (j < n) {  // the last, partial byte: lanes past n are 0 (loadu pads with zeros)
    uint32_t bits = 0;
    for (int64_t k = j; k < n; k += lanes) {
      const int64_t len = std::min<int64_t>(lanes, n - k);
      const V z = V::loadu(z_in + k, len);
      bits |= (mask_bits<A>(z) & ((1u << len) - 1)) << (k - j);
      act_forward<VecMath>(A, z, vslope).store(y + k, len);
    }
    mask[j / 8] = uint8_t(bits);
  }
  std::fill(mask + (n + 7) / 8, mask + mask_bytes, uint8_t(0));  // padding is part of the layout: zero it
}

// One row of the backward epilogue in the math type: dz = g * act'(saved) (mask bits or s),
// written to dz (if given) and added to the bias-gradient partial sums (if given).
template <Act A, typename acc_t>
void backward_row(const acc_t* g, const acc_t* s, const uint8_t* mask, acc_t* dz, acc_t* partial, int64_t n,
                  acc_t slope) {
  using V = Vectorized<acc_t>;
  const acc_t masked = A == Act::LeakyRelu ? slope : acc_t(0);
  for (int64_t j = 0; j < n; j += V::size()) {
    const int64_t len = std::min<int64_t>(V::size(), n - j);
    V d = V::loadu(g + j, len);
    if constexpr (saves_of(A) == Saves::Mask) d = d * mask_factor<acc_t>(mask, j, masked);
    if constexpr (saves_of(A) == Saves::Output || saves_of(A) == Saves::Preact)
      d = d * act_derivative<VecMath>(A, V::loadu(s + j, len), V(slope));
    if (dz) d.store(dz + j, len);
    if (partial) (V::loadu(partial + j, len) + d).store(partial + j, len);
  }
}

// One row of y = act(z) in the math type (activations that save z or y). y may be z (in place).
template <Act A, typename acc_t>
void activation_row(const acc_t* z, acc_t* y, int64_t n, acc_t slope) {
  using V = Vectorized<acc_t>;
  const V vslope(slope);
  for (int64_t j = 0; j < n; j += V::size()) {
    const int64_t len = std::min<int64_t>(V::size(), n - j);
    act_forward<VecMath>(A, V::loadu(z + j, len), vslope).store(y + j, len);
  }
}

template <typename scalar_t>
void forward_epilogue(at::Tensor& z, at::Tensor& y, at::Tensor& aux, Act act, double slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t m = z.size(0), n = z.size(1), row_bytes = mask_row_bytes(n);
  scalar_t* zp = z.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  uint8_t* mask = saves_of(act) == Saves::Mask ? aux.data_ptr<uint8_t>() : nullptr;
  const acc_t s = static_cast<acc_t>(slope);
  const bool avx512 = use_avx512();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));  // rows
  dispatch_act(act, [&](auto tag) {
    constexpr Act A = decltype(tag)::value;
    if constexpr (saves_of(A) == Saves::Output || saves_of(A) == Saves::Preact)
      at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            activation_row<A>(zp + i * n, yp + i * n, n, s);
          } else {  // half/bfloat16: convert chunk by chunk
            acc_t buf[kChunk];
            for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
              const int64_t len = std::min(kChunk, n - j0);
              at::vec::convert(zp + i * n + j0, buf, len);
              activation_row<A>(buf, buf, len, s);
              at::vec::convert(buf, yp + i * n + j0, len);
            }
          }
        }
      });
    if constexpr (saves_of(A) == Saves::Mask)
      at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          scalar_t* zr = zp + i * n;
          uint8_t* mr = mask + i * row_bytes;
          if constexpr (std::is_same_v<scalar_t, float>) {
            if (avx512) relu_row_avx512(zr, mr, row_bytes, yp + i * n, n, s, A == Act::LeakyRelu);
            else forward_row<A>(zr, mr, row_bytes, yp + i * n, n, s);
          } else if constexpr (std::is_same_v<scalar_t, acc_t>) {
            forward_row<A>(zr, mr, row_bytes, yp + i * n, n, s);
          } else {  // half/bfloat16: convert chunk by chunk
            acc_t buf[kChunk];
            for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
              const int64_t len = std::min(kChunk, n - j0);
              at::vec::convert(zr + j0, buf, len);
              const int64_t bytes = j0 + len < n ? len / 8 : row_bytes - j0 / 8;
              forward_row<A>(buf, mr + j0 / 8, bytes, buf, len, s);
              at::vec::convert(buf, yp + i * n + j0, len);
            }
          }
        }
      });
  });
}

template <typename scalar_t>
void backward_epilogue(const at::Tensor& grad_y, const at::Tensor& saved, at::Tensor* dz, at::Tensor* grad_b, Act act,
                       double slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t m = grad_y.size(0), n = grad_y.size(1), row_bytes = mask_row_bytes(n);
  const int64_t blocks = (m + kRowBlock - 1) / kRowBlock;
  std::vector<acc_t> partial(grad_b ? blocks * n : 0, acc_t(0));
  const scalar_t* gp = grad_y.data_ptr<scalar_t>();
  const Saves saves = saves_of(act);
  const uint8_t* mask = saves == Saves::Mask ? saved.data_ptr<uint8_t>() : nullptr;
  const scalar_t* sp = saves == Saves::Output || saves == Saves::Preact ? saved.data_ptr<scalar_t>() : nullptr;
  scalar_t* dp = dz ? dz->data_ptr<scalar_t>() : nullptr;
  const acc_t s = static_cast<acc_t>(slope);
  const bool avx512 = use_avx512();
  dispatch_act(act, [&](auto tag) {
    constexpr Act A = decltype(tag)::value;
    at::parallel_for(0, blocks, 1, [&](int64_t bbegin, int64_t bend) {
      for (int64_t blk = bbegin; blk < bend; ++blk) {
        acc_t* part = grad_b ? partial.data() + blk * n : nullptr;
        for (int64_t i = blk * kRowBlock; i < std::min(m, (blk + 1) * kRowBlock); ++i) {
          const uint8_t* mr = mask ? mask + i * row_bytes : nullptr;
          if constexpr (std::is_same_v<scalar_t, float> && saves_of(A) == Saves::Mask) {
            if (avx512)
              relu_grad_row_avx512(gp + i * n, mr, dp ? dp + i * n : nullptr, part, n, s, A == Act::LeakyRelu);
            else backward_row<A>(gp + i * n, sp, mr, dp ? dp + i * n : nullptr, part, n, s);
          } else if constexpr (std::is_same_v<scalar_t, acc_t>) {
            backward_row<A>(gp + i * n, sp ? sp + i * n : nullptr, mr, dp ? dp + i * n : nullptr, part, n, s);
          } else {  // half/bfloat16: sum dz as stored (rounded), as eager's sum of the dz tensor would
            acc_t g[kChunk], sv[kChunk];
            for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
              const int64_t len = std::min(kChunk, n - j0);
              at::vec::convert(gp + i * n + j0, g, len);
              if (sp) at::vec::convert(sp + i * n + j0, sv, len);
              backward_row<A>(g, sv, mr ? mr + j0 / 8 : nullptr, g, static_cast<acc_t*>(nullptr), len, s);
              if (dp) {
                at::vec::convert(g, dp + i * n + j0, len);
                at::vec::convert(dp + i * n + j0, g, len);
              }
              if (part) backward_row<Act::None>(g, sv, nullptr, static_cast<acc_t*>(nullptr), part + j0, len, s);
            }
          }
        }
      }
    });
  });
  if (!grad_b) return;
  scalar_t* bp = grad_b->data_ptr<scalar_t>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      acc_t total = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) total += partial[blk * n + j];
      bp[j] = static_cast<scalar_t>(total);
    }
  });
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, int64_t act) {
  CHECK_CPU(x);
  CHECK_CPU(weight);
  CHECK_DIM(x, 2);
  CHECK_DIM(weight, 2);
  CHECK_SAME_DTYPE(x, weight);
  CHECK_ACTIVATION(act);
  TORCH_CHECK(x.size(1) == weight.size(1), "x has ", x.size(1), " features, weight expects ", weight.size(1));
}

}  // namespace

std::vector<at::Tensor> dense_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                          const c10::optional<at::Tensor>& bias, int64_t act, double slope) {
  check_inputs(x, weight, act);
  const Act a = static_cast<Act>(act);
  const int64_t m = x.size(0), n = weight.size(0);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    CHECK_CPU(b);
    CHECK_SAME_DTYPE(x, b);
    CHECK_SHAPE(b, n);
  }
  // The bias goes into the GEMM (beta = 1 over a broadcast bias, as nn.Linear does): measured here it
  // costs the GEMM nothing, and z is rounded once. The epilogue is then the activation's one pass.
  at::Tensor z = b.defined() ? at::addmm(b, x, weight.t()) : at::mm(x, weight.t());  // fresh, contiguous
  // y in place of z unless backward needs z (kept as aux); a mask's padding bytes are part of its layout.
  const Saves saves = saves_of(a);
  at::Tensor y = saves == Saves::Preact ? at::empty_like(z) : z;
  at::Tensor aux = saves == Saves::Preact ? z
                   : saves == Saves::Mask ? at::empty({m, mask_row_bytes(n)}, x.options().dtype(at::kByte))
                                          : at::empty({0}, x.options());
  if (m == 0 || n == 0) {
    if (saves == Saves::Mask) aux.zero_();  // the epilogue writes every byte, padding included, when it runs
  } else if (a != Act::None) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dense_forward_cpu",
                                    [&] { forward_epilogue<scalar_t>(z, y, aux, a, slope); });
  }
  return {y, aux};
}

std::vector<at::Tensor> dense_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                           const at::Tensor& saved, int64_t act, double slope, bool need_x, bool need_w,
                                           bool need_b) {
  check_inputs(x, weight, act);
  const Act a = static_cast<Act>(act);
  const Saves saves = saves_of(a);
  const int64_t m = x.size(0), n = weight.size(0);
  at::Tensor g = grad_y.contiguous();
  CHECK_SHAPE(g, m, n);
  CHECK_SAME_DTYPE(g, x);
  if (saves == Saves::Mask) CHECK_SHAPE(saved, m, mask_row_bytes(n));
  if (saves == Saves::Preact || saves == Saves::Output) CHECK_SHAPE(saved, m, n);
  const at::Tensor savedc = saved.contiguous();
  if (saves == Saves::Preact || saves == Saves::Output) CHECK_SAME_DTYPE(saved, x);
  at::Tensor grad_b = need_b ? at::zeros({n}, x.options()) : at::Tensor();
  at::Tensor dz = saves == Saves::None ? g : at::empty_like(g);  // dz is grad_y itself for "none"
  if (m > 0 && n > 0 && (saves != Saves::None || need_b)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dense_backward_cpu", [&] {
      backward_epilogue<scalar_t>(g, savedc, saves == Saves::None ? nullptr : &dz, need_b ? &grad_b : nullptr, a,
                                  slope);
    });
  }
  // A distinct empty tensor for each gradient not needed: a custom op's outputs may not alias.
  const auto empty = [&] { return at::empty({0}, x.options()); };
  return {need_x ? at::mm(dz, weight) : empty(), need_w ? at::mm(dz.t(), x) : empty(), need_b ? grad_b : empty()};
}

GENFAST_CAPABILITY_NS_END
}  // namespace genfast
