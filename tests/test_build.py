"""How genfast was built, and that every backend shares the one activation table."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import genfast
from genfast import _extension
from genfast.activations import ACTIVATIONS


def test_build_info_reports_what_was_built():
    info = genfast.build_info()
    for key in ("version", "torch", "cuda", "cuda_archs", "triton", "backends"):
        assert key in info
    assert info["torch"] == torch.__version__
    assert "reference" in info["backends"]
    assert info["cuda"] == _extension.has_cuda_kernels()
    if info["cuda"]:
        assert info["cuda_archs"], "a CUDA build names its architectures"


@pytest.mark.skipif(_extension._C is None, reason="genfast._C is not built")
def test_cpp_activation_list_is_the_python_table():
    table = {name: (code, saves.lower()) for name, (code, saves) in _extension._C.activation_table().items()}
    assert table == {name: (a.code, a.saves) for name, a in ACTIVATIONS.items()}


@pytest.mark.skipif(_extension._C is None, reason="genfast._C is not built")
def test_cpu_kernels_run_their_parallel_loops_on_pytorchs_openmp_threads():
    """Without -fopenmp, at::parallel_for compiles to a serial loop: a silent 2x-on-2-cores loss."""
    if not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()):
        pytest.skip("PyTorch's parallel backend here is not OpenMP on Linux")
    assert genfast.build_info()["openmp"]


@pytest.mark.skipif(_extension._C is None, reason="genfast._C is not built")
def test_extension_was_built_for_this_torch():
    assert _extension._C.build_info()["torch"].split("+")[0] == torch.__version__.split("+")[0]


def test_cuda_kernels_are_compiled_when_a_toolkit_and_cuda_torch_are_present():
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None or CUDA_HOME is None:
        pytest.skip("no CUDA toolkit or no CUDA PyTorch: a CPU-only build is expected")
    import os

    if os.environ.get("GENFAST_CUDA") == "0":
        pytest.skip("GENFAST_CUDA=0 forced a CPU-only build")
    assert genfast.build_info()["cuda"], (
        "CUDA toolkit and CUDA PyTorch present, but no CUDA kernels were built"
    )


def _cuobjdump() -> str | None:
    """Triton's own cuobjdump first (CUDA 13 toolkits may ship none), then PATH, then $CUDA_HOME/bin."""
    from torch.utils.cpp_extension import CUDA_HOME

    triton = importlib.util.find_spec("triton")
    packages = list(triton.submodule_search_locations or []) if triton else []
    candidates = [Path(p, "backends", "nvidia", "bin", "cuobjdump") for p in packages]
    candidates += [shutil.which("cuobjdump"), CUDA_HOME and Path(CUDA_HOME, "bin", "cuobjdump")]
    return next((str(c) for c in candidates if c and os.access(c, os.X_OK)), None)


def test_cuda_build_embeds_ptx_for_gpus_newer_than_its_targets():
    """SASS alone (the old default 8.0;9.0) gives 'no kernel image' on sm_100/sm_120; PTX is JIT-compiled.
    The architectures the build was given, and where a cuobjdump exists, the PTX in the binary."""
    info = genfast.build_info()
    if not info["cuda"]:
        pytest.skip("a CPU-only build has no GPU code")
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        assert any(arch.endswith("+PTX") for arch in info["cuda_archs"]), info["cuda_archs"]
    cuobjdump = _cuobjdump()
    if cuobjdump:
        listing = subprocess.run(
            [cuobjdump, "--list-ptx", _extension._C.__file__], capture_output=True, text=True, timeout=120
        )
        assert "sm_" in listing.stdout, listing.stdout[-2000:] + listing.stderr[-2000:]


# Kernels allowed a stack frame or local memory: part of the demangled name -> why it cannot do without.
_MISH_DZ = (
    "mish's derivative (one IEEE division, a subroutine call on the GPU) in the dense backward: "
    "across the calls of the unrolled row loop ptxas keeps one 64-bit loop value on the stack, stored once "
    "before the loop and loaded once after it (8-16 bytes a thread, no traffic in the loop)"
)
KERNELS_ALLOWED_LOCAL_MEMORY: dict[str, str] = {
    "dz_kernel<float, (genfast::Act)9>": _MISH_DZ,
    "dz_kernel<c10::Half, (genfast::Act)9>": _MISH_DZ,
    "dz_kernel<c10::BFloat16, (genfast::Act)9>": _MISH_DZ,
}


def _resource_usage(so_path: str, cuobjdump: str) -> dict[str, dict[str, dict[str, int]]]:
    """{"sm_80": {mangled kernel: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}}} of each SASS image."""
    dump = subprocess.run(
        [cuobjdump, "--dump-resource-usage", so_path], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    usage: dict[str, dict[str, dict[str, int]]] = {}
    elf, arch, function = False, None, None
    for line in map(str.strip, dump.splitlines()):
        if line.startswith("Fatbin "):
            elf, arch = line == "Fatbin elf code:", None  # PTX sections have an arch too, but no registers
        elif elf and (m := re.fullmatch(r"arch = (sm_\w+)", line)):
            arch = m[1]
            usage.setdefault(arch, {})
        elif arch and (m := re.fullmatch(r"Function (\S+):", line)):
            function = m[1]
        elif arch and function and line.startswith("REG:"):
            usage[arch][function] = {
                k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line)
            }
            function = None
    return usage


def _demangle(names: list[str]) -> list[str]:
    if not names or shutil.which("c++filt") is None:
        return names
    return subprocess.run(
        ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True
    ).stdout.splitlines()


def test_cuda_kernels_have_no_stack_and_no_local_memory():
    """The ptxas report (-Xptxas -v), read from the binary that ships so that it cannot go stale: every
    kernel of genfast._C, for each SASS architecture, with its registers, stack frame and local memory
    (cuobjdump --dump-resource-usage). A stack frame or local memory means register spills or an array
    indexed at run time: per-thread traffic through L1/L2 in a kernel meant to be memory-bound on its
    inputs. Each architecture the build was given has SASS, all with the same kernels."""
    info = genfast.build_info()
    if not info["cuda"]:
        pytest.skip("a CPU-only build has no CUDA kernels")
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump: not in Triton's package, on PATH or in $CUDA_HOME/bin")
    usage = _resource_usage(_extension._C.__file__, cuobjdump)
    archs = {"sm_" + arch.split("+")[0].replace(".", "") for arch in info["cuda_archs"]}
    assert set(usage) == archs, f"SASS for {sorted(usage)}, built for {info['cuda_archs']}"
    kernels = {arch: set(functions) for arch, functions in usage.items()}
    first = min(kernels)
    for arch in kernels:
        assert kernels[arch], f"no kernels in the {arch} SASS"
        differ = sorted(kernels[arch] ^ kernels[first])
        assert not differ, f"{arch} and {first} have different kernels: {_demangle(differ)}"
    offenders = [
        (arch, name, r)
        for arch, functions in sorted(usage.items())
        for name, r in sorted(functions.items())
        if r["STACK"] or r["LOCAL"]
    ]
    readable = _demangle([name for _, name, _ in offenders])
    report = [
        f"{arch} REG:{r['REG']} STACK:{r['STACK']} LOCAL:{r['LOCAL']} {name}"
        for (arch, _, r), name in zip(offenders, readable)
        if not any(allowed in name for allowed in KERNELS_ALLOWED_LOCAL_MEMORY)
    ]
    assert not report, "kernels with a stack frame or local memory:\n" + "\n".join(report)
