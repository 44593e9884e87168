"""The classic MNIST autoencoder: 784-600-400-200 with ReLU, the mirrored decoder, a Sigmoid output."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from genfast.models._twin import TwinModel, check_sizes, mlp


class Autoencoder(TwinModel):
    """encoder: sizes with ReLU after every layer; decoder: the sizes reversed, ReLU, then Sigmoid.

    Args:
        sizes: (input, hidden..., code) features; default the classic (784, 600, 400, 200).
        fused: genfast's FusedLinear layers (True) or plain nn.Linear + activation (False).
    """

    def __init__(self, sizes: tuple[int, ...] = (784, 600, 400, 200), fused: bool = True) -> None:
        super().__init__()
        self.sizes = check_sizes("sizes", sizes, at_least=2)  # (input, code) at the least
        self.encoder = mlp(self.sizes, nn.ReLU(), last=nn.ReLU())
        self.decoder = mlp(self.sizes[::-1], nn.ReLU(), last=nn.Sigmoid())
        self._finish(fused)

    def forward(self, x: Tensor) -> Tensor:
        """(B, input) in [0, 1] -> the reconstruction (B, input) in [0, 1]."""
        return self.decoder(self.encoder(x.flatten(1)))

    def loss(self, x: Tensor) -> Tensor:
        """Mean squared error of the reconstruction, averaged over every element."""
        x = x.flatten(1)
        return F.mse_loss(self(x), x)

    def reconstruct(self, x: Tensor) -> Tensor:
        return self(x)
