"""How a public op call reaches its implementation: the kernel, the custom op, or PyTorch's plain math.

- ``traced()``: under ``torch.compile`` or ``torch.jit.trace`` the call must be the registered custom op,
  so that the graph holds ``genfast::<op>`` (an eager kernel call through pybind11 is invisible to the
  tracer, which would record only the ATen ops around it).
- ``plain_math(*tensors)``: under a ``torch.func`` transform (vmap, grad, jvp, ...) or forward-mode AD
  with a tangent on an input, the kernels cannot run (they neither see batched tensors nor propagate
  tangents), so the op computes genfast's reference expression in plain PyTorch ops, which every
  transform differentiates and batches. Correct, not fused.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor


def traced() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def plain_math(*tensors: Tensor | None) -> bool:
    if torch.compiler.is_compiling():  # Dynamo sees the custom ops (it reports no transform it traces here)
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    if forward_ad._current_level < 0:  # no dual level entered: no tangent anywhere (the common case, cheap)
        return False
    return any(isinstance(t, Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in tensors)
