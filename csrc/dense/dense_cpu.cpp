// CPU backend of the fused dense layer (contract and math in dense.h).
// The GEMM goes through ATen (MKL/oneDNN); bias + activation (+ mask or z) is one pass over the
// GEMM's output, in place, row block by row block while it is hot in cache. Backward computes
// dz = grad_y * act'(saved) and the bias gradient in one pass, then the two GEMMs through ATen.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

#include "common/activations.h"
#include "common/checks.h"
#include "dense/dense.h"

namespace genfast {
namespace {

using at::vec::Vectorized;
constexpr int64_t kChunk = 512;     // columns converted to the math type at a time (multiple of 128)
constexpr int64_t kRowBlock = 64;   // rows per task in backward: fixed, so sums never depend on threads

// Vectorized forms of act_forward / act_derivative (activations.h has the scalar math; Mask
// activations never come here in backward, their derivative is read from the bits).
template <typename V>
V vec_forward(Act a, V z, V slope) {
  const V zero(0), one(1), half(0.5);
  switch (a) {
    case Act::Relu: return at::vec::clamp_min(z, zero);
    case Act::LeakyRelu: return V::blendv(z * slope, z, z > zero);
    case Act::Gelu: return half * z * (one + (z * V(M_SQRT1_2)).erf());
    case Act::GeluTanh:
      return half * z * (one + (V(0.79788456080286535588) * (z + V(0.044715) * z * z * z)).tanh());
    case Act::Silu: return z / (one + z.neg().exp());
    case Act::Sigmoid: return one / (one + z.neg().exp());
    case Act::Tanh: return z.tanh();
    default: return z;
  }
}

template <typename V>
V vec_derivative(Act a, V s) {
  const V one(1), half(0.5);
  switch (a) {
    case Act::Gelu:
      return half * (one + (s * V(M_SQRT1_2)).erf()) +
             s * (half.neg() * s * s).exp() * V(0.39894228040143267794);
    case Act::GeluTanh: {
      const V k(0.79788456080286535588), c(0.044715);
      const V t = (k * (s + c * s * s * s)).tanh();
      return half * (one + t) + half * s * (one - t * t) * k * (one + V(3) * c * s * s);
    }
    case Act::Silu: {
      const V sig = one / (one + s.neg().exp());
      return sig * (one + s * (one - sig));
    }
    case Act::Sigmoid: return s * (one - s);
    case Act::Tanh: return one - s * s;
    default: return one;
  }
}

// Applies f to buf[0, n) in vectors, the tail through a zero-padded vector.
template <typename acc_t, typename F>
void vec_apply(acc_t* buf, int64_t n, F f) {
  using V = Vectorized<acc_t>;
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) f(V::loadu(buf + j)).store(buf + j);
  if (j < n) f(V::loadu(buf + j, n - j)).store(buf + j, n - j);
}

template <typename scalar_t>
void forward_epilogue(at::Tensor& z, at::Tensor& y, at::Tensor& aux, const at::Tensor& bias,
                      Act act, double slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t m = z.size(0), n = z.size(1), row_bytes = mask_row_bytes(n);
  const Saves saves = saves_of(act);
  std::vector<acc_t> bias_acc(n, acc_t(0));
  if (bias.defined()) at::vec::convert(bias.data_ptr<scalar_t>(), bias_acc.data(), n);
  scalar_t* zp = z.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  uint8_t* mask = saves == Saves::Mask ? aux.data_ptr<uint8_t>() : nullptr;
  const Vectorized<acc_t> vslope(static_cast<acc_t>(slope));
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
    acc_t buf[kChunk];
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
        const int64_t len = std::min(kChunk, n - j0);
        at::vec::convert(zp + i * n + j0, buf, len);
        if (bias.defined()) {
          for (int64_t k = 0; k < len; ++k) buf[k] += bias_acc[j0 + k];
        }
        if (saves == Saves::Preact) at::vec::convert(buf, zp + i * n + j0, len);
        if (mask) {
          uint8_t* row = mask + i * row_bytes + j0 / 8;
          for (int64_t k = 0; k < len; k += 8) {
            uint8_t byte = 0;
            for (int64_t t = 0; t < 8 && k + t < len; ++t) byte |= uint8_t(buf[k + t] > acc_t(0)) << t;
            row[k / 8] = byte;
          }
        }
        if (act != Act::None) vec_apply(buf, len, [&](auto v) { return vec_forward(act, v, vslope); });
        at::vec::convert(buf, yp + i * n + j0, len);
      }
      if (mask) {  // padding bytes are part of the layout: zero, never stale memory
        const int64_t used = (n + 7) / 8;
        std::fill(mask + i * row_bytes + used, mask + (i + 1) * row_bytes, uint8_t(0));
      }
    }
  });
}

