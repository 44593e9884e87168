"""genfast::elbo_loss and genfast::gan_loss: each loss and its gradient in one forward pass.

The forward kernel writes the gradient of the loss (scaled by 1/batch for "mean") while it computes the
loss, so backward only multiplies those saved gradients by grad_output (a scalar, or one value per sample
for reduction "none"). No double backward: a gradient of these gradients raises.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from genfast import reference
from genfast._extension import _C
from genfast.loss_terms import (
    GAN_KINDS,
    NO_TERM,
    RECON_LOSSES,
    REDUCTIONS,
    UINT8_TARGET_SCALE,
    Term,
    code_of,
    real_term,
)
from genfast.ops import _route
from genfast.ops._checks import FLOAT_DTYPES, check_same, check_tensor
from genfast.ops._op import Kernels, Op, plus

_NONE = REDUCTIONS["none"]


def _triton():  # imported on first use: Triton is optional
    from genfast.triton import losses

    return losses


# Why a gradient of these gradients raises, in the error.
_SAVED_GRADIENT = (
    "its backward scales a gradient saved by the forward kernel. Where a gradient of a gradient "
    "is needed, use the plain PyTorch expressions in genfast.reference."
)


# ---------------------------------------------------------------------------------------------------
# ELBO


def _elbo_fake(recon, target, mu, logvar, beta, recon_kind, reduction, target_scale, need_grad):
    shape = (recon.shape[0],) if reduction == _NONE else ()
    grads = [t.new_empty(t.shape if need_grad else (0,)) for t in (recon, mu, logvar)]
    return (recon.new_empty(shape), recon.new_empty(shape), recon.new_empty(shape), *grads)


def _per_sample_times(saved: Tensor, factor: Tensor | None) -> Tensor | None:
    """saved * factor, factor a scalar or one value per row of saved (reduction "none")."""
    if factor is None:
        return None
    return saved * (factor.view(-1, *([1] * (saved.dim() - 1))) if factor.dim() else factor)


def _elbo_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*output[3:])
    ctx.beta = inputs[4]


def _elbo_gradients(ctx, grad_loss, grad_recon_term, grad_kl_term, *_):
    # d loss/d recon = saved_recon; d loss/d (mu, logvar) = beta * saved_kl; the terms are outputs too.
    saved_recon, saved_mu, saved_logvar = ctx.saved_tensors
    on_recon = plus(grad_loss, grad_recon_term)
    on_kl = plus(None if grad_loss is None else ctx.beta * grad_loss, grad_kl_term)
    need_recon, _, need_mu, need_logvar = ctx.needs_input_grad[:4]
    return (
        _per_sample_times(saved_recon, on_recon) if need_recon else None,
        None,
        _per_sample_times(saved_mu, on_kl) if need_mu else None,
        _per_sample_times(saved_logvar, on_kl) if need_logvar else None,
        None,
        None,
        None,
        None,
        None,
    )


ELBO = Op(
    "elbo_loss",
    "(Tensor recon, Tensor target, Tensor mu, Tensor logvar, float beta, int recon_kind, int reduction, "
    "float target_scale, bool need_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    Kernels(
        reference=reference.losses_elbo_forward,
        cpu=lambda: _C.losses_elbo_forward_cpu,
        cuda=lambda: _C.losses_elbo_forward_cuda,
        triton=lambda: _triton().losses_elbo_forward,
    ),
    _elbo_fake,
    setup=_elbo_setup,
    backward=_elbo_gradients,
    double_backward=_SAVED_GRADIENT,
    nondifferentiable=(3, 4, 5),
    cpp_node=lambda: _C.elbo_node,
)


def _check_elbo_inputs(recon, target, mu, logvar) -> None:
    """Clear errors naming the argument before any kernel runs."""
    for name, t in (("recon", recon), ("mu", mu), ("logvar", logvar)):
        check_tensor(name, t)
    check_tensor("target", target, FLOAT_DTYPES + (torch.uint8, torch.bool))
    check_same(("recon", "mu", "logvar"), (recon, mu, logvar))
    if target.device != recon.device:
        raise ValueError(f"target is on {target.device} but recon is on {recon.device}")
    if target.dtype not in (recon.dtype, torch.uint8, torch.bool):
        raise TypeError(
            f"target: expected recon's dtype {recon.dtype}, uint8 (pixels 0..255) or bool, got {target.dtype}"
        )
    if target.requires_grad:
        raise ValueError("target: genfast's losses give the target no gradient; pass target.detach()")
    if recon.dim() < 2 or mu.dim() < 2:
        raise ValueError(
            f"recon and mu: expected (batch, features...), got shapes {tuple(recon.shape)} and "
            f"{tuple(mu.shape)}"
        )
    if target.shape != recon.shape:
        raise ValueError(f"target: expected recon's shape {tuple(recon.shape)}, got {tuple(target.shape)}")
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar: expected mu's shape {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    if mu.shape[0] != recon.shape[0]:
        raise ValueError(f"mu: expected recon's batch size {recon.shape[0]}, got shape {tuple(mu.shape)}")


def _number(name: str, value: object) -> float:
    """A finite real number, given as a Python number or a one-element tensor that needs no gradient."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                f"{name}: expected a real number or a one-element real tensor, got a tensor of shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
        if value.requires_grad:
            raise ValueError(
                f"{name}: genfast's losses give {name} no gradient; pass {name}.detach() or a number"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name}: expected a finite real number, got {value!r}")
    return float(value)


