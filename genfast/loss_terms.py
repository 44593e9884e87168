"""The one table of the fused losses: integer codes and what each GAN kind computes.

The codes are those of ``csrc/losses/losses.h`` (tests/test_build.py checks they agree) and of the
Triton kernels. Every GAN loss is a sum of elementwise terms f(x; p) over logits x:

- ``"bce"``: softplus(x) - p x, binary cross-entropy with logits against target p;
- ``"hinge"``: max(1 + p x, 0);
- ``"square"``: 0.5 (x - p)^2;
- ``"linear"``: p x.

Each kind is the term and parameter it applies to the real logits, the fake logits (discriminator) and
the fake logits (generator), as published: non-saturating (Goodfellow et al. 2014), hinge (Lim & Ye
2017), least squares (Mao et al. 2017), Wasserstein (Arjovsky et al. 2017).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

RECON_LOSSES = {"bce": 0, "mse": 1}
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
TERMS = {"bce": 0, "hinge": 1, "square": 2, "linear": 3}
UINT8_TARGET_SCALE = 1.0 / 255.0
"""uint8 targets are pixel intensities 0..255 meaning 0..1 (bool targets are 0/1)."""
KL_ROWS_DTYPE = torch.float64
"""The per-row KL of every backend is float64 whatever the inputs' dtype (csrc/reparam/reparam.h)."""


def target_values(target: Tensor, dtype: torch.dtype) -> Tensor:
    """Targets as probabilities in `dtype`: uint8 pixels 0..255 mean 0..1, bool means 0/1."""
    values = target.to(dtype)
    return values * UINT8_TARGET_SCALE if target.dtype == torch.uint8 else values


class Term(NamedTuple):
    code: int
    param: float


NO_TERM = Term(TERMS["linear"], 0.0)
"""The second term of a generator loss, over an empty tensor (the cheapest term to compile)."""


class GanKind(NamedTuple):
    real: Term  # for real_label_smoothing s, a target p of 1 becomes 1 - s
    fake: Term
    generator: Term
    smoothable: bool  # whether real_label_smoothing means anything for this kind


GAN_KINDS: dict[str, GanKind] = {
    "nonsaturating": GanKind(Term(TERMS["bce"], 1.0), Term(TERMS["bce"], 0.0), Term(TERMS["bce"], 1.0), True),
    "hinge": GanKind(
        Term(TERMS["hinge"], -1.0), Term(TERMS["hinge"], 1.0), Term(TERMS["linear"], -1.0), False
    ),
    "lsgan": GanKind(
        Term(TERMS["square"], 1.0), Term(TERMS["square"], 0.0), Term(TERMS["square"], 1.0), True
    ),
    "wasserstein": GanKind(
        Term(TERMS["linear"], -1.0), Term(TERMS["linear"], 1.0), Term(TERMS["linear"], -1.0), False
    ),
}


def real_term(kind: str, real_label_smoothing: float) -> Term:
    """The term on the real logits, with the target 1 lowered to 1 - real_label_smoothing."""
    term = GAN_KINDS[kind].real
    return Term(term.code, term.param - real_label_smoothing) if GAN_KINDS[kind].smoothable else term


def code_of(table: dict[str, int], name: str, argument: str) -> int:
    """table[name], or a ValueError naming the argument and the choices."""
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"{argument}: expected one of {sorted(table)}, got {name!r}")
    return table[name]
