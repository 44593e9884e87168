"""genfast: fused kernels for generative models in PyTorch.

>>> import torch, genfast
>>> layer = genfast.nn.FusedLinear(784, 600, activation="relu")
>>> y = layer(torch.randn(64, 784))
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import torch

from genfast import _extension, nn
from genfast.activations import ACTIVATIONS
from genfast.backend import available_backends, triton_version, use_backend
from genfast.ops import (
    discriminator_loss,
    elbo_loss,
    fused_dense,
    generator_loss,
    kl_divergence,
    r1_penalty,
    reparameterize,
    reparameterize_kl,
)

try:
    __version__ = version("genfast")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"


def build_info() -> dict:
    """How this genfast was built and what it can run now."""
    built = _extension._C.build_info() if _extension._C is not None else {}
    archs = built.get("cuda_archs") or ""
    return {
        "version": __version__,
        "torch": torch.__version__,
        "built_for_torch": built.get("torch"),
        "cuda": bool(built.get("cuda", False)),
        "cuda_version": built.get("cuda_version"),
        "cuda_archs": [a for a in archs.replace(",", ";").split(";") if a],
        "openmp": bool(built.get("openmp", False)),
        # the CPU kernels' variant in use (DEFAULT, AVX2, AVX512; GENFAST_CPU_CAPABILITY pins it) and those built
        "cpu_capability": built.get("cpu_capability"),
        "cpu_capabilities": list(built.get("cpu_capabilities", ())),
        "triton": triton_version(),
        "backends": available_backends(),
        "activations": sorted(ACTIVATIONS),
    }


__all__ = [
    "ACTIVATIONS",
    "available_backends",
    "build_info",
    "discriminator_loss",
    "elbo_loss",
    "fused_dense",
    "generator_loss",
    "kl_divergence",
    "nn",
    "r1_penalty",
    "reparameterize",
    "reparameterize_kl",
    "use_backend",
]
