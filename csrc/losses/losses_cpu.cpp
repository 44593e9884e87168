// CPU backend of the fused losses (contract and math in losses.h).
// One vectorized pass: each row (ELBO) or block of elements (GAN) computes its loss terms and writes
// their gradients. Terms are computed in the math type and summed with compensation in the math type (BCE,
// KL) or in double (MSE, GAN): as accurate as eager's cascade sums, which a plain fp32 sum over a long row
// is not; rows and blocks are fixed units of work, summed in index order at the end, so the bits never
// depend on the number of threads.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

#include "common/checks.h"
#include "common/cpu_capability.h"
#include "common/cpu_math.h"
#include "losses/losses.h"

namespace genfast {
GENFAST_CAPABILITY_NS_BEGIN  // genfast::<capability>:: in the kernel files (cpu_capability.h)
namespace {
using at::vec::Vectorized;
using namespace cpu_math;
constexpr int64_t kGanBlock = 1 << 14;       // elements per GAN partial sum: fixed, never the thread count
constexpr int64_t kGrainElements = 1 << 15;  // work per parallel task

template <typename T>
struct TypeTag {
  using type = T;
};

// ---------------------------------------------------------------------------------------------------
// Elementwise math on vectors of the math type: returns the loss, sets grad to its derivative.

template <typename V>
C10_ALWAYS_INLINE V bce(V x, V t, V& grad) {
  const V zero(0), one(1);
  const V e = exp(x.abs().neg());                       // exp(-|x|) in (0, 1]: never overflows; NaN stays NaN
  grad = V::blendv(e, one, x >= zero) / (one + e) - t;  // sigmoid(x) - t
  // PyTorch's form (binary_cross_entropy_with_logits): the same NaN at infinite logits, where the limit
  // needs a convention PyTorch does not make.
  return (one - t) * x + at::vec::maximum(x.neg(), zero) + log1p_unit(e);
}

template <Term T, typename V>
V gan_term(V x, V p, V& grad) {
  const V zero(0), one(1);
  if constexpr (T == Term::Bce) return bce(x, p, grad);
  if constexpr (T == Term::Hinge) {
    const V h = one + p * x;
    grad = V::blendv(V::blendv(zero, p, h > zero), x, x != x);  // NaN x: NaN gradient, not 0
    return at::vec::maximum(h, zero);
  }
  if constexpr (T == Term::Square) {
    grad = x - p;
    return V(0.5) * grad * grad;
  }
  grad = V::blendv(p, x, x != x);  // Linear
  return p * x;
}

// ---------------------------------------------------------------------------------------------------
// ELBO

// Sum over one row of the squared error in double (the difference of two fp32 values and its square are
// exact or nearly: a one-element loss is then correctly rounded); gradient times gscale to grad.
template <typename scalar_t, typename target_t>
double mse_row(const scalar_t* x, const target_t* t, scalar_t* grad, int64_t n, double tscale, double gscale) {
  using V = Vectorized<double>;
  double xbuf[kChunk], tbuf[kChunk], gbuf[kChunk];
  const V vg(2 * gscale);
  Fp64Sum sum;
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t len = std::min(kChunk, n - j0);
    const double* xs = as_math(x + j0, xbuf, len, 1.0);
    const double* ts = as_math(t + j0, tbuf, len, tscale);
    double* gs = grad_slot<double>(grad ? grad + j0 : nullptr, gbuf);
    for (int64_t j = 0; j < len; j += V::size()) {
      const int64_t m = std::min<int64_t>(V::size(), len - j);
      const V d = V::loadu(xs + j, m) - V::loadu(ts + j, m);
      sum.add(d * d);  // tail lanes: 0
      if (gs) (vg * d).store(gs + j, m);
    }
    store_grad(gbuf, grad ? grad + j0 : nullptr, len);
  }
  return sum.total();
}

// Sum over one row of the BCE-with-logits loss, in the math type; gradient times gscale to grad (if given).
template <typename scalar_t, typename target_t>
double bce_row(const scalar_t* x, const target_t* t, scalar_t* grad, int64_t n, double tscale, double gscale) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  acc_t xbuf[kChunk], tbuf[kChunk], gbuf[kChunk], terms[kChunk];
  const V vg(static_cast<acc_t>(gscale));
  BufferSum<V> sum;  // fp32 lanes, as accurate as double ones here and twice as many a vector
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t len = std::min(kChunk, n - j0);
    const acc_t* xs = as_math(x + j0, xbuf, len, acc_t(1));
    const acc_t* ts = as_math(t + j0, tbuf, len, static_cast<acc_t>(tscale));
    acc_t* gs = grad_slot<acc_t>(grad ? grad + j0 : nullptr, gbuf);
    constexpr int64_t w = V::size();
    int64_t j = 0;
    // Two vectors an iteration: their chains (exp, two divisions, a series) are independent and overlap;
    // one at a time, each waited on its own latency (~50 cycles a vector on AVX2, measured).
    for (; j + 2 * w <= len; j += 2 * w) {
      V g0, g1;
      const V l0 = bce(V::loadu(xs + j), V::loadu(ts + j), g0);
      const V l1 = bce(V::loadu(xs + j + w), V::loadu(ts + j + w), g1);
      l0.store(terms + j);
      l1.store(terms + j + w);
      if (gs) {
        (g0 * vg).store(gs + j);
        (g1 * vg).store(gs + j + w);
      }
    }
    for (; j < len; j += w) {
      const int64_t m = std::min<int64_t>(w, len - j);
      V g;
      bce(V::loadu(xs + j, m), V::loadu(ts + j, m), g).store(terms + j, m);  // tail lanes not stored
      if (gs) (g * vg).store(gs + j, m);
    }
    sum.add(terms, len);
    store_grad(gbuf, grad ? grad + j0 : nullptr, len);
  }
  return sum.total();
}

