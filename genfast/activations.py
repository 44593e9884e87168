"""The one table of activations, shared by every backend.

Each entry gives the activation's integer code (the same numbers are used by the C++/CUDA
math in ``csrc/common/activations.h`` and by ``genfast/triton/activations.py``; a test checks they agree),
its reference forward, and what the backward of a fused layer must save to compute the
derivative with the least memory:

- ``"mask"``: one bit per element, set where the gradient passes unscaled (relu, leaky_relu), by eager
  PyTorch's own comparisons: relu's backward zeroes where ``z <= 0``, so a NaN z passes the gradient;
  leaky_relu's passes where ``z > 0``, so a NaN z gets the slope; packed as ``mask_row_bytes`` says;
- ``"output"``: the activation's output ``y`` (sigmoid, tanh: the derivative is a function of y);
- ``"preact"``: the pre-activation ``z`` (gelu, gelu_tanh, silu, softplus, mish);
- ``"none"``: nothing (identity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_CUBIC = 0.044715
SOFTPLUS_THRESHOLD = 20.0  # softplus(z) = z above it: PyTorch's default (beta 1), the only one genfast fuses


@dataclass(frozen=True)
class Activation:
    name: str
    code: int
    saves: str
    forward: Callable[[Tensor, float], Tensor]
    derivative: Callable[[Tensor, float], Tensor]
    """Derivative dy/dz as a function of what ``saves`` names (z > 0 for "mask")."""
    module: type | None
    """The torch.nn module this activation replaces in ``genfast.nn.convert``."""
    derivative_mask: Callable[[Tensor], Tensor] | None = None
    """For saves == "mask": z -> the mask bits (bool)."""


def _gelu_tanh_derivative(z: Tensor, _: float) -> Tensor:
    inner = _SQRT_2_OVER_PI * (z + _GELU_TANH_CUBIC * z**3)
    t = torch.tanh(inner)
    dinner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_CUBIC * z**2)
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner


def _gelu_derivative(z: Tensor, _: float) -> Tensor:
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return cdf + z * pdf


def _silu_derivative(z: Tensor, _: float) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _softplus_derivative(z: Tensor, _: float) -> Tensor:
    return torch.where(z > SOFTPLUS_THRESHOLD, 1.0, torch.sigmoid(z))


def _mish_derivative(z: Tensor, _: float) -> Tensor:
    t = torch.tanh(torch.nn.functional.softplus(z))
    return t + z * torch.sigmoid(z) * (1.0 - t * t)


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("none", 0, "none", lambda z, _: z, lambda z, _: torch.ones_like(z), None),
        Activation(
            "relu",
            1,
            "mask",
            lambda z, _: torch.relu(z),
            lambda positive, _: torch.where(positive, 1.0, 0.0),
            torch.nn.ReLU,
            lambda z: ~(z <= 0),
        ),
        Activation(
            "leaky_relu",
            2,
            "mask",
            lambda z, slope: torch.nn.functional.leaky_relu(z, slope),
            # slope as a float64 tensor: two Python numbers would make a float32 result, rounding the slope
            lambda positive, slope: torch.where(
                positive, 1.0, torch.tensor(slope, dtype=torch.float64, device=positive.device)
            ),
            torch.nn.LeakyReLU,
            lambda z: z > 0,
        ),
        Activation(
            "gelu", 3, "preact", lambda z, _: torch.nn.functional.gelu(z), _gelu_derivative, torch.nn.GELU
        ),
        Activation(
            "gelu_tanh",
            4,
            "preact",
            lambda z, _: torch.nn.functional.gelu(z, approximate="tanh"),
            _gelu_tanh_derivative,
            torch.nn.GELU,
        ),
        Activation(
            "silu", 5, "preact", lambda z, _: torch.nn.functional.silu(z), _silu_derivative, torch.nn.SiLU
        ),
        Activation(
            "sigmoid",
            6,
            "output",
            lambda z, _: torch.sigmoid(z),
            lambda y, _: y * (1.0 - y),
            torch.nn.Sigmoid,
        ),
        Activation("tanh", 7, "output", lambda z, _: torch.tanh(z), lambda y, _: 1.0 - y * y, torch.nn.Tanh),
        Activation(
            "softplus",
            8,
            "preact",
            lambda z, _: torch.nn.functional.softplus(z),
            _softplus_derivative,
            torch.nn.Softplus,
        ),
        Activation(
            "mish", 9, "preact", lambda z, _: torch.nn.functional.mish(z), _mish_derivative, torch.nn.Mish
        ),
    )
}


def mask_row_bytes(n: int) -> int:
    """Bytes per row of a packed mask (uint8 (M, mask_row_bytes(N))): one bit per column, bit j of a row in
    byte j // 8, bit j % 8, rows padded to 128 bits (the layout cuBLASLt's RELU_AUX epilogues use). Every
    backend saves this layout; csrc/common/activations.h holds the C++ twin."""
    return (n + 127) // 128 * 16


def get_activation(name: str | None) -> Activation:
    """Look an activation up by name (None means "none"); raise a clear error if unknown."""
    if name is None:
        name = "none"
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)} or None, got {name!r}")
    return ACTIVATIONS[name]


def activation_from_module(module: torch.nn.Module) -> tuple[str, float] | None:
    """The (name, negative_slope) of a torch.nn activation module genfast can fuse, else None."""
    if isinstance(module, torch.nn.GELU):
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu"), 0.01
    if isinstance(module, torch.nn.LeakyReLU):
        return "leaky_relu", float(module.negative_slope)
    if isinstance(module, torch.nn.Softplus) and (module.beta != 1 or module.threshold != SOFTPLUS_THRESHOLD):
        return None  # genfast's softplus is PyTorch's default one
    for act in ACTIVATIONS.values():
        if act.module is not None and type(module) is act.module:
            return act.name, 0.01
    return None


def activation_module(name: str, negative_slope: float) -> torch.nn.Module:
    """The plain torch.nn module computing the named activation (inverse of the above)."""
    act = get_activation(name)
    if act.name == "none":
        return torch.nn.Identity()
    if act.name == "leaky_relu":
        return torch.nn.LeakyReLU(negative_slope)
    if act.name == "gelu_tanh":
        return torch.nn.GELU(approximate="tanh")
    return act.module()
