// The CPU capability in use and the dispatchers of the CPU kernels' entry points (cpu_capability.h).
// Compiled once, at baseline (no vector flags): it runs on every CPU PyTorch runs on.
#include "common/cpu_capability.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>

#include "dense/dense.h"
#include "losses/losses.h"
#include "reparam/reparam.h"

namespace genfast {

// The variants' entry points: genfast::DEFAULT::dense_forward_cpu etc. (same signatures as the
// dispatchers in the headers; the kernel files define them inside GENFAST_CAPABILITY_NS).
#ifdef GENFAST_CPU_X86_VARIANTS
#define GENFAST_DECLARE_VARIANTS(name) \
  namespace DEFAULT {                  \
  decltype(::genfast::name) name;      \
  }                                    \
  namespace AVX2 {                     \
  decltype(::genfast::name) name;      \
  }                                    \
  namespace AVX512 {                   \
  decltype(::genfast::name) name;      \
  }
// The chosen variant of an entry point (a function pointer; the switch is on a cached value).
#define GENFAST_CPU_KERNEL(name) pick_variant(&DEFAULT::name, &AVX2::name, &AVX512::name)
#else
#define GENFAST_DECLARE_VARIANTS(name) \
  namespace DEFAULT {                  \
  decltype(::genfast::name) name;      \
  }
#define GENFAST_CPU_KERNEL(name) (&DEFAULT::name)
#endif

GENFAST_DECLARE_VARIANTS(dense_forward_cpu)
GENFAST_DECLARE_VARIANTS(dense_backward_cpu)
GENFAST_DECLARE_VARIANTS(losses_elbo_forward_cpu)
GENFAST_DECLARE_VARIANTS(losses_gan_forward_cpu)
GENFAST_DECLARE_VARIANTS(reparam_forward_cpu)
GENFAST_DECLARE_VARIANTS(reparam_backward_cpu)
GENFAST_DECLARE_VARIANTS(kl_forward_cpu)
GENFAST_DECLARE_VARIANTS(kl_backward_cpu)
GENFAST_DECLARE_VARIANTS(reparam_kl_forward_cpu)
GENFAST_DECLARE_VARIANTS(reparam_kl_backward_cpu)

std::string cpu_capability_name(CpuCapability capability) {
  switch (capability) {
    case CpuCapability::Avx512: return "AVX512";
    case CpuCapability::Avx2: return "AVX2";
    default: return "DEFAULT";
  }
}

bool cpu_supports(CpuCapability capability) {
#ifdef GENFAST_CPU_X86_VARIANTS
  // __builtin_cpu_supports checks the OS saves the vector state too (XGETBV), as ATen's cpuinfo does.
  switch (capability) {
    case CpuCapability::Default: return true;
    case CpuCapability::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case CpuCapability::Avx512:
      return cpu_supports(CpuCapability::Avx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return capability == CpuCapability::Default;
#endif
}

namespace {

CpuCapability aten_capability() {
  const std::string aten = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512" on x86-64
  if (aten == "AVX512") return CpuCapability::Avx512;
  if (aten == "AVX2") return CpuCapability::Avx2;
  return CpuCapability::Default;
}

CpuCapability choose() {
  if (const char* env = std::getenv("GENFAST_CPU_CAPABILITY"); env && *env) {
    std::string name(env);
    std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::toupper(c); });
    CpuCapability wanted;
    if (name == "DEFAULT") wanted = CpuCapability::Default;
    else if (name == "AVX2") wanted = CpuCapability::Avx2;
    else if (name == "AVX512") wanted = CpuCapability::Avx512;
    else TORCH_CHECK(false, "GENFAST_CPU_CAPABILITY=", env, ": expected default, avx2 or avx512");
    TORCH_CHECK(cpu_supports(wanted), "GENFAST_CPU_CAPABILITY=", env, ": this CPU (or this build) has no ", name);
    return wanted;
  }
  CpuCapability best = CpuCapability::Default;
  for (CpuCapability c : {CpuCapability::Avx2, CpuCapability::Avx512})
    if (cpu_supports(c)) best = c;
  return std::min(best, aten_capability());
}

template <typename F>
F pick_variant(F default_variant, F avx2, F avx512) {
  switch (cpu_capability()) {
    case CpuCapability::Avx512: return avx512;
    case CpuCapability::Avx2: return avx2;
    default: return default_variant;
  }
}

}  // namespace

CpuCapability cpu_capability() {
  static const CpuCapability chosen = choose();  // thread-safe; an error is thrown again on the next call
  return chosen;
}

std::vector<at::Tensor> dense_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                          const c10::optional<at::Tensor>& bias, int64_t act, double slope) {
  return GENFAST_CPU_KERNEL(dense_forward_cpu)(x, weight, bias, act, slope);
}

std::vector<at::Tensor> dense_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                           const at::Tensor& saved, int64_t act, double slope, bool need_x, bool need_w,
                                           bool need_b) {
  return GENFAST_CPU_KERNEL(dense_backward_cpu)(grad_y, x, weight, saved, act, slope, need_x, need_w, need_b);
}

std::vector<at::Tensor> losses_elbo_forward_cpu(const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mu,
                                                const at::Tensor& logvar, double beta, int64_t recon_kind,
                                                int64_t reduction, double target_scale, bool need_grad) {
  return GENFAST_CPU_KERNEL(losses_elbo_forward_cpu)(recon, target, mu, logvar, beta, recon_kind, reduction,
                                                     target_scale, need_grad);
}

std::vector<at::Tensor> losses_gan_forward_cpu(const at::Tensor& first, const at::Tensor& second, int64_t term0,
                                               double param0, int64_t term1, double param1, int64_t reduction,
                                               bool need_grad) {
  return GENFAST_CPU_KERNEL(losses_gan_forward_cpu)(first, second, term0, param0, term1, param1, reduction, need_grad);
}

std::vector<at::Tensor> reparam_forward_cpu(const at::Tensor& mu, const at::Tensor& logvar,
                                            c10::optional<at::Generator> generator) {
  return GENFAST_CPU_KERNEL(reparam_forward_cpu)(mu, logvar, std::move(generator));
}

at::Tensor reparam_backward_cpu(const at::Tensor& grad_z, const at::Tensor& logvar, const at::Tensor& rng_state) {
  return GENFAST_CPU_KERNEL(reparam_backward_cpu)(grad_z, logvar, rng_state);
}

at::Tensor kl_forward_cpu(const at::Tensor& mu, const at::Tensor& logvar) {
  return GENFAST_CPU_KERNEL(kl_forward_cpu)(mu, logvar);
}

std::vector<at::Tensor> kl_backward_cpu(const at::Tensor& grad_kl, const at::Tensor& mu, const at::Tensor& logvar) {
  return GENFAST_CPU_KERNEL(kl_backward_cpu)(grad_kl, mu, logvar);
}

std::vector<at::Tensor> reparam_kl_forward_cpu(const at::Tensor& mu, const at::Tensor& logvar,
                                               c10::optional<at::Generator> generator) {
  return GENFAST_CPU_KERNEL(reparam_kl_forward_cpu)(mu, logvar, std::move(generator));
}

std::vector<at::Tensor> reparam_kl_backward_cpu(const at::Tensor& grad_z, const at::Tensor& grad_kl,
                                                const at::Tensor& mu, const at::Tensor& logvar,
                                                const at::Tensor& rng_state) {
  return GENFAST_CPU_KERNEL(reparam_kl_backward_cpu)(grad_z, grad_kl, mu, logvar, rng_state);
}

}  // namespace genfast
