"""Loads genfast._C and fails loudly when it was built for another PyTorch or CUDA."""

from __future__ import annotations

import torch

IMPORT_ERROR: str | None = None
# _C loads on every CPU PyTorch runs on: its CPU kernels are built for DEFAULT, AVX2 and AVX512 and it
# runs the best this CPU has (csrc/common/cpu_capability.h; GENFAST_CPU_CAPABILITY pins one).
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
