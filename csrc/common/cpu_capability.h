// Runtime dispatch of the CPU kernels by CPU capability, as ATen does (ATen/native/DispatchStub.h).
//
// Each *_cpu.cpp kernel file is compiled once per capability (setup.py, CMakeLists.txt):
//   DEFAULT  no vector flags                               -DCPU_CAPABILITY=DEFAULT
//   AVX2     -mavx2 -mfma -mf16c                           -DCPU_CAPABILITY=AVX2    (x86-64 only)
//   AVX512   -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -DCPU_CAPABILITY=AVX512  (x86-64 only)
// Every genfast definition a kernel file makes or includes (the headers' inline functions too) lives in
// GENFAST_CAPABILITY_NS, an inline namespace named after the capability (genfast::AVX2::...), so that
// each variant has its own symbols and the linker never merges an AVX-512 copy of an inline function
// with the baseline one. ATen's Vectorized does the same (at::vec::CPU_CAPABILITY). Files compiled
// once, at baseline (genfast.cpp, *_autograd.cpp, the .cu host code), have no CPU_CAPABILITY: the
// macros are empty there and genfast::dense_forward_cpu etc. are the dispatchers of cpu_capability.cpp.
#pragma once

#include <string>

#if defined(CPU_CAPABILITY) && !defined(__CUDACC__)
#define GENFAST_CAPABILITY_NS_BEGIN inline namespace CPU_CAPABILITY {
#define GENFAST_CAPABILITY_NS_END }
#else
#define GENFAST_CAPABILITY_NS_BEGIN
#define GENFAST_CAPABILITY_NS_END
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define GENFAST_CPU_X86_VARIANTS 1  // the build compiles the AVX2 and AVX512 variants too
#endif

namespace genfast {

enum class CpuCapability : int { Default = 0, Avx2 = 1, Avx512 = 2 };

// The variant the CPU entry points run, chosen once: GENFAST_CPU_CAPABILITY (default, avx2 or avx512,
// any case) when set, which must be one this CPU supports; else the best this CPU supports, capped by the
// capability ATen itself runs (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY).
CpuCapability cpu_capability();
std::string cpu_capability_name(CpuCapability capability);  // "DEFAULT", "AVX2", "AVX512"
bool cpu_supports(CpuCapability capability);                // this CPU (and OS) can run the variant

}  // namespace genfast
