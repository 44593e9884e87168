"""Reparameterization sampling and the Gaussian KL on the backends this machine runs (reference, cpu,
triton interpreted), against the float64 reference with the very noise the forward drew.

The noise a call drew is read back through the custom op, which returns the call's rng_state (seed,
offset) beside z; genfast.reference.noise(rng_state, shape) regenerates it (the public result is z alone).
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import genfast
from genfast import reference
from genfast.rng import new_rng_state
from tests.conftest import non_contiguous, require_backend
from tests.tolerance import assert_within_rule

BACKENDS = ["reference", "cpu", "triton"]
# Under the Triton interpreter (numpy, one program at a time) only float32/float64 and small shapes.
SHAPES = {
    "reference": [(1, 1), (7, 100), (100, 784), (1003, 7), (3, 5, 7)],
    "cpu": [(1, 1), (7, 100), (100, 784), (1003, 7), (3, 5, 7), (1, 100003)],
    "triton": [(1, 1), (7, 100), (33, 7), (3, 5, 7)],
}
DTYPES = {
    "reference": [torch.float32, torch.float64, torch.bfloat16, torch.float16],
    "cpu": [torch.float32, torch.float64, torch.bfloat16, torch.float16],
    "triton": [torch.float32, torch.float64],
}
CASES = [(b, s, d) for b in BACKENDS for s in SHAPES[b] for d in DTYPES[b]]


def leaves(shape, dtype, scale=1.0):
    mu, logvar = (torch.randn(shape, dtype=torch.float64) * scale for _ in range(2))
    return mu.to(dtype).requires_grad_(), logvar.to(dtype).requires_grad_()


def sample_op(backend, mu, logvar, generator=None):
    """(z, rng_state) through the custom op on `backend`: the testing window onto the noise."""
    with genfast.use_backend(backend):
        return torch.ops.genfast.reparameterize(mu, logvar, generator)


def eps_of(rng_state, shape):
    return reference.noise(rng_state, shape)


def check_sample(label, z, mu, logvar, eps):
    m, lv, e = mu.detach(), logvar.detach(), eps
    exact = m.double() + torch.exp(0.5 * lv.double()) * e.double()
    eager = m + torch.exp(0.5 * lv) * e.to(m.dtype)
    assert_within_rule(f"{label} z", z, eager, exact)


def check_sample_gradient(label, grad_logvar, grad_z, logvar, eps):
    lv = logvar.detach()
    exact = 0.5 * grad_z.double() * eps.double() * torch.exp(0.5 * lv.double())
    eager = 0.5 * grad_z * eps.to(lv.dtype) * torch.exp(0.5 * lv)
    assert_within_rule(f"{label} grad_logvar", grad_logvar, eager, exact)


def kl_plain(mu, logvar):
    """KL per sample as VAE code writes it, at the inputs' dtype."""
    return 0.5 * (torch.exp(logvar) - 1 - logvar + mu * mu).sum(-1)


def reduce(values, reduction):
    return {"none": lambda t: t, "sum": torch.sum, "mean": torch.mean}[reduction](values)


# ---------------------------------------------------------------------------------------------------
# Sampling: values and gradients with the forward's own noise


