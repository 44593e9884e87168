"""Autograd pieces shared by the ops' backward rules."""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def plus(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """The sum of two optional gradients (None: no gradient reached that path, materialized nowhere)."""
    return b if a is None else a if b is None else a + b


def no_double_backward(op: str, why: str | None = None):
    """Decorate a backward (ctx, *args) so that it refuses create_graph=True (a gradient of this gradient)
    with a clear error naming `op`, and `why` if given.

    The kernels' backward is not differentiable: a result built on it would miss the dependence of what
    the forward saved on the inputs, and once_differentiable's deferred error is skipped when
    autograd.grad asks only for parameters, so a gradient penalty through the op would silently be wrong.
    AOTAutograd traces backward without grad mode: compile works.
    """
    def wrap(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *args):
            if torch.is_grad_enabled():
                raise RuntimeError(f"genfast {op} has no double backward (backward with create_graph=True)"
                                   + (f": {why}" if why else ""))
            return backward(ctx, *args)
        return wrapper
    return wrap
