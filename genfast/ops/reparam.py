"""genfast::reparameterize, genfast::kl_rows, genfast::reparameterize_kl: sampling and the Gaussian KL.

Sampling draws its noise inside the kernel from a counter-based Philox stream (csrc/common/philox.h)
and returns the (seed, offset) pair it used, rng_state; backward regenerates the same noise from it, so
nothing of mu's shape is saved. grad_mu is grad_z itself. The KL is computed per row of the last
dimension in float64 and reduced over the batch here, then rounded once to mu's dtype.

Eager calls go through autograd.Functions (a custom op's Python dispatch costs more than the kernels
of a small latent); under torch.compile the custom ops run, tagged nondeterministic_seeded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from genfast import backend, reference
from genfast.loss_terms import KL_ROWS_DTYPE
from genfast.ops import _route
from genfast.ops._autograd import no_double_backward, plus
from genfast.ops._checks import check_same, check_tensor

_REDUCTIONS = ("none", "sum", "mean")
_SEEDED = (torch.Tag.nondeterministic_seeded,)

torch.library.define("genfast::reparameterize", "(Tensor mu, Tensor logvar, Generator? generator=None) -> "
                     "(Tensor, Tensor)", tags=_SEEDED)
torch.library.define("genfast::reparameterize_kl", "(Tensor mu, Tensor logvar, Generator? generator=None) -> "
                     "(Tensor, Tensor, Tensor)", tags=_SEEDED)


def _kernel(family: str, step: str, device: torch.device):
    return backend.kernel(family, step, device, module="reparam")


@torch.library.impl("genfast::reparameterize", "default")
def _reparameterize(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None):
    return tuple(_kernel("reparam", "forward", mu.device)(mu.contiguous(), logvar.contiguous(), generator))


@torch.library.impl("genfast::reparameterize_kl", "default")
def _reparameterize_kl(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None):
    return tuple(_kernel("reparam_kl", "forward", mu.device)(mu.contiguous(), logvar.contiguous(), generator))


def _rows(mu: Tensor) -> int:
    rows = 1
    for size in mu.shape[:-1]:
        rows *= size
    return rows


@torch.library.register_fake("genfast::reparameterize")
def _(mu, logvar, generator=None):
    return torch.empty_like(mu, memory_format=torch.contiguous_format), mu.new_empty(2, dtype=torch.int64)


@torch.library.register_fake("genfast::reparameterize_kl")
def _(mu, logvar, generator=None):
    return (torch.empty_like(mu, memory_format=torch.contiguous_format), mu.new_empty(2, dtype=torch.int64),
            mu.new_empty(_rows(mu), dtype=KL_ROWS_DTYPE))


@torch.library.custom_op("genfast::reparameterize_backward", mutates_args=())
def _reparameterize_backward(grad_z: Tensor, logvar: Tensor, rng_state: Tensor) -> Tensor:
    return _kernel("reparam", "backward", logvar.device)(grad_z.contiguous(), logvar.contiguous(), rng_state)


@_reparameterize_backward.register_fake
def _(grad_z, logvar, rng_state):
    return torch.empty_like(logvar, memory_format=torch.contiguous_format)


@torch.library.custom_op("genfast::kl_rows", mutates_args=())
def _kl_rows(mu: Tensor, logvar: Tensor) -> Tensor:
    return _kernel("kl", "forward", mu.device)(mu.contiguous(), logvar.contiguous())


@_kl_rows.register_fake
def _(mu, logvar):
    return mu.new_empty(_rows(mu), dtype=KL_ROWS_DTYPE)


@torch.library.custom_op("genfast::kl_rows_backward", mutates_args=())
def _kl_rows_backward(grad_kl: Tensor, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    return tuple(_kernel("kl", "backward", mu.device)(grad_kl.contiguous(), mu.contiguous(), logvar.contiguous()))


@_kl_rows_backward.register_fake
def _(grad_kl, mu, logvar):
    return (torch.empty_like(mu, memory_format=torch.contiguous_format),
            torch.empty_like(logvar, memory_format=torch.contiguous_format))


# ---------------------------------------------------------------------------------------------------
# Autograd: one rule per op, shared by the custom ops (compile) and the autograd.Functions (eager).

def _sample_gradients(ctx, grad_z: Tensor | None, backward) -> tuple[Tensor | None, Tensor | None]:
    """grad_z is None when z took no part in the loss (grads are not materialized): then there is no
    sampling term. A zero grad_z times an overflowing exp(0.5 logvar) would be 0 * inf = NaN, where
    PyTorch, which never reaches an unused z, gives the KL's gradient alone."""
    logvar, rng_state = ctx.saved_tensors[:2]
    if grad_z is None:
        return None, None
    grad_logvar = backward(grad_z, logvar, rng_state) if ctx.needs_input_grad[1] else None
    return grad_z if ctx.needs_input_grad[0] else None, grad_logvar


