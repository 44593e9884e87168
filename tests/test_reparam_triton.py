"""The Triton reparam launchers (genfast.triton.reparam) on CPU tensors under TRITON_INTERPRET=1.

What only the Triton backend can get wrong: the Philox key and counter split of tl.philox, eps against the
reference noise, results independent of the block size, the KL's bits run to run, the fused pass against
the separate ones, and the contract functions against genfast.reference (tolerance rule of
tests/tolerance.py, eager PyTorch at the same dtype with the same eps).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from genfast import reference
from genfast.loss_terms import KL_ROWS_DTYPE
from tests.conftest import require_backend
from tests.tolerance import assert_within_rule

if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    from genfast.triton.reparam import _philox_bits

    @triton.jit
    def _bits_kernel(state_ptr, groups_ptr, out_ptr, N: tl.constexpr):
        """out[4 i + k] = word k of the Philox bits of group groups[i] under rng_state."""
        i = tl.arange(0, N)
        bits = _philox_bits(state_ptr, tl.load(groups_ptr + i))
        for k in tl.static_range(4):
            tl.store(out_ptr + 4 * i + k, bits[k].to(tl.int64))


DTYPES = [torch.float32, torch.float64]  # the interpreter runs neither float16 nor bfloat16
# Rows of 1, 7, 100 and 784 columns (cut mid Philox group, several KL steps), 3-D, numel % 4 != 0.
SHAPES = [(5, 1), (1, 7), (3, 7), (16, 100), (4, 784), (2, 3, 7), (3, 1031)]


@pytest.fixture(scope="module")
def triton_reparam():
    require_backend("triton", "cpu")
    from genfast.triton import reparam

    return reparam


def inputs(shape, dtype):
    return (torch.randn(shape, dtype=torch.float64).to(dtype) for _ in range(2))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kernel_eps(triton_reparam, rng_state, shape):
    """The kernels' own float32 eps: backward with logvar = 0 and grad_z = 2 returns it exactly."""
    ones = torch.ones(shape)
    return triton_reparam.reparam_backward(2 * ones, 0 * ones, rng_state)


def test_philox_bits_are_the_references(triton_reparam):
    """tl.philox's key split and counter words against the reference (which passes Random123's
    known answers), with seed, offset and group all past 32 bits."""
    groups = torch.tensor([0, 1, 5, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3, 2**62 + 11])
    for seed, offset in [(0, 0), (-1, 0), (2**63 - 1, 5), (-(2**63), 2**32 + 9), (123456789, -7)]:
        out = torch.empty(4 * len(groups), dtype=torch.int64)
        _bits_kernel[(1,)](torch.tensor([seed, offset]), groups, out, N=len(groups))
        want = reference.philox_bits(seed & (2**64 - 1), offset & (2**64 - 1), groups)
        assert torch.equal(out.view(-1, 4), torch.stack(want, dim=1)), f"seed {seed}, offset {offset}"


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 101), (1031,)])
def test_eps_is_the_reference_noise(triton_reparam, shape):
    _, rng_state = triton_reparam.reparam_forward(*inputs(shape, torch.float32))
    eps, want = kernel_eps(triton_reparam, rng_state, shape), reference.noise(rng_state, shape)
    # The interpreter's numpy log/cos/sin are a few ulps off torch's: same bits in, eps equal to ~1e-6.
    torch.testing.assert_close(eps, want, rtol=1e-6, atol=1e-6)
    assert_within_rule("eps", eps, want, want.double())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_contract_functions_match_the_reference(triton_reparam, shape, dtype):
    mu, logvar = inputs(shape, dtype)
    mu64, logvar64 = mu.double(), logvar.double()
    z, rng_state = triton_reparam.reparam_forward(mu, logvar, seeded(7))
    want_z, want_state = reference.reparam_forward(mu64, logvar64, seeded(7))
    assert torch.equal(rng_state, want_state) and z.dtype == dtype and z.shape == mu.shape
    eps = reference.noise(rng_state, shape).to(dtype)
    assert_within_rule("z", z, mu + torch.exp(0.5 * logvar) * eps, want_z)

    grad_z = torch.randn_like(mu)
    assert_within_rule(
        "grad_logvar",
        triton_reparam.reparam_backward(grad_z, logvar, rng_state),
        0.5 * grad_z * eps * torch.exp(0.5 * logvar),
        reference.reparam_backward(grad_z.double(), logvar64, rng_state),
    )

    kl = triton_reparam.kl_forward(mu, logvar)
    assert kl.dtype == KL_ROWS_DTYPE
    eager_kl = 0.5 * (torch.expm1(logvar) - logvar + mu * mu).sum(-1).reshape(-1)
    assert_within_rule("kl", kl, eager_kl.to(kl.dtype), reference.kl_forward(mu64, logvar64))

    grad_kl = torch.randn(kl.shape, dtype=kl.dtype)
    grad_mu, grad_logvar = triton_reparam.kl_backward(grad_kl, mu, logvar)
    want_mu, want_logvar = reference.kl_backward(grad_kl.double(), mu64, logvar64)
    g = grad_kl.view(*shape[:-1], 1).to(dtype)
    assert_within_rule("kl grad_mu", grad_mu, g * mu, want_mu)
    assert_within_rule("kl grad_logvar", grad_logvar, 0.5 * g * torch.expm1(logvar), want_logvar)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 6), (2, 3, 101), (3, 784)])
