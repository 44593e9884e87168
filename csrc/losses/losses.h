// Fused losses: the negative ELBO of a VAE and the GAN losses, each one pass that computes the loss
// and writes its gradient (backward multiplies that gradient by grad_output: a scale, no kernel).
// The codes mirror genfast/loss_terms.py (tests/test_build.py checks they agree).
//
// losses_elbo_forward(recon (B, D), target (B, D), mu (B, L), logvar (B, L), beta, recon_kind, reduction,
//                     target_scale, need_grad) -> {loss, recon_term, kl_term, grad_recon, grad_mu, grad_logvar}
//   Per sample i:  r_i  = sum_j bce(recon, t) (Bce: recon are logits) or sum_j (recon - t)^2 (Mse)
//                  kl_i = 0.5 sum_k (exp(logvar) - 1 - logvar + mu^2)    KL(N(mu, exp(logvar)) || N(0, I))
//                  loss_i = r_i + beta kl_i
//     bce(x, t) = (1 - t) x + max(-x, 0) + log1p(exp(-|x|)), binary_cross_entropy_with_logits' stable form
//     (the same NaN as PyTorch at x = -inf, and at x = +inf with t = 1).
//     t = target (recon's dtype) or target * target_scale (uint8: 1/255 for pixels, 1 for 0/1 values).
//   Reduction None: loss, recon_term, kl_term of shape (B,); Mean: sums over i divided by B, 0-d;
//     Sum: sums over i, 0-d. All in recon's dtype.
//   With c = 1/B (Mean) or 1 (None, Sum), the gradients written (recon's dtype; empty if !need_grad):
//     grad_recon = c dr_i/drecon = c (sigmoid(x) - t) (Bce) or c 2 (x - t) (Mse)
//     grad_mu = c mu, grad_logvar = c 0.5 expm1(logvar): the gradient of kl_term, without beta, so that
//     backward serves every output: d/drecon = grad_recon (g_loss + g_recon_term),
//     d/dmu = grad_mu (beta g_loss + g_kl_term), each g per sample (None) or a scalar.
//   The target gets no gradient.
//
// losses_gan_forward(first, second, term0, param0, term1, param1, reduction, need_grad)
//   -> {loss, grad_first, grad_second}; first (N0 elements) and second (N1) of any shape, read as flat
//   (so the Python layer adds no reshape, which is an autograd node of its own), gradients in their shapes.
//   Elementwise terms f(x; p): Bce: softplus(x) - p x (logits with target p); Hinge: max(1 + p x, 0);
//   Square: 0.5 (x - p)^2; Linear: p x. The second tensor may be empty (a generator loss).
//   Reduction None (N1 = N0 or 0): loss[i] = f0(first[i]) + f1(second[i]), first's shape;
//     Mean: sum f0 / N0 + sum f1 / N1 (a sum over an empty tensor counts 0); Sum: sum f0 + sum f1.
//   grad_first = c0 f0'(first), c0 = 1/N0 (Mean) or 1; grad_second likewise. NaN in gives NaN out
//   in the loss and in the gradient of that element.
//
// Inputs: contiguous (the Python layer makes them so), float16/bfloat16/float32/float64; target of
// recon's dtype or uint8. BCE terms in fp32 (fp64 for fp64 inputs); MSE terms in fp64 (cheap, and a
// loss of a few elements is then correctly rounded, where fp32 terms leave its last bit to chance); GAN
// terms in fp64, but for BCE ones on the CPU (math type; summed in fp64); KL terms in fp64 on the GPU,
// in the math type on the CPU (KL and BCE terms summed per row with compensation in the math type,
// cpu_math.h); the rows' sums in fp64 in a fixed order, so every result is the same bits run to run
// and, on the CPU, for any thread count.
// Indices are int64.
// Bytes (e bytes per element, e_t per target element): ELBO forward reads e BD + e_t BD + 2 e BL and
// writes e (BD + 2 BL) gradients + 3 outputs; GAN forward reads and writes e (N0 + N1) (+ e N0 for
// None). Without need_grad the gradients are not written.
#pragma once

#include <torch/extension.h>

#include <vector>

#include "common/cpu_capability.h"

