"""The fused losses against the same losses as common PyTorch code writes them (eager and torch.compile).

ELBO: ``F.binary_cross_entropy_with_logits(reduction="sum")`` + the closed-form KL, over the batch (the
PyTorch VAE example), on MNIST-like (batch, 784) inputs, batch 64 to 65536. GAN: the discriminator and
generator losses of each kind on (batch, 1) logits, batch 64 to 4096. Forward + backward ("both"), the
inputs requiring grad (the target does not).

``bytes`` is the least any implementation must move for forward + backward: read every input once,
write every gradient once. genfast's forward writes the gradients; its backward hands them back where the
loss's gradient is exactly 1 on the CPU (these cases), and elsewhere reads and rewrites them (there its
fraction of the bandwidth bound is at most 3/5 for the ELBO).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import genfast
from benchmarks.cases.common import DTYPES, QUICK_DTYPE, Contender, contenders_of, make_step, short_dtype

_LATENT = 32


@dataclass(frozen=True)
class LossCase:
    loss: str  # "elbo", "discriminator" or "generator"
    batch: int
    features: int  # 784 for the ELBO, 1 (one logit per sample) for the GAN losses
    kind: str  # recon_loss ("bce", "mse") for the ELBO, the GAN kind otherwise
    dtype: str
    mode: str = "both"

    @property
    def name(self) -> str:
        return f"{self.loss} {self.kind} {self.batch}x{self.features} {short_dtype(self.dtype)} {self.mode}"

    @property
    def flops(self) -> int:
        return 0  # memory-bound: see bytes

    @property
    def bytes(self) -> int:
        """Forward + backward, at the least: each input read once, each gradient written once."""
        e = torch.finfo(getattr(torch, self.dtype)).bits // 8
        if self.loss == "elbo":  # recon, target, mu, logvar in; grad_recon, grad_mu, grad_logvar out
            return e * (3 * self.batch * self.features + 4 * self.batch * _LATENT)
        tensors = 2 if self.loss == "discriminator" else 1
        return e * 2 * tensors * self.batch * self.features


def _cases(device_type: str) -> tuple[LossCase, ...]:
    dtypes = DTYPES[device_type]
    elbo_batches = (64, 256, 1024, 4096, 16384, 65536)
    cases = [LossCase("elbo", b, 784, "bce", dtype) for dtype in dtypes for b in elbo_batches]
    cases += [LossCase("elbo", 4096, 784, "mse", dtype) for dtype in dtypes]
    for dtype in dtypes:
        for loss in ("discriminator", "generator"):
            cases += [
                LossCase(loss, b, 1, kind, dtype)
                for kind in ("nonsaturating", "hinge")
                for b in (64, 256, 1024, 4096)
            ]
            cases += [
                LossCase(loss, b, 1, kind, dtype) for kind in ("lsgan", "wasserstein") for b in (64, 4096)
            ]
    return tuple(cases)


CASES: dict[str, tuple[LossCase, ...]] = {device_type: _cases(device_type) for device_type in DTYPES}
QUICK_CASES: dict[str, tuple[LossCase, ...]] = {
    device_type: (
        LossCase("elbo", 256, 784, "bce", dtype),
        LossCase("discriminator", 64, 1, "nonsaturating", dtype),
    )
    for device_type, dtype in QUICK_DTYPE.items()
}


# ---------------------------------------------------------------------------------------------------
# The losses as common PyTorch code writes them.


def eager_elbo(recon: Tensor, target: Tensor, mu: Tensor, logvar: Tensor, recon_loss: str) -> Tensor:
    if recon_loss == "bce":
        reconstruction = F.binary_cross_entropy_with_logits(recon, target, reduction="sum")
    else:
        reconstruction = F.mse_loss(recon, target, reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return (reconstruction + kld) / recon.shape[0]


def eager_discriminator(real: Tensor, fake: Tensor, kind: str) -> Tensor:
    if kind == "nonsaturating":
        return F.binary_cross_entropy_with_logits(
            real, torch.ones_like(real)
        ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    if kind == "lsgan":
        return 0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake**2).mean()
    return fake.mean() - real.mean()


def eager_generator(fake: Tensor, kind: str) -> Tensor:
    if kind == "nonsaturating":
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    if kind == "lsgan":
        return 0.5 * ((fake - 1) ** 2).mean()
    return -fake.mean()


# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Setup:
    inputs: tuple[Tensor, ...]
    grad_output: Tensor
    eager: Callable[..., Tensor]
    genfast: Callable[..., Tensor]
    compiled: Callable[..., Tensor]


@functools.lru_cache(maxsize=1)
def _setup(case: LossCase, device: torch.device) -> _Setup:
    torch.manual_seed(0)
    kw = {"device": device, "dtype": getattr(torch, case.dtype)}
    if case.loss == "elbo":
        target = torch.rand(case.batch, case.features, **kw)
        inputs = tuple(
            torch.randn(case.batch, n, **kw).requires_grad_() for n in (case.features, _LATENT, _LATENT)
        )

        def eager(recon, mu, logvar):
            return eager_elbo(recon, target, mu, logvar, case.kind)

        def ours(recon, mu, logvar):
            return genfast.elbo_loss(recon, target, mu, logvar, recon_loss=case.kind)

    else:
        count = 2 if case.loss == "discriminator" else 1
        inputs = tuple(torch.randn(case.batch, case.features, **kw).requires_grad_() for _ in range(count))
        eager = functools.partial(eager_discriminator if count == 2 else eager_generator, kind=case.kind)
        ours = functools.partial(
            genfast.discriminator_loss if count == 2 else genfast.generator_loss, kind=case.kind
        )
    torch._dynamo.reset()  # a fresh Dynamo state per case: no recompile limit, no shape made dynamic
    return _Setup(inputs, torch.ones((), **kw), eager, ours, torch.compile(eager, dynamic=False))


def contenders(case: LossCase, device: torch.device) -> dict[str, Contender]:
    """genfast on each backend of `device`, eager and torch.compile, all on the same inputs."""
    setup = _setup(case, device)
    step = functools.partial(make_step, inputs=setup.inputs, grad_output=setup.grad_output, mode=case.mode)
    return contenders_of(step, setup.genfast, {"eager": setup.eager, "compile": setup.compiled}, device)
