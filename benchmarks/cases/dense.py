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
    dtype: str  # of the inputs; with autocast, the dtype autocast runs the layer in (inputs float32)
    mode: str
    autocast: bool = False

    @property
    def name(self) -> str:
        dtype = f"fp32 autocast {short_dtype(self.dtype)}" if self.autocast else short_dtype(self.dtype)
        return f"{self.batch}x{self.in_features}->{self.out_features} {self.activation} {dtype} {self.mode}"

    @property
    def flops(self) -> int:
        """Multiply-adds x2 of the GEMMs: y (forward); grad_x and grad_weight (backward)."""
        return 2 * self.batch * self.in_features * self.out_features * _GEMMS_PER_MODE[self.mode]


_MLP_LAYERS = ((784, 600), (600, 400), (100, 128), (1024, 784))
_BATCHES = (64, 256, 1024, 4096)
_GELU_SHAPES = ((256, 784, 600), (4096, 1024, 784))
_LARGE = {"cpu": ((2048, 2048, 2048), "float32"), "cuda": ((8192, 8192, 8192), "bfloat16")}


# CPU: bfloat16 under autocast (float32 inputs and parameters, as mixed-precision training has them),
# where ATen's GEMM uses the CPU's bf16 units (AVX512-BF16, AMX) when it has them.
_AUTOCAST = {"cpu": "bfloat16", "cuda": None}


def _cases(shapes: list[tuple[int, int, int, str, str]], autocast: bool = False) -> tuple[DenseCase, ...]:
    """Every mode of each (batch, in, out, activation, dtype), modes of one shape next to each other."""
    return tuple(DenseCase(*shape, mode, autocast) for shape in shapes for mode in MODES)


def _full(device_type: str) -> tuple[DenseCase, ...]:
    (large, large_dtype) = _LARGE[device_type]
    shapes = [
        (batch, i, o, "relu", dtype)
        for dtype in DTYPES[device_type]
        for (i, o) in _MLP_LAYERS
        for batch in _BATCHES
    ]
    shapes += [(*shape, "gelu", dtype) for dtype in DTYPES[device_type] for shape in _GELU_SHAPES]
    autocast = _AUTOCAST[device_type]
    mixed = (
        [(*shape, act, autocast) for shape in _GELU_SHAPES for act in ("relu", "gelu")] if autocast else []
    )
    return _cases(shapes + [(*large, "relu", large_dtype)]) + _cases(mixed, autocast=True)


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
    dtype = "float32" if case.autocast else case.dtype
    setup = _setup(case.batch, case.in_features, case.out_features, case.activation, dtype, device)
    grad_output = setup.grad_output.to(getattr(torch, case.dtype))
    step = functools.partial(make_step, inputs=setup.inputs, grad_output=grad_output, mode=case.mode)
    if case.autocast:
        step = functools.partial(_step_under_autocast, step, device.type, getattr(torch, case.dtype))
    # genfast:auto is what a user gets (the backend genfast picks); genfast:<backend> pins that backend.
    ours = _genfast(case.activation)
    return {
        "genfast:auto": Contender(functools.partial(step, ours)),
        **contenders_of(step, ours, setup.baselines, device),
    }


def _step_under_autocast(step, device_type: str, dtype: torch.dtype, fn):
    """step(fn), its forward and backward calls run under torch.autocast(device_type, dtype) (a backward
    mode's graph is built when step(fn) is called)."""
    with torch.autocast(device_type, dtype=dtype):
        inner = step(fn)

    def run():
        with torch.autocast(device_type, dtype=dtype):
            return inner()

    return run
