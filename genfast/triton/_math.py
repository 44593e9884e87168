"""Device helpers shared by genfast's Triton kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def math_scalar(x, ACC: tl.constexpr):
    """A float kernel argument, declared ``tl.float64`` (undeclared, Triton passes a Python float as fp32),
    in the math type: rounded once for fp32 math, kept for fp64 (where tl.cast would round a Python float
    through fp32 under the interpreter)."""
    if ACC == tl.float64:
        return x
    else:
        return tl.cast(x, ACC)