def test_results_do_not_depend_on_the_block_size(triton_reparam, shape, dtype):
    """Sampling blocks of 16 and 64 Philox groups, KL blocks of 1, 2 and 16 rows: the same bits."""
    mu, logvar = inputs(shape, dtype)
    z, rng_state = triton_reparam.reparam_forward(mu, logvar, seeded(3))
    grad_z = torch.randn_like(mu)
    grad_logvar = triton_reparam.reparam_backward(grad_z, logvar, rng_state)
    kl = triton_reparam.kl_forward(mu, logvar)
    grad_kl = torch.randn(kl.shape, dtype=kl.dtype)
    kl_grads = triton_reparam.kl_backward(grad_kl, mu, logvar)
    for block in (16, 64):
        assert torch.equal(triton_reparam.reparam_forward(mu, logvar, seeded(3), block=block)[0], z), block
        assert torch.equal(
            triton_reparam.reparam_backward(grad_z, logvar, rng_state, block=block), grad_logvar
        )
    for block in (1, 2, 16):
        assert torch.equal(triton_reparam.kl_forward(mu, logvar, block=block), kl), block
        fused_z, _, fused_kl = triton_reparam.reparam_kl_forward(mu, logvar, seeded(3), block=block)
        assert torch.equal(fused_z, z) and torch.equal(fused_kl, kl), block
        for ours, want in zip(triton_reparam.kl_backward(grad_kl, mu, logvar, block=block), kl_grads):
            assert torch.equal(ours, want), block


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_bits_are_the_same_run_to_run_and_fused(triton_reparam, dtype):
    mu, logvar = inputs((9, 3, 101), dtype)
    kl = triton_reparam.kl_forward(mu, logvar)
    assert torch.equal(triton_reparam.kl_forward(mu.clone(), logvar.clone()), kl)
    z, rng_state, fused_kl = triton_reparam.reparam_kl_forward(mu, logvar, seeded(11))
    alone_z, alone_state = triton_reparam.reparam_forward(mu, logvar, seeded(11))
    assert torch.equal(rng_state, alone_state) and torch.equal(z, alone_z)
    assert torch.equal(fused_kl, kl)


def test_each_forward_draws_a_fresh_seed(triton_reparam):
    mu, logvar = inputs((3, 7), torch.float32)
    states = [triton_reparam.reparam_forward(mu, logvar)[1] for _ in range(2)]
    states.append(triton_reparam.reparam_kl_forward(mu, logvar)[1])
    assert len({int(s[0]) for s in states}) == 3 and all(int(s[1]) == 0 for s in states)


@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0), (2, 0, 3)])
def test_empty_tensors(triton_reparam, shape):
    mu, logvar = torch.empty(shape), torch.empty(shape)
    rows = torch.Size(shape[:-1]).numel()
    z, rng_state = triton_reparam.reparam_forward(mu, logvar)
    assert z.shape == shape and torch.equal(rng_state, torch.zeros(2, dtype=torch.int64))
    assert triton_reparam.reparam_backward(mu, logvar, rng_state).shape == shape
    kl = triton_reparam.kl_forward(mu, logvar)
    assert torch.equal(kl, torch.zeros(rows, dtype=KL_ROWS_DTYPE))
    z, rng_state, kl = triton_reparam.reparam_kl_forward(mu, logvar)
    assert z.shape == shape and torch.equal(kl, torch.zeros(rows, dtype=KL_ROWS_DTYPE))
    grad_kl = torch.zeros(rows, dtype=KL_ROWS_DTYPE)
    assert all(g.shape == shape for g in triton_reparam.kl_backward(grad_kl, mu, logvar))