def _kl_gradients(ctx, grad_kl: Tensor | None, mu: Tensor, logvar: Tensor, backward):
    if grad_kl is None:
        return None, None
    return tuple(backward(grad_kl.to(KL_ROWS_DTYPE), mu, logvar))


def _setup_sample(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1], output[1])
    ctx.set_materialize_grads(False)


@no_double_backward("reparameterize")
def _reparameterize_autograd(ctx, grad_z, _grad_state):
    return (*_sample_gradients(ctx, grad_z, _reparameterize_backward), None)


torch.library.register_autograd("genfast::reparameterize", _reparameterize_autograd, setup_context=_setup_sample)


def _setup_kl(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


@no_double_backward("kl_divergence")
def _kl_autograd(ctx, grad_kl):
    return _kl_gradients(ctx, grad_kl, *ctx.saved_tensors, _kl_rows_backward)


_kl_rows.register_autograd(_kl_autograd, setup_context=_setup_kl)


def _setup_sample_kl(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1], output[1], inputs[0])
    ctx.set_materialize_grads(False)


@no_double_backward("reparameterize_kl")
def _sample_kl_gradients(ctx, grad_z, grad_kl, sample_backward, kl_backward):
    logvar, _, mu = ctx.saved_tensors
    grad_mu, grad_logvar = _sample_gradients(ctx, grad_z, sample_backward)
    kl_mu, kl_logvar = _kl_gradients(ctx, grad_kl, mu, logvar, kl_backward)
    return plus(grad_mu, kl_mu), plus(grad_logvar, kl_logvar)


torch.library.register_autograd(
    "genfast::reparameterize_kl",
    lambda ctx, grad_z, _grad_state, grad_kl: (*_sample_kl_gradients(ctx, grad_z, grad_kl, _reparameterize_backward,
                                                                     _kl_rows_backward), None),
    setup_context=_setup_sample_kl)


def _eager_kernel(name: str, family: str, step: str):
    """Backend `name`'s kernel, inputs made contiguous (as the custom ops do)."""
    kernel = backend.kernel_of(name, family, step, module="reparam")

    def call(*tensors):
        return kernel(*(t.contiguous() if isinstance(t, Tensor) else t for t in tensors))
    return call


# The eager Functions record the backend their forward ran on (ctx.backend): backward runs there too,
# whichever thread autograd runs it on.

class _EagerReparameterize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, logvar, generator):
        ctx.backend = backend.select(mu.device)
        z, rng_state = _eager_kernel(ctx.backend, "reparam", "forward")(mu, logvar, generator)
        _setup_sample(ctx, (mu, logvar), (z, rng_state))
        return z

    @staticmethod
    @no_double_backward("reparameterize")
    def backward(ctx, grad_z):
        return (*_sample_gradients(ctx, grad_z, _eager_kernel(ctx.backend, "reparam", "backward")), None)


class _EagerKl(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, logvar):
        ctx.backend = backend.select(mu.device)
        _setup_kl(ctx, (mu, logvar), None)
        return _eager_kernel(ctx.backend, "kl", "forward")(mu, logvar)

    @staticmethod
    @no_double_backward("kl_divergence")
    def backward(ctx, grad_kl):
        return _kl_gradients(ctx, grad_kl, *ctx.saved_tensors, _eager_kernel(ctx.backend, "kl", "backward"))


