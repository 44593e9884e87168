"""Reparameterization and KL on the GPU: the CUDA kernels directly (genfast._C.*_cuda) and the public API.

Ground truth: eps = genfast.reference.philox_normal at the (seed, offset) the kernel recorded in rng_state,
then z, KL and the gradients in float64; the tolerance rule of tests/tolerance.py against eager PyTorch at
the same dtype with the same eps.
"""

from __future__ import annotations

import math

import pytest
import torch

import genfast
from genfast import _extension
from tests.conftest import require_backend
from tests.tolerance import assert_within_rule

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# numel: 1, 7, 100, 784, 1000+, not a multiple of 4, several grid-stride rounds.
SIZES = [1, 7, 100, 784, 1003, 4097, (1 << 20) + 3]
# (rows, cols) for the per-row KL: cols 1 and 2 (many rows per warp), rows cut mid-group (cols % 4 != 0),
# cols around the 4096-element chunk, rows of many chunks (the second reduction kernel).
KL_SHAPES = [
    (1, 1),
    (7, 1),
    (1000, 2),
    (1, 7),
    (100, 7),
    (784, 100),
    (1003, 784),
    (3, 4095),
    (3, 4097),
    (5, 12345),
    (2, 100003),
    (1, (1 << 22) + 5),
]


@pytest.fixture
def kernels():
    require_backend("cuda", "cuda")
    if not hasattr(_extension._C, "reparam_forward_cuda"):
        pytest.skip("genfast._C was built without the reparam CUDA kernels")
    return _extension._C


def inputs(shape, dtype, offset=0):
    """mu, logvar ~ N(0, 1), contiguous, `offset` elements into their storage."""
    n = math.prod(shape)
    storage = torch.randn(2, n + offset, device="cuda", dtype=torch.float64).to(dtype)
    return storage[0, offset:].view(shape), storage[1, offset:].view(shape)


def recorded_eps(rng_state: torch.Tensor, shape) -> torch.Tensor:
    """The float32 noise the kernel drew, from the reference generator at the state it recorded."""
    from genfast.reference import philox_normal

    seed, offset = (int(v) & (2**64 - 1) for v in rng_state.tolist())
    return philox_normal(seed, offset, math.prod(shape)).to("cuda").view(shape)


def kernel_eps(kernels, rng_state: torch.Tensor, shape) -> torch.Tensor:
    """The kernel's own float32 noise, bit for bit: its backward with logvar = 0, grad_z = 2 is eps."""
    ones = torch.ones(shape, device="cuda")
    return kernels.reparam_backward_cuda(2 * ones, 0 * ones, rng_state)


def check_sample(name, z, mu, logvar, eps):
    assert z.shape == mu.shape and z.dtype == mu.dtype, f"{name}: z is {z.dtype} {tuple(z.shape)}"
    reference = mu.double() + torch.exp(0.5 * logvar.double()) * eps.double()
    eager = mu + torch.exp(0.5 * logvar) * eps.to(mu.dtype)
    assert_within_rule(f"{name} z", z, eager, reference)


def check_sample_gradient(name, grad_logvar, grad_z, logvar, eps):
    reference = 0.5 * grad_z.double() * eps.double() * torch.exp(0.5 * logvar.double())
    eager = 0.5 * grad_z * eps.to(logvar.dtype) * torch.exp(0.5 * logvar)
    assert_within_rule(f"{name} grad_logvar", grad_logvar, eager, reference)


def kl_rows(mu, logvar):
    """0.5 * sum over the last dimension of exp(logvar) + mu^2 - 1 - logvar, at the inputs' dtype."""
    return 0.5 * (torch.exp(logvar) + mu * mu - 1 - logvar).sum(-1)


def check_kl(name, kl, mu, logvar):
    """kl: per-row values of any dtype; eager at mu's dtype, in kl's dtype for the comparison."""
    reference = kl_rows(mu.double(), logvar.double()).reshape(kl.shape)
    assert_within_rule(f"{name} kl", kl, kl_rows(mu, logvar).reshape(kl.shape).to(kl.dtype), reference)


