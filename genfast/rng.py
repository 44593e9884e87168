"""The rng_state of genfast's random ops: an int64 (2,) tensor (seed, offset) naming the Philox stream a
call drew its noise from (csrc/common/philox.h), which its backward draws again.

A leaf module: the Triton launchers and the reference backend draw their state here (the C++ kernels
draw theirs in C++), from PyTorch's generator, so torch.manual_seed makes every backend deterministic.
"""

from __future__ import annotations

import torch
from torch import Tensor


def new_rng_state(device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """(seed, offset = 0) for one call: one seed drawn from `generator` (default: the device's), on
    `device`, so a launch reads it without a host sync and a CUDA graph replays whatever it holds."""
    seed = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=device, generator=generator)
    return torch.cat([seed, seed.new_zeros(1)])
