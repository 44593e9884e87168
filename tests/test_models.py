"""The models against their plain twins: the same weights and the same noise give the same outputs,
losses and parameter gradients within the tolerance rule (tests/tolerance.py), with the twin evaluated in
float64 as the reference and in the model's dtype as eager PyTorch. Also conversion, checkpoints,
sampling helpers and argument checks.

Small sizes run on every backend (the CPU's, Triton interpreted, and the GPU's where there is one); each
model's default (classic) size runs once on the CPU's default backend.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import Tensor

import genfast
from genfast.models import GAN, VAE, Autoencoder, LanguageModel
from genfast.nn import FusedLinear
from tests.conftest import require_backend
from tests.tolerance import assert_within_rule

# (device, backend): every backend of the CPU (Triton interpreted), and of the GPU where there is one.
BACKENDS = [
    ("cpu", "reference"),
    ("cpu", "cpu"),
    ("cpu", "triton"),
    pytest.param("cuda", "cuda", marks=pytest.mark.gpu),
    pytest.param("cuda", "triton", marks=pytest.mark.gpu),
]
GAN_KINDS = ["nonsaturating", "hinge", "lsgan", "wasserstein"]
VOCAB = 29
Values = dict[str, Tensor]


def small(name: str, **kwargs) -> torch.nn.Module:
    """Each model at sizes the Triton interpreter runs in a second."""
    if name == "autoencoder":
        return Autoencoder((48, 32, 24, 16), **kwargs)
    if name == "vae":
        return VAE(48, hidden=(32,), latent=8, **kwargs)
    if name == "gan":
        return GAN((16, 32, 48), (48, 32, 1), **kwargs)
    return LanguageModel(VOCAB, context=4, embedding=8, hidden=(32, 32), **kwargs)


def classic(name: str) -> torch.nn.Module:
    """Each model at its default size."""
    if name == "lm":
        return LanguageModel(VOCAB)
    return {"autoencoder": Autoencoder, "vae": VAE, "gan": GAN}[name]()


def dtype_of(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


# ---------------------------------------------------------------------------------------------------
# Steps: a model and its inputs -> named outputs with the "loss" to differentiate. Float inputs are cast
# to the model's dtype, so the float64 twin computes in float64 throughout.


def autoencoder_step(model: Autoencoder, x: Tensor) -> Values:
    x = x.to(dtype_of(model))
    return {"reconstruction": model(x), "loss": model.loss(x)}


def vae_step(model: VAE, x: Tensor, eps: Tensor) -> Values:
    eps = eps.to(dtype_of(model))
    logits, mu, logvar, z = model(x, eps=eps)
    loss, reconstruction, kl = model.loss(x, eps=eps, return_terms=True)
    return {
        "logits": logits,
        "mu": mu,
        "logvar": logvar,
        "z": z,
        "loss": loss,
        "reconstruction term": reconstruction,
        "kl term": kl,
    }


def gan_discriminator_step(model: GAN, real: Tensor, noise: Tensor) -> Values:
    real, noise = real.to(dtype_of(model)), noise.to(dtype_of(model))
    fake = model(noise)
    return {
        "fake": fake,
        "real logits": model.discriminate(real),
        "loss": model.discriminator_loss(real, fake),
    }


def gan_generator_step(model: GAN, noise: Tensor) -> Values:
    fake = model(noise.to(dtype_of(model)))
    return {"fake": fake, "fake logits": model.discriminate(fake), "loss": model.generator_loss(fake)}


def lm_step(model: LanguageModel, tokens: Tensor, targets: Tensor) -> Values:
    return {"logits": model(tokens), "loss": model.loss(tokens, targets)}


def inputs_of(
    name: str, model: torch.nn.Module, batch: int
) -> tuple[Callable[..., Values], tuple[Tensor, ...]]:
    """The step of model `name` and fresh random inputs for it (the GAN: the generator's step)."""
    if name == "autoencoder":
        return autoencoder_step, (torch.rand(batch, model.sizes[0]),)
    if name == "vae":
        return vae_step, (torch.rand(batch, model.in_features), torch.randn(batch, model.latent))
    if name == "gan":
        return gan_generator_step, (torch.randn(batch, model.noise_features),)
    tokens = torch.randint(0, model.vocab_size, (batch, model.context))
    return lm_step, (tokens, torch.randint(0, model.vocab_size, (batch,)))


def run_step(model: torch.nn.Module, step: Callable[..., Values], *inputs: Tensor) -> Values:
    """The step's outputs, then the gradient of every parameter that got one, by backward of the loss."""
    model.zero_grad(set_to_none=True)
    values = step(model, *inputs)
    values["loss"].backward()
    values = {name: value.detach() for name, value in values.items()}
    values.update({f"grad {name}": p.grad for name, p in model.named_parameters() if p.grad is not None})
    return values


def assert_like_twin(
    ours: Values, model: torch.nn.Module, step: Callable[..., Values], *inputs: Tensor
) -> Values:
    """`ours` (the genfast model's values) within the rule of the plain twin's in its dtype (eager) and in
    float64 (reference), every output, loss and gradient; returns the reference's values."""
    eager = run_step(model.plain(), step, *inputs)
    exact = run_step(model.plain().double(), step, *inputs)
    assert set(ours) == set(eager) == set(exact), "the same outputs and parameter gradients"
    for name in exact:
        assert_within_rule(name, ours[name], eager[name], exact[name])
    return exact


def check_step(model: torch.nn.Module, step: Callable[..., Values], *inputs: Tensor) -> Values:
    return assert_like_twin(run_step(model, step, *inputs), model, step, *inputs)


def parameters_of(model: torch.nn.Module, prefix: str = "") -> set[str]:
    return {f"grad {n}" for n, _ in model.named_parameters() if n.startswith(prefix)}


# ---------------------------------------------------------------------------------------------------
# Forward and backward against the plain twin


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("name", ["autoencoder", "vae", "gan", "lm"])
def test_small_model_matches_its_plain_twin(name, device, backend):
    require_backend(backend, device)
    model = small(name).to(device)
    step, inputs = inputs_of(name, model, batch=7)
    inputs = tuple(t.to(device) for t in inputs)
    with genfast.use_backend(backend):
        values = run_step(model, step, *inputs)
    exact = assert_like_twin(values, model, step, *inputs)
    assert parameters_of(model) <= set(exact), "every parameter gets a gradient"


@pytest.mark.parametrize("name", ["autoencoder", "vae", "gan", "lm"])
def test_classic_model_matches_its_plain_twin(name):
    model = classic(name)
    step, inputs = inputs_of(name, model, batch=32)
    exact = check_step(model, step, *inputs)
    assert parameters_of(model) <= set(exact)


@pytest.mark.parametrize("device, backend", BACKENDS)
def test_vae_in_kernel_sampling_matches_the_twin_given_the_noise_it_drew(device, backend):
    """The fused VAE samples z inside genfast's kernel; eps = (z - mu) / exp(0.5 logvar), recovered in
    float64, replays that noise in the plain twins. Reseeding before the loss replays it in the model."""
    require_backend(backend, device)
    model = small("vae").to(device).train()
    x = torch.rand(9, model.in_features, device=device)
    seed = int(torch.randint(2**31, ()))

    def sampling_step(model: VAE, x: Tensor) -> Values:
        torch.manual_seed(seed)
        logits, mu, logvar, z = model(x)
        torch.manual_seed(seed)
        loss, reconstruction, kl = model.loss(x, return_terms=True)
        return {
            "logits": logits,
            "mu": mu,
            "logvar": logvar,
            "z": z,
            "loss": loss,
            "reconstruction term": reconstruction,
            "kl term": kl,
        }

    with genfast.use_backend(backend):
        ours = run_step(model, sampling_step, x)
    mu, logvar, z = (ours[k].double() for k in ("mu", "logvar", "z"))
    eps = (z - mu) / torch.exp(0.5 * logvar)
    assert (z - mu).abs().max() > 0.1, "training mode samples"
    assert abs(float(eps.std()) - 1) < 0.5, "the noise is standard normal"
    assert_like_twin(ours, model, vae_step, x, eps)


@pytest.mark.parametrize("kind", GAN_KINDS)
@pytest.mark.parametrize("device, backend", BACKENDS)
def test_gan_losses_and_gradients_match_the_twin(kind, device, backend):
    """The discriminator's step (gradients into the discriminator only: the fakes are detached) and the
    generator's (gradients through the discriminator into both)."""
    require_backend(backend, device)
    model = small("gan", kind=kind).to(device)
    real, noise = (
        torch.rand(11, 48, device=device) * 2 - 1,
        torch.randn(11, model.noise_features, device=device),
    )
    with genfast.use_backend(backend):
        ours = run_step(model, gan_discriminator_step, real, noise)
    exact = assert_like_twin(ours, model, gan_discriminator_step, real, noise)
    assert {k for k in exact if k.startswith("grad")} == parameters_of(model, "discriminator")
    with genfast.use_backend(backend):
        ours = run_step(model, gan_generator_step, noise)
    exact = assert_like_twin(ours, model, gan_generator_step, noise)
    assert {k for k in exact if k.startswith("grad")} == parameters_of(model)


def test_classic_gan_discriminator_step_matches_the_twin():
    model = classic("gan")
    check_step(model, gan_discriminator_step, torch.rand(32, 784) * 2 - 1, torch.randn(32, 100))


# ---------------------------------------------------------------------------------------------------
# Conversion and checkpoints


@pytest.mark.parametrize("name", ["autoencoder", "vae", "gan", "lm"])
def test_plain_and_fused_copy_round_trip(name):
    model = small(name)
    step, inputs = inputs_of(name, model, batch=5)
    plain = model.plain()
    assert not plain.fused and not any(isinstance(m, FusedLinear) for m in plain.modules())
    assert model.fused and any(isinstance(m, FusedLinear) for m in model.modules())
    again = plain.fused_copy()
    assert again.fused and [type(m) for m in again.modules()] == [type(m) for m in model.modules()]
    assert list(plain.state_dict()) == list(model.state_dict()) == list(again.state_dict())
    assert all(p is not q for p, q in zip(plain.parameters(), model.parameters())), "copies, not shared"
    expected, got = run_step(model, step, *inputs), run_step(again, step, *inputs)
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_fused_false_builds_the_plain_model():
    torch.manual_seed(0)
    plain = VAE(48, hidden=(32,), latent=8, fused=False)
    torch.manual_seed(0)
    model = small("vae")
    assert not any(isinstance(m, FusedLinear) for m in plain.modules())
    for (key, a), (other, b) in zip(plain.state_dict().items(), model.state_dict().items()):
        assert key == other and torch.equal(a, b), "same initialisation either way"


@pytest.mark.parametrize("name", ["autoencoder", "vae", "gan", "lm"])
def test_state_dict_saved_to_a_file_loads_into_the_plain_twin_and_back(name, tmp_path):
    model = small(name)
    step, inputs = inputs_of(name, model, batch=5)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    plain = small(name, fused=False)  # fresh weights, overwritten by the file
    plain.load_state_dict(torch.load(path, weights_only=True))
    expected_plain = run_step(model.plain(), step, *inputs)
    got_plain = run_step(plain, step, *inputs)
    torch.save(plain.state_dict(), path)
    back = small(name)
    back.load_state_dict(torch.load(path, weights_only=True))
    expected, got = run_step(model, step, *inputs), run_step(back, step, *inputs)
    for key in expected:
        assert torch.equal(got_plain[key], expected_plain[key]), key
        assert torch.equal(got[key], expected[key]), key


# ---------------------------------------------------------------------------------------------------
# Modes, sampling helpers, argument checks


@pytest.mark.parametrize("fused", [True, False])
def test_vae_eval_mode_uses_mu_and_training_mode_samples(fused):
    model = small("vae", fused=fused)
    x = torch.rand(6, model.in_features)
    model.eval()
    logits, mu, logvar, z = model(x)
    assert torch.equal(z, mu)
    torch.testing.assert_close(logits, model.decoder(mu), rtol=0, atol=0)
    assert torch.equal(model(x)[0], logits), "eval is deterministic"
    eps = torch.randn_like(mu)
    torch.testing.assert_close(model(x, eps=eps)[3], mu + torch.exp(0.5 * logvar) * eps)
    model.train()
    first, second = model(x)[3], model(x)[3]
    assert not torch.equal(first, mu) and not torch.equal(first, second), "training mode draws fresh noise"


def test_vae_sample_and_reconstruct():
    model = small("vae")
    images = model.sample(10, generator=torch.Generator().manual_seed(1))
    assert images.shape == (10, 48) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, model.sample(10, generator=torch.Generator().manual_seed(1)))
    assert not images.requires_grad
    x = torch.rand(4, 3, 16)  # flattened to 48 features
    reconstruction = model.reconstruct(x)
    assert reconstruction.shape == (4, 48) and 0 <= reconstruction.min() and reconstruction.max() <= 1
    assert torch.equal(reconstruction, model.reconstruct(x)), "the posterior mean: no noise"
    pixels, eps = torch.randint(0, 256, (4, 48), dtype=torch.uint8), torch.randn(4, model.latent)
    torch.testing.assert_close(
        model.loss(pixels, eps=eps),
        model.loss(pixels / 255, eps=eps),
        msg="uint8 pixels read as 0..1, as inputs and as targets",
    )
    torch.testing.assert_close(model.reconstruct(pixels), model.reconstruct(pixels / 255))