@pytest.mark.parametrize("backend, shape, dtype", CASES)
def test_sample_and_gradients_use_the_forward_noise(backend, shape, dtype):
    require_backend(backend, "cpu")
    mu, logvar = leaves(shape, dtype)
    z, rng_state = sample_op(backend, mu, logvar)
    assert z.shape == mu.shape and z.dtype == dtype
    assert rng_state.dtype == torch.int64 and rng_state.shape == (2,)
    eps = eps_of(rng_state, shape)
    check_sample(f"{backend} {shape} {dtype}", z, mu, logvar, eps)
    grad_z = torch.randn(shape, dtype=torch.float64).to(dtype)
    with genfast.use_backend(backend):
        grad_mu, grad_logvar = torch.autograd.grad(z, (mu, logvar), grad_z)
    assert grad_mu is grad_z or torch.equal(grad_mu, grad_z), "grad_mu is grad_z"
    check_sample_gradient(f"{backend} {shape} {dtype}", grad_logvar, grad_z, logvar, eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_function_is_the_op(backend):
    """genfast.reparameterize (eager autograd.Function) draws what the custom op draws, gradients too."""
    require_backend(backend, "cpu")
    mu, logvar = leaves((33, 20), torch.float32)
    grad_z = torch.randn(33, 20)
    results = []
    for fn in (lambda: sample_op(backend, mu, logvar)[0], lambda: genfast.reparameterize(mu, logvar)):
        torch.manual_seed(1234)
        with genfast.use_backend(backend):
            z = fn()
            results.append((z, *torch.autograd.grad(z, (mu, logvar), grad_z)))
    for ours, op in zip(*results):
        assert torch.equal(ours, op)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_sample_as_their_contiguous_copies(backend):
    require_backend(backend, "cpu")
    mu, logvar = (t.detach().t() for t in leaves((20, 33), torch.float32))
    assert not mu.is_contiguous()
    z, rng_state = sample_op(backend, mu, logvar, torch.Generator().manual_seed(3))
    contiguous, _ = sample_op(backend, mu.contiguous(), logvar.contiguous(), torch.Generator().manual_seed(3))
    assert torch.equal(z, contiguous)
    check_sample(f"{backend} transposed", z, mu, logvar, eps_of(rng_state, mu.shape))
    with genfast.use_backend(backend):
        kl = genfast.kl_divergence(mu, logvar, reduction="none")
        assert torch.equal(kl, genfast.kl_divergence(mu.contiguous(), logvar.contiguous(), reduction="none"))
    exact = kl_plain(mu.double(), logvar.double())
    assert_within_rule(f"{backend} transposed kl", kl, kl_plain(mu, logvar), exact)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_backends_draw_the_reference_noise(backend):
    """Every backend's eps is philox_normal's: the same bits, log/sin/cos within an ulp or two."""
    require_backend(backend, "cpu")
    shape = (7, 1003) if backend == "cpu" else (3, 103)
    ones = torch.ones(shape)
    z, rng_state = sample_op(backend, 0 * ones, 0 * ones)  # mu = 0, std = 1: z is eps
    eps = eps_of(rng_state, shape)
    torch.testing.assert_close(z, eps, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# The noise is a standard normal (bounds derived below, not tuned)

# n i.i.d. N(0, 1) samples: the sample mean, variance, skewness and excess kurtosis have standard errors
# sqrt(1/n), sqrt(2/n), sqrt(6/n), sqrt(24/n), and a lag-k correlation sqrt(1/n). Bounds of 6 standard
# errors: each false alarm has probability 2e-9. Kolmogorov-Smirnov at significance 1e-4: the asymptotic
# critical value of sqrt(n) D is sqrt(-ln(1e-4 / 2) / 2) = 2.2.
N_SAMPLES = 1 << 20
SIGMAS = 6.0
KS_CRITICAL = math.sqrt(-math.log(1e-4 / 2) / 2)


def recovered_noise(backend, mu, logvar):
    with genfast.use_backend(backend):
        z = genfast.reparameterize(mu, logvar)
    return ((z.double() - mu.double()) / torch.exp(0.5 * logvar.double())).reshape(-1)


def assert_standard_normal(backend: str, x: torch.Tensor, following: torch.Tensor) -> None:
    """x: the noise of one call (flat, float64, rows of 64); following: the next call's."""
    n = x.numel()
    mean = x.mean()
    centred = x - mean
    var = centred.square().mean()
    skew = (centred**3).mean() / var**1.5
    kurtosis = (centred**4).mean() / var**2 - 3
    for name, value, standard_error in (
        ("mean", mean, 1 / n),
        ("variance", var - 1, 2 / n),
        ("skewness", skew, 6 / n),
        ("excess kurtosis", kurtosis, 24 / n),
    ):
        bound = SIGMAS * math.sqrt(standard_error)
        assert abs(float(value)) < bound, f"{backend}: {name} off by {float(value):.3g} (bound {bound:.3g})"
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=x.device) / n
    ks = float((ranks - torch.special.ndtr(x.sort().values)).abs().max())
    assert math.sqrt(n) * ks < KS_CRITICAL, (
        f"{backend}: KS statistic {math.sqrt(n) * ks:.3f} >= {KS_CRITICAL:.3f}"
    )
    bound = SIGMAS / math.sqrt(n)
    for lag in (1, 2, 3, 4, 5, 64):  # within a Philox group (1..3), across groups (4, 5), across rows (64)
        corr = float((centred[:-lag] * centred[lag:]).mean() / var)
        assert abs(corr) < bound, f"{backend}: lag-{lag} correlation {corr:.3g} (bound {bound:.3g})"
    corr = float(((following - following.mean()) * centred).mean() / var)
    assert abs(corr) < bound, f"{backend}: successive calls correlate ({corr:.3g}, bound {bound:.3g})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_is_standard_normal(backend):
    require_backend(backend, "cpu")
    mu, logvar = (t.detach() for t in leaves((N_SAMPLES // 64, 64), torch.float32))
    assert_standard_normal(
        backend, recovered_noise(backend, mu, logvar), recovered_noise(backend, mu, logvar)
    )


# ---------------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_noise_fresh_noise_otherwise(backend):
    require_backend(backend, "cpu")
    mu, logvar = (t.detach() for t in leaves((100, 7), torch.float32))

    def draw():
        with genfast.use_backend(backend):
            return genfast.reparameterize(mu, logvar)

    torch.manual_seed(7)
    first, following = draw(), draw()
    torch.manual_seed(7)
    again = draw()
    torch.manual_seed(8)
    other = draw()
    assert torch.equal(first, again)
    assert not torch.equal(first, following) and not torch.equal(first, other)
    generators = [torch.Generator().manual_seed(99) for _ in range(2)]
    state = torch.get_rng_state()
    with genfast.use_backend(backend):
        a, b = (genfast.reparameterize(mu, logvar, generator=g) for g in generators)
    assert torch.equal(a, b) and not torch.equal(a, first)
    assert torch.equal(state, torch.get_rng_state()), "an explicit generator leaves the default one alone"


def test_cpu_result_does_not_depend_on_the_thread_count():
    require_backend("cpu", "cpu")
    script = (
        "import hashlib, sys, torch, genfast\n"
        "torch.set_num_threads(int(sys.argv[1]))\n"
        "mu = torch.linspace(-2, 2, 1003 * 257).view(1003, 257); logvar = mu.flip(0)\n"
        "with genfast.use_backend('cpu'):\n"
        "    z, kl = genfast.reparameterize_kl(mu, logvar, generator=torch.Generator().manual_seed(5),"
        " reduction='none')\n"
        "    big = genfast.reparameterize(torch.zeros(1 << 20), torch.zeros(1 << 20),"
        " generator=torch.Generator().manual_seed(6))\n"
        "print(hashlib.sha256(torch.cat([z.flatten(), kl, big]).numpy().tobytes()).hexdigest())\n"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script, str(threads)], capture_output=True, text=True, check=True
        ).stdout
        for threads in (1, 2, 3)
    }
    assert len(outputs) == 1, outputs


# ---------------------------------------------------------------------------------------------------
# KL divergence


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("backend, shape, dtype", CASES)
def test_kl_divergence_and_gradients(backend, shape, dtype, reduction):
    require_backend(backend, "cpu")
    mu, logvar = leaves(shape, dtype)
    with genfast.use_backend(backend):
        kl = genfast.kl_divergence(mu, logvar, reduction=reduction)
    m64, lv64 = (t.detach().double().requires_grad_() for t in (mu, logvar))
    exact = reduce(kl_plain(m64, lv64), reduction)
    eager_in = [t.detach().clone().requires_grad_() for t in (mu, logvar)]
    eager = reduce(kl_plain(*eager_in), reduction)
    label = f"{backend} {shape} {dtype} {reduction}"
    assert kl.dtype == dtype and kl.shape == exact.shape
    assert_within_rule(f"{label} kl", kl, eager, exact)
    grad = (
        torch.randn(exact.shape, dtype=torch.float64).to(dtype).double()
    )  # the same grad_output for all three
    with genfast.use_backend(backend):
        ours = torch.autograd.grad(kl, (mu, logvar), grad.to(dtype))
    for name, g, e, x in zip(
        ("grad_mu", "grad_logvar"),
        ours,
        torch.autograd.grad(eager, eager_in, grad.to(dtype)),
        torch.autograd.grad(exact, (m64, lv64), grad),
    ):
        assert_within_rule(f"{label} {name}", g, e, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_bits_are_the_same_run_to_run(backend):
    require_backend(backend, "cpu")
    mu, logvar = (t.detach() for t in leaves((64, 4099 if backend == "cpu" else 130), torch.float32))
    with genfast.use_backend(backend):
        results = [genfast.kl_divergence(mu, logvar, reduction="none") for _ in range(2)]
    assert torch.equal(*results)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_sample_and_kl_equal_the_separate_ops(backend, reduction):
    require_backend(backend, "cpu")
    mu, logvar = leaves((33, 7), torch.float32)
    grad_z = torch.randn(33, 7)
    with genfast.use_backend(backend):
        torch.manual_seed(11)
        z, kl = genfast.reparameterize_kl(mu, logvar, reduction=reduction)
        fused = torch.autograd.grad((z, kl), (mu, logvar), (grad_z, torch.ones_like(kl)))
        torch.manual_seed(11)
        z_alone, kl_alone = genfast.reparameterize(mu, logvar), genfast.kl_divergence(mu, logvar, reduction)
        separate = torch.autograd.grad((z_alone, kl_alone), (mu, logvar), (grad_z, torch.ones_like(kl)))
    assert torch.equal(z, z_alone) and torch.equal(kl, kl_alone)
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b, rtol=2 * torch.finfo(torch.float32).eps, atol=0)


# ---------------------------------------------------------------------------------------------------
# gradcheck, opcheck, compile


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    require_backend(backend, "cpu")
    mu, logvar = leaves((5, 7), torch.float64)

    def sample_and_kl(m, lv):  # a fresh generator of a fixed seed per call: the same noise every time
        return genfast.reparameterize_kl(m, lv, reduction="none", generator=torch.Generator().manual_seed(0))

    with genfast.use_backend(backend):
        assert torch.autograd.gradcheck(sample_and_kl, (mu, logvar))
        assert torch.autograd.gradcheck(lambda m, lv: genfast.kl_divergence(m, lv, "sum"), (mu, logvar))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck(backend):
    require_backend(backend, "cpu")
    mu, logvar = (t.detach().requires_grad_() for t in leaves((7, 20), torch.float32))
    rng_state = new_rng_state(mu.device)
    ops = torch.ops.genfast
    with genfast.use_backend(backend):
        for op, args in (
            (ops.reparameterize.default, (mu, logvar)),
            (ops.reparameterize_kl.default, (mu, logvar)),
            (ops.kl_rows.default, (mu, logvar)),
            (ops.reparameterize_backward.default, (torch.randn(7, 20), logvar.detach(), rng_state)),
            (
                ops.kl_rows_backward.default,
                (torch.randn(7, dtype=torch.float64), mu.detach(), logvar.detach()),
            ),
        ):
            torch.library.opcheck(op, args)
    assert torch.Tag.nondeterministic_seeded in ops.reparameterize.default.tags
    assert torch.Tag.nondeterministic_seeded in ops.reparameterize_kl.default.tags


class TinyVAE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = genfast.nn.FusedLinear(12, 16)
        self.heads = torch.nn.Linear(16, 8)
        self.sample = genfast.nn.Reparameterize()
        self.decoder = genfast.nn.FusedLinear(4, 12, activation="none")

    def forward(self, x):
        mu, logvar = self.heads(self.encoder(x)).chunk(2, dim=-1)
        z = self.sample(mu, logvar)
        return self.decoder(z), genfast.kl_divergence(mu, logvar)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compiled_vae_matches_eager(backend):
    require_backend(backend, "cpu")
    eager = TinyVAE()
    compiled_copy = TinyVAE()
    compiled_copy.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_copy, fullgraph=True)
    x = torch.randn(9, 12)
    results = []
    for model in (eager, compiled):
        torch.manual_seed(5)
        with genfast.use_backend(backend):
            recon, kl = model(x)
            (recon.square().mean() + kl).backward()
        results.append((recon, kl, *(p.grad for p in model.parameters())))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert torch.equal(results[0][0], results[1][0]), "the same noise under compile"


def test_reparameterize_module_samples_in_training_only():
    layer = genfast.nn.Reparameterize()
    mu, logvar = (t.detach() for t in leaves((4, 3), torch.float32))
    assert not torch.equal(layer(mu, logvar), mu)
    layer.eval()
    assert layer(mu, logvar) is mu
    layer.sample_in_eval = True
    assert not torch.equal(layer(mu, logvar), mu)
    assert "sample_in_eval=True" in repr(layer) and not list(layer.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_saves_no_noise(backend):
    """Saved for backward: logvar (the caller's tensor) and the 2-element rng_state, nothing of mu's shape."""
    require_backend(backend, "cpu")
    mu, logvar = leaves((64, 32), torch.float32)
    saved = []
    with (
        genfast.use_backend(backend),
        torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t),
    ):
        genfast.reparameterize(mu, logvar)
    assert len(saved) == 2
    assert saved[0] is logvar or saved[0].data_ptr() == logvar.data_ptr()
    assert saved[1].shape == (2,) and saved[1].dtype == torch.int64


# ---------------------------------------------------------------------------------------------------
# Edge cases and bad input


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_logvar_plus_minus_80(backend, dtype):
    """exp(0.5 * 80) = 2.4e17 and exp(80) = 5.5e34 fit fp32 and bf16: z, KL and gradients stay finite. In
    fp16 (max 65504) z is +-inf wherever the exact result is beyond fp16's range (as in eager code), never
    NaN, and the KL and its logvar gradient overflow to +inf: reported, not silently clipped."""
    require_backend(backend, "cpu")
    mu = torch.randn(64, 33).to(dtype)
    sign = torch.randint(0, 2, mu.shape) * 2 - 1
    logvar = (80.0 * sign).to(dtype)
    with genfast.use_backend(backend):
        z, rng_state = torch.ops.genfast.reparameterize(mu, logvar)
        kl = genfast.kl_divergence(mu, logvar, reduction="none")
        grad_logvar = torch.ops.genfast.reparameterize_backward(torch.ones_like(mu), logvar, rng_state)
    exact = mu.double() + torch.exp(0.5 * logvar.double()) * eps_of(rng_state, mu.shape).double()
    assert not z.isnan().any() and not kl.isnan().any() and not grad_logvar.isnan().any()
    if dtype == torch.float16:
        assert torch.equal(z.isinf(), exact.abs() > torch.finfo(dtype).max)
        assert bool(kl.isinf().all())
    else:
        assert bool(z.isfinite().all() and kl.isfinite().all() and grad_logvar.isfinite().all())
        torch.testing.assert_close(z.double(), exact, rtol=4 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0,), (0, 5), (5, 0), (2, 0, 3)])
