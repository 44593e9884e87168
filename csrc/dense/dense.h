// Fused dense + activation: y = act(x @ weight^T + bias).
//
// forward(x (M, K), weight (N, K), bias (N) or none, act, slope) -> {y (M, N), aux}
//   aux is what backward needs beyond x and weight (see Saves in common/activations.h):
//   Mask: uint8 (M, mask_row_bytes(N)), bit j of row i set where z[i, j] > 0;
//   Preact: z (M, N) in x's dtype; Output / None: an empty tensor (backward gets y or nothing).
// backward(grad_y (M, N), x, weight, saved, act, slope, need_x, need_w, need_b)
//   -> {grad_x (M, K), grad_weight (N, K), grad_bias (N)}, an empty tensor for each not needed.
//   dz = grad_y * act'(saved); grad_x = dz @ weight; grad_weight = dz^T @ x; grad_bias = sum_i dz.
//   saved is aux for Mask/Preact, y for Output, empty for None.
// Bytes: forward reads x and weight and writes y (+ aux); the GEMM adds the bias, the epilogue is one
// pass over y (activation + mask bits), in place unless z must be kept.
#pragma once

#include <torch/extension.h>

#include <vector>

#include "common/cpu_capability.h"

namespace genfast {
GENFAST_CAPABILITY_NS_BEGIN  // genfast::<capability>:: in the kernel files (cpu_capability.h)

std::vector<at::Tensor> dense_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                          const c10::optional<at::Tensor>& bias, int64_t act, double slope);
std::vector<at::Tensor> dense_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                           const at::Tensor& saved, int64_t act, double slope, bool need_x, bool need_w,
                                           bool need_b);

// genfast::fused_dense's eager autograd node (dense_autograd.cpp): forward's arguments and outputs, on the
// cpu or cuda kernels by x's device; backward(create_graph=True) calls the op's Python rule
// (common/python_rules.h) as rule(grad_y, x, weight, bias, (need_x, need_w, need_b), act, slope).
std::vector<at::Tensor> dense_node(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                   int64_t act, double slope);

#ifdef GENFAST_WITH_CUDA
std::vector<at::Tensor> dense_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                           const c10::optional<at::Tensor>& bias, int64_t act, double slope);
std::vector<at::Tensor> dense_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                            const at::Tensor& saved, int64_t act, double slope, bool need_x,
                                            bool need_w, bool need_b);
#endif

GENFAST_CAPABILITY_NS_END
}  // namespace genfast
