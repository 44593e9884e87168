"""genfast::fused_dense: y = act(x @ weight^T + bias), one custom op forward and one backward.

Backward saves the least it can (activations.py says what): a bit mask for relu/leaky_relu, y for
sigmoid/tanh, z for gelu/gelu_tanh/silu, nothing for none; plus x and weight for the GEMMs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from genfast import _extension, backend, reference
from genfast.activations import ACTIVATIONS, get_activation, mask_row_bytes
from genfast.ops import _route
from genfast.ops._checks import autocast_dtype, check_same, check_shape, check_tensor

_SAVES = {a.code: a.saves for a in ACTIVATIONS.values()}
_NAMES = {a.code: a.name for a in ACTIVATIONS.values()}
# Backends whose eager calls go through genfast._C.dense_eager (a C++ autograd node, see
# csrc/dense/dense_autograd.cpp) rather than _EagerFusedDense.
_COMPILED = ("cpu", "cuda")


@torch.library.custom_op("genfast::fused_dense", mutates_args=())
def _forward(x: Tensor, weight: Tensor, bias: Tensor | None, act: int, slope: float) -> tuple[Tensor, Tensor]:
    forward = backend.kernel("dense", "forward", x.device)
    return tuple(forward(x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
                         act, slope))


@_forward.register_fake
def _(x, weight, bias, act, slope):
    m, n = x.shape[0], weight.shape[0]
    saves = _SAVES[act]
    if saves == "mask":
        aux = x.new_empty((m, mask_row_bytes(n)), dtype=torch.uint8)
    elif saves == "preact":
        aux = x.new_empty((m, n))
    else:
        aux = x.new_empty(0)
    return x.new_empty((m, n)), aux


@torch.library.custom_op("genfast::fused_dense_backward", mutates_args=())
def _backward(grad_y: Tensor, x: Tensor, weight: Tensor, saved: Tensor, act: int, slope: float,
              need_x: bool, need_w: bool, need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    backward = backend.kernel("dense", "backward", x.device)
    return tuple(backward(grad_y.contiguous(), x.contiguous(), weight.contiguous(), saved.contiguous(),
                          act, slope, need_x, need_w, need_b))


@_backward.register_fake
def _(grad_y, x, weight, saved, act, slope, need_x, need_w, need_b):
    # a distinct empty tensor for each gradient not needed: a custom op's outputs may not alias
    return (x.new_empty(x.shape if need_x else 0), weight.new_empty(weight.shape if need_w else 0),
            weight.new_empty(weight.shape[0] if need_b else 0))


def _saved_for_backward(act: int, y: Tensor, aux: Tensor) -> Tensor:
    return y if _SAVES[act] == "output" else aux


def _setup_context(ctx, inputs, output):
    x, weight, bias, act, slope = inputs
    # bias (a reference, no memory) only for a backward that builds a graph: it recomputes from x, w, b.
    ctx.save_for_backward(x, weight, _saved_for_backward(act, *output), bias)
    ctx.act, ctx.slope = act, slope


def _gradients(ctx, grad_y, backward):
    x, weight, saved, bias = ctx.saved_tensors
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bias is not None)
    if torch.is_grad_enabled():
        grads = _gradients_with_graph(grad_y, (x, weight, bias), need, ctx.act, ctx.slope)
    else:
        grads = backward(grad_y.contiguous(), x, weight, saved, ctx.act, ctx.slope, *need)
    return tuple(g if n else None for g, n in zip(grads, need)) + (None, None)


def _gradients_with_graph(grad_y, inputs, need, act, slope):
    """backward(create_graph=True), as gradient penalties (R1, WGAN-GP) call it: the kernels' gradients
    would be constants to autograd, so differentiate the reference expression instead, graph and all."""
    y = reference.fused_dense(*inputs, _NAMES[act], slope)
    grads = iter(torch.autograd.grad(y, [t for t, n in zip(inputs, need) if n], grad_y, create_graph=True))
    return tuple(next(grads) if n else None for n in need)


_forward.register_autograd(lambda ctx, grad_y, _grad_aux: _gradients(ctx, grad_y, _backward),
                           setup_context=_setup_context)


class _EagerFusedDense(torch.autograd.Function):
    """The same kernels and saved tensors as the custom op, for eager mode only.

    torch.library's Python dispatch of a custom op costs ~120 us per forward + backward on the CPU,
    more than the whole kernel of a small layer; an autograd.Function costs a fraction of that.
    Under torch.compile the custom op runs instead, so the compiler sees one opaque op.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, act, slope):
        ctx.backend = backend.select(x.device)  # backward runs there too, whichever thread runs it
        y, aux = backend.kernel_of(ctx.backend, "dense", "forward")(x, weight, bias, act, slope)
        ctx.mark_non_differentiable(aux)
        _setup_context(ctx, (x, weight, bias, act, slope), (y, aux))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _gradients(ctx, grad_y, backend.kernel_of(ctx.backend, "dense", "backward"))


def _check_inputs(x, weight, bias) -> None:
    """Raise a clear error naming the argument before any kernel runs."""
    check_tensor("x", x)
    check_tensor("weight", weight)
    if bias is not None:
        check_tensor("bias", bias)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected 2 dimensions (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: expected shape (..., {weight.shape[1]}) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(x.shape)}")
    if bias is not None:
        check_shape("bias", bias, (weight.shape[0],))


def _takes_cpp_entry(x, weight, bias) -> bool:
    """Eager call on a compiled backend: the C++ entry checks the tensors (anything else, and every
    other path, is checked here in Python, so non-tensors get the same clear errors)."""
    return (isinstance(x, Tensor) and isinstance(weight, Tensor) and (bias is None or isinstance(bias, Tensor))
            and backend.select(x.device) in _COMPILED and not _route.traced()
            and not _route.plain_math(x, weight, bias))


def fused_dense(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = "relu",
                negative_slope: float = 0.01) -> Tensor:
    """y = act(x @ weight^T + bias) in one fused op, forward and backward.

    Args:
        x: (..., in_features), float16/bfloat16/float32/float64.
        weight: (out_features, in_features), same dtype and device as x.
        bias: (out_features,) or None.
        activation: "relu", "leaky_relu", "gelu" (erf), "gelu_tanh", "silu", "sigmoid", "tanh",
            "none" or None.
        negative_slope: slope of leaky_relu for negative inputs.
    Returns:
        (..., out_features) in x's dtype (the autocast dtype under autocast).
    """
    act = get_activation(activation)
    if _takes_cpp_entry(x, weight, bias):
        return _extension._C.dense_eager(x, weight, bias, act.code, float(negative_slope))
    _check_inputs(x, weight, bias)
    dtype = autocast_dtype(x.device)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    check_same(("x", "weight", "bias"), (x, weight, bias))
    if _route.plain_math(x, weight, bias):
        return reference.fused_dense(x, weight, bias, act.name, float(negative_slope))
    # Rows spelled out rather than -1: with in_features == 0 there is nothing to infer -1 from.
    x2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()
    weight, bias = weight.contiguous(), None if bias is None else bias.contiguous()
    if _route.traced():
        y, _ = _forward(x2d, weight, bias, act.code, float(negative_slope))
    else:
        y = _EagerFusedDense.apply(x2d, weight, bias, act.code, float(negative_slope))
    return y.view(*x.shape[:-1], weight.shape[0])