def test_empty_tensors(backend, shape):
    """Defined results and no noise drawn."""
    require_backend(backend, "cpu")
    mu, logvar = (torch.empty(shape, requires_grad=True) for _ in range(2))
    state = torch.get_rng_state()
    with genfast.use_backend(backend):
        z = genfast.reparameterize(mu, logvar)
        kl = genfast.kl_divergence(mu, logvar, reduction="none")
        total = genfast.kl_divergence(mu, logvar, reduction="sum")
    assert z.shape == shape and kl.shape == shape[:-1] and float(total) == 0.0
    assert torch.equal(kl, torch.zeros(shape[:-1]))
    (z.sum() + total).backward()
    assert mu.grad.shape == shape
    if backend != "reference":
        assert torch.equal(state, torch.get_rng_state())


def test_mean_over_an_empty_batch_is_refused():
    mu = torch.empty(0, 5)
    with pytest.raises(ValueError, match="empty batch"):
        genfast.kl_divergence(mu, mu, reduction="mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_gives_nan_out(backend):
    require_backend(backend, "cpu")
    mu, logvar = torch.randn(4, 8), torch.randn(4, 8)
    mu[1, 3], logvar[2, 5] = float("nan"), float("nan")
    with genfast.use_backend(backend):
        z, kl = genfast.reparameterize_kl(mu, logvar, reduction="none")
    assert torch.equal(z.isnan(), mu.isnan() | logvar.isnan())
    assert kl.isnan().tolist() == [False, True, True, False]


def test_bad_input_is_refused_with_clear_errors():
    mu, logvar = torch.randn(10, 4), torch.randn(10, 4)
    cases = [
        (lambda: genfast.reparameterize(mu, logvar[:, :3]), ValueError, "logvar: expected mu's shape"),
        (lambda: genfast.reparameterize(mu, logvar.double()), TypeError, "logvar has dtype"),
        (lambda: genfast.reparameterize(mu.int(), logvar.int()), TypeError, "mu: expected dtype"),
        (lambda: genfast.reparameterize(mu, logvar.to("meta")), ValueError, "logvar is on meta"),
        (lambda: genfast.reparameterize(mu.numpy(), logvar), TypeError, "mu: expected a torch.Tensor"),
        (lambda: genfast.reparameterize(mu, logvar, generator=5), TypeError, "generator"),
        (lambda: genfast.kl_divergence(mu, logvar, reduction="avg"), ValueError, "reduction"),
        (lambda: genfast.kl_divergence(mu[0, 0], logvar[0, 0]), ValueError, "at least one dimension"),
        (lambda: genfast.reparameterize_kl(mu, logvar.half()), TypeError, "logvar has dtype"),
    ]
    for call, error, words in cases:
        with pytest.raises(error, match=words):
            call()


def test_second_order_gradients_are_refused():
    mu, logvar = leaves((4, 3), torch.float32)
    z = genfast.reparameterize(mu, logvar)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(z.sum(), logvar, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiled", [False, True])
def test_a_kl_only_loss_gives_the_kl_gradient_even_where_the_sample_scale_overflows(backend, compiled):
    """The defect: with z unused, backward still added the sampling term 0 * exp(0.5 logvar) = 0 * inf = NaN.
    PyTorch never reaches an unused z: grad_logvar is the KL's alone (inf where expm1 overflows too)."""
    require_backend(backend, "cpu")
    mu, logvar = leaves((3, 4), torch.float32)
    with torch.no_grad():
        logvar[0, 0], logvar[1, 1] = 180.0, float("inf")  # exp(90) and exp(inf) overflow float32

    def kl_only(m, lv):
        return genfast.reparameterize_kl(m, lv, reduction="sum")[1]

    fn = kl_only
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(kl_only, fullgraph=True)
    with genfast.use_backend(backend):
        grad_mu, grad_logvar = torch.autograd.grad(fn(mu, logvar), (mu, logvar))
    m, lv = mu.detach().double().requires_grad_(), logvar.detach().double().requires_grad_()
    expected = torch.autograd.grad(reference.kl_divergence(m, lv, "sum"), (m, lv))
    assert not grad_logvar.isnan().any()
    torch.testing.assert_close(grad_logvar, expected[1].float())
    torch.testing.assert_close(grad_mu, expected[0].float())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck_with_non_contiguous_inputs(backend):
    require_backend(backend, "cpu")
    mu, logvar = (non_contiguous(t) for t in leaves((7, 20), torch.float32))
    assert not mu.is_contiguous()
    rng_state = new_rng_state(mu.device)
    ops = torch.ops.genfast
    with genfast.use_backend(backend):
        for op, args in (
            (ops.reparameterize.default, (mu, logvar)),
            (ops.reparameterize_kl.default, (mu, logvar)),
            (ops.kl_rows.default, (mu, logvar)),
            (
                ops.reparameterize_backward.default,
                (non_contiguous(torch.randn(7, 20)), logvar.detach(), rng_state),
            ),
            (
                ops.kl_rows_backward.default,
                (non_contiguous(torch.randn(7, dtype=torch.float64)), mu.detach(), logvar.detach()),
            ),
        ):
            torch.library.opcheck(op, args)
