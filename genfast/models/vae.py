"""The VAE of Kingma & Welling as the PyTorch example builds it: 784-400-(20, 20), decoder 20-400-784."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from genfast import reference
from genfast.loss_terms import target_values
from genfast.models._twin import TwinModel, check_positive, check_sizes, mlp
from genfast.nn.reparameterize import Reparameterize
from genfast.ops.losses import elbo_loss


class VAE(TwinModel):
    """MLP encoder to (mu, logvar), sampling z, MLP decoder to Bernoulli logits; negative ELBO loss.

    Args:
        in_features: input features (784 for MNIST); inputs are probabilities in [0, 1] (or uint8 pixels).
        hidden: hidden sizes of the encoder (the decoder mirrors them); default (400,).
        latent: size of z; default 20.
        beta: weight of the KL term in the loss (beta-VAE); 1 is the ELBO.
        fused: genfast's layers, sampling and fused ELBO (True) or plain PyTorch (False).
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: tuple[int, ...] = (400,),
        latent: int = 20,
        beta: float = 1.0,
        fused: bool = True,
    ) -> None:
        super().__init__()
        check_positive("in_features", in_features)
        check_positive("latent", latent)
        hidden = check_sizes("hidden", hidden, at_least=0)
        if not math.isfinite(beta) or beta < 0:
            raise ValueError(f"beta: expected a finite number >= 0, got {beta}")
        self.in_features, self.latent, self.beta = in_features, latent, float(beta)
        self.encoder = mlp((in_features, *hidden, 2 * latent), nn.ReLU())
        self.decoder = mlp((latent, *hidden[::-1], in_features), nn.ReLU())
        self.sample_z: nn.Module = Reparameterize() if fused else PlainReparameterize()
        self._finish(fused)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, ...) probabilities, or uint8 pixels (0..255 read as 0..1) -> mu, logvar (B, latent)."""
        mu, logvar = self.encoder(target_values(x.flatten(1), self._dtype())).chunk(2, dim=-1)
        return mu, logvar

    def forward(self, x: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x (B, in_features) -> (logits, mu, logvar, z). z = mu + exp(0.5 logvar) eps with eps drawn
        inside genfast's kernel (fused), by torch.randn_like (plain), or given (`eps`, e.g. to replay
        the noise of another run). In eval mode z = mu unless eps is given."""
        mu, logvar = self.encode(x)
        if eps is not None:
            z = mu + torch.exp(0.5 * logvar) * eps
        else:
            z = self.sample_z(mu, logvar)  # mu in eval mode
        return self.decoder(z), mu, logvar, z

    def loss(self, x: Tensor, eps: Tensor | None = None, return_terms: bool = False):
        """Negative ELBO per sample (BCE of the logits + beta KL), averaged over the batch; with
        return_terms, (loss, reconstruction term, KL term)."""
        logits, mu, logvar, _ = self(x, eps)
        target = x.flatten(1)
        if target.dtype not in (torch.uint8, torch.bool):
            target = target.to(logits.dtype)
        if self.fused:
            terms = elbo_loss(logits, target, mu, logvar, beta=self.beta, return_terms=True)
        else:
            terms = reference.elbo_terms(logits, target, mu, logvar, beta=self.beta)
        return terms if return_terms else terms[0]

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images decoded from z ~ N(0, I): probabilities (n, in_features)."""
        z = torch.randn(n, self.latent, generator=generator, device=self._device(), dtype=self._dtype())
        return torch.sigmoid(self.decoder(z))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The decoded posterior mean of x: probabilities of x's flattened shape."""
        return torch.sigmoid(self.decoder(self.encode(x)[0]))

    def plain(self) -> "VAE":
        twin = super().plain()
        twin.sample_z = PlainReparameterize()
        return twin

    def fused_copy(self) -> "VAE":
        twin = super().fused_copy()
        twin.sample_z = Reparameterize()
        return twin

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class PlainReparameterize(nn.Module):
    """The sampling step as plain PyTorch writes it (eps from torch.randn_like, kept for backward); mu in
    eval mode, like genfast.nn.Reparameterize."""

    def forward(self, mu: Tensor, logvar: Tensor) -> Tensor:
        if not self.training:
            return mu
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
