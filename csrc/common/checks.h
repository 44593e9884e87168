// Input checks for the C++ entry points. The Python layer validates user input with clear
// messages first; these guard the kernels against misuse from other callers.
#pragma once

#include <torch/extension.h>

#define CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor")
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_DIM(x, d) TORCH_CHECK((x).dim() == (d), #x " must have ", (d), " dimensions, got ", (x).dim())
#define CHECK_SHAPE(x, ...)                                                                                \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " has shape ", (x).sizes(), ", expected ", \
              at::IntArrayRef({__VA_ARGS__}))
#define CHECK_SAME_DTYPE(x, y) \
  TORCH_CHECK((x).scalar_type() == (y).scalar_type(), #x " and " #y " must have the same dtype")
#define CHECK_ACTIVATION(code) \
  TORCH_CHECK((code) >= 0 && (code) < genfast::kNumActivations, "unknown activation code ", (code))
#define CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), #x " is on ", (x).device(), ", " #y " on ", (y).device())
#define CHECK_SAME_SHAPE(x, y) \
  TORCH_CHECK((x).sizes() == (y).sizes(), #x " has shape ", (x).sizes(), ", " #y " has shape ", (y).sizes())
#define CHECK_FLOATING(x)                                                                 \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||        \
                  (x).scalar_type() == at::kBFloat16 || (x).scalar_type() == at::kDouble, \
              #x " must be float16, bfloat16, float32 or float64, got ", (x).scalar_type())
