"""genfast::reparameterize, genfast::kl_rows, genfast::reparameterize_kl: sampling and the Gaussian KL.

Sampling draws its noise inside the kernel from a counter-based Philox stream (csrc/common/philox.h)
and returns the (seed, offset) pair it used, rng_state; backward regenerates the same noise from it, so
nothing of mu's shape is saved. grad_mu is grad_z itself. The KL is computed per row of the last
dimension in float64 and reduced over the batch here, then rounded once to mu's dtype.

The sampling ops are tagged nondeterministic_seeded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from genfast import reference
from genfast._extension import _C
from genfast.loss_terms import KL_ROWS_DTYPE, RECON_LOSSES, REDUCTIONS
from genfast.ops import _route
from genfast.ops._checks import check_same, check_tensor
from genfast.ops._op import Kernels, Op, plus
from genfast.ops.losses import ELBO

_REDUCTIONS = ("none", "sum", "mean")
_SEEDED = (torch.Tag.nondeterministic_seeded,)


def _triton():  # imported on first use: Triton is optional
    from genfast.triton import reparam

    return reparam


def _rows(mu: Tensor) -> int:
    rows = 1
    for size in mu.shape[:-1]:
        rows *= size
    return rows


def _contiguous_like(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------------
# Backward ops

SAMPLE_BACKWARD = Op(
    "reparameterize_backward",
    "(Tensor grad_z, Tensor logvar, Tensor rng_state) -> Tensor",
    Kernels(
        reference=reference.reparam_backward,
        cpu=lambda: _C.reparam_backward_cpu,
        cuda=lambda: _C.reparam_backward_cuda,
        triton=lambda: _triton().reparam_backward,
    ),
    lambda grad_z, logvar, rng_state: _contiguous_like(logvar),
)

KL_BACKWARD = Op(
    "kl_rows_backward",
    "(Tensor grad_kl, Tensor mu, Tensor logvar) -> (Tensor, Tensor)",
    Kernels(
        reference=reference.kl_backward,
        cpu=lambda: _C.kl_backward_cpu,
        cuda=lambda: _C.kl_backward_cuda,
        triton=lambda: _triton().kl_backward,
    ),
    lambda grad_kl, mu, logvar: (_contiguous_like(mu), _contiguous_like(logvar)),
)

SAMPLE_KL_BACKWARD = Op(
    "reparameterize_kl_backward",
    "(Tensor grad_z, Tensor grad_kl, Tensor mu, Tensor logvar, Tensor rng_state) -> (Tensor, Tensor)",
    Kernels(
        reference=reference.reparam_kl_backward,
        cpu=lambda: _C.reparam_kl_backward_cpu,
        cuda=lambda: _C.reparam_kl_backward_cuda,
        triton=lambda: _triton().reparam_kl_backward,
    ),
    lambda grad_z, grad_kl, mu, logvar, rng_state: (_contiguous_like(mu), _contiguous_like(logvar)),
)


# ---------------------------------------------------------------------------------------------------
# Autograd: one rule per op


def _sample_gradients(ctx, grad_z: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """grad_z is None when z took no part in the loss (grads are not materialized): then there is no
    sampling term. A zero grad_z times an overflowing exp(0.5 logvar) would be 0 * inf = NaN, where
    PyTorch, which never reaches an unused z, gives the KL's gradient alone."""
    logvar, rng_state = ctx.saved_tensors[:2]
    if grad_z is None:
        return None, None
    grad_logvar = (
        SAMPLE_BACKWARD.run(ctx.backend, grad_z, logvar, rng_state) if ctx.needs_input_grad[1] else None
    )
    return grad_z if ctx.needs_input_grad[0] else None, grad_logvar


def _kl_gradients(ctx, grad_kl: Tensor | None, mu: Tensor, logvar: Tensor):
    if grad_kl is None:
        return None, None
    return tuple(KL_BACKWARD.run(ctx.backend, grad_kl.to(KL_ROWS_DTYPE), mu, logvar))


def _setup_sample(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1], output[1])


def _sample_backward(ctx, grad_z, _grad_state):
    return (*_sample_gradients(ctx, grad_z), None)


def _setup_kl(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _kl_backward(ctx, grad_kl):
    return _kl_gradients(ctx, grad_kl, *ctx.saved_tensors)


def _setup_sample_kl(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1], output[1], inputs[0])


def _sample_kl_backward(ctx, grad_z, _grad_state, grad_kl):
    logvar, rng_state, mu = ctx.saved_tensors
    if grad_z is not None and grad_kl is not None and ctx.needs_input_grad[1]:
        # Both gradients reach logvar: one kernel sums them (one pass, each element rounded once).
        grad_mu, grad_logvar = SAMPLE_KL_BACKWARD.run(
            ctx.backend, grad_z, grad_kl.to(KL_ROWS_DTYPE), mu, logvar, rng_state
        )
        return grad_mu if ctx.needs_input_grad[0] else None, grad_logvar, None
    grad_mu, grad_logvar = _sample_gradients(ctx, grad_z)
    kl_mu, kl_logvar = _kl_gradients(ctx, grad_kl, mu, logvar)
    return plus(grad_mu, kl_mu), plus(grad_logvar, kl_logvar), None