template <Recon R, typename scalar_t, typename target_t>
void elbo_rows(const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mu, const at::Tensor& logvar,
               std::vector<at::Tensor>& grads, double tscale, double gscale, double* r, double* k) {
  const int64_t b = recon.size(0), d = recon.size(1), l = mu.size(1);
  const scalar_t* xp = recon.data_ptr<scalar_t>();
  const target_t* tp = target.data_ptr<target_t>();
  const scalar_t* mp = mu.data_ptr<scalar_t>();
  const scalar_t* lp = logvar.data_ptr<scalar_t>();
  const bool need_grad = grads[0].defined();
  scalar_t* gx = need_grad ? grads[0].data_ptr<scalar_t>() : nullptr;
  scalar_t* gm = need_grad ? grads[1].data_ptr<scalar_t>() : nullptr;
  scalar_t* gl = need_grad ? grads[2].data_ptr<scalar_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(d + l, 1));
  at::parallel_for(0, b, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* xi = xp + i * d;
      const target_t* ti = tp + i * d;
      scalar_t* gi = gx ? gx + i * d : nullptr;
      if constexpr (R == Recon::Bce) r[i] = bce_row(xi, ti, gi, d, tscale, gscale);
      else r[i] = mse_row(xi, ti, gi, d, tscale, gscale);
      k[i] = kl_row(mp + i * l, lp + i * l, gm ? gm + i * l : nullptr, gl ? gl + i * l : nullptr, l, gscale);
    }
  });
}

// Index-order sum: the same bits whatever the thread count.
double ordered_sum(const double* v, int64_t n) {
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += v[i];
  return total;
}

// ---------------------------------------------------------------------------------------------------
// GAN

