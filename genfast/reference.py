"""Pure-PyTorch reference of every op: the ground truth of the tests and the last-resort backend.

``fused_dense`` is the plain differentiable expression (tests evaluate it in float64). The
``<op>_forward``/``<op>_backward`` pairs implement the kernel contract of the other backends
(``csrc/<op>/<op>.h``) with PyTorch operations, saved tensors in the same layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from genfast.activations import ACTIVATIONS, get_activation, mask_row_bytes
from genfast.loss_terms import GAN_KINDS, RECON_LOSSES, REDUCTIONS, TERMS, Term, real_term, target_values
from genfast.rng import new_rng_state

_BY_CODE = {a.code: a for a in ACTIVATIONS.values()}
_BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.int32)


def fused_dense(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "relu",
    negative_slope: float = 0.01,
) -> Tensor:
    """act(x @ weight^T + bias), differentiable by autograd."""
    return get_activation(activation).forward(F.linear(x, weight, bias), negative_slope)


def pack_mask(positive: Tensor) -> Tensor:
    """(M, N) bool -> (M, mask_row_bytes(N)) uint8, bit j of a row in byte j // 8, bit j % 8."""
    m, n = positive.shape
    padded = F.pad(positive.to(torch.int32), (0, mask_row_bytes(n) * 8 - n))
    weights = _BIT_WEIGHTS.to(positive.device)
    return (padded.view(m, mask_row_bytes(n), 8) * weights).sum(-1).to(torch.uint8)  # m may be 0: no -1


def unpack_mask(mask: Tensor, n: int) -> Tensor:
    """Inverse of pack_mask: (M, mask_row_bytes(n)) uint8 -> (M, n) bool."""
    bits = (mask.to(torch.int32).unsqueeze(-1) // _BIT_WEIGHTS.to(mask.device)) % 2
    return bits.flatten(1)[:, :n].bool()


def dense_forward(x: Tensor, weight: Tensor, bias: Tensor | None, act: int, slope: float):
    activation = _BY_CODE[act]
    z = F.linear(x, weight, bias)
    y = activation.forward(z, slope)
    if activation.saves == "mask":
        return y, pack_mask(activation.derivative_mask(z))
    if activation.saves == "preact":
        return y, z
    return y, x.new_empty(0)


def dense_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    saved: Tensor,
    act: int,
    slope: float,
    need_x: bool,
    need_w: bool,
    need_b: bool,
):
    activation = _BY_CODE[act]
    if activation.saves == "mask":
        saved = unpack_mask(saved, weight.shape[0])
    if activation.saves == "none":
        dz = grad_y
    else:  # in fp32 at least, rounded once, as eager's kernels do (fp16 z**2 overflows at |z| > 256)
        math_dtype = torch.promote_types(grad_y.dtype, torch.float32)
        if saved.is_floating_point():
            saved = saved.to(math_dtype)
        dz = (grad_y.to(math_dtype) * activation.derivative(saved, slope)).to(grad_y.dtype)
    return (  # a distinct empty tensor for each gradient not needed: a custom op's outputs may not alias
        dz @ weight if need_x else x.new_empty(0),
        dz.t() @ x if need_w else x.new_empty(0),
        dz.sum(0) if need_b else x.new_empty(0),
    )


# ---------------------------------------------------------------------------------------------------
# Losses: the plain expressions (as eager code writes them; tests evaluate them in float64), then the
# kernel contract of csrc/losses/losses.h, its gradients taken from the plain expressions by autograd.


def kl_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """Per sample KL(N(mu, exp(logvar)) || N(0, I)) = 0.5 sum (exp(logvar) - 1 - logvar + mu^2)."""
    return 0.5 * (logvar.exp() - 1 - logvar + mu * mu).flatten(1).sum(1)


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return values
    return values.mean() if reduction == "mean" else values.sum()