def check_kl_gradients(name, grad_mu, grad_logvar, grad_kl, mu, logvar):
    g = grad_kl.reshape(*mu.shape[:-1], 1)
    for label, ours, eager, reference in (
        ("grad_mu", grad_mu, g.to(mu.dtype) * mu, g.double() * mu.double()),
        (
            "grad_logvar",
            grad_logvar,
            0.5 * g.to(mu.dtype) * (torch.exp(logvar) - 1),
            0.5 * g.double() * torch.expm1(logvar.double()),
        ),
    ):
        assert_within_rule(f"{name} {label}", ours, eager, reference)


def generator_offset() -> int:
    return torch.cuda.default_generators[torch.cuda.current_device()].get_offset()


# ---------------------------------------------------------------------------------------------------
# The kernels, called directly


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", SIZES)
def test_sample_and_gradient_use_the_recorded_noise(kernels, numel, dtype):
    mu, logvar = inputs((numel,), dtype)
    z, rng_state = kernels.reparam_forward_cuda(mu, logvar, None)
    assert rng_state.dtype == torch.int64 and rng_state.shape == (2,) and rng_state.device == mu.device
    eps = recorded_eps(rng_state, mu.shape)
    # The GPU's logf/sinf/cosf may differ from the reference's by an ulp: the rule's floor (1e-6 RMS).
    assert_within_rule("eps", kernel_eps(kernels, rng_state, mu.shape), eps, eps.double())
    check_sample(f"{numel} {dtype}", z, mu, logvar, eps)
    grad_z = torch.randn_like(mu)
    grad_logvar = kernels.reparam_backward_cuda(grad_z, logvar, rng_state)
    check_sample_gradient(f"{numel} {dtype}", grad_logvar, grad_z, logvar, eps)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("offset", [1, 2, 3])
def test_misaligned_storage_and_nd_shapes(kernels, offset, dtype):
    """Storage offsets that rule out vector loads; eps follows the flat (row-major) index."""
    mu, logvar = inputs((3, 7, 101), dtype, offset)
    z, rng_state = kernels.reparam_forward_cuda(mu, logvar, None)
    eps = recorded_eps(rng_state, mu.shape)
    check_sample(f"offset {offset} {dtype}", z, mu, logvar, eps)
    grad_z = torch.randn(1 + mu.numel(), device="cuda", dtype=dtype)[1:].view(mu.shape)
    check_sample_gradient(
        f"offset {offset} {dtype}",
        kernels.reparam_backward_cuda(grad_z, logvar, rng_state),
        grad_z,
        logvar,
        eps,
    )
    torch.manual_seed(21)
    z, rng_state = kernels.reparam_forward_cuda(mu, logvar, None)
    torch.manual_seed(21)
    aligned_z, aligned_state = kernels.reparam_forward_cuda(mu.clone(), logvar.clone(), None)
    assert torch.equal(aligned_state, rng_state)
    assert torch.equal(aligned_z, z), "the vector and the scalar path must give the same bits"
    aligned = (mu.clone(), logvar.clone())
    assert torch.equal(kernels.kl_forward_cuda(mu, logvar), kernels.kl_forward_cuda(*aligned))
    grad_kl = torch.randn(21, device="cuda", dtype=torch.float64)
    for ours, want in zip(
        kernels.kl_backward_cuda(grad_kl, mu, logvar), kernels.kl_backward_cuda(grad_kl, *aligned)
    ):
        assert torch.equal(ours, want)
    torch.manual_seed(22)
    fused = kernels.reparam_kl_forward_cuda(mu, logvar, None)
    torch.manual_seed(22)
    for ours, want in zip(fused, kernels.reparam_kl_forward_cuda(*aligned, None)):
        assert torch.equal(ours, want)