template <typename scalar_t>
void backward_epilogue(const at::Tensor& grad_y, const at::Tensor& saved, at::Tensor& dz,
                       at::Tensor& grad_b, Act act, double slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t m = grad_y.size(0), n = grad_y.size(1), row_bytes = mask_row_bytes(n);
  const Saves saves = saves_of(act);
  const int64_t blocks = (m + kRowBlock - 1) / kRowBlock;
  const bool want_b = grad_b.defined();
  std::vector<acc_t> partial(want_b ? blocks * n : 0, acc_t(0));
  const scalar_t* gp = grad_y.data_ptr<scalar_t>();
  scalar_t* dp = saves != Saves::None ? dz.data_ptr<scalar_t>() : nullptr;  // dz is grad_y for None
  at::parallel_for(0, blocks, 1, [&](int64_t bbegin, int64_t bend) {
    acc_t g[kChunk], s[kChunk];
    for (int64_t blk = bbegin; blk < bend; ++blk) {
      for (int64_t i = blk * kRowBlock; i < std::min(m, (blk + 1) * kRowBlock); ++i) {
        for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
          const int64_t len = std::min(kChunk, n - j0);
          at::vec::convert(gp + i * n + j0, g, len);
          if (saves == Saves::Mask) {
            const uint8_t* row = saved.data_ptr<uint8_t>() + i * row_bytes + j0 / 8;
            const acc_t neg = act == Act::LeakyRelu ? acc_t(slope) : acc_t(0);
            for (int64_t k = 0; k < len; ++k) g[k] *= (row[k / 8] >> (k % 8)) & 1 ? acc_t(1) : neg;
          } else if (saves != Saves::None) {
            at::vec::convert(saved.data_ptr<scalar_t>() + i * n + j0, s, len);
            vec_apply(s, len, [&](auto v) { return vec_derivative(act, v); });
            for (int64_t k = 0; k < len; ++k) g[k] *= s[k];
          }
          if (saves != Saves::None) at::vec::convert(g, dp + i * n + j0, len);
          if (want_b) {
            // Sum dz as stored (rounded to scalar_t), as eager's sum of the dz tensor would.
            const scalar_t* d = saves != Saves::None ? dp + i * n + j0 : gp + i * n + j0;
            acc_t* p = partial.data() + blk * n + j0;
            for (int64_t k = 0; k < len; ++k) p[k] += static_cast<acc_t>(d[k]);
          }
        }
      }
    }
  });
  if (!want_b) return;
  scalar_t* bp = grad_b.data_ptr<scalar_t>();
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
  TORCH_CHECK(x.size(1) == weight.size(1), "x has ", x.size(1), " features, weight expects ",
              weight.size(1));
}

}  // namespace

std::vector<at::Tensor> dense_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                          const c10::optional<at::Tensor>& bias, int64_t act,
                                          double slope) {
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
  // fp32/fp64: the bias joins the activation's pass. Half/bf16: the bias goes into the GEMM, as in
  // eager nn.Linear, so z is rounded once rather than twice (z, then z + bias).
  const bool bias_in_gemm = b.defined() && at::isReducedFloatingType(x.scalar_type());
  at::Tensor z = bias_in_gemm ? at::addmm(b, x, weight.t()) : at::mm(x, weight.t());  // fresh, contiguous
  if (bias_in_gemm) b = at::Tensor();
  at::Tensor y = saves_of(a) == Saves::Preact ? at::empty_like(z) : z;
  at::Tensor aux;
  switch (saves_of(a)) {
    case Saves::Mask: aux = at::empty({m, mask_row_bytes(n)}, x.options().dtype(at::kByte)); break;
    case Saves::Preact: aux = z; break;
    default: aux = at::empty({0}, x.options());
  }
  if (m > 0 && n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dense_forward_cpu", [&] {
      forward_epilogue<scalar_t>(z, y, aux, b, a, slope);
    });
  }
  return {y, aux};
}

std::vector<at::Tensor> dense_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                           const at::Tensor& weight, const at::Tensor& saved,
                                           int64_t act, double slope, bool need_x, bool need_w,
                                           bool need_b) {
  check_inputs(x, weight, act);
  const Act a = static_cast<Act>(act);
  const int64_t m = x.size(0), n = weight.size(0);
  at::Tensor g = grad_y.contiguous();
  CHECK_SHAPE(g, m, n);
  CHECK_SAME_DTYPE(g, x);
  if (saves_of(a) == Saves::Mask) CHECK_SHAPE(saved, m, mask_row_bytes(n));
  if (saves_of(a) == Saves::Preact || saves_of(a) == Saves::Output) CHECK_SHAPE(saved, m, n);
  at::Tensor savedc = saved.contiguous();
  at::Tensor dz = saves_of(a) == Saves::None ? g : at::empty_like(g);
  at::Tensor grad_b = need_b ? at::zeros({n}, x.options()) : at::Tensor();
  if (m > 0 && n > 0 && (saves_of(a) != Saves::None || need_b)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dense_backward_cpu", [&] {
      backward_epilogue<scalar_t>(g, savedc, dz, grad_b, a, slope);
    });
  }
  at::Tensor empty = at::empty({0}, x.options());
  return {need_x ? at::mm(dz, weight) : empty, need_w ? at::mm(dz.t(), x) : empty,
          need_b ? grad_b : empty};
}

}  // namespace genfast