def reparameterize(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """mu + exp(0.5 logvar) eps as eager code writes it, eps from torch.randn (not the kernels' Philox
    stream: see reparam_forward for that); genfast's ops run it under torch.func transforms."""
    eps = (
        torch.randn(mu.shape, dtype=mu.dtype, device=mu.device, generator=generator)
        if generator is not None
        else torch.randn_like(mu)
    )
    return mu + torch.exp(0.5 * logvar) * eps


def kl_divergence(mu: Tensor, logvar: Tensor, reduction: str = "mean") -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the last dimension, then reduced over the rest."""
    return _reduce(0.5 * (torch.expm1(logvar) - logvar + mu * mu).sum(-1), reduction)


def elbo_terms(
    recon: Tensor,
    target: Tensor,
    mu: Tensor,
    logvar: Tensor,
    beta: float = 1.0,
    recon_loss: str = "bce",
    reduction: str = "mean",
) -> tuple[Tensor, Tensor, Tensor]:
    """(negative ELBO, reconstruction term, KL term), each reduced over the batch by `reduction`."""
    t = target_values(target, recon.dtype)
    if recon_loss == "bce":
        per_element = F.binary_cross_entropy_with_logits(recon, t, reduction="none")
    else:
        per_element = (recon - t) ** 2
    r = per_element.flatten(1).sum(1)
    k = kl_standard_normal(mu, logvar)
    return _reduce(r + beta * k, reduction), _reduce(r, reduction), _reduce(k, reduction)


def gan_term(x: Tensor, code: int, param: float) -> Tensor:
    """The elementwise term f(x; p) of genfast.loss_terms, as plain PyTorch."""
    if code == TERMS["bce"]:
        return F.binary_cross_entropy_with_logits(x, torch.full_like(x, param), reduction="none")
    if code == TERMS["hinge"]:
        return F.relu(1 + param * x)
    if code == TERMS["square"]:
        return 0.5 * (x - param) ** 2
    return param * x


def gan_loss(first: Tensor, second: Tensor | None, term0: Term, term1: Term | None, reduction: str) -> Tensor:
    """Term 0 over `first` plus term 1 over `second` (if given), each reduced by `reduction`."""
    f0 = gan_term(first, *term0)
    if reduction == "none":
        return f0 if second is None else f0 + gan_term(second, *term1)
    loss = _reduce(f0, reduction)
    return loss if second is None else loss + _reduce(gan_term(second, *term1), reduction)


def discriminator_loss(
    real_logits: Tensor,
    fake_logits: Tensor,
    kind: str = "nonsaturating",
    real_label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    return gan_loss(
        real_logits, fake_logits, real_term(kind, real_label_smoothing), GAN_KINDS[kind].fake, reduction
    )


def generator_loss(fake_logits: Tensor, kind: str = "nonsaturating", reduction: str = "mean") -> Tensor:
    return gan_loss(fake_logits, None, GAN_KINDS[kind].generator, None, reduction)


def gan_term_derivative(x: Tensor, code: int, param: float) -> Tensor:
    """d gan_term(x; p) / dx, NaN where x is NaN."""
    if code == TERMS["bce"]:
        d = torch.sigmoid(x) - param
    elif code == TERMS["hinge"]:
        d = torch.where(1 + param * x > 0, param, 0.0)
    elif code == TERMS["square"]:
        d = x - param
    else:
        d = torch.full_like(x, param)
    return torch.where(x.isnan(), x, d)


def _name(table: dict[str, int], code: int) -> str:
    return next(name for name, c in table.items() if c == code)


# The contract functions run inside custom ops, where autograd does not record: gradients are written
# out here (the tests check them against autograd of the plain expressions above). They compute in
# float64 and round once: as the fallback backend they must never be less accurate than eager code.


def losses_elbo_forward(
    recon: Tensor,
    target: Tensor,
    mu: Tensor,
    logvar: Tensor,
    beta: float,
    recon_kind: int,
    reduction: int,
    target_scale: float,
    need_grad: bool,
):
    x, m, lv = (v.double() for v in (recon, mu, logvar))
    t = target.double() * target_scale
    bce = recon_kind == RECON_LOSSES["bce"]
    outputs = elbo_terms(x, t, m, lv, beta, _name(RECON_LOSSES, recon_kind), _name(REDUCTIONS, reduction))
    grads = [x.new_empty(0) for _ in range(3)]  # distinct: a custom op's outputs must not alias
    if need_grad:
        c = 1.0 / x.shape[0] if reduction == REDUCTIONS["mean"] else 1.0
        grads = [c * (torch.sigmoid(x) - t if bce else 2 * (x - t)), c * m, c * 0.5 * torch.expm1(lv)]
    return tuple(v.to(recon.dtype) for v in (*outputs, *grads))


def losses_gan_forward(
    first: Tensor,
    second: Tensor,
    term0: int,
    param0: float,
    term1: int,
    param1: float,
    reduction: int,
    need_grad: bool,
):
    red = _name(REDUCTIONS, reduction)
    segments = ((first.double(), Term(term0, param0)), (second.double(), Term(term1, param1)))
    # The mean over an empty segment counts 0 (a generator loss has no second segment).
    f0, f1 = (
        x.sum() if red == "mean" and x.numel() == 0 else gan_loss(x, None, term, None, red)
        for x, term in segments
    )
    loss = f0 + f1 if red != "none" or second.numel() else f0
    grads = [first.new_empty(0) for _ in range(2)]
    if need_grad:
        grads = [
            gan_term_derivative(x, *term) / (x.numel() if red == "mean" and x.numel() else 1)
            for x, term in segments
        ]
    return tuple(v.to(first.dtype) for v in (loss, *grads))


# ---------------------------------------------------------------------------------------------------
# Reparameterization and the Gaussian KL: the noise of csrc/common/philox.h in PyTorch integer ops,
# then the kernel contract of csrc/reparam/reparam.h, computed in float64 and rounded once.

_MASK32 = 0xFFFFFFFF
_PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of a * b for int64 tensors a of 32-bit values: b split in 16-bit halves keeps
    every product below 2^48 (int64 has no unsigned 64-bit multiply)."""
    low, high = a * (b & 0xFFFF), a * (b >> 16)
    return (high + (low >> 16)) >> 16, (((high & 0xFFFF) << 16) + low) & _MASK32


def philox_bits(seed: int, offset: int, groups: Tensor) -> list[Tensor]:
    """Philox4x32-10 with key = seed, counter = (offset, group) as four 32-bit words: 4 int64 tensors."""
    key = [seed & _MASK32, (seed >> 32) & _MASK32]
    words = [
        torch.full_like(groups, offset & _MASK32),
        torch.full_like(groups, (offset >> 32) & _MASK32),
        groups & _MASK32,
        (groups >> 32) & _MASK32,
    ]
    for _ in range(10):
        hi0, lo0 = _mulhilo32(words[0], _PHILOX_MULTIPLIERS[0])
        hi1, lo1 = _mulhilo32(words[2], _PHILOX_MULTIPLIERS[1])
        words = [hi1 ^ words[1] ^ key[0], lo1, hi0 ^ words[3] ^ key[1], lo0]
        key = [(k + step) & _MASK32 for k, step in zip(key, _PHILOX_KEY_STEPS)]
    return words


def philox_normal(seed: int, offset: int, numel: int, device: torch.device | str | None = None) -> Tensor:
    """The float32 noise eps[0:numel] of state (seed, offset), as every backend draws it (philox.h)."""
    groups = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    uniform = [((bits >> 8).to(torch.float32) + 0.5) * 2.0**-24 for bits in philox_bits(seed, offset, groups)]
    normals = []
    for radius_u, angle_u in (uniform[0:2], uniform[2:4]):
        radius, angle = torch.sqrt(-2.0 * torch.log(radius_u)), 6.283185307179586 * angle_u
        normals += [radius * torch.cos(angle), radius * torch.sin(angle)]
    return torch.stack(normals, dim=1).reshape(-1)[:numel]


def noise(rng_state: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The float32 eps of `shape` that a call with `rng_state` drew (and its backward draws again)."""
    seed, offset = (int(v) & (2**64 - 1) for v in rng_state.tolist())
    n = 1
    for size in shape:
        n *= size
    return philox_normal(seed, offset, n, rng_state.device).view(shape)


def reparam_forward(
    mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    rng_state = new_rng_state(mu.device, generator)
    eps = noise(rng_state, mu.shape).double()
    return (mu.double() + torch.exp(0.5 * logvar.double()) * eps).to(mu.dtype), rng_state


def reparam_backward(grad_z: Tensor, logvar: Tensor, rng_state: Tensor) -> Tensor:
    eps = noise(rng_state, logvar.shape).double()
    return (0.5 * grad_z.double() * eps * torch.exp(0.5 * logvar.double())).to(logvar.dtype)


def kl_forward(mu: Tensor, logvar: Tensor) -> Tensor:
    """(rows,) KL of each row of the last dimension, in float64."""
    m, lv = mu.double(), logvar.double()
    return (0.5 * (torch.expm1(lv) - lv + m * m).sum(-1)).reshape(-1)


def kl_backward(grad_kl: Tensor, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    g = grad_kl.double().view(*mu.shape[:-1], 1)
    return (g * mu.double()).to(mu.dtype), (0.5 * g * torch.expm1(logvar.double())).to(mu.dtype)


def reparam_kl_forward(
    mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    return (*reparam_forward(mu, logvar, generator), kl_forward(mu, logvar))


def reparam_kl_backward(
    grad_z: Tensor, grad_kl: Tensor, mu: Tensor, logvar: Tensor, rng_state: Tensor
) -> tuple[Tensor, Tensor]:
    """(grad_mu, grad_logvar) of reparam_kl_forward: the sampling and KL gradients summed, rounded once."""
    eps = noise(rng_state, logvar.shape).double()
    g = grad_kl.double().view(*mu.shape[:-1], 1)
    gz, m, lv = grad_z.double(), mu.double(), logvar.double()
    grad_logvar = 0.5 * (gz * eps * torch.exp(0.5 * lv) + g * torch.expm1(lv))
    return (gz + g * m).to(mu.dtype), grad_logvar.to(mu.dtype)