def test_rng_state_follows_the_generator(kernels):
    """seed = the generator's seed; counter offset = philox offset / 4, one counter block per call."""
    mu, logvar = inputs((100, 7), torch.float32)
    torch.cuda.manual_seed(123456789)
    start = generator_offset()
    _, first = kernels.reparam_forward_cuda(mu, logvar, None)
    _, second = kernels.reparam_forward_cuda(mu, logvar, None)
    _, third, _ = kernels.reparam_kl_forward_cuda(mu, logvar, None)
    assert first.tolist() == [123456789, start // 4]
    assert second.tolist() == [123456789, start // 4 + 1]
    assert third.tolist() == [123456789, start // 4 + 2]
    assert generator_offset() == start + 12, "each call reserves an increment of 4 (32-bit draws)"


def test_determinism_and_fresh_noise(kernels):
    mu, logvar = inputs((1000, 20), torch.float32)
    torch.manual_seed(7)
    first = kernels.reparam_forward_cuda(mu, logvar, None)[0]
    following = kernels.reparam_forward_cuda(mu, logvar, None)[0]
    torch.manual_seed(7)
    again = kernels.reparam_forward_cuda(mu, logvar, None)[0]
    torch.manual_seed(8)
    other_seed = kernels.reparam_forward_cuda(mu, logvar, None)[0]
    assert torch.equal(first, again)
    assert not torch.equal(first, following) and not torch.equal(first, other_seed)
    # An explicit generator: the same seed gives the same noise and leaves the default generator alone.
    offset = generator_offset()
    generators = [torch.Generator(device="cuda").manual_seed(99) for _ in range(2)]
    a, b = (kernels.reparam_forward_cuda(mu, logvar, g)[0] for g in generators)
    assert torch.equal(a, b) and not torch.equal(a, first)
    assert generator_offset() == offset


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", KL_SHAPES)
def test_kl_forward_and_backward(kernels, shape, dtype):
    mu, logvar = inputs(shape, dtype)
    kl = kernels.kl_forward_cuda(mu, logvar)
    assert kl.dtype == torch.float64 and kl.shape == (shape[0],)
    check_kl(f"{shape} {dtype}", kl, mu, logvar)
    assert torch.equal(kl, kernels.kl_forward_cuda(mu, logvar)), "the KL must be the same bits run to run"
    grad_kl = torch.randn(shape[0], device="cuda", dtype=torch.float64)
    grad_mu, grad_logvar = kernels.kl_backward_cuda(grad_kl, mu, logvar)
    assert grad_mu.dtype == dtype and grad_logvar.shape == mu.shape
    check_kl_gradients(f"{shape} {dtype}", grad_mu, grad_logvar, grad_kl, mu, logvar)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (1003, 7), (128, 20), (3, 4097), (2, 100003)])
def test_fused_sample_and_kl_equal_the_separate_kernels(kernels, shape, dtype):
    """reparam_kl_forward draws each group once per row it touches: same z, same KL bits as the two kernels."""
    mu, logvar = inputs(shape, dtype)
    torch.manual_seed(11)
    z, rng_state, kl = kernels.reparam_kl_forward_cuda(mu, logvar, None)
    torch.manual_seed(11)
    z_alone, state_alone = kernels.reparam_forward_cuda(mu, logvar, None)
    assert torch.equal(rng_state, state_alone)
    assert torch.equal(z, z_alone)
    assert torch.equal(kl, kernels.kl_forward_cuda(mu, logvar))
    check_sample(f"{shape} {dtype}", z, mu, logvar, recorded_eps(rng_state, shape))
    check_kl(f"{shape} {dtype}", kl, mu, logvar)


def test_kl_of_nd_input_is_per_row_of_the_last_dimension(kernels):
    mu, logvar = inputs((3, 5, 7), torch.float32)
    kl = kernels.kl_forward_cuda(mu, logvar)
    assert kl.shape == (15,)
    check_kl("3d", kl, mu.reshape(15, 7), logvar.reshape(15, 7))


@pytest.mark.parametrize("dtype", DTYPES)
def test_logvar_plus_minus_80(kernels, dtype):
    """exp(0.5 * 80) = 2.4e17 and exp(80) = 5.5e34 are finite in fp32: z, KL and gradients stay finite
    in fp32 and bf16; in fp16 z is +-inf exactly where the float64 result rounds to inf (as in eager)."""
    mu, _ = inputs((64, 33), dtype)
    sign = torch.randint(0, 2, mu.shape, device="cuda") * 2 - 1
    logvar = (80.0 * sign).to(dtype)
    z, rng_state, kl = kernels.reparam_kl_forward_cuda(mu, logvar, None)
    # With std = 2.4e17 an ulp of eps is far above the rule's 1e-6 floor: compare with the kernel's eps.
    eps = kernel_eps(kernels, rng_state, mu.shape)
    big = sign > 0
    reference = (mu.double() + torch.exp(0.5 * logvar.double()) * eps.double()).to(dtype)
    assert torch.equal(z.isinf(), reference.isinf())
    if dtype == torch.float16:
        assert torch.equal(torch.sign(z[big]), torch.sign(eps[big]).to(dtype))
        check_sample("logvar -80", z[~big], mu[~big], logvar[~big], eps[~big])
    else:
        assert bool(torch.isfinite(z).all())
        check_sample("logvar +-80", z, mu, logvar, eps)
    assert bool(torch.isfinite(kl).all())
    check_kl(f"logvar +-80 {dtype}", kl, mu.float(), logvar.float())  # eager in fp32, compared in float64
    grad_z = torch.randn_like(mu)
    grad_logvar = kernels.reparam_backward_cuda(grad_z, logvar, rng_state)
    if dtype != torch.float16:
        check_sample_gradient("logvar +-80", grad_logvar, grad_z, logvar, eps)
    grad_mu, grad_logvar = kernels.kl_backward_cuda(
        torch.ones(64, device="cuda", dtype=torch.float64), mu, logvar
    )
    assert bool(torch.isfinite(grad_mu).all())
    assert bool(torch.isfinite(grad_logvar).all()) == (dtype != torch.float16), (
        "0.5 (e^80 - 1) overflows fp16 only"
    )


@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0), (2, 0, 3)])
def test_empty_tensors(kernels, shape):
    """Defined results without a launch, and no noise drawn."""
    mu, logvar = (torch.empty(shape, device="cuda") for _ in range(2))
    offset = generator_offset()
    z, rng_state = kernels.reparam_forward_cuda(mu, logvar, None)
    assert z.shape == shape and rng_state.shape == (2,)
    assert kernels.reparam_backward_cuda(z, logvar, rng_state).shape == shape
    rows = math.prod(shape[:-1])
    assert torch.equal(
        kernels.kl_forward_cuda(mu, logvar), torch.zeros(rows, device="cuda", dtype=torch.float64)
    )
    grad_mu, grad_logvar = kernels.kl_backward_cuda(
        torch.ones(rows, device="cuda", dtype=torch.float64), mu, logvar
    )
    assert grad_mu.shape == shape and grad_logvar.shape == shape
    z, _, kl = kernels.reparam_kl_forward_cuda(mu, logvar, None)
    assert z.shape == shape and torch.equal(kl, torch.zeros(rows, device="cuda", dtype=torch.float64))
    assert generator_offset() == offset