class _EagerReparameterizeKl(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mu, logvar, generator):
        ctx.backend = backend.select(mu.device)
        z, rng_state, kl = _eager_kernel(ctx.backend, "reparam_kl", "forward")(mu, logvar, generator)
        ctx.mark_non_differentiable(rng_state)
        _setup_sample_kl(ctx, (mu, logvar), (z, rng_state))
        return z, kl

    @staticmethod
    def backward(ctx, grad_z, grad_kl):
        return (*_sample_kl_gradients(ctx, grad_z, grad_kl, _eager_kernel(ctx.backend, "reparam", "backward"),
                                      _eager_kernel(ctx.backend, "kl", "backward")), None)


# ---------------------------------------------------------------------------------------------------
# Public API

def _check_pair(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> None:
    check_tensor("mu", mu)
    check_tensor("logvar", logvar)
    check_same(("mu", "logvar"), (mu, logvar))
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar: expected mu's shape {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != mu.device.type:
            raise ValueError(f"generator: is a {generator.device.type} generator but mu is on {mu.device}")
        if torch.compiler.is_compiling():
            raise RuntimeError("generator: torch.compile cannot trace a torch.Generator argument; seed the "
                               "default generator with torch.manual_seed instead")


def _check_kl(mu: Tensor, reduction: str) -> None:
    if mu.dim() < 1:
        raise ValueError("mu: expected at least one dimension (the latent one), got a scalar")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    if reduction == "mean" and _rows(mu) == 0:
        raise ValueError(f"mu: the mean over an empty batch is undefined (shape {tuple(mu.shape)}); "
                         "use reduction='sum' or 'none'")


def _reduce(rows: Tensor, mu: Tensor, reduction: str) -> Tensor:
    """Per-row KL (math type) -> per sample (mu.shape[:-1]), sum or mean, in mu's dtype."""
    if reduction == "none":
        return rows.view(mu.shape[:-1]).to(mu.dtype)
    return (rows.mean() if reduction == "mean" else rows.sum()).to(mu.dtype)


def reparameterize(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """z = mu + exp(0.5 * logvar) * eps, eps ~ N(0, I) drawn inside the kernel; backward stores no noise.

    Args:
        mu, logvar: the same shape, dtype (float16/bfloat16/float32/float64) and device.
        generator: the torch.Generator to seed from (default: the device's); eager mode only.
    Returns:
        z of mu's shape and dtype (computed in fp32, fp64 for float64). grad_mu = grad_z,
        grad_logvar = 0.5 * grad_z * eps * exp(0.5 * logvar) with the very eps of the forward.
    """
    _check_pair(mu, logvar, generator)
    if _route.plain_math(mu, logvar):
        return reference.reparameterize(mu, logvar, generator)
    if _route.traced():
        return torch.ops.genfast.reparameterize(mu, logvar)[0]
    return _EagerReparameterize.apply(mu, logvar, generator)


def kl_divergence(mu: Tensor, logvar: Tensor, reduction: str = "mean") -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the last dimension, then reduced over the rest.

    Args:
        mu, logvar: (..., latent), the same dtype and device.
        reduction: "none" (per sample, shape mu.shape[:-1]), "sum" or "mean" over the samples.
    Returns:
        in mu's dtype; per-sample sums and the reduction in fp64, rounded once.
    """
    _check_pair(mu, logvar)
    _check_kl(mu, reduction)
    if _route.plain_math(mu, logvar):
        return reference.kl_divergence(mu, logvar, reduction)
    rows = _kl_rows(mu, logvar) if _route.traced() else _EagerKl.apply(mu, logvar)
    return _reduce(rows, mu, reduction)


def reparameterize_kl(mu: Tensor, logvar: Tensor, reduction: str = "mean",
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(reparameterize(mu, logvar), kl_divergence(mu, logvar, reduction)) in one pass over mu and logvar."""
    _check_pair(mu, logvar, generator)
    _check_kl(mu, reduction)
    if _route.plain_math(mu, logvar):
        return reference.reparameterize(mu, logvar, generator), reference.kl_divergence(mu, logvar, reduction)
    if _route.traced():
        z, _, rows = torch.ops.genfast.reparameterize_kl(mu, logvar)
    else:
        z, rows = _EagerReparameterizeKl.apply(mu, logvar, generator)
    return z, _reduce(rows, mu, reduction)
