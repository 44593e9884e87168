"""Which implementation of an op runs: decided here and nowhere else.

From the tensor's device, what was built, and the pinned backend (``use_backend`` or the
``GENFAST_BACKEND`` environment variable, read once at import: a process-wide pin under every
``use_backend``). Unpinned, a CUDA tensor goes to ``cuda`` then ``triton``
then ``reference``, a CPU tensor to ``cpu`` then ``reference``; falling back past a missing backend
warns once. A pinned backend that cannot run raises.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import warnings
from typing import Iterator

import torch

from genfast import _extension

BACKENDS = ("reference", "cpu", "cuda", "triton")
_DEFAULT_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
# The process-wide pin of the environment, read once (os.environ.get costs 0.5 us, a third of a small
# layer's Python overhead), and use_backend's pin, local to the thread or asyncio task that set it: a
# pin in one thread must never move another thread's calls. Ops record the backend their forward ran
# on and run their backward there, so autograd's worker threads need no pin of their own.
_ENVIRONMENT_PIN: str | None = os.environ.get("GENFAST_BACKEND") or None
_context_pin: contextvars.ContextVar[str | None] = contextvars.ContextVar("genfast_backend", default=None)


def triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return triton.__version__


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def why_unusable(name: str, device_type: str) -> str | None:
    """None if backend `name` can run on tensors of `device_type`, else the reason it cannot."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; expected one of {BACKENDS}"
    if name == "reference":
        return None
    if name == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs on CPU tensors, got {device_type} tensors"
        return (
            None if _extension.has_cpu_kernels() else f"genfast._C did not load ({_extension.IMPORT_ERROR})"
        )
    if name == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device_type} tensors"
        return None if _extension.has_cuda_kernels() else "genfast._C was built without CUDA kernels"
    if triton_version() is None:
        return "triton is not installed"
    if device_type == "cuda" or (device_type == "cpu" and _triton_interpreted()):
        return None
    return f"triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device_type} tensors"


def pinned_backend() -> str | None:
    return _context_pin.get() or _ENVIRONMENT_PIN


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every genfast op that this thread (or asyncio task) calls inside the block on backend `name`
    (raises at the op if it can't run). Other threads keep their own pin; GENFAST_BACKEND is process-wide."""
    if name not in BACKENDS:
        raise ValueError(f"use_backend: unknown backend {name!r}; expected one of {BACKENDS}")
    token = _context_pin.set(name)
    try:
        yield
    finally:
        _context_pin.reset(token)


def select(device: torch.device) -> str:
    """The backend that runs an op whose tensors live on `device`."""
    pinned = _context_pin.get() or _ENVIRONMENT_PIN  # (pinned_backend() inlined: this runs on every op call)
    if pinned is not None:
        reason = why_unusable(pinned, device.type)
        if reason is not None:
            raise RuntimeError(f"genfast backend {pinned!r} was pinned but cannot run: {reason}")
        return pinned
    return _default_backend(device.type)


# device type -> its default backend. A plain dict, not functools.lru_cache: torch.compile traces select
# (fused_dense calls it) and Dynamo warns about every lru_cache wrapper it traces through.
_DEFAULTS: dict[str, str] = {}


# A constant to Dynamo: it calls the function while tracing instead of tracing it, so no graph guards
# on the cache (a first call under compile would fill it and force a recompile).
@torch.compiler.assume_constant_result
def _default_backend(device_type: str) -> str:
    """The first usable backend of the device's order (cached: what was built does not change at run
    time, and so each fallback warns once)."""
    cached = _DEFAULTS.get(device_type)
    if cached is not None:
        return cached
    chosen = "reference"
    for name in _DEFAULT_ORDER.get(device_type, ("reference",)):
        reason = why_unusable(name, device_type)
        if reason is None:
            chosen = name
            break
        warnings.warn(f"genfast: backend {name!r} unavailable ({reason}); falling back", stacklevel=4)
    _DEFAULTS[device_type] = chosen
    return chosen


def available_backends() -> list[str]:
    """Backends usable right now on some device of this machine."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS if any(why_unusable(b, d) is None for d in devices)]