def test_bad_arguments_are_refused(kernels):
    mu, logvar = inputs((10, 4), torch.float32)
    cases = [
        (lambda: kernels.reparam_forward_cuda(mu, logvar.cpu(), None), "CUDA"),
        (lambda: kernels.reparam_forward_cuda(mu, logvar.double(), None), "dtype"),
        (lambda: kernels.reparam_forward_cuda(mu, logvar[:, :3].contiguous(), None), "shape"),
        (lambda: kernels.reparam_forward_cuda(mu.t(), logvar.t(), None), "contiguous"),
        (lambda: kernels.reparam_forward_cuda(mu.int(), logvar.int(), None), "float"),
        (lambda: kernels.reparam_forward_cuda(mu, logvar, torch.Generator()), "cuda"),
        (
            lambda: kernels.reparam_backward_cuda(
                mu, logvar, torch.zeros(3, dtype=torch.int64, device="cuda")
            ),
            "shape",
        ),
        (lambda: kernels.reparam_backward_cuda(mu, logvar, torch.zeros(2, device="cuda")), "int64"),
        (lambda: kernels.kl_forward_cuda(mu[0, 0], logvar[0, 0]), "dimension"),
        (
            lambda: kernels.kl_backward_cuda(torch.ones(9, device="cuda", dtype=torch.float64), mu, logvar),
            "shape",
        ),
        (lambda: kernels.kl_backward_cuda(torch.ones(10, device="cuda").half(), mu, logvar), "Double"),
    ]
    for call, words in cases:
        with pytest.raises(RuntimeError, match=words):
            call()


