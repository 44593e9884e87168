"""How genfast was built, and that every backend shares the one activation table."""

from __future__ import annotations

import sys

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
def test_cpp_activation_codes_are_the_python_table():
    assert _extension._C.activation_codes() == {name: a.code for name, a in ACTIVATIONS.items()}


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
    assert genfast.build_info()["cuda"], "CUDA toolkit and CUDA PyTorch present, but no CUDA kernels were built"


def test_cuda_build_embeds_ptx_for_gpus_newer_than_its_targets():
    """SASS alone (the old default 8.0;9.0) gives 'no kernel image' on sm_100/sm_120; PTX is JIT-compiled.
    The architectures the build was given, and where the toolkit has cuobjdump, the PTX in the binary."""
    import os
    import shutil
    import subprocess

    info = genfast.build_info()
    if not info["cuda"]:
        pytest.skip("a CPU-only build has no GPU code")
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        assert any(arch.endswith("+PTX") for arch in info["cuda_archs"]), info["cuda_archs"]
    cuobjdump = shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump"
    if os.path.exists(cuobjdump):
        listing = subprocess.run([cuobjdump, "--list-ptx", _extension._C.__file__], capture_output=True, text=True,
                                 timeout=120)
        assert "sm_" in listing.stdout, listing.stdout[-2000:] + listing.stderr[-2000:]
