"""Builds genfast and its extension genfast._C from csrc/.

Build switches (environment variables; each one set is printed during the build):
  GENFAST_CUDA=0|1        force the CPU-only or the CUDA build. Default: CUDA when this PyTorch is a
                          CUDA build and a CUDA toolkit is found (no GPU needed to build).
  TORCH_CUDA_ARCH_LIST    CUDA architectures to compile for. Default: "8.0;9.0+PTX" (sm_80 and sm_90 code,
                          plus sm_90 PTX that newer GPUs, sm_100 and sm_120, compile when they load it).
  CUDA_HOME               the CUDA toolkit. Default: /usr/local/cuda when it exists, else PyTorch's guess.
  MAX_JOBS                parallel compile jobs (ninja).
  GENFAST_DEBUG=1         compile with -O0 -g instead of -O3.
Build with `pip install --no-build-isolation .`: PyTorch is a build dependency and must be the very
PyTorch that will import the extension.
"""

import glob
import os
import platform
import sys
import sysconfig

from setuptools import find_packages, setup

VERSION = "0.1.0"
SWITCHES = ("GENFAST_CUDA", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "MAX_JOBS", "GENFAST_DEBUG")

for name in SWITCHES:
    if name in os.environ:
        print(f"genfast build: {name}={os.environ[name]}", file=sys.stderr)
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402  (CUDA_HOME must be set before cpp_extension reads it)
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda() -> bool:
    forced = os.environ.get("GENFAST_CUDA")
    if forced is not None:
        if forced not in ("0", "1"):
            raise SystemExit(f"GENFAST_CUDA must be 0 or 1, got {forced!r}")
        if forced == "1" and (torch.version.cuda is None or CUDA_HOME is None):
            raise SystemExit("GENFAST_CUDA=1 but this PyTorch has no CUDA or no CUDA toolkit was found")
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


# Each CPU kernel file (csrc/*/*_cpu.cpp) is compiled once per capability, with these flags; the loader
# picks the best this CPU has (csrc/common/cpu_capability.h; GENFAST_CPU_CAPABILITY pins one). The rest
# of the extension is compiled at baseline. x86-64 only: elsewhere the DEFAULT variant alone.
CPU_VARIANTS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],  # ATen's
}


def cpu_variants() -> dict[str, list[str]]:
    """Capability -> compile flags of the kernel files' variants built on this machine's architecture."""
    names = ["DEFAULT", "AVX2", "AVX512"] if platform.machine() in ("x86_64", "AMD64") else ["DEFAULT"]
    return {
        name: CPU_VARIANTS[name] + [f"-DCPU_CAPABILITY={name}", f"-DCPU_CAPABILITY_{name}"] for name in names
    }


def cpu_kernel_sources() -> list[str]:
    return sorted(glob.glob("csrc/*/*_cpu.cpp"))


class BuildVariants(BuildExtension):
    """BuildExtension that compiles the CPU kernel files once per capability (cpu_variants()), each variant
    into its own directory of build_temp (its own ninja file: incremental rebuilds work), and links all
    of them. One set of extra_compile_args serves every source of an Extension, hence this subclass.
    Link order: baseline objects, then DEFAULT, AVX2, AVX512: where the variants share an inline function
    of PyTorch's headers, the linker keeps the first copy, the baseline or DEFAULT one."""

    def build_extension(self, ext):
        kernels = [s for s in ext.sources if s in cpu_kernel_sources()]
        ext.sources = [s for s in ext.sources if s not in kernels]
        cxx = (
            ext.extra_compile_args["cxx"]
            if isinstance(ext.extra_compile_args, dict)
            else ext.extra_compile_args
        )
        objects = []
        for name, flags in cpu_variants().items():
            objects += self.compiler.compile(
                kernels,
                output_dir=os.path.join(self.build_temp, f"cpu_{name.lower()}"),
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs=list(cxx) + flags,
                depends=ext.depends,
            )
        ext.extra_objects = objects + list(ext.extra_objects or [])
        ext.depends = list(ext.depends) + kernels  # setuptools relinks only when a source is newer than _C
        super().build_extension(ext)


def openmp_flags() -> list[str]:
    """at::parallel_for is a header template: compiled without -fopenmp, its `omp parallel` is ignored
    and every parallel loop of the CPU kernels runs on one thread. (Linux: PyTorch's own libgomp.)"""
    return ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []


def pip_cuda_dirs(sub: str) -> list[str]:
    """Headers/libraries of the pip CUDA packages (the system toolkit may lack some, e.g. cusparse.h)."""
    site = sysconfig.get_paths()["purelib"]
    return [d for d in glob.glob(os.path.join(site, "nvidia", "cu*", sub)) if os.path.isdir(d)]


def extension():
    cuda = want_cuda()
    debug = os.environ.get("GENFAST_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = ["csrc/genfast.cpp"] + sorted(glob.glob("csrc/*/*.cpp"))
    macros = [("GENFAST_TORCH_VERSION", f'"{torch.__version__}"')]
    args = {"cxx": opt + openmp_flags()}  # -std is PyTorch's choice (C++17 or C++20)
    if not cuda:
        print("genfast build: CPU-only extension", file=sys.stderr)
        return CppExtension(
            "genfast._C",
            sources,
            include_dirs=[os.path.abspath("csrc")],
            define_macros=macros,
            extra_compile_args=args,
            extra_link_args=openmp_flags(),
        )
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    print(f"genfast build: CUDA {torch.version.cuda} extension for {archs} ({CUDA_HOME})", file=sys.stderr)
    macros += [("GENFAST_WITH_CUDA", None), ("GENFAST_CUDA_ARCHS", f'"{archs}"')]
    args["cxx"].append("-DGENFAST_WITH_CUDA")
    args["nvcc"] = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
    cccl = os.path.join(CUDA_HOME, "include", "cccl")
    include_dirs = (
        [os.path.abspath("csrc")] + ([cccl] if os.path.isdir(cccl) else []) + pip_cuda_dirs("include")
    )
    library_dirs = pip_cuda_dirs("lib")
    # The pip wheel ships only libcublasLt.so.13 (no unversioned link); PyTorch loads it first.
    cublaslt = [
        f"-l:{os.path.basename(p)}"
        for d in library_dirs
        for p in sorted(glob.glob(os.path.join(d, "libcublasLt.so.*")))[:1]
    ] or ["-lcublasLt"]
    return CUDAExtension(
        "genfast._C",
        sources + sorted(glob.glob("csrc/*/*_cuda.cu")),
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        define_macros=macros,
        extra_compile_args=args,
        extra_link_args=cublaslt + openmp_flags(),
    )


def local_version() -> str:
    """Wheels name the PyTorch and CUDA they were built for: 0.1.0+torch2.14.cu130 (or .cpu)."""
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    cuda = f"cu{torch.version.cuda.replace('.', '')}" if want_cuda() else "cpu"
    return f"{VERSION}+torch{torch_mm}.{cuda}"


setup(
    name="genfast",
    version=local_version(),
    packages=find_packages(include=["genfast", "genfast.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildVariants.with_options(use_ninja=True)},
)