def test_graph_replays_draw_fresh_noise_equal_to_the_eager_sequence(kernels):
    """philox_cuda_state unpacked in the kernel: each replay reads the generator's state of that replay,
    records it in rng_state, and backward (captured too) reads rng_state from device memory."""
    mu, logvar = inputs((1003, 7), torch.float32)
    grad_z = torch.randn_like(mu)

    def step():
        z, rng_state = kernels.reparam_forward_cuda(mu, logvar, None)
        grad_logvar = kernels.reparam_backward_cuda(grad_z, logvar, rng_state)
        z_kl, state_kl, kl = kernels.reparam_kl_forward_cuda(mu, logvar, None)
        return z, rng_state, grad_logvar, z_kl, state_kl, kl

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()

    torch.manual_seed(2024)
    replayed = []
    for _ in range(3):
        graph.replay()
        replayed.append([t.clone() for t in static])
    torch.manual_seed(2024)
    eager = [step() for _ in range(3)]
    for replay, expected in zip(replayed, eager):
        for got, want in zip(replay, expected):
            assert torch.equal(got, want)
    assert not torch.equal(replayed[0][0], replayed[1][0]), "each replay must draw fresh noise"
    check_sample("replay", replayed[2][0], mu, logvar, recorded_eps(replayed[2][1], mu.shape))
    check_sample_gradient("replay", replayed[2][2], grad_z, logvar, recorded_eps(replayed[2][1], mu.shape))


