"""What every family's cases share: case names, modes and dtypes, the contender record, the genfast backends
to time and the contenders they make."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from genfast.backend import why_unusable

_NATIVE_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
_SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

MODES = ("forward", "backward", "both")
DTYPES = {"cpu": ("float32",), "cuda": ("float32", "bfloat16")}
"""The dtypes a full run times per device type."""
QUICK_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
"""The one dtype a quick run times per device type."""


def short_dtype(dtype: str) -> str:
    """The dtype as case names spell it: fp32, bf16, fp16 (any other as it is)."""
    return _SHORT_DTYPE.get(dtype, dtype)


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


def make_step(
    fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], grad_output: torch.Tensor, mode: str
) -> Callable[[], object]:
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


def contenders_of(
    step: Callable[[Callable[..., object]], Callable[[], object]],
    ours: Callable[..., object],
    baselines: dict[str, Callable[..., object]],
    device: torch.device,
) -> dict[str, Contender]:
    """genfast's function `ours` pinned to each backend of `device`, then each of `baselines` unpinned,
    all made into timed callables by `step` (``make_step`` with the case's inputs and mode bound)."""
    result = {f"genfast:{b}": Contender(functools.partial(step, ours), b) for b in genfast_backends(device)}
    result.update({name: Contender(functools.partial(step, fn)) for name, fn in baselines.items()})
    return result
