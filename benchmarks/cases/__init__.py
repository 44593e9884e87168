"""The op families the suite knows, and what a family module provides.

A family is a module ``benchmarks/cases/<family>.py`` registered in ``FAMILIES``. It exposes
``CASES`` and ``QUICK_CASES`` (device type -> tuple of frozen case dataclasses, each with ``name``,
``dtype``, ``mode`` and ``flops``; optionally ``bytes``, the least traffic of a memory-bound case, ``steps``,
training steps per timed call, reported as steps/s, or ``calls``, op calls per timed call, reported as µs per
call) and ``contenders(case, device) -> dict[str, Contender]``: genfast on each backend this device has,
eager PyTorch and ``torch.compile``, on the same inputs.
"""

from __future__ import annotations

from types import ModuleType

from benchmarks.cases import dense, losses, overhead, reparam, training

FAMILIES: dict[str, ModuleType] = {
    "dense": dense,
    "losses": losses,
    "reparam": reparam,
    "training": training,
    "overhead": overhead,
}