def test_noise_is_standard_normal_and_uncorrelated(kernels):
    """Over n = 2^22 samples recovered as (z - mu) / std, each statistic lies within 6 standard errors
    of N(0, 1)'s (standard errors of a normal sample: mean 1/sqrt(n), variance sqrt(2/n), skew
    sqrt(6/n), excess kurtosis sqrt(24/n), a correlation 1/sqrt(n); a false alarm has probability ~2e-9
    each), and a Kolmogorov-Smirnov test at significance 1e-4 holds on 1e6 of them."""
    scipy_stats = pytest.importorskip("scipy.stats")
    n = 1 << 22
    mu, logvar = inputs((n // 1024, 1024), torch.float32)
    z1, z2 = (kernels.reparam_forward_cuda(mu, logvar, None)[0] for _ in range(2))
    std = torch.exp(0.5 * logvar.double())
    e1, e2 = ((z.double() - mu.double()) / std for z in (z1, z2))
    e1, e2 = e1.flatten(), e2.flatten()
    bound = 6 / math.sqrt(n)
    centred = e1 - e1.mean()
    variance = centred.pow(2).mean()
    assert abs(float(e1.mean())) < bound
    assert abs(float(variance) - 1) < 6 * math.sqrt(2 / n)
    assert abs(float(centred.pow(3).mean() / variance**1.5)) < 6 * math.sqrt(6 / n)
    assert abs(float(centred.pow(4).mean() / variance**2) - 3) < 6 * math.sqrt(24 / n)
    for lag in (1, 2, 3, 4, 5):  # within a Philox group (lags 1-3) and across groups
        assert abs(float(torch.corrcoef(torch.stack([e1[:-lag], e1[lag:]]))[0, 1])) < bound
    assert abs(float(torch.corrcoef(torch.stack([e1, e2]))[0, 1])) < bound, "successive calls correlate"
    assert scipy_stats.kstest(e1[:1_000_000].cpu().numpy(), "norm").pvalue > 1e-4


def test_indices_past_2_31(kernels):
    """n = 2^31 + 8192 float32 elements (five 8 GiB tensors): with logvar = 0 and grad_z = 2,
    grad_logvar = eps exactly and z = mu + eps rounded once, so z == mu + grad_logvar bit for bit;
    a 32-bit index would wrap and repeat the first elements' noise."""
    if torch.cuda.get_device_properties(0).total_memory < 48 * 2**30:
        pytest.skip("needs 48 GiB of GPU memory")
    n = (1 << 31) + 8192
    mu = torch.randn(n, device="cuda")
    logvar = torch.zeros(n, device="cuda")
    z, rng_state = kernels.reparam_forward_cuda(mu, logvar, None)
    grad_logvar = kernels.reparam_backward_cuda(torch.full_like(mu, 2.0), logvar, rng_state)
    for start in (0, (1 << 31) - 4096, n - 4096):
        window = slice(start, start + 4096)
        assert torch.equal(z[window], mu[window] + grad_logvar[window])
    assert not torch.equal(grad_logvar[(1 << 31) : (1 << 31) + 4096], grad_logvar[:4096])


def test_kl_rows_past_2_31(kernels):
    """Two rows of 2^30 + 4096 bfloat16 elements: mu = 0.5, logvar = 0 make every term 0.25 and every
    partial sum exact, so kl = 2^27 + 512 per row exactly, in any order; grad_mu = grad_kl[row] * 0.5."""
    if torch.cuda.get_device_properties(0).total_memory < 32 * 2**30:
        pytest.skip("needs 32 GiB of GPU memory")
    shape = (2, (1 << 30) + 4096)
    mu = torch.full(shape, 0.5, device="cuda", dtype=torch.bfloat16)
    logvar = torch.zeros(shape, device="cuda", dtype=torch.bfloat16)
    expected = torch.full((2,), 2.0**27 + 512, device="cuda", dtype=torch.float64)
    assert torch.equal(kernels.kl_forward_cuda(mu, logvar), expected)
    grad_kl = torch.tensor([1.0, 2.0], device="cuda", dtype=torch.float64)
    grad_mu, grad_logvar = kernels.kl_backward_cuda(grad_kl, mu, logvar)
    assert bool((grad_mu[0] == 0.5).all()) and bool((grad_mu[1] == 1.0).all())
    assert not bool(grad_logvar.any())
    del grad_mu, grad_logvar
    torch.manual_seed(5)
    z, _, kl = kernels.reparam_kl_forward_cuda(mu, logvar, None)
    assert torch.equal(kl, expected)
    torch.manual_seed(5)
    assert torch.equal(z, kernels.reparam_forward_cuda(mu, logvar, None)[0])


# ---------------------------------------------------------------------------------------------------
# The public API on the cuda backend


def leaves(shape, dtype):
    return [t.clone().requires_grad_() for t in inputs(shape, dtype)]


def public_sample(mu, logvar, seed, **kwargs):
    torch.manual_seed(seed)
    with genfast.use_backend("cuda"):
        return genfast.reparameterize(mu, logvar, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 100), (1003, 784), (3, 5, 7)])
def test_public_reparameterize_is_the_kernel_with_its_gradients(kernels, shape, dtype):
    mu, logvar = leaves(shape, dtype)
    z = public_sample(mu, logvar, seed=31)
    torch.manual_seed(31)
    expected, rng_state = kernels.reparam_forward_cuda(mu.detach(), logvar.detach(), None)
    assert torch.equal(z, expected)
    grad_z = torch.randn_like(z)
    grad_mu, grad_logvar = torch.autograd.grad(z, (mu, logvar), grad_z)
    assert torch.equal(grad_mu, grad_z), "grad_mu is grad_z"
    check_sample_gradient(
        f"public {shape} {dtype}", grad_logvar, grad_z, logvar.detach(), recorded_eps(rng_state, shape)
    )


