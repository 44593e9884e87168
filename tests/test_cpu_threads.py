"""The cpu backend's results do not depend on the thread count: every CPU op, forward and backward, gives
bitwise the same outputs and gradients with torch.set_num_threads(1) and (2), at sizes where the kernels'
parallel loops split the work between the threads (issue 14)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from tests.conftest import genfast, require_backend

Tensors = tuple[torch.Tensor, ...]


def _inputs(*shapes: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    """Normal inputs that require grad, the same on every call (their own generator: not the test's seed)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).requires_grad_() for shape in shapes]


def _with_gradients(outputs: torch.Tensor | Tensors, inputs: list[torch.Tensor]) -> Tensors:
    """The outputs and the inputs' gradients for a fixed, non-uniform grad_output per output."""
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    generator = torch.Generator().manual_seed(1)
    grad_outputs = [torch.randn(out.shape, generator=generator) for out in outputs]
    return tuple(t.detach() for t in outputs) + torch.autograd.grad(outputs, inputs, grad_outputs)


def _dense(activation: str) -> Tensors:
    # 1031 rows: the epilogue's row loop splits, with a remainder past the last full block.
    x, weight, bias = _inputs((1031, 784), (1000, 784), (1000,))
    return _with_gradients(genfast.fused_dense(x, weight, bias, activation), [x, weight, bias])


def _elbo(recon_loss: str) -> Tensors:
    recon, mu, logvar = _inputs((4096, 784), (4096, 32), (4096, 32))
    target = torch.rand(4096, 784, generator=torch.Generator().manual_seed(2))
    loss = genfast.elbo_loss(recon, target, mu, logvar, recon_loss=recon_loss)
    return _with_gradients(loss, [recon, mu, logvar])


def _discriminator(kind: str) -> Tensors:
    real, fake = _inputs((4096, 256), (4096, 256))  # 2^20 logits each: many of the kernel's blocks
    return _with_gradients(genfast.discriminator_loss(real, fake, kind), [real, fake])


def _generator(kind: str) -> Tensors:
    (fake,) = _inputs((4096, 256))
    return _with_gradients(genfast.generator_loss(fake, kind), [fake])


def _kl(reduction: str) -> Tensors:
    mu, logvar = _inputs((4096, 1024), (4096, 1024))
    return _with_gradients(genfast.kl_divergence(mu, logvar, reduction), [mu, logvar])


def _reparameterize() -> Tensors:
    mu, logvar = _inputs((4096, 1024), (4096, 1024))
    z = genfast.reparameterize(mu, logvar, generator=torch.Generator().manual_seed(3))
    return _with_gradients(z, [mu, logvar])


def _reparameterize_kl() -> Tensors:
    mu, logvar = _inputs((4096, 1024), (4096, 1024))
    z, kl = genfast.reparameterize_kl(mu, logvar, generator=torch.Generator().manual_seed(3))
    return _with_gradients((z, kl), [mu, logvar])


GAN_KINDS = ("nonsaturating", "hinge", "lsgan", "wasserstein")
CASES: dict[str, Callable[[], Tensors]] = {
    "fused_dense relu": lambda: _dense("relu"),
    "fused_dense gelu": lambda: _dense("gelu"),
    "elbo_loss bce": lambda: _elbo("bce"),
    "elbo_loss mse": lambda: _elbo("mse"),
    **{f"discriminator_loss {kind}": (lambda kind=kind: _discriminator(kind)) for kind in GAN_KINDS},
    **{f"generator_loss {kind}": (lambda kind=kind: _generator(kind)) for kind in GAN_KINDS},
    "kl_divergence mean": lambda: _kl("mean"),
    "kl_divergence none": lambda: _kl("none"),
    "reparameterize": _reparameterize,
    "reparameterize_kl": _reparameterize_kl,
}


def _at_threads(count: int, fn: Callable[[], Tensors]) -> Tensors:
    """fn() on the cpu backend with torch.set_num_threads(count), the count before restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        with genfast.use_backend("cpu"):
            return fn()
    finally:
        torch.set_num_threads(before)


def _difference(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} and {tuple(b.shape)}"
    differ = a != b
    return f"{int(differ.sum())} of {a.numel()} elements differ, by up to {float((a - b).abs().max()):.3g}"


@pytest.mark.parametrize("case", CASES)
def test_cpu_op_is_bitwise_the_same_on_one_and_two_threads(case):
    require_backend("cpu", "cpu")
    one, two = (_at_threads(count, CASES[case]) for count in (1, 2))
    assert len(one) == len(two)
    differences = {i: _difference(a, b) for i, (a, b) in enumerate(zip(one, two)) if not torch.equal(a, b)}
    assert not differences, f"{case}: outputs then gradients, 1 vs 2 threads: {differences}"
