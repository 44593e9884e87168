"""Test set-up: Triton runs interpreted on CPU tensors when there is no GPU (set before any import)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import genfast  # noqa: E402
from genfast.backend import why_unusable  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def require_backend(name: str, device: str) -> None:
    """Skip, with the reason, when backend `name` cannot run on `device` tensors here."""
    reason = why_unusable(name, device)
    if reason is not None:
        pytest.skip(f"backend {name} on {device}: {reason}")


def compiled_op_targets(fn, *args) -> list[str]:
    """The call targets of the graph torch.compile(fn, fullgraph=True) traces for args (run on the cpu backend)."""
    torch._dynamo.reset()
    seen: list[str] = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    with genfast.use_backend("cpu"):
        torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return seen


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values with every stride doubled (a view that is not contiguous), requires_grad kept."""
    return torch.stack([t.detach(), t.detach()], -1)[..., 0].requires_grad_(t.requires_grad)


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs per test, reproducible from the printed seed."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
    yield


__all__ = ["compiled_op_targets", "genfast", "non_contiguous", "require_backend"]