// Sum of term T over x[0, n); gradient times gscale to grad (if given), and each element's loss added
// to `each` (if given, zeroed by the caller). BCE terms in the math type (the inline exp and log1p of
// cpu_math.h in fp32 lanes: fp64 terms cost ~5 ns an element in SLEEF's double exp and log1p); the
// others, which need no transcendental, in double, so that a loss of a few elements is correctly rounded
// as eager's sometimes is. Sums in fp64: GAN terms have both signs, and a compensated fp32 sum per lane is
// only as accurate as its lane's partial sum, which may be far larger than the total.
template <Term T, typename scalar_t>
double gan_block(const scalar_t* x, int64_t n, double param, scalar_t* grad, double gscale, double* each) {
  using m_t = std::conditional_t<T == Term::Bce, at::opmath_type<scalar_t>, double>;
  using V = Vectorized<m_t>;
  m_t xbuf[kChunk], gbuf[kChunk];
  const V p(static_cast<m_t>(param)), vg(static_cast<m_t>(gscale));
  Fp64Sum sum;
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t len = std::min(kChunk, n - j0);
    const m_t* xs = as_math(x + j0, xbuf, len, m_t(1));
    m_t* gs = grad_slot<m_t>(grad ? grad + j0 : nullptr, gbuf);
    for (int64_t j = 0; j < len; j += V::size()) {
      const int64_t m = std::min<int64_t>(V::size(), len - j);
      V g;
      const V loss = V::set(V(0), gan_term<T>(V::loadu(xs + j, m), p, g), m);  // tail lanes: 0
      sum.add(loss);
      if (gs) (g * vg).store(gs + j, m);
      if (each) {
        m_t lanes[V::size()];
        loss.store(lanes);
        for (int64_t k = 0; k < m; ++k) each[j0 + j + k] += lanes[k];
      }
    }
    store_grad(gbuf, grad ? grad + j0 : nullptr, len);
  }
  return sum.total();
}

template <typename scalar_t>
double gan_block_dispatch(Term term, const scalar_t* x, int64_t n, double param, scalar_t* grad, double gscale,
                          double* each) {
  switch (term) {
    case Term::Bce: return gan_block<Term::Bce>(x, n, param, grad, gscale, each);
    case Term::Hinge: return gan_block<Term::Hinge>(x, n, param, grad, gscale, each);
    case Term::Square: return gan_block<Term::Square>(x, n, param, grad, gscale, each);
    default: return gan_block<Term::Linear>(x, n, param, grad, gscale, each);
  }
}

struct GanSegment {
  const at::Tensor& x;
  Term term;
  double param;
  at::Tensor grad;  // undefined: not needed
  double gscale;
};

template <typename scalar_t>
at::Tensor gan_loss(const GanSegment (&segments)[2], Reduction reduction) {
  const int64_t n = std::max(segments[0].x.numel(), segments[1].x.numel());
  const int64_t blocks = (n + kGanBlock - 1) / kGanBlock;
  std::vector<double> partial(2 * blocks, 0.0);
  const bool per_element = reduction == Reduction::None;
  at::Tensor out = per_element ? at::empty_like(segments[0].x) : at::Tensor();
  scalar_t* op = per_element ? out.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrainElements / kGanBlock), [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t first = blk * kGanBlock;
      for (int64_t c0 = first; c0 < std::min(n, first + kGanBlock); c0 += kChunk) {
        double each[kChunk] = {};
        for (int s = 0; s < 2; ++s) {
          const GanSegment& seg = segments[s];
          const int64_t len = std::min(kChunk, seg.x.numel() - c0);
          if (len <= 0) continue;
          scalar_t* grad = seg.grad.defined() ? seg.grad.template data_ptr<scalar_t>() + c0 : nullptr;
          partial[2 * blk + s] += gan_block_dispatch(seg.term, seg.x.template data_ptr<scalar_t>() + c0, len, seg.param,
                                                     grad, seg.gscale, per_element ? each : nullptr);
        }
        if (op) at::vec::convert(each, op + c0, std::min(kChunk, n - c0));
      }
    }
  });
  if (per_element) return out;
  double total = 0;
  for (int s = 0; s < 2; ++s) {
    double sum = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) sum += partial[2 * blk + s];
    const int64_t count = segments[s].x.numel();
    total += reduction == Reduction::Mean ? (count > 0 ? sum / count : 0.0) : sum;
  }
  return at::scalar_tensor(total, segments[0].x.options());
}

}  // namespace

