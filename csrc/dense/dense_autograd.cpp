// Eager-mode entry of the compiled dense backends: input checks, autocast, the cpu/cuda kernels of
// dense.h wrapped in a C++ autograd Function, so an eager call costs one C++ call and one autograd node.
// The same steps in Python (genfast/ops/dense.py, which the reference and triton backends and
// torch.compile go through) cost ~6 us more per call, more than a small layer's whole kernel.
// Saves exactly what the custom op saves (x, weight, and mask bits / y / z by activation). The checks
// raise the same exceptions with the same words as ops/_checks.py; tests/test_dense_inputs.py runs
// both paths on the same cases.
#include <ATen/autocast_mode.h>
#include <c10/util/accumulate.h>
#include <torch/autograd.h>

#include <sstream>

#include "common/activations.h"
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
                                        const at::Tensor& saved, int64_t act, double slope, bool need_x,
                                        bool need_w, bool need_b) {
#ifdef GENFAST_WITH_CUDA
  if (x.is_cuda()) return dense_backward_cuda(grad_y, x, weight, saved, act, slope, need_x, need_w, need_b);
#endif
  return dense_backward_cpu(grad_y, x, weight, saved, act, slope, need_x, need_w, need_b);
}

// act(z) with ATen's differentiable ops (double backward only; the kernels compute it otherwise).
at::Tensor activation_aten(const at::Tensor& z, Act act, double slope) {
  switch (act) {
    case Act::Relu: return at::relu(z);
    case Act::LeakyRelu: return at::leaky_relu(z, slope);
    case Act::Gelu: return at::gelu(z);
    case Act::GeluTanh: return at::gelu(z, "tanh");
    case Act::Silu: return at::silu(z);
    case Act::Sigmoid: return at::sigmoid(z);
    case Act::Tanh: return at::tanh(z);
    default: return z;
  }
}

// backward(create_graph=True), as gradient penalties (R1, WGAN-GP) call it: the kernels' gradients
// would be constants to autograd, so recompute y with ATen's ops and differentiate that, graph and all.
std::vector<at::Tensor> gradients_with_graph(const at::Tensor& grad_y, const std::vector<at::Tensor>& inputs,
                                             const std::vector<bool>& need, Act act, double slope) {
  const at::Tensor y = activation_aten(at::linear(inputs[0], inputs[1], inputs[2]), act, slope);
  variable_list wanted;
  for (size_t i = 0; i < 3; ++i) {
    if (need[i]) wanted.push_back(inputs[i]);
  }
  variable_list grads = torch::autograd::grad({y}, wanted, {grad_y}, /*retain_graph=*/true, /*create_graph=*/true);
  std::vector<at::Tensor> out(3);
  for (size_t i = 0, k = 0; i < 3; ++i) {
    if (need[i]) out[i] = grads[k++];
  }
  return out;
}

struct FusedDense : public torch::autograd::Function<FusedDense> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, int64_t act, double slope) {
    std::vector<at::Tensor> out = forward_kernel(x, weight, bias, act, slope);
    const bool keeps_output = saves_of(static_cast<Act>(act)) == Saves::Output;
    // bias (a reference, no memory) only for a backward that builds a graph: it recomputes from x, w, b.
    ctx->save_for_backward({x, weight, keeps_output ? out[0] : out[1], bias.value_or(at::Tensor())});
    ctx->saved_data["act"] = act;
    ctx->saved_data["slope"] = slope;
    return out[0];
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    // Edges exist only for tensor arguments: bias is edge 2 when it was given.
    const std::vector<bool> need = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                    saved[3].defined() && ctx->needs_input_grad(2)};
    const Act act = static_cast<Act>(ctx->saved_data["act"].toInt());
    const double slope = ctx->saved_data["slope"].toDouble();
    std::vector<at::Tensor> g =
        torch::autograd::GradMode::is_enabled()
            ? gradients_with_graph(grads[0], {saved[0], saved[1], saved[3]}, need, act, slope)
            : backward_kernel(grads[0].contiguous(), saved[0], saved[1], saved[2], static_cast<int64_t>(act), slope,
                              need[0], need[1], need[2]);
    return {need[0] ? g[0] : at::Tensor(), need[1] ? g[1] : at::Tensor(), need[2] ? g[2] : at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

std::string shape_tuple(at::IntArrayRef sizes) {  // as Python prints a shape: (5,) or (4, 6)
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

void check_float(const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
                   name, ": expected dtype in ['torch.float16', 'torch.bfloat16', 'torch.float32', 'torch.float64'], ",
                   "got ", dtype_name(dtype));
}

void check_like_x(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " has dtype ", dtype_name(t.scalar_type()),
                   " but x has dtype ", dtype_name(x.scalar_type()));
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_float("x", x);
  check_float("weight", weight);
  if (bias) check_float("bias", *bias);
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight: expected 2 dimensions (out_features, in_features), got shape ",
                    shape_tuple(weight.sizes()));
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == weight.size(1), "x: expected shape (..., ", weight.size(1),
                    ") to match weight ", shape_tuple(weight.sizes()), ", got ", shape_tuple(x.sizes()));
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias: expected shape (",
                      weight.size(0), ",), got ", shape_tuple(bias->sizes()));
  }
}

}  // namespace

at::Tensor dense_eager(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias, int64_t act, double slope) {
  check_inputs(x, weight, bias);
  const auto device_type = x.device().type();
  if (at::autocast::is_autocast_enabled(device_type)) {
    const auto dtype = at::autocast::get_autocast_dtype(device_type);
    x = x.to(dtype);
    weight = weight.to(dtype);
    if (bias) bias = bias->to(dtype);
  }
  check_like_x("weight", weight, x);
  if (bias) {
    check_like_x("bias", *bias, x);
    bias = bias->contiguous();
  }
  // Reshapes are autograd nodes of their own (~1 us each way): only for inputs that are not 2-D.
  if (x.dim() == 2) return FusedDense::apply(x.contiguous(), weight.contiguous(), bias, act, slope);
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = weight.size(0);
  // Rows spelled out rather than -1: with in_features == 0 there is nothing to infer -1 from.
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const at::Tensor x2d = x.reshape({rows, x.size(-1)}).contiguous();
  return FusedDense::apply(x2d, weight.contiguous(), bias, act, slope).view(out_shape);
}

}  // namespace genfast