def _check_reduction(reduction: str, numel: int, what: str) -> int:
    code = code_of(REDUCTIONS, reduction, "reduction")
    if reduction == "mean" and numel == 0:
        raise ValueError(f"reduction: the mean over an empty {what} is undefined; use 'sum' (0) or 'none'")
    return code


def _need_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def elbo_loss(
    recon: Tensor,
    target: Tensor,
    mu: Tensor,
    logvar: Tensor,
    beta: float = 1.0,
    recon_loss: str = "bce",
    reduction: str = "mean",
    return_terms: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """The negative ELBO of a VAE with a diagonal Gaussian posterior, loss and gradient in one pass.

    Per sample i: loss_i = r_i + beta * kl_i, with
    r_i = sum_j bce(recon_ij, target_ij) (recon_loss="bce", recon are logits; stable
    max(x, 0) - x t + log(1 + exp(-|x|))) or sum_j (recon_ij - target_ij)^2 (recon_loss="mse"), and
    kl_i = KL(N(mu_i, exp(logvar_i)) || N(0, I)) = 0.5 sum_k (exp(logvar) - 1 - logvar + mu^2).

    Args:
        recon: (B, ...) logits ("bce") or values ("mse"), float16/bfloat16/float32/float64.
        target: recon's shape; probabilities in [0, 1] in recon's dtype, uint8 pixels (0..255 mean
            0..1) or bool (0/1). It gets no gradient.
        mu, logvar: (B, ...) mean and log-variance of the posterior, recon's dtype and device.
        beta: weight of the KL term.
        reduction: "mean" (over the batch), "sum" or "none" (one value per sample, shape (B,)).
        return_terms: also return the reconstruction and KL terms (same reduction, KL without beta).
    Returns:
        the loss in recon's dtype (computed in fp32), or (loss, recon_term, kl_term). The terms are
        differentiable too.
    """
    _check_elbo_inputs(recon, target, mu, logvar)
    beta = _number("beta", beta)
    kind = code_of(RECON_LOSSES, recon_loss, "recon_loss")
    red = _check_reduction(reduction, recon.shape[0], "batch")
    if _route.plain_math(recon, mu, logvar):
        terms = reference.elbo_terms(recon, target, mu, logvar, beta, recon_loss, reduction)
        return terms if return_terms else terms[0]
    target_scale = UINT8_TARGET_SCALE if target.dtype == torch.uint8 else 1.0
    if target.dtype == torch.bool:
        target = target.view(torch.uint8)
    args = (*(t.flatten(1).contiguous() for t in (recon, target, mu, logvar)), beta, kind, red, target_scale)
    terms = ELBO(*args, _need_grad(recon, mu, logvar))[:3]
    return tuple(terms) if return_terms else terms[0]


# ---------------------------------------------------------------------------------------------------
# GAN


def _gan_fake(first, second, term0, param0, term1, param1, reduction, need_grad):
    grads = [t.new_empty(t.shape if need_grad else (0,)) for t in (first, second)]
    return (first.new_empty(first.shape if reduction == _NONE else ()), *grads)


def _gan_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*output[1:])


def _gan_gradients(ctx, grad_loss, *_):
    # grad_loss is a scalar or, for "none", one value per element of first (second has its shape then).
    if grad_loss is None:
        return (None,) * 8
    return (
        tuple(
            saved * grad_loss if need else None
            for saved, need in zip(ctx.saved_tensors, ctx.needs_input_grad[:2])
        )
        + (None,) * 6
    )


GAN = Op(
    "gan_loss",
    "(Tensor first, Tensor second, int term0, float param0, int term1, float param1, int reduction, "
    "bool need_grad) -> (Tensor, Tensor, Tensor)",
    Kernels(
        reference=reference.losses_gan_forward,
        cpu=lambda: _C.losses_gan_forward_cpu,
        cuda=lambda: _C.losses_gan_forward_cuda,
        triton=lambda: _triton().losses_gan_forward,
    ),
    _gan_fake,
    setup=_gan_setup,
    backward=_gan_gradients,
    double_backward=_SAVED_GRADIENT,
    nondifferentiable=(1, 2),
    cpp_node=lambda: _C.gan_node,
)


def _gan_loss(first: Tensor, second: Tensor | None, terms: tuple[Term, Term], reduction: str) -> Tensor:
    """Term 0 over `first` + term 1 over `second` (None: a generator loss), checked inputs."""
    # Any shape: the kernels read the tensors as flat (a reshape here would be one more autograd node).
    red = code_of(REDUCTIONS, reduction, "reduction")
    tensors = (first.contiguous(), first.new_empty(0) if second is None else second.contiguous())
    args = (*tensors, terms[0].code, float(terms[0].param), terms[1].code, float(terms[1].param), red)
    return GAN(*args, _need_grad(*tensors))[0]


