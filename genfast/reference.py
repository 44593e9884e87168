"""Pure-PyTorch reference of every op: the ground truth of the tests and the last-resort backend.

``fused_dense`` is the plain differentiable expression (tests evaluate it in float64). The
``<op>_forward``/``<op>_backward`` pairs implement the kernel contract of the other backends
(``csrc/<op>/<op>.h``) with PyTorch operations, saved tensors in the same layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from genfast.activations import ACTIVATIONS, get_activation

_BY_CODE = {a.code: a for a in ACTIVATIONS.values()}
_BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.int32)


def fused_dense(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = "relu",
                negative_slope: float = 0.01) -> Tensor:
    """act(x @ weight^T + bias), differentiable by autograd."""
    return get_activation(activation).forward(F.linear(x, weight, bias), negative_slope)


def mask_row_bytes(n: int) -> int:
    """Bytes per row of a packed relu mask: n bits padded to a multiple of 128."""
    return (n + 127) // 128 * 16


def pack_mask(positive: Tensor) -> Tensor:
    """(M, N) bool -> (M, mask_row_bytes(N)) uint8, bit j of a row in byte j // 8, bit j % 8."""
    m, n = positive.shape
    padded = F.pad(positive.to(torch.int32), (0, mask_row_bytes(n) * 8 - n))
    weights = _BIT_WEIGHTS.to(positive.device)
    return (padded.view(m, -1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_mask(mask: Tensor, n: int) -> Tensor:
    """Inverse of pack_mask: (M, mask_row_bytes(n)) uint8 -> (M, n) bool."""
    bits = (mask.to(torch.int32).unsqueeze(-1) // _BIT_WEIGHTS.to(mask.device)) % 2
    return bits.flatten(1)[:, :n].bool()


def dense_forward(x: Tensor, weight: Tensor, bias: Tensor | None, act: int, slope: float):
    activation = _BY_CODE[act]
    z = F.linear(x, weight, bias)
    y = activation.forward(z, slope)
    if activation.saves == "mask":
        return y, pack_mask(z > 0)
    if activation.saves == "preact":
        return y, z
    return y, x.new_empty(0)


def dense_backward(grad_y: Tensor, x: Tensor, weight: Tensor, saved: Tensor, act: int, slope: float,
                   need_x: bool, need_w: bool, need_b: bool):
    activation = _BY_CODE[act]
    if activation.saves == "mask":
        saved = unpack_mask(saved, weight.shape[0])
    dz = grad_y if activation.saves == "none" else grad_y * activation.derivative(saved, slope).to(grad_y.dtype)
    empty = x.new_empty(0)
    return (
        dz @ weight if need_x else empty,
        dz.t() @ x if need_w else empty,
        dz.sum(0) if need_b else empty,
    )