def test_public_reparameterize_of_non_contiguous_inputs(kernels):
    """A transposed view samples as its contiguous copy: eps follows the logical row-major index."""
    mu, logvar = (t.t() for t in inputs((784, 100), torch.float32))
    z = public_sample(mu, logvar, seed=3)
    torch.manual_seed(3)
    assert torch.equal(z, kernels.reparam_forward_cuda(mu.contiguous(), logvar.contiguous(), None)[0])
    z_generator = public_sample(mu, logvar, seed=0, generator=torch.Generator(device="cuda").manual_seed(3))
    assert torch.equal(z_generator, z)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_public_kl_divergence_and_reparameterize_kl(kernels, reduction, dtype):
    shape = (1003, 20)
    mu, logvar = leaves(shape, dtype)
    with genfast.use_backend("cuda"):
        kl = genfast.kl_divergence(mu, logvar, reduction=reduction)
        torch.manual_seed(17)
        z, kl_fused = genfast.reparameterize_kl(mu, logvar, reduction=reduction)
    torch.manual_seed(17)
    assert torch.equal(z, kernels.reparam_forward_cuda(mu.detach(), logvar.detach(), None)[0])
    assert torch.equal(kl, kl_fused)
    rows = kl_rows(mu.detach(), logvar.detach())
    rows64 = kl_rows(mu.detach().double(), logvar.detach().double())
    reduce = {"none": lambda t: t, "sum": torch.sum, "mean": torch.mean}[reduction]
    assert kl.shape == reduce(rows64).shape
    assert_within_rule(f"public kl {reduction} {dtype}", kl, reduce(rows).to(kl.dtype), reduce(rows64))
    grad_kl = torch.randn_like(kl)
    grad_mu, grad_logvar = torch.autograd.grad(kl, (mu, logvar), grad_kl)
    per_row = grad_kl.float() * torch.ones(shape[0], device="cuda") / (shape[0] if reduction == "mean" else 1)
    check_kl_gradients(
        f"public {reduction} {dtype}", grad_mu, grad_logvar, per_row, mu.detach(), logvar.detach()
    )


