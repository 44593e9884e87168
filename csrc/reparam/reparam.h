// Reparameterization sampling and KL divergence of a diagonal Gaussian N(mu, exp(logvar)), fused.
//
// Random state: every backend describes the noise of one call by rng_state, an int64 tensor of shape
// (2,) on mu's device holding (seed, offset); eps[i] = philox normal i of (seed, offset)
// (common/philox.h). Backward regenerates eps from rng_state and stores nothing of mu's shape.
//   CPU:  seed = one random64() draw from the CPU generator (under its lock), offset = 0.
//   CUDA: seed and offset / 4 of philox_cuda_state(4) of the CUDA generator (under its lock), unpacked
//         in the kernel, which writes them into rng_state: CUDA-graph safe (replays read the graph's
//         offset). PyTorch counts that offset in 32-bit draws, philox.h's offset in 128-bit blocks.
//
// reparam_forward(mu, logvar, generator) -> {z, rng_state}
//   z = mu + exp(0.5 * logvar) * eps, in mu's dtype, computed in fp32.
// reparam_backward(grad_z, logvar, rng_state) -> grad_logvar
//   grad_logvar = 0.5 * grad_z * eps * exp(0.5 * logvar)   (grad_mu is grad_z itself: no kernel)
// kl_forward(mu, logvar) -> kl (rows,) in float64, whatever mu's dtype
//   rows = numel / mu.size(-1); kl[r] = 0.5 * sum_j (expm1(logvar) - logvar + mu^2) over row r: each
//   term in the math type (or better), the sum in float64 (the CPU: compensated in the math type, as
//   accurate; cpu_math.h) in a fixed order (deterministic). float64
//   rows let the batch reduction (Python) round once: float32 rows, each rounded, then summed, leave
//   the last bit of a scalar KL to chance.
// kl_backward(grad_kl (rows,) in float64, mu, logvar) -> {grad_mu, grad_logvar} in mu's dtype
//   grad_mu = grad_kl[r] * mu;  grad_logvar = 0.5 * grad_kl[r] * expm1(logvar)
// reparam_kl_forward(mu, logvar, generator) -> {z, rng_state, kl}: both in one pass over mu and logvar.
// reparam_kl_backward(grad_z, grad_kl, mu, logvar, rng_state) -> {grad_mu, grad_logvar}: the sums of the
//   sampling and KL gradients in one pass, each rounded once:
//   grad_mu = grad_z + grad_kl[r] * mu;  grad_logvar = 0.5 * (grad_z * eps * exp(0.5 * logvar) +
//   grad_kl[r] * expm1(logvar))
//
// mu and logvar: same shape, dtype (float16/bfloat16/float32/float64), device; contiguous (the Python
// layer makes them so). Indices are int64. Bytes: forward reads mu and logvar, writes z (and kl);
// backward reads grad_z and logvar, writes grad_logvar; kl_backward reads mu, logvar, writes two grads;
// reparam_kl_backward reads grad_z, mu, logvar, writes two grads.
#pragma once

#include <torch/extension.h>

#include <vector>

#include "common/cpu_capability.h"

namespace genfast {
GENFAST_CAPABILITY_NS_BEGIN  // genfast::<capability>:: in the kernel files (cpu_capability.h)

std::vector<at::Tensor> reparam_forward_cpu(const at::Tensor& mu, const at::Tensor& logvar,
                                            c10::optional<at::Generator> generator);
at::Tensor reparam_backward_cpu(const at::Tensor& grad_z, const at::Tensor& logvar, const at::Tensor& rng_state);
at::Tensor kl_forward_cpu(const at::Tensor& mu, const at::Tensor& logvar);
std::vector<at::Tensor> kl_backward_cpu(const at::Tensor& grad_kl, const at::Tensor& mu, const at::Tensor& logvar);
std::vector<at::Tensor> reparam_kl_forward_cpu(const at::Tensor& mu, const at::Tensor& logvar,
                                               c10::optional<at::Generator> generator);
std::vector<at::Tensor> reparam_kl_backward_cpu(const at::Tensor& grad_z, const at::Tensor& grad_kl,
                                                const at::Tensor& mu, const at::Tensor& logvar,
                                                const at::Tensor& rng_state);

#ifdef GENFAST_WITH_CUDA
std::vector<at::Tensor> reparam_forward_cuda(const at::Tensor& mu, const at::Tensor& logvar,
                                             c10::optional<at::Generator> generator);
at::Tensor reparam_backward_cuda(const at::Tensor& grad_z, const at::Tensor& logvar, const at::Tensor& rng_state);
at::Tensor kl_forward_cuda(const at::Tensor& mu, const at::Tensor& logvar);
std::vector<at::Tensor> kl_backward_cuda(const at::Tensor& grad_kl, const at::Tensor& mu, const at::Tensor& logvar);
std::vector<at::Tensor> reparam_kl_forward_cuda(const at::Tensor& mu, const at::Tensor& logvar,
                                                c10::optional<at::Generator> generator);
std::vector<at::Tensor> reparam_kl_backward_cuda(const at::Tensor& grad_z, const at::Tensor& grad_kl,
                                                 const at::Tensor& mu, const at::Tensor& logvar,
                                                 const at::Tensor& rng_state);
#endif

GENFAST_CAPABILITY_NS_END
}  // namespace genfast
