"""The fused losses on every backend against the float64 reference: values, gradients, formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import genfast
from genfast import reference
from genfast.loss_terms import GAN_KINDS
from tests.conftest import require_backend
from tests.tolerance import assert_within_rule

REDUCTIONS = ["mean", "sum", "none"]
KINDS = sorted(GAN_KINDS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (batch, features, latent): 1, 7, 100, 784 and 1000+ in each role, up to MNIST's (4096, 784).
CPU_SHAPES = [(1, 1, 1), (7, 100, 7), (100, 784, 20), (1031, 7, 100), (4096, 784, 32)]
# The Triton interpreter is slow: small shapes, one crossing the 128-wide column block.
TRITON_SHAPES = [(1, 1, 1), (7, 100, 7), (9, 130, 3)]
GAN_SHAPES = [(1,), (7, 1), (64, 1), (1000,), (4096, 1), (33, 100)]
TRITON_GAN_SHAPES = [(1,), (7, 1), (1500,)]


def elbo_inputs(batch, features, latent, dtype, target_dtype=None, device="cpu"):
    kw = {"dtype": torch.float64, "device": device}
    recon = torch.randn(batch, features, **kw) * 3
    target = torch.rand(batch, features, **kw)
    if target_dtype == torch.uint8:
        target = torch.randint(0, 256, (batch, features), dtype=torch.uint8, device=device)
    elif target_dtype == torch.bool:
        target = torch.rand(batch, features, device=device) < 0.3
    mu, logvar = torch.randn(batch, latent, **kw), torch.randn(batch, latent, **kw)
    return recon.to(dtype), target if target_dtype else target.to(dtype), mu.to(dtype), logvar.to(dtype)


def powers_of_two(shape, device="cpu"):
    """Random grad_output weights +-2^k: scaling by them is exact in every dtype, as with loss scaling.

    The saved gradient is rounded to the inputs' dtype, so any other weight adds a rounding, which at
    float16/bfloat16 shows on a single element (the rule compares RMS errors: one element is a coin
    flip); test_arbitrary_weights_at_low_precision covers those on a batch where the RMS means something.
    """
    signs = torch.randint(0, 2, shape, device=device).double() * 2 - 1
    return signs * torch.randint(-3, 4, shape, device=device).double().exp2()


def check_elbo(
    backend, recon, target, mu, logvar, beta=0.5, recon_loss="bce", reduction="mean", weights=None
):
    """Loss, both terms and the three gradients of a weighted sum of (loss, recon term, KL term), at
    recon's dtype in genfast and in eager PyTorch, against the float64 reference.

    A weighted term adds its weight to the loss's (w_loss + w_term: not a power of two), so at
    float16/bfloat16 only the loss is weighted here, and beta is a power of two.
    """
    shape = (recon.shape[0],) if reduction == "none" else ()
    low_precision = recon.dtype in (torch.float16, torch.bfloat16)
    device = recon.device
    weights = weights or [powers_of_two(shape, device)] + [
        torch.zeros(shape, device=device) if low_precision else powers_of_two(shape, device) for _ in range(2)
    ]
    results = {}
    for name, dtype in (("genfast", recon.dtype), ("eager", recon.dtype), ("reference", torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (recon, mu, logvar)]
        tgt = target if target.dtype in (torch.uint8, torch.bool) else target.to(dtype)
        if name == "genfast":
            with genfast.use_backend(backend):
                out = genfast.elbo_loss(
                    leaves[0],
                    tgt,
                    *leaves[1:],
                    beta=beta,
                    recon_loss=recon_loss,
                    reduction=reduction,
                    return_terms=True,
                )
        else:
            out = reference.elbo_terms(leaves[0], tgt, *leaves[1:], beta, recon_loss, reduction)
        torch.autograd.backward(out, [w.to(dtype) for w in weights])
        results[name] = [*out] + [t.grad for t in leaves]
    labels = ("loss", "recon_term", "kl_term", "grad_recon", "grad_mu", "grad_logvar")
    for label, ours, eager, ref in zip(labels, *results.values()):
        assert_within_rule(f"{backend} {recon_loss} {reduction} {recon.dtype} {label}", ours, eager, ref)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("recon_loss", ["bce", "mse"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_elbo_cpu_backends_match_reference(backend, shape, dtype, recon_loss, reduction):
    require_backend(backend, "cpu")
    check_elbo(backend, *elbo_inputs(*shape, dtype), recon_loss=recon_loss, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("recon_loss", ["bce", "mse"])
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_elbo_triton_interpreted_matches_reference(shape, recon_loss, reduction):
    require_backend("triton", "cpu")
    check_elbo("triton", *elbo_inputs(*shape, torch.float32), recon_loss=recon_loss, reduction=reduction)


@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.bool])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_elbo_byte_targets(backend, target_dtype):
    """uint8 targets are pixels 0..255 meaning 0..1 (MNIST as stored); bool targets are 0/1."""
    require_backend(backend, "cpu")
    batch, features = (100, 784) if backend != "triton" else (5, 40)
    recon, target, mu, logvar = elbo_inputs(batch, features, 8, torch.float32, target_dtype)
    check_elbo(backend, recon, target, mu, logvar)
    as_float = target.float() / 255 if target_dtype == torch.uint8 else target.float()
    with genfast.use_backend(backend):
        torch.testing.assert_close(
            genfast.elbo_loss(recon, target, mu, logvar), genfast.elbo_loss(recon, as_float, mu, logvar)
        )


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_elbo_non_contiguous_and_image_shaped_inputs(backend):
    require_backend(backend, "cpu")
    images = torch.randn(6, 2, 5, 8).transpose(2, 3)  # (B, C, H, W) as a transposed view
    assert not images.is_contiguous()
    target = torch.rand(6, 2, 8, 5)
    latent = torch.randn(12, 6).t()[:, ::2]  # (6, 6) with strides (1, 12)
    check_elbo(backend, images, target, latent, torch.randn(6, 6), reduction="none")
    check_elbo(backend, images, target, latent, torch.randn(6, 6), recon_loss="mse")


def gan_inputs(shape, dtype, scale=2.0, device="cpu"):
    return [(torch.randn(shape, dtype=torch.float64, device=device) * scale).to(dtype) for _ in range(2)]


def check_gan(backend, real, fake, kind, reduction, smoothing=0.0, weights=None):
    """Discriminator and generator losses and their gradients (each loss weighted and backpropagated on
    its own), at the logits' dtype in genfast and in eager PyTorch, against the float64 reference."""
    shape = real.shape if reduction == "none" else ()
    weights = weights or [powers_of_two(shape, real.device) for _ in range(2)]
    results = {}
    for name, dtype in (("genfast", real.dtype), ("eager", real.dtype), ("reference", torch.float64)):
        r, f = (t.detach().to(dtype).requires_grad_() for t in (real, fake))
        module = genfast if name == "genfast" else reference
        with genfast.use_backend(backend if name == "genfast" else "reference"):
            d_loss = module.discriminator_loss(r, f, kind, smoothing, reduction)
            g_loss = module.generator_loss(f, kind, reduction)
        d_grads = torch.autograd.grad(d_loss, (r, f), weights[0].to(dtype))
        (g_grad,) = torch.autograd.grad(g_loss, f, weights[1].to(dtype))
        results[name] = [d_loss, g_loss, *d_grads, g_grad]
    labels = ("d_loss", "g_loss", "d_loss grad_real", "d_loss grad_fake", "g_loss grad_fake")
    for label, ours, eager, ref in zip(labels, *results.values()):
        assert_within_rule(f"{backend} {kind} {reduction} {real.dtype} {label}", ours, eager, ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gan_non_contiguous_logits_match_reference(backend, kind):
    require_backend(backend, "cpu")
    real, fake = (t.t() for t in gan_inputs((101, 33), torch.float32))  # transposed views
    assert not real.is_contiguous() and not fake.is_contiguous()
    for reduction in REDUCTIONS:
        check_gan(backend, real, fake, kind, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GAN_SHAPES)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gan_cpu_backends_match_reference(backend, shape, dtype, kind, reduction):
    require_backend(backend, "cpu")
    smoothing = 0.1 if GAN_KINDS[kind].smoothable and shape[0] != 7 else 0.0
    check_gan(backend, *gan_inputs(shape, dtype), kind, reduction, smoothing)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", TRITON_GAN_SHAPES)
def test_gan_triton_interpreted_matches_reference(shape, kind, reduction):
    require_backend("triton", "cpu")
    check_gan("triton", *gan_inputs(shape, torch.float32), kind, reduction, 0.2 * GAN_KINDS[kind].smoothable)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gan_real_and_fake_batches_of_different_sizes(backend, reduction):
    require_backend(backend, "cpu")
    for kind in KINDS:
        check_gan(backend, torch.randn(64, 1), torch.randn(48, 1), kind, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_arbitrary_weights_at_low_precision(dtype, reduction):
    """Weights that are not powers of two round the saved gradient a second time: within the rule."""
    require_backend("cpu", "cpu")
    recon, target, mu, logvar = elbo_inputs(512, 784, 32, dtype)
    shape = (512,) if reduction == "none" else ()
    check_elbo(
        "cpu",
        recon,
        target,
        mu,
        logvar,
        reduction=reduction,
        weights=[torch.randn(shape, dtype=torch.float64) for _ in range(3)],
    )
    real, fake = gan_inputs((4096, 1), dtype)
    shape = real.shape if reduction == "none" else ()
    for kind in KINDS:
        check_gan("cpu", real, fake, kind, reduction, weights=[torch.randn(shape, dtype=torch.float64)] * 2)


# ---------------------------------------------------------------------------------------------------
# The published definitions, written out independently of genfast's term table, in float64.


def published_discriminator(r, f, kind, s):
    if kind == "nonsaturating":  # BCE against labels 1 (smoothed to 1 - s) and 0
        return F.binary_cross_entropy_with_logits(
            r, torch.full_like(r, 1 - s)
        ) + F.binary_cross_entropy_with_logits(f, torch.zeros_like(f))
    if kind == "hinge":
        return torch.relu(1 - r).mean() + torch.relu(1 + f).mean()
    if kind == "lsgan":
        return 0.5 * ((r - (1 - s)) ** 2).mean() + 0.5 * (f**2).mean()
    return f.mean() - r.mean()


def published_generator(f, kind):
    if kind == "nonsaturating":
        return -torch.log(torch.sigmoid(f)).mean()  # -log D(G(z))
    if kind == "lsgan":
        return 0.5 * ((f - 1) ** 2).mean()
    return -f.mean()


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("kind", KINDS)
def test_gan_losses_are_the_published_definitions(backend, kind):
    require_backend(backend, "cpu")
    real, fake = (t.requires_grad_() for t in gan_inputs((50, 1), torch.float64))
    s = 0.1 if GAN_KINDS[kind].smoothable else 0.0
    with genfast.use_backend(backend):
        ours = (
            genfast.discriminator_loss(real, fake, kind, real_label_smoothing=s),
            genfast.generator_loss(fake, kind),
        )
    theirs = published_discriminator(real, fake, kind, s), published_generator(fake, kind)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        for ga, gb in zip(
            torch.autograd.grad(a, (real, fake), allow_unused=True, materialize_grads=True),
            torch.autograd.grad(b, (real, fake), allow_unused=True, materialize_grads=True),
        ):
            torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
    if kind == "nonsaturating":  # also -log D(x) - log(1 - D(G(z))) with D = sigmoid
        d = torch.sigmoid(real), torch.sigmoid(fake)
        textbook = (
            -(1 - s) * torch.log(d[0]).mean() - s * torch.log(1 - d[0]).mean() - torch.log(1 - d[1]).mean()
        )
        torch.testing.assert_close(ours[0], textbook, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("recon_loss", ["bce", "mse"])
def test_elbo_is_the_textbook_vae_loss(backend, recon_loss):
    """Kingma & Welling: BCE (or squared error) summed over pixels + KL, per sample; mean over the batch."""
    require_backend(backend, "cpu")
    recon, target, mu, logvar = elbo_inputs(16, 30, 4, torch.float64)
    beta = 2.5
    with genfast.use_backend(backend):
        ours = genfast.elbo_loss(recon, target, mu, logvar, beta=beta, recon_loss=recon_loss)
    if recon_loss == "bce":
        rec = F.binary_cross_entropy(torch.sigmoid(recon), target, reduction="sum")
    else:
        rec = F.mse_loss(recon, target, reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    torch.testing.assert_close(ours, (rec + beta * kl) / 16, rtol=1e-10, atol=1e-10)


def test_kl_term_is_the_closed_form_of_the_gaussian_kl():
    mu, logvar = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    posterior = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(posterior, prior).sum(1)
    _, _, kl = genfast.elbo_loss(
        torch.zeros(5, 2, dtype=torch.float64),
        torch.zeros(5, 2, dtype=torch.float64),
        mu,
        logvar,
        reduction="none",
        return_terms=True,
    )
    torch.testing.assert_close(kl, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_weighted_sum_of_losses_backpropagates_each_weight(backend):
    """grad_output other than 1: 0.3 * mean ELBO + per-sample ELBOs weighted by w + 5 * hinge D loss."""
    require_backend(backend, "cpu")
    recon, target, mu, logvar = elbo_inputs(6, 20, 3, torch.float64)
    real, fake = gan_inputs((6, 1), torch.float64)
    leaves = [t.requires_grad_() for t in (recon, mu, logvar, real, fake)]
    w = torch.rand(6, dtype=torch.float64)
    elbo = {
        genfast: lambda red: genfast.elbo_loss(recon, target, mu, logvar, reduction=red),
        reference: lambda red: reference.elbo_terms(recon, target, mu, logvar, reduction=red)[0],
    }
    grads = []
    for module, pin in ((genfast, backend), (reference, "reference")):
        with genfast.use_backend(pin):
            total = (
                0.3 * elbo[module]("mean")
                + (w * elbo[module]("none")).sum()
                + 5 * module.discriminator_loss(real, fake, "hinge")
            )
        grads.append(torch.autograd.grad(total, leaves))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_loss_in_fp32_math_for_low_precision_inputs():
    """bf16 inputs: the loss is computed in fp32 and rounded once, so it is the float64 value rounded."""
    require_backend("cpu", "cpu")
    recon, target, mu, logvar = elbo_inputs(64, 784, 16, torch.bfloat16)
    with genfast.use_backend("cpu"):
        ours = genfast.elbo_loss(recon, target, mu, logvar, reduction="sum")
    exact = reference.elbo_terms(
        recon.double(), target.double(), mu.double(), logvar.double(), reduction="sum"
    )[0]
    assert ours.dtype == torch.bfloat16
    bf16_ulp = 2.0 ** (math.frexp(float(exact))[1] - 8)
    assert abs(float(ours) - float(exact)) <= bf16_ulp


# ---------------------------------------------------------------------------------------------------
# GPU (skipped, visibly, without one)

GPU_SHAPES = CPU_SHAPES + [(65536, 784, 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("recon_loss", ["bce", "mse"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_elbo_backends_match_reference(backend, shape, dtype, recon_loss, reduction):
    require_backend(backend, "cuda")
    check_elbo(
        backend, *elbo_inputs(*shape, dtype, device="cuda"), recon_loss=recon_loss, reduction=reduction
    )


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_elbo_uint8_targets(backend):
    require_backend(backend, "cuda")
    check_elbo(backend, *elbo_inputs(4096, 784, 32, torch.bfloat16, torch.uint8, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GAN_SHAPES + [(1 << 20,)])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_gan_backends_match_reference(backend, shape, dtype, kind, reduction):
    require_backend(backend, "cuda")
    check_gan(
        backend, *gan_inputs(shape, dtype, device="cuda"), kind, reduction, 0.1 * GAN_KINDS[kind].smoothable
    )


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_same_bits_run_to_run_and_extremes(backend):
    require_backend(backend, "cuda")
    recon, target, mu, logvar = (
        t.requires_grad_() if i != 1 else t
        for i, t in enumerate(elbo_inputs(65536, 784, 32, torch.float32, device="cuda"))
    )
    logits = (torch.randn(1 << 20, device="cuda") * 1e4).requires_grad_()
    runs = []
    for _ in range(3):
        with genfast.use_backend(backend):
            loss = genfast.elbo_loss(recon, target, mu, logvar)
            d_loss = genfast.discriminator_loss(logits, logits.flip(0))
        runs.append([loss, d_loss, *torch.autograd.grad(loss + d_loss, (recon, mu, logvar, logits))])
    assert all(v.isfinite().all() for v in runs[0])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_cuda_backend_launches_one_kernel_per_loss():
    require_backend("cuda", "cuda")
    from torch.profiler import ProfilerActivity, profile

    recon, target, mu, logvar = elbo_inputs(1024, 784, 32, torch.float32, device="cuda")
    real, fake = gan_inputs((4096, 1), torch.float32, device="cuda")
    calls = {
        "elbo mean": lambda: genfast.elbo_loss(recon, target, mu, logvar),
        "elbo none": lambda: genfast.elbo_loss(recon, target, mu, logvar, reduction="none"),
        "discriminator": lambda: genfast.discriminator_loss(real, fake, "hinge"),
        "generator": lambda: genfast.generator_loss(fake),
    }
    with genfast.use_backend("cuda"):
        for name, call in calls.items():
            call()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                call()
                torch.cuda.synchronize()
            kernels = [
                e.name
                for e in prof.events()
                if e.device_type.name == "CUDA" and "memset" not in e.name.lower()
            ]
            assert len(kernels) == 1, (name, kernels)