def test_public_forward_saves_no_noise(kernels):
    """Backward regenerates eps: the forward allocates z (and a 16-byte rng_state) and saves only inputs."""
    mu, logvar = leaves((4096, 1024), torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with genfast.use_backend("cuda"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z = genfast.reparameterize(mu, logvar)
    grown = torch.cuda.memory_allocated() - before
    z_bytes = z.numel() * z.element_size()
    assert grown <= z_bytes + 65536, f"forward kept {grown - z_bytes} bytes besides z"
    for t in saved:
        if t.numel() >= mu.numel():
            assert t.data_ptr() in (mu.data_ptr(), logvar.data_ptr()), f"forward saved a new {tuple(t.shape)}"
    z.backward(torch.ones_like(z))
    assert torch.equal(mu.grad, torch.ones_like(mu))


def test_public_compiled_step_matches_eager(kernels):
    """torch.compile(fullgraph=True) calls the same kernels with the same generator state: the same z
    and KL bits, and gradients within the rule of eager genfast's (float64 reference, same eps)."""

    def step(mu, logvar):
        return genfast.reparameterize_kl(mu, logvar, reduction="none")

    mu, logvar = leaves((256, 32), torch.float32)
    grad_z, grad_kl = torch.randn(256, 32, device="cuda"), torch.randn(256, device="cuda")
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        torch.manual_seed(41)
        with genfast.use_backend("cuda"):
            z, kl = fn(mu, logvar)
        results.append((z, kl, *torch.autograd.grad((z, kl), (mu, logvar), (grad_z, grad_kl))))
    (z, kl, *eager_grads), (compiled_z, compiled_kl, *compiled_grads) = results
    assert torch.equal(compiled_z, z) and torch.equal(compiled_kl, kl)
    torch.manual_seed(41)
    eps = kernel_eps(
        kernels, kernels.reparam_forward_cuda(mu.detach(), logvar.detach(), None)[1], mu.shape
    ).double()
    m, lv, g = mu.detach().double(), logvar.detach().double(), grad_kl.double()[:, None]
    std = torch.exp(0.5 * lv)
    references = (grad_z.double() + g * m, 0.5 * grad_z.double() * eps * std + 0.5 * g * torch.expm1(lv))
    for label, eager, compiled, reference in zip(
        ("grad_mu", "grad_logvar"), eager_grads, compiled_grads, references
    ):
        assert_within_rule(f"compiled {label}", compiled, eager, reference)


def test_public_bad_devices_are_refused(kernels):
    mu, logvar = inputs((10, 4), torch.float32)
    with genfast.use_backend("cuda"):
        with pytest.raises((ValueError, TypeError), match="logvar"):
            genfast.reparameterize(mu, logvar.cpu())
        with pytest.raises((ValueError, TypeError), match="logvar"):
            genfast.kl_divergence(mu, logvar.cpu())
        with pytest.raises((ValueError, TypeError), match="generator"):
            genfast.reparameterize(mu, logvar, generator=torch.Generator())


# ---------------------------------------------------------------------------------------------------
# Both GPU backends (cuda, triton) through the public API: recorded noise, distribution, graphs


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 100), (1003, 784), (3, 5, 7)])
def test_backend_sample_kl_and_gradients(backend, shape, dtype):
    require_backend(backend, "cuda")
    mu, logvar = leaves(shape, dtype)
    with genfast.use_backend(backend):
        z, rng_state = torch.ops.genfast.reparameterize(mu, logvar)
        grad_z = torch.randn_like(z)
        grad_mu, grad_logvar = torch.autograd.grad(z, (mu, logvar), grad_z)
        kl = genfast.kl_divergence(mu, logvar, reduction="none")
        grad_kl = torch.randn_like(kl)
        kl_grads = torch.autograd.grad(kl, (mu, logvar), grad_kl)
    assert torch.equal(grad_mu, grad_z)
    eps = recorded_eps(rng_state, shape)
    check_sample(f"{backend} {shape} {dtype}", z, mu.detach(), logvar.detach(), eps)
    check_sample_gradient(f"{backend} {shape} {dtype}", grad_logvar, grad_z, logvar.detach(), eps)
    rows64 = kl_rows(mu.detach().double(), logvar.detach().double())
    assert_within_rule(f"{backend} kl {dtype}", kl, kl_rows(mu.detach(), logvar.detach()), rows64)
    check_kl_gradients(f"{backend} {dtype}", *kl_grads, grad_kl.double(), mu.detach(), logvar.detach())


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_backend_noise_is_standard_normal(backend):
    from tests.test_reparam import assert_standard_normal

    require_backend(backend, "cuda")
    mu, logvar = inputs((1 << 18, 64), torch.float32)

    def recovered():
        with genfast.use_backend(backend):
            z = genfast.reparameterize(mu, logvar)
        return ((z.double() - mu.double()) / torch.exp(0.5 * logvar.double())).reshape(-1)

    assert_standard_normal(backend, recovered(), recovered())


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_backend_graph_replays_match_the_eager_sequence(backend):
    """Replays of a captured forward + backward draw fresh noise, equal to eager calls under the same seed
    (the warm-up calls compile the kernels before the capture)."""
    require_backend(backend, "cuda")
    mu, logvar = leaves((1003, 7), torch.float32)
    grad_z = torch.randn(1003, 7, device="cuda")

    def step():
        with genfast.use_backend(backend):
            z, kl = genfast.reparameterize_kl(mu, logvar, reduction="sum")
        return (z, kl, *torch.autograd.grad((z, kl), (mu, logvar), (grad_z, torch.ones_like(kl))))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    torch.manual_seed(78)
    replayed = []
    for _ in range(3):
        graph.replay()
        replayed.append([t.clone() for t in static])
    torch.manual_seed(78)
    eager = [[t.detach() for t in step()] for _ in range(3)]
    for replay, expected in zip(replayed, eager):
        for got, want in zip(replay, expected):
            assert torch.equal(got, want)
    assert not torch.equal(replayed[0][0], replayed[1][0])
