// genfast::fused_dense's eager autograd node in C++ (genfast/ops/dense.py routes eager calls on the cpu
// and cuda backends here, through genfast/ops/_op.py): the same arguments, outputs and saved tensors as
// the op, one C++ call and one autograd node, where the Python autograd.Function costs ~6 us more per
// call, more than a small layer's whole kernel. Inputs come checked, 2-D and contiguous from Python.
// backward(create_graph=True) calls the op's Python rule (common/python_rules.h): defined once, there.
#include <torch/autograd.h>
#include <torch/extension.h>

#include "common/activations.h"
#include "common/python_rules.h"
#include "dense/dense.h"

namespace genfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::vector<at::Tensor> forward_kernel(const at::Tensor& x, const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias, int64_t act, double slope) {
#ifdef GENFAST_WITH_CUDA
  if (x.is_cuda()) return dense_forward_cuda(x, weight, bias, act, slope);
#endif
  return dense_forward_cpu(x, weight, bias, act, slope);
}

std::vector<at::Tensor> backward_kernel(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& saved, int64_t act, double slope, bool need_x, bool need_w,
                                        bool need_b) {
#ifdef GENFAST_WITH_CUDA
  if (x.is_cuda()) return dense_backward_cuda(grad_y, x, weight, saved, act, slope, need_x, need_w, need_b);
#endif
  return dense_backward_cpu(grad_y, x, weight, saved, act, slope, need_x, need_w, need_b);
}

std::vector<at::Tensor> gradients_with_graph(const at::Tensor& grad_y, const variable_list& saved,
                                             const std::vector<bool>& need, int64_t act, double slope) {
  pybind11::gil_scoped_acquire gil;  // held until the Python objects below are gone
  const c10::optional<at::Tensor> bias = saved[3].defined() ? c10::optional<at::Tensor>(saved[3]) : c10::nullopt;
  const pybind11::object result =
      call_double_backward("fused_dense", grad_y, saved[0], saved[1], bias,
                           std::make_tuple(bool(need[0]), bool(need[1]), bool(need[2])), act, slope);
  const pybind11::tuple grads = result;
  std::vector<at::Tensor> out(3);
  for (size_t i = 0; i < 3; ++i) {
    if (!grads[i].is_none()) out[i] = grads[i].cast<at::Tensor>();
  }
  return out;
}

struct FusedDense : public torch::autograd::Function<FusedDense> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, int64_t act, double slope) {
    std::vector<at::Tensor> out = forward_kernel(x, weight, bias, act, slope);
    const bool keeps_output = saves_of(static_cast<Act>(act)) == Saves::Output;
    // bias (a reference, no memory) only for a backward that builds a graph: it recomputes from x, w, b.
    ctx->save_for_backward({x, weight, keeps_output ? out[0] : out[1], bias.value_or(at::Tensor())});
    ctx->saved_data["act"] = act;
    ctx->saved_data["slope"] = slope;
    ctx->mark_non_differentiable({out[1]});
    ctx->set_materialize_grads(false);
    return {out[0], out[1]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    // Edges exist only for tensor arguments: bias is edge 2 when it was given.
    const std::vector<bool> need = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                    saved[3].defined() && ctx->needs_input_grad(2)};
    const int64_t act = ctx->saved_data["act"].toInt();
    const double slope = ctx->saved_data["slope"].toDouble();
    std::vector<at::Tensor> g(3);
    if (grads[0].defined()) {
      g = torch::autograd::GradMode::is_enabled() ? gradients_with_graph(grads[0], saved, need, act, slope)
                                                  : backward_kernel(grads[0].contiguous(), saved[0], saved[1], saved[2],
                                                                    act, slope, need[0], need[1], need[2]);
    }
    return {need[0] ? g[0] : at::Tensor(), need[1] ? g[1] : at::Tensor(), need[2] ? g[2] : at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

std::vector<at::Tensor> dense_node(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                   int64_t act, double slope) {
  return FusedDense::apply(x, weight, bias, act, slope);
}

}  // namespace genfast