def _check_kind(kind: str) -> None:
    if not isinstance(kind, str) or kind not in GAN_KINDS:
        raise ValueError(f"kind: expected one of {sorted(GAN_KINDS)}, got {kind!r}")


def discriminator_loss(
    real_logits: Tensor,
    fake_logits: Tensor,
    kind: str = "nonsaturating",
    real_label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """The discriminator's GAN loss on its logits (any shape), loss and gradient in one pass.

    With r the real logits, f the fake logits and s = real_label_smoothing, per element:
    "nonsaturating": softplus(-r) + s r + softplus(f) (BCE with targets 1 - s and 0),
    "hinge": relu(1 - r) + relu(1 + f), "lsgan": 0.5 (r - (1 - s))^2 + 0.5 f^2,
    "wasserstein": f - r. "mean" averages the real and the fake terms each over its own count,
    "sum" sums them, "none" returns the per-element sum (real and fake of the same shape).

    Args:
        real_logits, fake_logits: float16/bfloat16/float32/float64, same dtype and device.
        real_label_smoothing: in [0, 1); nonsaturating and lsgan only.
    Returns:
        a scalar (shape of real_logits for "none") in the logits' dtype, computed in fp32.
    """
    _check_kind(kind)
    check_tensor("real_logits", real_logits)
    check_tensor("fake_logits", fake_logits)
    check_same(("real_logits", "fake_logits"), (real_logits, fake_logits))
    real_label_smoothing = _number("real_label_smoothing", real_label_smoothing)
    if not 0.0 <= real_label_smoothing < 1.0:
        raise ValueError(f"real_label_smoothing: expected a value in [0, 1), got {real_label_smoothing}")
    if real_label_smoothing and not GAN_KINDS[kind].smoothable:
        raise ValueError(f"real_label_smoothing: the {kind!r} loss has no labels to smooth; use 0")
    if reduction == "none" and real_logits.shape != fake_logits.shape:
        raise ValueError(
            f"fake_logits: reduction 'none' needs real_logits' shape {tuple(real_logits.shape)}, "
            f"got {tuple(fake_logits.shape)}"
        )
    _check_reduction(reduction, min(real_logits.numel(), fake_logits.numel()), "batch")
    if _route.plain_math(real_logits, fake_logits):
        return reference.discriminator_loss(real_logits, fake_logits, kind, real_label_smoothing, reduction)
    terms = (real_term(kind, real_label_smoothing), GAN_KINDS[kind].fake)
    return _gan_loss(real_logits, fake_logits, terms, reduction)


def generator_loss(fake_logits: Tensor, kind: str = "nonsaturating", reduction: str = "mean") -> Tensor:
    """The generator's GAN loss on the discriminator's logits of fakes, loss and gradient in one pass.

    Per element of the fake logits f: "nonsaturating": softplus(-f) (BCE with target 1),
    "hinge" and "wasserstein": -f, "lsgan": 0.5 (f - 1)^2; then "mean", "sum" or "none".

    Args:
        fake_logits: any shape, float16/bfloat16/float32/float64.
    Returns:
        a scalar (fake_logits' shape for "none") in fake_logits' dtype, computed in fp32.
    """
    _check_kind(kind)
    check_tensor("fake_logits", fake_logits)
    _check_reduction(reduction, fake_logits.numel(), "batch")
    if _route.plain_math(fake_logits):
        return reference.generator_loss(fake_logits, kind, reduction)
    return _gan_loss(fake_logits, None, (GAN_KINDS[kind].generator, NO_TERM), reduction)


# ---------------------------------------------------------------------------------------------------
# R1


def r1_penalty(real_logits: Tensor, real_inputs: Tensor, gamma: float) -> Tensor:
    """StyleGAN2's R1 regularizer: gamma / 2 * E_i[ ||d sum(D(x)) / d x_i||^2 ] over the real inputs.

    Computed through autograd (``torch.autograd.grad(..., create_graph=True)``), so its own backward is
    a double backward through the discriminator; genfast's FusedLinear layers support it.

    Args:
        real_logits: D(real_inputs), any shape with the batch first.
        real_inputs: (B, ...) the real batch, with requires_grad set before D ran on it.
        gamma: the R1 weight.
    Returns:
        a scalar in real_logits' dtype.
    """
    check_tensor("real_logits", real_logits)
    check_tensor("real_inputs", real_inputs)
    gamma = _number("gamma", gamma)
    if not real_inputs.requires_grad or real_logits.grad_fn is None:
        raise ValueError(
            "real_inputs: must require grad before the discriminator runs on them "
            "(real_inputs.requires_grad_(); real_logits = D(real_inputs))"
        )
    if real_inputs.shape[0] == 0:
        raise ValueError("real_inputs: the mean over an empty batch is undefined")
    (grad,) = torch.autograd.grad(real_logits.sum(), real_inputs, create_graph=True)
    return 0.5 * gamma * grad.square().flatten(1).sum(1).mean()
