"""fused_dense against ``F.linear`` + activation module (eager and ``torch.compile``).

Shapes: the classic MLP layers at several batch sizes, relu (gelu on two of them), and one large
square GEMM; each in forward, backward and both. x, weight and bias all require grad.
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
from benchmarks.cases.common import (
    DTYPES,
    MODES,
    QUICK_DTYPE,
    Contender,
    contenders_of,
    make_step,
    short_dtype,
)
from genfast.activations import activation_module

_GEMMS_PER_MODE = {"forward": 1, "backward": 2, "both": 3}


@dataclass(frozen=True)
class DenseCase:
    batch: int
    in_features: int
    out_features: int
    activation: str
    dtype: str
    mode: str

    @property
    def name(self) -> str:
        return (
            f"{self.batch}x{self.in_features}->{self.out_features} {self.activation} "
            f"{short_dtype(self.dtype)} {self.mode}"
        )

    @property
    def flops(self) -> int:
        """Multiply-adds x2 of the GEMMs: y (forward); grad_x and grad_weight (backward)."""
        return 2 * self.batch * self.in_features * self.out_features * _GEMMS_PER_MODE[self.mode]


_MLP_LAYERS = ((784, 600), (600, 400), (100, 128), (1024, 784))
_BATCHES = (64, 256, 1024, 4096)
_GELU_SHAPES = ((256, 784, 600), (4096, 1024, 784))
_LARGE = {"cpu": ((2048, 2048, 2048), "float32"), "cuda": ((8192, 8192, 8192), "bfloat16")}


def _cases(shapes: list[tuple[int, int, int, str, str]]) -> tuple[DenseCase, ...]:
    """Every mode of each (batch, in, out, activation, dtype), modes of one shape next to each other."""
    return tuple(DenseCase(*shape, mode) for shape in shapes for mode in MODES)


def _full(device_type: str) -> tuple[DenseCase, ...]:
    (large, large_dtype) = _LARGE[device_type]
    shapes = [
        (batch, i, o, "relu", dtype)
        for dtype in DTYPES[device_type]
        for (i, o) in _MLP_LAYERS
        for batch in _BATCHES
    ]
    shapes += [(*shape, "gelu", dtype) for dtype in DTYPES[device_type] for shape in _GELU_SHAPES]
    return _cases(shapes + [(*large, "relu", large_dtype)])


CASES: dict[str, tuple[DenseCase, ...]] = {device_type: _full(device_type) for device_type in _LARGE}
QUICK_CASES: dict[str, tuple[DenseCase, ...]] = {
    device_type: _cases([(64, 100, 128, "relu", dtype), (256, 784, 600, "gelu", dtype)])
    for device_type, dtype in QUICK_DTYPE.items()
}


@dataclass(frozen=True)
class _Setup:
    inputs: tuple[Tensor, Tensor, Tensor]
    grad_output: Tensor
    baselines: dict[str, Callable[..., Tensor]]


@functools.lru_cache(maxsize=1)
def _setup(
    batch: int, in_features: int, out_features: int, activation: str, dtype: str, device: torch.device
) -> _Setup:
    """Inputs and compiled baselines of one shape, shared by its three modes (compiled once)."""
    torch.manual_seed(0)
    kw = {"device": device, "dtype": getattr(torch, dtype)}
    x = torch.randn(batch, in_features, **kw).requires_grad_()
    weight = (torch.randn(out_features, in_features, **kw) / math.sqrt(in_features)).requires_grad_()
    bias = torch.randn(out_features, **kw).requires_grad_()
    grad_output = torch.randn(batch, out_features, **kw)
    eager = _eager(activation)
    # A fresh Dynamo state per shape: no recompile limit to hit, no shape made dynamic behind our back.
    torch._dynamo.reset()
    baselines = {"eager": eager, "compile": torch.compile(eager, dynamic=False)}
    if device.type == "cuda" and (batch, in_features, out_features) == _LARGE["cuda"][0]:
        baselines["compile:max-autotune"] = torch.compile(eager, dynamic=False, mode="max-autotune")
    return _Setup((x, weight, bias), grad_output, baselines)


def _eager(activation: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """nn.Linear + the activation's nn module, as a function of (x, weight, bias)."""
    act = activation_module(activation, negative_slope=0.01)

    def eager(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return act(F.linear(x, weight, bias))

    return eager


def _genfast(activation: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    return functools.partial(genfast.fused_dense, activation=activation)


def contenders(case: DenseCase, device: torch.device) -> dict[str, Contender]:
    """genfast on each backend of `device`, eager and torch.compile, all on the same inputs."""
    setup = _setup(case.batch, case.in_features, case.out_features, case.activation, case.dtype, device)
    step = functools.partial(make_step, inputs=setup.inputs, grad_output=setup.grad_output, mode=case.mode)
    # genfast:auto is what a user gets (the backend genfast picks); genfast:<backend> pins that backend.
    ours = _genfast(case.activation)
    return {
        "genfast:auto": Contender(functools.partial(step, ours)),
        **contenders_of(step, ours, setup.baselines, device),
    }