SAMPLE = Op(
    "reparameterize",
    "(Tensor mu, Tensor logvar, Generator? generator=None) -> (Tensor, Tensor)",
    Kernels(
        reference=reference.reparam_forward,
        cpu=lambda: _C.reparam_forward_cpu,
        cuda=lambda: _C.reparam_forward_cuda,
        triton=lambda: _triton().reparam_forward,
    ),
    lambda mu, logvar, generator=None: (_contiguous_like(mu), mu.new_empty(2, dtype=torch.int64)),
    setup=_setup_sample,
    backward=_sample_backward,
    nondifferentiable=(1,),
    tags=_SEEDED,
)

KL = Op(
    "kl_rows",
    "(Tensor mu, Tensor logvar) -> Tensor",
    Kernels(
        reference=reference.kl_forward,
        cpu=lambda: _C.kl_forward_cpu,
        cuda=lambda: _C.kl_forward_cuda,
        triton=lambda: _triton().kl_forward,
    ),
    lambda mu, logvar: mu.new_empty(_rows(mu), dtype=KL_ROWS_DTYPE),
    setup=_setup_kl,
    backward=_kl_backward,
)

SAMPLE_KL = Op(
    "reparameterize_kl",
    "(Tensor mu, Tensor logvar, Generator? generator=None) -> (Tensor, Tensor, Tensor)",
    Kernels(
        reference=reference.reparam_kl_forward,
        cpu=lambda: _C.reparam_kl_forward_cpu,
        cuda=lambda: _C.reparam_kl_forward_cuda,
        triton=lambda: _triton().reparam_kl_forward,
    ),
    lambda mu, logvar, generator=None: (
        _contiguous_like(mu),
        mu.new_empty(2, dtype=torch.int64),
        mu.new_empty(_rows(mu), dtype=KL_ROWS_DTYPE),
    ),
    setup=_setup_sample_kl,
    backward=_sample_kl_backward,
    nondifferentiable=(1,),
    tags=_SEEDED,
)


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
            raise RuntimeError(
                "generator: torch.compile cannot trace a torch.Generator argument; seed the "
                "default generator with torch.manual_seed instead"
            )


def _check_kl(mu: Tensor, reduction: str) -> None:
    if mu.dim() < 1:
        raise ValueError("mu: expected at least one dimension (the latent one), got a scalar")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    if reduction == "mean" and _rows(mu) == 0:
        raise ValueError(
            f"mu: the mean over an empty batch is undefined (shape {tuple(mu.shape)}); "
            "use reduction='sum' or 'none'"
        )


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
    return SAMPLE(mu.contiguous(), logvar.contiguous(), generator)[0]


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
    mu, logvar = mu.contiguous(), logvar.contiguous()
    if (
        reduction != "none"
        and mu.dtype in _GRADIENT_IN_FORWARD_DTYPES
        and torch.is_grad_enabled()
        and (mu.requires_grad or logvar.requires_grad)
    ):
        return _kl_with_gradient(mu, logvar, reduction)
    return _reduce(KL(mu, logvar), mu, reduction)


# float16/bfloat16 keep kl_rows' backward (the gradient computed in fp32 and rounded once): a saved
# gradient in those dtypes, scaled by grad_output, would be rounded twice.
_GRADIENT_IN_FORWARD_DTYPES = (torch.float32, torch.float64)


def _kl_with_gradient(mu: Tensor, logvar: Tensor, reduction: str) -> Tensor:
    """The reduced KL as the ELBO kernel over no reconstruction features (its loss is then the KL): its
    forward writes the gradient while it sums, so backward only scales that (on the CPU, a gradient of
    exactly 1 hands it back): mu and logvar are read once and exp(logvar) computed once for forward and
    backward, where kl_rows reads and computes them again in backward."""
    rows = _rows(mu)  # spelled out: with latent 0 there is nothing to infer -1 from
    rows_mu, rows_logvar = mu.reshape(rows, mu.shape[-1]), logvar.reshape(rows, mu.shape[-1])
    no_features = mu.new_empty(rows, 0)
    args = (RECON_LOSSES["mse"], REDUCTIONS[reduction], 1.0, True)
    return ELBO(no_features, no_features, rows_mu, rows_logvar, 1.0, *args)[0]


def reparameterize_kl(
    mu: Tensor, logvar: Tensor, reduction: str = "mean", generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """(reparameterize(mu, logvar), kl_divergence(mu, logvar, reduction)) in one pass over mu and logvar."""
    _check_pair(mu, logvar, generator)
    _check_kl(mu, reduction)
    if _route.plain_math(mu, logvar):
        return reference.reparameterize(mu, logvar, generator), reference.kl_divergence(mu, logvar, reduction)
    z, _, rows = SAMPLE_KL(mu.contiguous(), logvar.contiguous(), generator)
    return z, _reduce(rows, mu, reduction)
