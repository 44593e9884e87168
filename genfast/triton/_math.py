"""Device helpers shared by genfast's Triton kernels.

Transcendental functions: compiled, ``tl.exp``/``tl.log``/``tl.sin``/``tl.cos`` (and ``tl.sigmoid``, built
on ``tl.exp``) become the GPU's approximate instructions (``ex2.approx`` of x log2(e), ``lg2.approx``,
``sin.approx``...), whose error grows with the argument: exp(150) is off by ~1e-5 relative. Kernels call
the functions below instead: libdevice's (CUDA's own expf/logf/sinpif/cospif, within 2 ulp, what the CUDA
kernels call) when compiled, Triton's own under the interpreter, where they are NumPy's (libdevice does not
exist there).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def math_scalar(x, ACC: tl.constexpr):
    """A float kernel argument, declared ``tl.float64`` (undeclared, Triton passes a Python float as fp32),
    in the math type: rounded once for fp32 math, kept for fp64 (where tl.cast would round a Python float
    through fp32 under the interpreter)."""
    if ACC == tl.float64:
        return x
    else:
        return tl.cast(x, ACC)


@triton.jit
def exp(x):
    if _INTERPRETED:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def log(x):
    if _INTERPRETED:
        return tl.log(x)
    else:
        return libdevice.log(x)


@triton.jit
def sinpi(x):
    """sin(pi x): the argument needs no rounding by pi, as the CUDA kernels' sinpif (the same function)."""
    if _INTERPRETED:
        return tl.sin(3.141592653589793 * x)
    else:
        return libdevice.sinpi(x)


@triton.jit
def cospi(x):
    if _INTERPRETED:
        return tl.cos(3.141592653589793 * x)
    else:
        return libdevice.cospi(x)


@triton.jit
def sigmoid(x):
    """1 / (1 + e^-x): 0 for x -> -inf (e^-x overflows to inf), 1 for x -> inf."""
    return 1.0 / (1.0 + exp(-x))
