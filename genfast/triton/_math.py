"""Device helpers shared by genfast's Triton kernels.

Transcendental functions: compiled, ``tl.exp``/``tl.log``/``tl.sin``/``tl.cos`` (and ``tl.sigmoid``, built
on ``tl.exp``) become the GPU's approximate instructions (``ex2.approx`` of x log2(e), ``lg2.approx``,
``sin.approx``...), whose error grows with the argument: exp(150) is off by ~1e-5 relative. Kernels call
the functions below instead: libdevice's (CUDA's own expf/logf/sinpif/cospif, within 2 ulp, what the CUDA
kernels call) when compiled, Triton's own under the interpreter, where they are NumPy's (libdevice does not
exist there). ``log1p`` and ``expm1`` are Kahan's forms over those (the interpreter has no
libdevice.log1p/expm1). ``math_type`` is the host side: the type a kernel computes in for a dtype.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
"""Whether kernels run under Triton's interpreter (NumPy on the CPU), read once at import. A constexpr, so
kernels can branch on it (globals read inside kernels must be); on the host it is a plain truth value."""


def math_type(dtype: torch.dtype):
    """The math type of a kernel (its ACC argument) for tensors of `dtype`: fp64 for fp64, else fp32, so
    fp16/bf16 inputs are computed in fp32 as eager's kernels compute them."""
    return tl.float64 if dtype == torch.float64 else tl.float32


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
    if INTERPRETED:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def log(x):
    if INTERPRETED:
        return tl.log(x)
    else:
        return libdevice.log(x)


@triton.jit
def sinpi(x):
    """sin(pi x): the argument needs no rounding by pi, as the CUDA kernels' sinpif (the same function)."""
    if INTERPRETED:
        return tl.sin(3.141592653589793 * x)
    else:
        return libdevice.sinpi(x)


@triton.jit
def cospi(x):
    if INTERPRETED:
        return tl.cos(3.141592653589793 * x)
    else:
        return libdevice.cospi(x)


@triton.jit
def sigmoid(x):
    """1 / (1 + e^-x): 0 for x -> -inf (e^-x overflows to inf), 1 for x -> inf."""
    return 1.0 / (1.0 + exp(-x))


@triton.jit
def log1p(e):
    """log(1 + e) for e >= 0, with full relative precision for tiny e: Kahan's log(u) e / (u - 1), u = 1 + e,
    where the factor e / (u - 1) undoes the rounding of 1 + e that log(u) alone would keep; e itself where u
    rounds to 1 (the divisions never see 0)."""
    u = 1.0 + e
    exact = u == 1.0
    return tl.where(exact, e, log(u) * (e / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def expm1(x):
    """exp(x) - 1 without the cancellation near x = 0: Kahan's (u - 1) x / log(u), u = exp(x), for
    |x| < 0.5; past 0.5, |exp(x) - 1| >= 1 - e^-0.5 = 0.39 and the subtraction loses less than a bit. The
    unused branch is evaluated at 0.25, so it stays finite whatever x is."""
    small = tl.abs(x) < 0.5
    xs = tl.where(small, x, 0.25)
    u = exp(xs)
    exact = u == 1.0
    near_zero = tl.where(exact, xs, (u - 1.0) * (xs / tl.where(exact, 1.0, log(u))))
    return tl.where(small, near_zero, exp(x) - 1.0)
