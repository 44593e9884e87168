"""A small character-level language model in the style of Bengio et al. (2003): the embeddings of the
last `context` characters, concatenated, through an MLP of FusedLinear layers, to next-character logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genfast.models._twin import TwinModel, check_positive, check_sizes, mlp


class LanguageModel(TwinModel):
    """Next-token logits from the previous `context` tokens (index 0 pads the start of a text).

    Args:
        vocab_size: number of tokens (characters).
        context: tokens the model sees; default 16.
        embedding: features per token; default 32.
        hidden: hidden sizes of the MLP (GELU); default (512, 512).
        fused: genfast's layers (True) or plain nn.Linear + GELU (False).
    """

    def __init__(
        self,
        vocab_size: int,
        context: int = 16,
        embedding: int = 32,
        hidden: tuple[int, ...] = (512, 512),
        fused: bool = True,
    ) -> None:
        super().__init__()
        if vocab_size < 2 or context < 1:
            raise ValueError(f"vocab_size must be >= 2 and context >= 1, got {vocab_size}, {context}")
        check_positive("embedding", embedding)
        hidden = check_sizes("hidden", hidden, at_least=0)
        self.vocab_size, self.context = vocab_size, context
        self.embed = nn.Embedding(vocab_size, embedding)
        self.mlp = mlp((context * embedding, *hidden, vocab_size), nn.GELU())
        self._finish(fused)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, context) int64 -> logits (B, vocab_size) of the token that follows."""
        return self.mlp(self.embed(tokens).flatten(1))

    def loss(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy."""
        return F.cross_entropy(self(tokens), targets)

    @torch.no_grad()
    def generate(
        self, prompt: list[int], n: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> list[int]:
        """Sample n tokens after `prompt` (token ids), one at a time."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        device = self.embed.weight.device
        tokens = [0] * self.context + list(prompt)
        for _ in range(n):
            window = torch.tensor([tokens[-self.context :]], device=device)
            probs = torch.softmax(self(window).float() / temperature, dim=-1)
            tokens.append(int(torch.multinomial(probs.cpu(), 1, generator=generator)))
        return tokens[self.context + len(prompt) :]
