"""What every model shares: built from plain PyTorch layers, converted to genfast's, with a plain twin."""

from __future__ import annotations

import copy

from torch import nn

from genfast.nn.convert import convert, revert


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_positive(name: str, value: int) -> None:
    if not _positive_int(value):
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def check_sizes(name: str, sizes: tuple[int, ...], at_least: int) -> tuple[int, ...]:
    """`sizes` as a tuple, or ValueError naming `name` unless it holds at least `at_least` positive ints."""
    sizes = tuple(sizes)
    if len(sizes) < at_least or not all(_positive_int(s) for s in sizes):
        least = f"at least {at_least} " if at_least else ""
        raise ValueError(f"{name}: expected {least}positive integers, got {sizes}")
    return sizes


def mlp(sizes: tuple[int, ...], activation: nn.Module, last: nn.Module | None = None) -> nn.Sequential:
    """Linear layers of `sizes` with `activation` after each but the last, which gets `last` (if any).

    Each activation gets its own slot, so convert() fuses it into the Linear before it and the
    state_dict keys (0.weight, 2.weight, ...) are the plain MLP's."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        act = activation if i < len(sizes) - 2 else last
        if act is not None:
            layers.append(copy.deepcopy(act))
    return nn.Sequential(*layers)


class TwinModel(nn.Module):
    """A model whose layers are genfast's (fused=True) or plain PyTorch's, with the same state_dict.

    Subclasses build plain PyTorch modules and call ``self._finish(fused)``; ``self.fused`` tells their
    forward and loss which ops to use (genfast's fused ops or the plain expressions).
    """

    fused: bool

    def _finish(self, fused: bool) -> None:
        self.fused = fused
        if fused:
            convert(self)

    def plain(self) -> "TwinModel":
        """A copy built of plain PyTorch modules and ops only, with the same weights and state_dict keys."""
        twin = copy.deepcopy(self)
        revert(twin)
        twin.fused = False
        return twin

    def fused_copy(self) -> "TwinModel":
        """A copy built of genfast's layers and fused ops, with the same weights and state_dict keys."""
        twin = copy.deepcopy(self)
        convert(twin)
        twin.fused = True
        return twin
