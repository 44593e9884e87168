"""The activations' math for genfast's Triton kernels: one function each for y = act(z), dy/dz and the mask
bit, branching on the codes of genfast/activations.py (the one table; the C++ twin is
csrc/common/activations.h). Adding an activation here: its code constant, a branch in ``act_forward`` and
one in ``act_derivative``.

erf and tanh are written from exp (one code path for the interpreter, which has no libdevice):
fp32-accurate (relative error ~1e-7), also for fp64. exp, log1p and sigmoid are genfast.triton._math's.
"""

from __future__ import annotations

import triton
import triton.language as tl

from genfast.activations import ACTIVATIONS, SOFTPLUS_THRESHOLD
from genfast.triton._math import exp, log1p, sigmoid

# Globals read inside kernels must be tl.constexpr for the compiler.
NONE, RELU, LEAKY_RELU, GELU, GELU_TANH, SILU, SIGMOID, TANH, SOFTPLUS, MISH = (
    tl.constexpr(ACTIVATIONS[n].code)
    for n in (
        "none",
        "relu",
        "leaky_relu",
        "gelu",
        "gelu_tanh",
        "silu",
        "sigmoid",
        "tanh",
        "softplus",
        "mish",
    )
)
# What a kernel's SAVES argument means, by Activation.saves.
SAVES_MASK, SAVES_OUTPUT, SAVES_PREACT = tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
SAVES_CODE = {"none": 0, "mask": SAVES_MASK, "output": SAVES_OUTPUT, "preact": SAVES_PREACT}
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # (the interpreter needs constexprs right of tensors)
_SOFTPLUS_THRESHOLD = tl.constexpr(SOFTPLUS_THRESHOLD)
_MISH_CLAMP = tl.constexpr(20.0)  # csrc/common/activations.h's kMishClamp


def saves_code(act: int) -> int:
    """The SAVES argument of a kernel for activation code `act`."""
    return next(SAVES_CODE[a.saves] for a in ACTIVATIONS.values() if a.code == act)


@triton.jit
def _tanh(x):
    # Small |x|: odd polynomial (Cephes tanhf), as 1 - 2/(e^2x + 1) would lose all relative precision.
    x2 = x * x
    poly = (
        (((-5.70498872745e-3 * x2 + 2.06390887954e-2) * x2 - 5.37397155531e-2) * x2 + 1.33314422036e-1) * x2
        - 3.33332819422e-1
    ) * x2 * x + x
    return tl.where(tl.abs(x) < 0.625, poly, 1.0 - 2.0 / (exp(2.0 * x) + 1.0))


@triton.jit
def _normal_cdf(z):
    # Phi(z) = erfc(-z/sqrt2)/2 with erfc from Numerical Recipes' Chebyshev fit (relative error < 1.2e-7
    # for all arguments), so the tail z << 0 keeps its relative precision unlike 1 + erf.
    a = tl.abs(z) * 0.7071067811865476
    t = 1.0 / (1.0 + 0.5 * a)
    p = -1.26551223 + t * (
        1.00002368
        + t
        * (
            0.37409196
            + t
            * (
                0.09678418
                + t
                * (
                    -0.18628806
                    + t
                    * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))
                )
            )
        )
    )
    half_erfc = 0.5 * t * exp(p - a * a)
    return tl.where(z > 0, 1.0 - half_erfc, half_erfc)


@triton.jit
def _softplus(z):
    # PyTorch's default softplus: z itself above the threshold, where exp(z) could overflow (log1p(inf) is
    # NaN here: the unused branch sees 0 there). log1p keeps the tiny e^z of z << 0 exact.
    return tl.where(z > _SOFTPLUS_THRESHOLD, z, log1p(exp(tl.where(z > _SOFTPLUS_THRESHOLD, 0.0, z))))


@triton.jit
def _mish(z):
    # As csrc/common/activations.h's mish: one exp, t = tanh(softplus(z)) = n / (n + 2), n = e (e + 2).
    e = exp(tl.where(z > _MISH_CLAMP, _MISH_CLAMP, z))
    n = e * (e + 2.0)
    return z * (n / (n + 2.0))


@triton.jit
def _mish_derivative(z):
    # t + z sigmoid(z) (1 - t^2) with 1 - t^2 = d (2 - d), d = 2 / (n + 2); one division; 1 past the clamp.
    e = exp(tl.where(z > _MISH_CLAMP, _MISH_CLAMP, z))
    n = e * (e + 2.0)
    a = n + 2.0
    b = e + 1.0
    inv = 1.0 / (a * b)
    d = 2.0 * (b * inv)
    return tl.where(z > _MISH_CLAMP, 1.0, n * (b * inv) + z * (e * (a * inv)) * (d * (2.0 - d)))


@triton.jit
def act_forward(z, slope, ACT: tl.constexpr):
    if ACT == RELU:
        return tl.where(z < 0, 0.0, z)  # NaN stays NaN, as in torch.relu
    elif ACT == LEAKY_RELU:
        return tl.where(z > 0, z, z * slope)
    elif ACT == GELU:
        return z * _normal_cdf(z)
    elif ACT == GELU_TANH:
        return 0.5 * z * (1.0 + _tanh((z + 0.044715 * z * z * z) * _SQRT_2_OVER_PI))
    elif ACT == SILU:
        return z * sigmoid(z)
    elif ACT == SIGMOID:
        return sigmoid(z)
    elif ACT == TANH:
        return _tanh(z)
    elif ACT == SOFTPLUS:
        return _softplus(z)
    elif ACT == MISH:
        return _mish(z)
    else:
        return z


@triton.jit
def mask_bit(z, ACT: tl.constexpr):
    """Where the gradient of relu/leaky_relu passes unscaled, by activations.py's rule: relu's bit is
    "not z <= 0" (NaN passes), leaky_relu's "z > 0"."""
    if ACT == RELU:
        return (z <= 0) == 0
    else:
        return z > 0


@triton.jit
def act_derivative(s, ACT: tl.constexpr):
    """dy/dz from s = z (gelu, gelu_tanh, silu, softplus, mish) or s = y (sigmoid, tanh); the mask
    activations scale by their bit in the kernels."""
    if ACT == GELU:
        return _normal_cdf(s) + s * exp(-0.5 * s * s) * _INV_SQRT_2PI
    elif ACT == GELU_TANH:
        t = _tanh((s + 0.044715 * s * s * s) * _SQRT_2_OVER_PI)
        return 0.5 * (1.0 + t) + 0.5 * s * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * s * s)
    elif ACT == SILU:
        sig = sigmoid(s)
        return sig * (1.0 + s * (1.0 - sig))
    elif ACT == SIGMOID:
        return s * (1.0 - s)
    elif ACT == TANH:
        return 1.0 - s * s
    elif ACT == SOFTPLUS:
        return tl.where(s > _SOFTPLUS_THRESHOLD, 1.0, sigmoid(s))
    elif ACT == MISH:
        return _mish_derivative(s)
    else:
        return tl.full(s.shape, 1.0, s.dtype)
