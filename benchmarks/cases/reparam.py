"""Reparameterization sampling and the Gaussian KL against the same code as common PyTorch writes it
(eager and torch.compile).

Three ops on (batch, latent) mu and logvar, both requiring grad, each in forward, backward and both
(``kl`` in both only: genfast's reduced KL writes its gradient in the forward pass, as the losses do, so
its forward alone does the backward's work and its backward alone hands the gradient back; only the two
together compare with code that splits the work the other way):

- ``reparameterize``: ``genfast.reparameterize(mu, logvar)`` against
  ``mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)``;
- ``kl``: ``genfast.kl_divergence(mu, logvar, reduction="mean")`` against
  ``0.5 * (logvar.exp() - 1 - logvar + mu * mu).sum(-1).mean()`` (KL to N(0, I), summed over the latent
  dimension, averaged over the batch);
- ``reparameterize_kl``: ``genfast.reparameterize_kl(mu, logvar, reduction="mean") -> (z, kl)`` against the
  two eager functions above called one after the other.

Shapes: VAE latents from the PyTorch example's (128, 20) up to (65536, 1024) = 2^26 elements, and
(8192, 8192): the same 2^26 elements in rows 8x longer (the KL reduces along rows). CUDA runs every op,
shape and mode in float32 and bfloat16. The CPU runs float32, every op on (4096, 1024) in "both", and of
the 2^26 shapes only sampling on (65536, 1024) in "both" (on 2 cores a call takes seconds, a case minutes).

``bytes`` is the least any implementation must move, N elements of the dtype per (batch, latent) tensor:
reparameterize forward reads mu, logvar and writes z (3N), backward reads grad_z, logvar and writes
grad_logvar (3N; grad_mu is grad_z itself); kl forward reads mu, logvar (2N), backward reads them again
and writes grad_mu, grad_logvar (4N), but both together need only read mu, logvar once and write the two
gradients (4N: genfast's reduced KL writes its gradient in the forward pass, as the losses do);
reparameterize_kl forward 3N, backward reads grad_z, mu, logvar and writes grad_mu, grad_logvar (5N);
both is otherwise the sum. The scalar KL and its gradient are not counted.
genfast regenerates the noise in backward from a (seed, offset) pair; eager and torch.compile store eps
in forward and read it back in backward, at least N more each way, and hold it in memory in between.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

import genfast
from benchmarks.cases.common import (
    DTYPES,
    MODES,
    QUICK_DTYPE,
    Contender,
    contenders_of,
    make_step,
    short_dtype,
)

OPS = ("reparameterize", "kl", "reparameterize_kl")
_Op = Callable[..., Tensor | tuple[Tensor, Tensor]]  # (mu, logvar) -> z, kl or (z, kl)
# Tensors of N elements each mode must read and write, at the least (see the module docstring).
_TRAFFIC = {
    "reparameterize": {"forward": 3, "backward": 3},
    "kl": {"both": 4},
    "reparameterize_kl": {"forward": 3, "backward": 5},
}


@dataclass(frozen=True)
class ReparamCase:
    op: str  # one of OPS
    batch: int
    latent: int
    dtype: str
    mode: str

    @property
    def name(self) -> str:
        return f"{self.op} {self.batch}x{self.latent} {short_dtype(self.dtype)} {self.mode}"

    @property
    def flops(self) -> int:
        return 0  # memory-bound: see bytes

    @property
    def bytes(self) -> int:
        """The least any implementation must read and write in this mode (the module docstring)."""
        traffic = _TRAFFIC[self.op]
        if self.mode in traffic:
            tensors = traffic[self.mode]
        else:  # both, where it is the sum of the two
            tensors = traffic["forward"] + traffic["backward"]
        return tensors * self.batch * self.latent * torch.finfo(getattr(torch, self.dtype)).bits // 8


_SHAPES = ((128, 20), (1024, 64), (4096, 256), (16384, 512))
# Beyond _SHAPES, as (shape, ops, modes). CPU: (4096, 1024), the size issue 14 holds the CPU kernels to
# (16 MiB per fp32 tensor), in "both"; of 2^26 elements (a call takes 1-4 s on 2 cores, a case minutes)
# sampling alone. CUDA: every op and mode of the 2^26 shapes.
_LARGE = {
    "cpu": (((4096, 1024), OPS, ("both",)), ((65536, 1024), ("reparameterize",), ("both",))),
    "cuda": (((65536, 1024), OPS, MODES), ((8192, 8192), OPS, MODES)),
}


def _full(device_type: str) -> tuple[ReparamCase, ...]:
    """Every op and mode of each shape; the modes of one (op, shape, dtype) next to each other (they share
    inputs and compiles)."""
    shapes = [(shape, OPS, MODES) for shape in _SHAPES] + list(_LARGE[device_type])
    return tuple(
        ReparamCase(op, batch, latent, dtype, mode)
        for dtype in DTYPES[device_type]
        for ((batch, latent), ops, modes) in shapes
        for op in ops
        for mode in modes
        if op != "kl" or mode == "both"
    )


CASES: dict[str, tuple[ReparamCase, ...]] = {device_type: _full(device_type) for device_type in DTYPES}
QUICK_CASES: dict[str, tuple[ReparamCase, ...]] = {
    device_type: tuple(ReparamCase(op, 128, 20, dtype, "both") for op in OPS)
    for device_type, dtype in QUICK_DTYPE.items()
}


# ---------------------------------------------------------------------------------------------------
# The ops as common PyTorch code writes them.


def eager_reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


def eager_kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    return 0.5 * (logvar.exp() - 1 - logvar + mu * mu).sum(-1).mean()


def eager_reparameterize_kl(mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    return eager_reparameterize(mu, logvar), eager_kl_divergence(mu, logvar)


_EAGER = {
    "reparameterize": eager_reparameterize,
    "kl": eager_kl_divergence,
    "reparameterize_kl": eager_reparameterize_kl,
}


def _genfast(op: str) -> _Op:
    """genfast's op, looked up when a case is set up (importing the suite needs none of them)."""
    if op == "reparameterize":
        return genfast.reparameterize
    if op == "kl":
        return functools.partial(genfast.kl_divergence, reduction="mean")
    return functools.partial(genfast.reparameterize_kl, reduction="mean")


# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Setup:
    inputs: tuple[Tensor, Tensor]
    grad_output: Tensor | tuple[Tensor, Tensor]
    eager: _Op
    genfast: _Op
    compiled: _Op


@functools.lru_cache(maxsize=1)
def _setup(op: str, batch: int, latent: int, dtype: str, device: torch.device, retain_graph: bool) -> _Setup:
    """Inputs and compiled baseline of one (op, shape, dtype), shared by the modes that run without a
    retained graph (compiled once for them, once more for the backward mode)."""
    torch.manual_seed(0)
    kw = {"device": device, "dtype": getattr(torch, dtype)}
    mu, logvar = (torch.randn(batch, latent, **kw).requires_grad_() for _ in range(2))
    grad_z, grad_kl = torch.randn(batch, latent, **kw), torch.ones((), **kw)
    grad_output = {"reparameterize": grad_z, "kl": grad_kl, "reparameterize_kl": (grad_z, grad_kl)}[op]
    eager = _EAGER[op]
    torch._dynamo.reset()  # a fresh Dynamo state per shape: no recompile limit, no shape made dynamic
    return _Setup((mu, logvar), grad_output, eager, _genfast(op), _compile(eager, retain_graph))


def _compile(eager: _Op, retain_graph: bool) -> _Op:
    """torch.compile of `eager`; for a graph whose backward reruns (retain_graph), compiled without
    donated buffers: by default the compiled backward reuses the memory of the tensors it saved (here
    the noise), so it refuses retain_graph=True. Only the call that builds the graph runs under the
    setting: nothing is added to the timed backward."""
    compiled = torch.compile(eager, dynamic=False)
    if not retain_graph:
        return compiled

    def without_donated_buffers(*args: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        with torch._functorch.config.patch(donated_buffer=False):
            return compiled(*args)

    return without_donated_buffers


def contenders(case: ReparamCase, device: torch.device) -> dict[str, Contender]:
    """genfast on each backend of `device`, eager and torch.compile, all on the same inputs."""
    setup = _setup(case.op, case.batch, case.latent, case.dtype, device, case.mode == "backward")
    step = functools.partial(make_step, inputs=setup.inputs, grad_output=setup.grad_output, mode=case.mode)
    return contenders_of(step, setup.genfast, {"eager": setup.eager, "compile": setup.compiled}, device)
