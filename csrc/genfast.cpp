// genfast._C: binds every op's CPU and CUDA entry points. The Python layer (genfast/ops)
// wraps them in torch.library custom ops; nothing here is meant to be called directly.
#include <torch/extension.h>

#include "common/activations.h"
#include "common/cpu_capability.h"
#include "common/python_rules.h"
#include "dense/dense.h"
#include "losses/losses.h"
#include "reparam/reparam.h"

#ifdef GENFAST_WITH_CUDA
#include <cuda.h>  // CUDA_VERSION
#endif

#ifndef GENFAST_CUDA_ARCHS
#define GENFAST_CUDA_ARCHS ""
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef GENFAST_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = CUDA_VERSION;
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
#endif
  info["cuda_archs"] = GENFAST_CUDA_ARCHS;
#ifdef _OPENMP
  info["openmp"] = true;  // at::parallel_for really runs on several threads
#else
  info["openmp"] = false;
#endif
  info["torch"] = GENFAST_TORCH_VERSION;
  // The CPU kernels' variant in use (cpu_capability.h); an unknown or unsupported GENFAST_CPU_CAPABILITY
  // raises here, at import (genfast/_extension.py calls build_info).
  info["cpu_capability"] = genfast::cpu_capability_name(genfast::cpu_capability());
#ifdef GENFAST_CPU_X86_VARIANTS
  info["cpu_capabilities"] = pybind11::make_tuple("DEFAULT", "AVX2", "AVX512");  // the variants built
#else
  info["cpu_capabilities"] = pybind11::make_tuple("DEFAULT");
#endif
  return info;
}

// name -> (code, what backward saves), from activations.h's list: tests/test_build.py checks it against
// genfast/activations.py.
pybind11::dict activation_table() {
  pybind11::dict codes;
#define GENFAST_ACT_CODE(e, code, name, saves) codes[name] = pybind11::make_tuple(code, #saves);
  GENFAST_ACTIVATIONS(GENFAST_ACT_CODE)
#undef GENFAST_ACT_CODE
  return codes;
}

pybind11::dict loss_codes() {
  using genfast::Recon, genfast::Reduction, genfast::Term;
  pybind11::dict recon, reduction, term, codes;
  recon["bce"] = int64_t(Recon::Bce);
  recon["mse"] = int64_t(Recon::Mse);
  reduction["none"] = int64_t(Reduction::None);
  reduction["mean"] = int64_t(Reduction::Mean);
  reduction["sum"] = int64_t(Reduction::Sum);
  term["bce"] = int64_t(Term::Bce);
  term["hinge"] = int64_t(Term::Hinge);
  term["square"] = int64_t(Term::Square);
  term["linear"] = int64_t(Term::Linear);
  codes["recon"] = recon;
  codes["reduction"] = reduction;
  codes["term"] = term;
  return codes;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "genfast kernels (internal: use the genfast package)";
  m.def("build_info", &build_info);
  m.def("set_double_backward", &genfast::set_double_backward);
  m.def("activation_table", &activation_table);
  m.def("dense_forward_cpu", &genfast::dense_forward_cpu);
  m.def("dense_backward_cpu", &genfast::dense_backward_cpu);
  m.def("dense_node", &genfast::dense_node);
  m.def("reparam_forward_cpu", &genfast::reparam_forward_cpu);
  m.def("reparam_backward_cpu", &genfast::reparam_backward_cpu);
  m.def("kl_forward_cpu", &genfast::kl_forward_cpu);
  m.def("kl_backward_cpu", &genfast::kl_backward_cpu);
  m.def("reparam_kl_forward_cpu", &genfast::reparam_kl_forward_cpu);
  m.def("reparam_kl_backward_cpu", &genfast::reparam_kl_backward_cpu);
#ifdef GENFAST_WITH_CUDA
  m.def("dense_forward_cuda", &genfast::dense_forward_cuda);
  m.def("dense_backward_cuda", &genfast::dense_backward_cuda);
  m.def("reparam_forward_cuda", &genfast::reparam_forward_cuda);
  m.def("reparam_backward_cuda", &genfast::reparam_backward_cuda);
  m.def("kl_forward_cuda", &genfast::kl_forward_cuda);
  m.def("kl_backward_cuda", &genfast::kl_backward_cuda);
  m.def("reparam_kl_forward_cuda", &genfast::reparam_kl_forward_cuda);
  m.def("reparam_kl_backward_cuda", &genfast::reparam_kl_backward_cuda);
#endif
  // losses
  m.def("loss_codes", &loss_codes);
  m.def("losses_elbo_forward_cpu", &genfast::losses_elbo_forward_cpu);
  m.def("losses_gan_forward_cpu", &genfast::losses_gan_forward_cpu);
  m.def("elbo_node", &genfast::elbo_node);
  m.def("gan_node", &genfast::gan_node);
#ifdef GENFAST_WITH_CUDA
  m.def("losses_elbo_forward_cuda", &genfast::losses_elbo_forward_cuda);
  m.def("losses_gan_forward_cuda", &genfast::losses_gan_forward_cuda);
#endif
}
