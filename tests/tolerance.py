"""The tolerance rule of DESIGN.md: genfast's error at most twice eager PyTorch's, plus 1e-6.

Error is the root-mean-square difference from the float64 reference. RMS rather than max: at low
precision a relu mask bit flips wherever z rounds across 0, in genfast and eager alike but not at
the same elements, and a max would compare two single coin flips instead of the error level.

Eager's error is floored at the error of the reference rounded to the dtype, which no result in that
dtype can beat: on a few values (a scalar loss) eager's error is a coin flip that can land near 0,
and the rule would then ask genfast for better than correct rounding.
"""

from __future__ import annotations

import torch


def rms_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    if reference.numel() == 0:
        return 0.0
    return float((value.detach().double() - reference.detach().double()).pow(2).mean().sqrt())


def assert_within_rule(name: str, value: torch.Tensor, eager: torch.Tensor, reference: torch.Tensor) -> None:
    assert value.shape == reference.shape, f"{name}: shape {tuple(value.shape)} != {tuple(reference.shape)}"
    assert value.dtype == eager.dtype, f"{name}: dtype {value.dtype}, eager gives {eager.dtype}"
    ours = rms_error(value, reference)
    theirs = max(rms_error(eager, reference), rms_error(reference.to(value.dtype), reference))
    assert ours <= 2 * theirs + 1e-6, (
        f"{name}: genfast error {ours:.3g} > 2 x eager error {theirs:.3g} + 1e-6"
    )
