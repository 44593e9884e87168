"""FusedLinear: nn.Linear with its activation fused in (same parameters, init and state_dict)."""

from __future__ import annotations

import torch
from torch import Tensor

from genfast.activations import get_activation
from genfast.ops.dense import fused_dense


class FusedLinear(torch.nn.Linear):
    """``act(nn.Linear(x))`` as one genfast op.

    A subclass of nn.Linear, so initialisation, parameters and ``state_dict`` keys are nn.Linear's
    and checkpoints load either way. ``activation`` is one of genfast.activations' names.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str | None = "relu",
        negative_slope: float = 0.01,
        device=None,
        dtype=None,
    ) -> None:
        self.activation = get_activation(activation).name
        self.negative_slope = float(negative_slope)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        return fused_dense(input, self.weight, self.bias, self.activation, self.negative_slope)

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return f"{super().extra_repr()}, activation={self.activation!r}{slope}"
