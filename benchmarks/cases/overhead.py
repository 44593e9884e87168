"""Per-call overhead: forward + backward of an op at a shape so small that the time goes to Python, the
dispatcher and autograd rather than to arithmetic, against the same eager PyTorch code and its
torch.compile. The report gives each call's time in µs as well as in ms.

- ``fused_dense`` 64x100->128 relu against ``torch.relu(F.linear(x, weight, bias))``: functions, not
  nn modules, whose own call overhead would count against eager here;
- ``generator_loss`` nonsaturating on (64, 1) logits against
  ``F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))`` (``losses.eager_generator``);
- ``reparameterize`` 64x20 against ``mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)``
  (``reparam.eager_reparameterize``).

Every input requires grad; a call is the forward then ``torch.autograd.grad`` ("both"). float32 on each
device; a quick run has the same cases, as they are small already.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import genfast
from benchmarks.cases.common import Contender, contenders_of, make_step, short_dtype
from benchmarks.cases.losses import eager_generator
from benchmarks.cases.reparam import eager_reparameterize

OPS = ("fused_dense", "generator_loss", "reparameterize")
_DENSE_OUT = 128


@dataclass(frozen=True)
class OverheadCase:
    op: str  # one of OPS
    batch: int
    features: int  # fused_dense's in_features, reparameterize's latent size, 1 logit for the loss
    dtype: str = "float32"
    mode: str = "both"

    @property
    def name(self) -> str:
        shape = {
            "fused_dense": f"{self.batch}x{self.features}->{_DENSE_OUT} relu",
            "generator_loss": f"nonsaturating {self.batch}x{self.features}",
        }.get(self.op, f"{self.batch}x{self.features}")
        return f"{self.op} {shape} {short_dtype(self.dtype)} {self.mode}"

    @property
    def flops(self) -> int:
        return 0  # overhead-bound: no fraction of the matmul rate to report

    @property
    def calls(self) -> int:
        """Op calls per timed call (the report's µs per call)."""
        return 1


_CASES = (
    OverheadCase("fused_dense", 64, 100),
    OverheadCase("generator_loss", 64, 1),
    OverheadCase("reparameterize", 64, 20),
)
CASES: dict[str, tuple[OverheadCase, ...]] = {"cpu": _CASES, "cuda": _CASES}
QUICK_CASES = CASES


def _eager_dense(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return torch.relu(F.linear(x, weight, bias))


_EAGER: dict[str, Callable[..., Tensor]] = {
    "fused_dense": _eager_dense,
    "generator_loss": functools.partial(eager_generator, kind="nonsaturating"),
    "reparameterize": eager_reparameterize,
}


def _genfast(op: str) -> Callable[..., Tensor]:
    """genfast's op, looked up when a case is set up (importing the suite needs none of them)."""
    if op == "fused_dense":
        return functools.partial(genfast.fused_dense, activation="relu")
    if op == "generator_loss":
        return functools.partial(genfast.generator_loss, kind="nonsaturating")
    return genfast.reparameterize


def _inputs(case: OverheadCase, device: torch.device) -> tuple[tuple[Tensor, ...], Tensor]:
    """The op's inputs, all requiring grad, and the gradient of its output."""
    kw = {"device": device, "dtype": getattr(torch, case.dtype)}
    if case.op == "fused_dense":
        x = torch.randn(case.batch, case.features, **kw)
        weight = torch.randn(_DENSE_OUT, case.features, **kw) / math.sqrt(case.features)
        inputs = (x, weight, torch.randn(_DENSE_OUT, **kw))
        grad_output = torch.randn(case.batch, _DENSE_OUT, **kw)
    elif case.op == "generator_loss":
        inputs, grad_output = (torch.randn(case.batch, case.features, **kw),), torch.ones((), **kw)
    else:
        inputs = (torch.randn(case.batch, case.features, **kw), torch.randn(case.batch, case.features, **kw))
        grad_output = torch.randn(case.batch, case.features, **kw)
    return tuple(t.requires_grad_() for t in inputs), grad_output


def contenders(case: OverheadCase, device: torch.device) -> dict[str, Contender]:
    """genfast as a user gets it and on each backend of `device`, eager and torch.compile, on the same inputs."""
    torch.manual_seed(0)
    inputs, grad_output = _inputs(case, device)
    step = functools.partial(make_step, inputs=inputs, grad_output=grad_output, mode=case.mode)
    eager, ours = _EAGER[case.op], _genfast(case.op)
    torch._dynamo.reset()  # a fresh Dynamo state per case: no recompile limit, no shape made dynamic
    baselines = {"eager": eager, "compile": torch.compile(eager, dynamic=False)}
    return {
        "genfast:auto": Contender(functools.partial(step, ours)),
        **contenders_of(step, ours, baselines, device),
    }
