"""Classic generative models built from genfast's layers and fused ops, each with a plain PyTorch twin
(``model.plain()``) that has the same state_dict."""

from genfast.models.autoencoder import Autoencoder
from genfast.models.gan import GAN
from genfast.models.language import LanguageModel
from genfast.models.vae import VAE

__all__ = ["GAN", "VAE", "Autoencoder", "LanguageModel"]