namespace genfast {
GENFAST_CAPABILITY_NS_BEGIN  // genfast::<capability>:: in the kernel files (cpu_capability.h)

enum class Recon : int64_t { Bce = 0, Mse = 1 };
enum class Reduction : int64_t { None = 0, Mean = 1, Sum = 2 };
enum class Term : int64_t { Bce = 0, Hinge = 1, Square = 2, Linear = 3 };

std::vector<at::Tensor> losses_elbo_forward_cpu(const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mu,
                                                const at::Tensor& logvar, double beta, int64_t recon_kind,
                                                int64_t reduction, double target_scale, bool need_grad);
std::vector<at::Tensor> losses_gan_forward_cpu(const at::Tensor& first, const at::Tensor& second, int64_t term0,
                                               double param0, int64_t term1, double param1, int64_t reduction,
                                               bool need_grad);

// The eager autograd nodes of genfast::elbo_loss and genfast::gan_loss (losses_autograd.cpp): the ops'
// arguments and outputs, on the cpu or cuda kernel by the first tensor's device; backward scales the
// saved gradients as genfast/ops/losses.py's rule does.
std::vector<at::Tensor> elbo_node(const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mu,
                                  const at::Tensor& logvar, double beta, int64_t recon_kind, int64_t reduction,
                                  double target_scale, bool need_grad);
std::vector<at::Tensor> gan_node(const at::Tensor& first, const at::Tensor& second, int64_t term0, double param0,
                                 int64_t term1, double param1, int64_t reduction, bool need_grad);

#ifdef GENFAST_WITH_CUDA
std::vector<at::Tensor> losses_elbo_forward_cuda(const at::Tensor& recon, const at::Tensor& target,
                                                 const at::Tensor& mu, const at::Tensor& logvar, double beta,
                                                 int64_t recon_kind, int64_t reduction, double target_scale,
                                                 bool need_grad);
std::vector<at::Tensor> losses_gan_forward_cuda(const at::Tensor& first, const at::Tensor& second, int64_t term0,
                                                double param0, int64_t term1, double param1, int64_t reduction,
                                                bool need_grad);
#endif

// Checks shared by the CPU and CUDA entry points (the Python layer has checked the user's input).
inline void check_loss_codes(int64_t reduction) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "unknown reduction code ", reduction);
}

inline void check_elbo_inputs(const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mu,
                              const at::Tensor& logvar, int64_t recon_kind, int64_t reduction, double target_scale) {
  TORCH_CHECK(recon.dim() == 2 && mu.dim() == 2, "recon and mu must be 2-D (batch, features)");
  TORCH_CHECK(target.sizes() == recon.sizes(), "target has shape ", target.sizes(), ", recon ", recon.sizes());
  TORCH_CHECK(logvar.sizes() == mu.sizes(), "logvar has shape ", logvar.sizes(), ", mu ", mu.sizes());
  TORCH_CHECK(mu.size(0) == recon.size(0), "mu has ", mu.size(0), " rows, recon ", recon.size(0));
  TORCH_CHECK(recon.scalar_type() == mu.scalar_type() && mu.scalar_type() == logvar.scalar_type(),
              "recon, mu and logvar must have the same dtype");
  TORCH_CHECK(target.scalar_type() == recon.scalar_type() || target.scalar_type() == at::kByte,
              "target must have recon's dtype or be uint8");
  TORCH_CHECK(target.scalar_type() == at::kByte || target_scale == 1.0, "target_scale applies to uint8 only");
  TORCH_CHECK(recon.is_contiguous() && target.is_contiguous() && mu.is_contiguous() && logvar.is_contiguous(),
              "recon, target, mu and logvar must be contiguous");
  TORCH_CHECK(recon_kind == 0 || recon_kind == 1, "unknown recon_kind code ", recon_kind);
  check_loss_codes(reduction);
  TORCH_CHECK(reduction != int64_t(Reduction::Mean) || recon.size(0) > 0, "the mean over an empty batch");
}

inline void check_gan_inputs(const at::Tensor& first, const at::Tensor& second, int64_t term0, int64_t term1,
                             int64_t reduction) {
  TORCH_CHECK(first.scalar_type() == second.scalar_type(), "first and second must have the same dtype");
  TORCH_CHECK(first.is_contiguous() && second.is_contiguous(), "first and second must be contiguous");
  TORCH_CHECK(term0 >= 0 && term0 <= 3 && term1 >= 0 && term1 <= 3, "unknown term code ", term0, " or ", term1);
  check_loss_codes(reduction);
  if (reduction == int64_t(Reduction::None)) {
    TORCH_CHECK(second.numel() == 0 || second.numel() == first.numel(), "reduction none: second has ", second.numel(),
                " elements, first ", first.numel());
  }
  if (reduction == int64_t(Reduction::Mean)) TORCH_CHECK(first.numel() > 0, "the mean over an empty tensor");
}

GENFAST_CAPABILITY_NS_END
}  // namespace genfast
