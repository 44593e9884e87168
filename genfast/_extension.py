"""Loads genfast._C and fails loudly when it was built for another PyTorch or CUDA."""

from __future__ import annotations

import platform

import torch

IMPORT_ERROR: str | None = None
if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() not in (
    "AVX2",
    "AVX512",
):
    # _C is compiled for AVX2 on x86-64: loading it here would die on an illegal instruction.
    _C = None
    IMPORT_ERROR = f"this CPU lacks AVX2 ({torch.backends.cpu.get_cpu_capability()}), which genfast._C needs"
else:
    try:
        from genfast import _C
    except ImportError as error:  # a pure-Python checkout: only the reference and Triton backends
        _C = None
        IMPORT_ERROR = str(error)


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


if _C is not None:
    _built = _C.build_info()
    if _major_minor(_built["torch"]) != _major_minor(torch.__version__):
        raise ImportError(
            f"genfast._C was built for torch {_built['torch']} but torch {torch.__version__} is "
            "running: rebuild genfast (pip install --no-build-isolation .) against this PyTorch"
        )
    if _built["cuda"] and torch.version.cuda is None:
        raise ImportError(
            f"genfast._C was built with CUDA kernels (CUDA {_built['cuda_version']}) but torch "
            f"{torch.__version__} has no CUDA: install a CUDA build of PyTorch or rebuild with GENFAST_CUDA=0"
        )


def has_cpu_kernels() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and bool(_C.build_info()["cuda"])
