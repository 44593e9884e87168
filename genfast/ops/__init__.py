"""torch.library custom ops, one module per op family; the only layer that calls kernels."""

from genfast.ops.dense import fused_dense
from genfast.ops.losses import discriminator_loss, elbo_loss, generator_loss, r1_penalty
from genfast.ops.reparam import kl_divergence, reparameterize, reparameterize_kl

__all__ = [
    "discriminator_loss",
    "elbo_loss",
    "fused_dense",
    "generator_loss",
    "kl_divergence",
    "r1_penalty",
    "reparameterize",
    "reparameterize_kl",
]