def test_autoencoder_reconstruct_and_gan_sample_ranges():
    autoencoder = small("autoencoder")
    reconstruction = autoencoder.reconstruct(torch.rand(5, 1, 48))
    assert reconstruction.shape == (5, 48) and 0 <= reconstruction.min() and reconstruction.max() <= 1
    gan = small("gan")
    fake = gan(gan.noise(6))
    assert fake.shape == (6, 48) and -1 <= fake.min() and fake.max() <= 1
    assert gan.discriminate(fake).shape == (6, 1)
    images = gan.sample(6, generator=torch.Generator().manual_seed(2))
    assert images.shape == (6, 48) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, gan.sample(6, generator=torch.Generator().manual_seed(2)))


def test_language_model_generate():
    model = small("lm")
    tokens = model.generate([3, 1, 4], 12, generator=torch.Generator().manual_seed(3))
    assert len(tokens) == 12 and all(isinstance(t, int) and 0 <= t < VOCAB for t in tokens)
    assert tokens == model.generate([3, 1, 4], 12, generator=torch.Generator().manual_seed(3))
    assert model.generate([], 2, temperature=0.5) and model.generate([1], 0) == []
    assert model(torch.randint(0, VOCAB, (3, model.context))).shape == (3, VOCAB)
    with pytest.raises(ValueError, match="temperature"):
        model.generate([1], 3, temperature=0)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Autoencoder((784,)), "sizes"),
        (lambda: Autoencoder((784, 0)), "sizes"),
        (lambda: VAE(latent=0), "latent"),
        (lambda: VAE(in_features=-1), "in_features"),
        (lambda: VAE(hidden=(400, 0)), "hidden"),
        (lambda: VAE(beta=-1.0), "beta"),
        (lambda: VAE(beta=float("nan")), "beta"),
        (lambda: GAN(kind="vanilla"), "kind"),
        (lambda: GAN((100, 784), (512, 1)), "generator's output"),
        (lambda: GAN((100, 784), (784, 128)), "1 logit"),
        (lambda: GAN((784,), (784, 1)), "generator_sizes"),
        (lambda: LanguageModel(1), "vocab_size"),
        (lambda: LanguageModel(10, context=0), "context"),
        (lambda: LanguageModel(10, embedding=0), "embedding"),
        (lambda: LanguageModel(10, hidden=(64, -1)), "hidden"),
    ],
)
def test_bad_constructor_arguments_raise_value_error(build, match):
    with pytest.raises(ValueError, match=match):
        build()
