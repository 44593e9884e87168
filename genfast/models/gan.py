"""The classic MLP GAN for MNIST: generator 100-128-256-512-1024-784 (ReLU, Tanh output), discriminator
784-512-256-128-1 (LeakyReLU 0.2) producing logits, trained with genfast's GAN losses."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from genfast import reference
from genfast.loss_terms import GAN_KINDS
from genfast.models._twin import TwinModel, check_sizes, mlp
from genfast.ops.losses import discriminator_loss, generator_loss


class GAN(TwinModel):
    """Generator and discriminator MLPs; images in [-1, 1] (Tanh), flattened.

    Args:
        generator_sizes: (noise, hidden..., image); default (100, 128, 256, 512, 1024, 784).
        discriminator_sizes: (image, hidden..., 1); default (784, 512, 256, 128, 1).
        kind: the GAN loss: "nonsaturating", "hinge", "lsgan" or "wasserstein".
        fused: genfast's layers and fused losses (True) or plain PyTorch (False).
    """

    def __init__(
        self,
        generator_sizes: tuple[int, ...] = (100, 128, 256, 512, 1024, 784),
        discriminator_sizes: tuple[int, ...] = (784, 512, 256, 128, 1),
        kind: str = "nonsaturating",
        fused: bool = True,
    ) -> None:
        super().__init__()
        if kind not in GAN_KINDS:
            raise ValueError(f"kind: expected one of {sorted(GAN_KINDS)}, got {kind!r}")
        generator_sizes = check_sizes("generator_sizes", generator_sizes, at_least=2)
        discriminator_sizes = check_sizes("discriminator_sizes", discriminator_sizes, at_least=2)
        if generator_sizes[-1] != discriminator_sizes[0] or discriminator_sizes[-1] != 1:
            raise ValueError(
                f"the generator's output ({generator_sizes[-1]}) must be the discriminator's input "
                f"({discriminator_sizes[0]}), and the discriminator must end in 1 logit"
            )
        self.noise_features, self.kind = generator_sizes[0], kind
        self.generator = mlp(generator_sizes, nn.ReLU(), last=nn.Tanh())
        self.discriminator = mlp(discriminator_sizes, nn.LeakyReLU(0.2))
        self._finish(fused)

    def noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        p = next(self.parameters())
        return torch.randn(n, self.noise_features, generator=generator, device=p.device, dtype=p.dtype)

    def forward(self, noise: Tensor) -> Tensor:
        """noise (B, noise_features) -> images (B, image features) in [-1, 1]."""
        return self.generator(noise)

    def discriminate(self, images: Tensor) -> Tensor:
        """images (B, ...) -> logits (B, 1)."""
        return self.discriminator(images.flatten(1))

    def discriminator_loss(self, real: Tensor, fake: Tensor) -> Tensor:
        """The discriminator's loss on real images and (detached) fakes."""
        real_logits, fake_logits = self.discriminate(real), self.discriminate(fake.detach())
        loss = discriminator_loss if self.fused else reference.discriminator_loss
        return loss(real_logits, fake_logits, self.kind)

    def generator_loss(self, fake: Tensor) -> Tensor:
        """The generator's loss on fakes (gradients flow through the discriminator into the generator)."""
        loss = generator_loss if self.fused else reference.generator_loss
        return loss(self.discriminate(fake), self.kind)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n generated images in [0, 1] (for pictures)."""
        return (self(self.noise(n, generator)) + 1) / 2
