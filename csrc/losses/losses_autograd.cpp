// The eager autograd nodes of genfast::elbo_loss and genfast::gan_loss on the cpu and cuda backends
// (genfast/ops/_op.py routes eager calls that need gradients here): the ops' arguments and outputs, one
// C++ call and one node, where the Python autograd.Function costs ~25 us more per call than a small
// batch's whole loss. Backward is the rule of genfast/ops/losses.py: the forward kernel saved the loss's
// gradient, backward scales it by grad_output (per sample for reduction "none"). A backward that builds
// a graph raises the message of the op's Python rule (common/python_rules.h).
#include <torch/autograd.h>

#include "common/python_rules.h"
#include "losses/losses.h"

namespace genfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// backward(create_graph=True): these ops have none; the op's Python rule gives the message to raise.
void refuse_double_backward(const char* op) {
  if (!torch::autograd::GradMode::is_enabled()) return;
  std::string why;
  {
    pybind11::gil_scoped_acquire gil;
    why = call_double_backward(op).cast<std::string>();
  }
  TORCH_CHECK(false, why);
}

// saved * factor: factor a scalar, or one value per row of saved (reduction "none"). A CPU scalar factor of
// exactly 1 (loss.backward() of the loss itself, the common case) returns saved as it is: the product would
// be a copy of it, one more pass over the largest gradient. (A gradient changed in place then fails a
// retained graph's second backward loudly, through the saved tensor's version counter.)
at::Tensor per_sample_times(const at::Tensor& saved, const at::Tensor& factor) {
  if (factor.dim() == 0 && factor.is_cpu() && factor.item<double>() == 1.0) return saved;
  if (factor.dim() == 0) return saved * factor;
  std::vector<int64_t> shape(saved.dim(), 1);
  shape[0] = -1;
  return saved * factor.view(shape);
}

// The sum of two optional gradients (undefined: no gradient reached that path).
at::Tensor plus(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return a + b;
}

struct ElboLoss : public torch::autograd::Function<ElboLoss> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& recon, const at::Tensor& target,
                               const at::Tensor& mu, const at::Tensor& logvar, double beta, int64_t recon_kind,
                               int64_t reduction, double target_scale, bool need_grad) {
#ifdef GENFAST_WITH_CUDA
    std::vector<at::Tensor> out =
        recon.is_cuda()
            ? losses_elbo_forward_cuda(recon, target, mu, logvar, beta, recon_kind, reduction, target_scale, need_grad)
            : losses_elbo_forward_cpu(recon, target, mu, logvar, beta, recon_kind, reduction, target_scale, need_grad);
#else
    std::vector<at::Tensor> out =
        losses_elbo_forward_cpu(recon, target, mu, logvar, beta, recon_kind, reduction, target_scale, need_grad);
#endif
    ctx->save_for_backward({out[3], out[4], out[5]});
    ctx->saved_data["beta"] = beta;
    ctx->mark_non_differentiable({out[3], out[4], out[5]});
    ctx->set_materialize_grads(false);
    return out;
  }

  // d loss/d recon = saved_recon; d loss/d (mu, logvar) = beta * saved_kl; the terms are outputs too.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward("elbo_loss");
    const variable_list saved = ctx->get_saved_variables();
    const double beta = ctx->saved_data["beta"].toDouble();
    const at::Tensor on_recon = plus(grads[0], grads[1]);
    const at::Tensor on_kl = plus(grads[0].defined() ? grads[0] * beta : at::Tensor(), grads[2]);
    variable_list result(9);
    if (on_recon.defined() && ctx->needs_input_grad(0)) result[0] = per_sample_times(saved[0], on_recon);
    if (on_kl.defined() && ctx->needs_input_grad(2)) result[2] = per_sample_times(saved[1], on_kl);
    if (on_kl.defined() && ctx->needs_input_grad(3)) result[3] = per_sample_times(saved[2], on_kl);
    return result;
  }
};

struct GanLoss : public torch::autograd::Function<GanLoss> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& first, const at::Tensor& second, int64_t term0,
                               double param0, int64_t term1, double param1, int64_t reduction, bool need_grad) {
#ifdef GENFAST_WITH_CUDA
    std::vector<at::Tensor> out =
        first.is_cuda() ? losses_gan_forward_cuda(first, second, term0, param0, term1, param1, reduction, need_grad)
                        : losses_gan_forward_cpu(first, second, term0, param0, term1, param1, reduction, need_grad);
#else
    std::vector<at::Tensor> out =
        losses_gan_forward_cpu(first, second, term0, param0, term1, param1, reduction, need_grad);
#endif
    ctx->save_for_backward({out[1], out[2]});
    ctx->mark_non_differentiable({out[1], out[2]});
    ctx->set_materialize_grads(false);
    return out;
  }

  // grad_loss is a scalar or, for "none", one value per element of first (second has its shape then).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward("gan_loss");
    variable_list result(8);
    if (!grads[0].defined()) return result;
    const variable_list saved = ctx->get_saved_variables();
    for (size_t i = 0; i < 2; ++i) {
      // A scalar grad_loss, or ("none") one value per element, of saved's shape.
      if (ctx->needs_input_grad(i))
        result[i] = grads[0].dim() == 0 ? per_sample_times(saved[i], grads[0]) : saved[i] * grads[0];
    }
    return result;
  }
};

}  // namespace

std::vector<at::Tensor> elbo_node(const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mu,
                                  const at::Tensor& logvar, double beta, int64_t recon_kind, int64_t reduction,
                                  double target_scale, bool need_grad) {
  return ElboLoss::apply(recon, target, mu, logvar, beta, recon_kind, reduction, target_scale, need_grad);
}

std::vector<at::Tensor> gan_node(const at::Tensor& first, const at::Tensor& second, int64_t term0, double param0,
                                 int64_t term1, double param1, int64_t reduction, bool need_grad) {
  return GanLoss::apply(first, second, term0, param0, term1, param1, reduction, need_grad);
}

}  // namespace genfast
