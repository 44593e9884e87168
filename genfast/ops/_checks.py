"""Input checks shared by the public ops: clear ValueError/TypeError before any kernel runs."""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value: object, dtypes=FLOAT_DTYPES) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {value.dtype}")
    return value


def check_same(names: tuple[str, ...], tensors: tuple[Tensor | None, ...]) -> None:
    """Same dtype and device for every tensor given (None entries are skipped)."""
    first = tensors[0]
    device, dtype = first.device, first.dtype
    for i in range(1, len(tensors)):  # (indexing, not zip over slices: this runs on every op call)
        t = tensors[i]
        if t is None:
            continue
        if t.device != device:
            raise ValueError(f"{names[i]} is on {t.device} but {names[0]} is on {device}")
        if t.dtype != dtype:
            raise TypeError(f"{names[i]} has dtype {t.dtype} but {names[0]} has dtype {dtype}")


def check_shape(name: str, tensor: Tensor, expected: tuple[int, ...]) -> None:
    if tensor.shape != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(tensor.shape)}")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast casts to on this device, or None (autocast off, or a device without autocast,
    such as meta)."""
    if not torch._C._is_any_autocast_enabled():  # the common case, in one cheap call (every op call asks)
        return None
    if not torch.amp.is_autocast_available(device.type) or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)
