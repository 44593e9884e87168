"""use_backend pins the backend for the calling thread (or asyncio task) alone; backward runs on the
backend its forward ran on, whichever thread autograd runs it on."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

import genfast
from genfast.backend import select
from tests.conftest import require_backend

CPU = torch.device("cpu")


def test_a_pin_stays_in_its_thread():
    seen = []
    with genfast.use_backend("reference"):
        thread = threading.Thread(target=lambda: seen.append(select(CPU)))
        thread.start()
        thread.join()
        assert select(CPU) == "reference"
    assert seen == [select(CPU)], "another thread's unpinned call must not see this thread's pin"


def test_pins_of_concurrent_threads_never_mix():
    """The defect: with one process-wide stack of pins, a pin in one thread moved another thread's calls
    (about 1 call in 1000), and a thread pinned to cuda made the others' unpinned calls raise."""
    require_backend("cpu", "cpu")
    start, wrong = threading.Barrier(3), []

    def pinned(name):
        start.wait()
        for _ in range(2000):
            with genfast.use_backend(name):
                if select(CPU) != name:
                    wrong.append(name)

    def unpinned():
        start.wait()
        for _ in range(4000):
            try:
                if select(CPU) != "cpu":
                    wrong.append("unpinned")
            except RuntimeError as error:
                wrong.append(str(error))

    threads = [
        threading.Thread(target=pinned, args=("reference",)),
        threading.Thread(target=unpinned),
        threading.Thread(target=_pinned_to_cuda, args=(start, wrong)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def _pinned_to_cuda(start, wrong):
    """A cuda pin cannot run on CPU tensors: select raises, but only in the thread that pinned it."""
    start.wait()
    for _ in range(2000):
        with genfast.use_backend("cuda"):
            try:
                select(CPU)
                wrong.append("a cuda pin ran on CPU tensors")
            except RuntimeError:
                pass


def test_asyncio_tasks_keep_their_own_pins():
    async def task(name):
        with genfast.use_backend(name):
            await asyncio.sleep(0)
            return select(CPU)

    async def both():
        return await asyncio.gather(task("reference"), task("cpu"))

    require_backend("cpu", "cpu")
    assert asyncio.run(both()) == ["reference", "cpu"]


@pytest.mark.parametrize("op", ["dense", "reparameterize", "kl", "reparameterize_kl"])
def test_backward_runs_where_its_forward_ran(op, monkeypatch):
    """Backward on another thread (as autograd's device threads run it) or outside the pin's block."""
    require_backend("cpu", "cpu")
    from genfast.ops import dense, reparam

    calls = []
    for backward_op in (
        dense.BACKWARD,
        reparam.SAMPLE_BACKWARD,
        reparam.KL_BACKWARD,
        reparam.SAMPLE_KL_BACKWARD,
    ):
        kernel = backward_op.kernel("reference")
        monkeypatch.setitem(
            backward_op._resolved,
            "reference",
            lambda *a, _f=kernel, _n=backward_op.name: calls.append(_n) or _f(*a),
        )
    a, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    with genfast.use_backend("reference"):
        if op == "dense":
            out = genfast.fused_dense(a, b, None, activation="tanh")
        elif op == "reparameterize":
            out = genfast.reparameterize(a, b)
        elif op == "reparameterize_kl":  # z and the KL both used: the fused backward kernel
            z, kl = genfast.reparameterize_kl(a, b, reduction="none")
            out = z.sum() + kl.sum()
        else:  # "none": the op with a backward kernel (a reduced KL scales the gradient its forward wrote)
            out = genfast.kl_divergence(a, b, reduction="none")
    thread = threading.Thread(target=lambda: out.sum().backward())
    thread.start()
    thread.join()
    assert len(calls) == 1, "backward must run on the forward's backend (reference), not the thread's default"
    assert a.grad is not None
