"""genfast::fused_dense: y = act(x @ weight^T + bias), and genfast::fused_dense_backward.

Backward saves the least it can (activations.py says what): a bit mask for relu/leaky_relu, y for
sigmoid/tanh, z for gelu/gelu_tanh/silu, nothing for none; plus x and weight for the GEMMs. Eager calls
on the cpu and cuda backends take the op's C++ autograd node (csrc/dense/dense_autograd.cpp).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from genfast import reference
from genfast._extension import _C
from genfast.activations import ACTIVATIONS, get_activation, mask_row_bytes
from genfast.ops import _route
from genfast.ops._checks import autocast_dtype, check_same, check_shape, check_tensor
from genfast.ops._op import Kernels, Op


def _triton():  # imported on first use: Triton is optional
    from genfast.triton import dense

    return dense


_SAVES = {a.code: a.saves for a in ACTIVATIONS.values()}
_NAMES = {a.code: a.name for a in ACTIVATIONS.values()}


def _forward_fake(x, weight, bias, act, slope):
    m, n = x.shape[0], weight.shape[0]
    saves = _SAVES[act]
    if saves == "mask":
        aux = x.new_empty((m, mask_row_bytes(n)), dtype=torch.uint8)
    elif saves == "preact":
        aux = x.new_empty((m, n))
    else:
        aux = x.new_empty(0)
    return x.new_empty((m, n)), aux


def _backward_fake(grad_y, x, weight, saved, act, slope, need_x, need_w, need_b):
    # a distinct empty tensor for each gradient not needed: an op's outputs may not alias
    return (
        x.new_empty(x.shape if need_x else 0),
        weight.new_empty(weight.shape if need_w else 0),
        weight.new_empty(weight.shape[0] if need_b else 0),
    )


def _setup(ctx, inputs, output) -> None:
    x, weight, bias, act, slope = inputs
    y, aux = output
    # bias (a reference, no memory) only for a backward that builds a graph: it recomputes from x, w, b.
    ctx.save_for_backward(x, weight, y if _SAVES[act] == "output" else aux, bias)
    ctx.act, ctx.slope = act, slope


def _needs(ctx, bias: Tensor | None) -> tuple[bool, bool, bool]:
    return ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bias is not None


def _backward(ctx, grad_y, _grad_aux):
    x, weight, saved, bias = ctx.saved_tensors
    need = _needs(ctx, bias)
    if grad_y is None:
        return (None,) * 5
    grads = BACKWARD.run(ctx.backend, grad_y, x, weight, saved, ctx.act, ctx.slope, *need)
    return tuple(g if n else None for g, n in zip(grads, need)) + (None, None)


def _graph_gradients(grad_y, x, weight, bias, need, act, slope):
    """backward(create_graph=True), as gradient penalties (R1, WGAN-GP) call it: the kernels' gradients
    would be constants to autograd, so differentiate the reference expression instead, graph and all.
    Also the C++ node's rule (it calls this function)."""
    inputs = (x, weight, bias)
    y = reference.fused_dense(x, weight, bias, _NAMES[act], slope)
    grads = iter(torch.autograd.grad(y, [t for t, n in zip(inputs, need) if n], grad_y, create_graph=True))
    return tuple(next(grads) if n else None for n in need)


def _double_backward(ctx, grad_y, _grad_aux):
    x, weight, _, bias = ctx.saved_tensors
    if grad_y is None:
        return (None,) * 5
    return _graph_gradients(grad_y, x, weight, bias, _needs(ctx, bias), ctx.act, ctx.slope) + (None, None)


BACKWARD = Op(
    "fused_dense_backward",
    "(Tensor grad_y, Tensor x, Tensor weight, Tensor saved, int act, float slope, bool need_x, bool need_w, "
    "bool need_b) -> (Tensor, Tensor, Tensor)",
    Kernels(
        reference=reference.dense_backward,
        cpu=lambda: _C.dense_backward_cpu,
        cuda=lambda: _C.dense_backward_cuda,
        triton=lambda: _triton().dense_backward,
    ),
    _backward_fake,
)

FORWARD = Op(
    "fused_dense",
    "(Tensor x, Tensor weight, Tensor? bias, int act, float slope) -> (Tensor, Tensor)",
    Kernels(
        reference=reference.dense_forward,
        cpu=lambda: _C.dense_forward_cpu,
        cuda=lambda: _C.dense_forward_cuda,
        triton=lambda: _triton().dense_forward,
    ),
    _forward_fake,
    setup=_setup,
    backward=_backward,
    double_backward=_double_backward,
    nondifferentiable=(1,),
    cpp_node=lambda: _C.dense_node,
    cpp_double_backward=_graph_gradients,
)


def _check_inputs(x, weight, bias) -> None:
    """Raise a clear error naming the argument before any kernel runs."""
    check_tensor("x", x)
    check_tensor("weight", weight)
    if bias is not None:
        check_tensor("bias", bias)
    w_shape, x_shape = weight.shape, x.shape
    if len(w_shape) != 2:
        raise ValueError(
            f"weight: expected 2 dimensions (out_features, in_features), got shape {tuple(w_shape)}"
        )
    if not x_shape or x_shape[-1] != w_shape[1]:
        raise ValueError(
            f"x: expected shape (..., {w_shape[1]}) to match weight {tuple(w_shape)}, got {tuple(x_shape)}"
        )
    if bias is not None:
        check_shape("bias", bias, (w_shape[0],))


def fused_dense(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "relu",
    negative_slope: float = 0.01,
) -> Tensor:
    """y = act(x @ weight^T + bias) in one fused op, forward and backward.

    Args:
        x: (..., in_features), float16/bfloat16/float32/float64.
        weight: (out_features, in_features), same dtype and device as x.
        bias: (out_features,) or None.
        activation: a name in genfast.activations.ACTIVATIONS: "relu", "leaky_relu", "gelu" (erf),
            "gelu_tanh", "silu", "sigmoid", "tanh", "softplus" (PyTorch's default: beta 1, threshold 20),
            "mish", or "none" / None.
        negative_slope: slope of leaky_relu for negative inputs.
    Returns:
        (..., out_features) in x's dtype (the autocast dtype under autocast).
    """
    # Every line here runs on each eager call, where a small layer's whole kernel takes a few
    # microseconds: kept to the checks themselves.
    act = get_activation(activation)
    _check_inputs(x, weight, bias)
    if torch._C._is_any_autocast_enabled():  # (autocast_dtype's own first test, without the call)
        dtype = autocast_dtype(x.device)
        if dtype is not None:
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
    check_same(("x", "weight", "bias"), (x, weight, bias))
    if _route.plain_math(x, weight, bias):
        return reference.fused_dense(x, weight, bias, act.name, float(negative_slope))
    weight, bias = weight.contiguous(), None if bias is None else bias.contiguous()
    if x.dim() == 2:  # a reshape is an autograd node of its own (~1 us each way): only where needed
        return FORWARD(x.contiguous(), weight, bias, act.code, float(negative_slope))[0]
    # Rows spelled out rather than -1: with in_features == 0 there is nothing to infer -1 from.
    x2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()
    y = FORWARD(x2d, weight, bias, act.code, float(negative_slope))[0]
    return y.view(*x.shape[:-1], weight.shape[0])
