"""What every family's cases share: the contender record and the genfast backends to time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from genfast.backend import why_unusable

_NATIVE_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


@dataclass(frozen=True)
class Contender:
    make: Callable[[], Callable[[], object]]
    """Prepares the inputs' graph if the mode needs one, then returns the callable to time."""
    backend: str | None = None
    """The genfast backend to pin while preparing and timing; None for the PyTorch baselines."""


def genfast_backends(device: torch.device) -> tuple[str, ...]:
    """genfast's compiled backends that can run on `device` here (reference if none can)."""
    usable = tuple(b for b in _NATIVE_BACKENDS.get(device.type, ()) if why_unusable(b, device.type) is None)
    return usable or ("reference",)


def make_step(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], grad_output: torch.Tensor,
              mode: str) -> Callable[[], object]:
    """The callable that times `mode` of ``fn(*inputs)``.

    "forward": the forward as in training (inputs require grad); "backward": the backward alone, on a
    graph built here once and retained; "both": forward then backward. Gradients are returned by
    ``torch.autograd.grad``, not accumulated into ``.grad``, so every repeat does the same work.
    """
    if mode == "forward":
        return lambda: fn(*inputs)
    if mode == "both":
        return lambda: torch.autograd.grad(fn(*inputs), inputs, grad_output)
    if mode == "backward":
        output = fn(*inputs)
        return lambda: torch.autograd.grad(output, inputs, grad_output, retain_graph=True)
    raise ValueError(f"mode: expected forward, backward or both, got {mode!r}")