std::vector<at::Tensor> losses_elbo_forward_cpu(const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mu,
                                                const at::Tensor& logvar, double beta, int64_t recon_kind,
                                                int64_t reduction, double target_scale, bool need_grad) {
  CHECK_CPU(recon);
  CHECK_CPU(target);
  CHECK_CPU(mu);
  CHECK_CPU(logvar);
  check_elbo_inputs(recon, target, mu, logvar, recon_kind, reduction, target_scale);
  const int64_t b = recon.size(0);
  const Reduction red = static_cast<Reduction>(reduction);
  const double gscale = red == Reduction::Mean ? 1.0 / b : 1.0;
  std::vector<at::Tensor> grads(3);
  if (need_grad) grads = {at::empty_like(recon), at::empty_like(mu), at::empty_like(logvar)};
  std::vector<double> r(b), k(b);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, recon.scalar_type(), "losses_elbo_forward_cpu", [&] {
    auto rows = [&](auto recon_tag, auto target_tag) {
      using target_t = typename decltype(target_tag)::type;
      elbo_rows<decltype(recon_tag)::value, scalar_t, target_t>(recon, target, mu, logvar, grads, target_scale, gscale,
                                                                r.data(), k.data());
    };
    auto by_target = [&](auto recon_tag) {
      if (target.scalar_type() == at::kByte) rows(recon_tag, TypeTag<uint8_t>{});
      else rows(recon_tag, TypeTag<scalar_t>{});
    };
    if (static_cast<Recon>(recon_kind) == Recon::Bce) by_target(std::integral_constant<Recon, Recon::Bce>{});
    else by_target(std::integral_constant<Recon, Recon::Mse>{});
  });
  const at::TensorOptions options = recon.options();
  std::vector<at::Tensor> out;
  if (red == Reduction::None) {
    const at::Tensor rt = at::from_blob(r.data(), {b}, at::kDouble), kt = at::from_blob(k.data(), {b}, at::kDouble);
    // Copies: the double results must not alias r and k, which die here.
    const auto copy = [&](const at::Tensor& t) { return t.to(recon.scalar_type(), false, /*copy=*/true); };
    out = {copy(at::add(rt, kt, beta)), copy(rt), copy(kt)};
  } else {
    const double rs = ordered_sum(r.data(), b), ks = ordered_sum(k.data(), b);
    out = {at::scalar_tensor((rs + beta * ks) * gscale, options), at::scalar_tensor(rs * gscale, options),
           at::scalar_tensor(ks * gscale, options)};
  }
  for (const at::Tensor& g : grads) out.push_back(need_grad ? g : at::empty({0}, options));  // never aliased
  return out;
}

std::vector<at::Tensor> losses_gan_forward_cpu(const at::Tensor& first, const at::Tensor& second, int64_t term0,
                                               double param0, int64_t term1, double param1, int64_t reduction,
                                               bool need_grad) {
  CHECK_CPU(first);
  CHECK_CPU(second);
  check_gan_inputs(first, second, term0, term1, reduction);
  const Reduction red = static_cast<Reduction>(reduction);
  auto scale = [&](const at::Tensor& x) { return red == Reduction::Mean && x.numel() > 0 ? 1.0 / x.numel() : 1.0; };
  const GanSegment segments[2] = {
      {first, static_cast<Term>(term0), param0, need_grad ? at::empty_like(first) : at::Tensor(), scale(first)},
      {second, static_cast<Term>(term1), param1, need_grad ? at::empty_like(second) : at::Tensor(), scale(second)}};
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, first.scalar_type(), "losses_gan_forward_cpu",
                                  [&] { loss = gan_loss<scalar_t>(segments, red); });
  const auto grad = [&](int s) { return need_grad ? segments[s].grad : at::empty({0}, first.options()); };
  return {loss, grad(0), grad(1)};  // a custom op's outputs must not alias each other
}

GENFAST_CAPABILITY_NS_END
}  // namespace genfast
