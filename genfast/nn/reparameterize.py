"""Reparameterize: the VAE sampling step as a module (samples in training, returns mu in eval)."""

from __future__ import annotations

import torch
from torch import Tensor

from genfast.ops.reparam import reparameterize


class Reparameterize(torch.nn.Module):
    """``z = mu + exp(0.5 * logvar) * eps`` with in-kernel noise (genfast.reparameterize).

    In training mode it samples; in eval mode it returns ``mu`` (the posterior mean), unless
    ``sample_in_eval`` is True (e.g. to draw reconstructions from a trained model). No parameters.
    """

    def __init__(self, sample_in_eval: bool = False) -> None:
        super().__init__()
        self.sample_in_eval = sample_in_eval

    def forward(self, mu: Tensor, logvar: Tensor) -> Tensor:
        if self.training or self.sample_in_eval:
            return reparameterize(mu, logvar)
        return mu

    def extra_repr(self) -> str:
        return f"sample_in_eval={self.sample_in_eval}"
