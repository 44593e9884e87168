"""End to end: one training step of each model of genfast.models, the fused model against its plain twin
(``model.plain()``: nn.Linear + activation modules, the plain loss expressions, ``torch.randn_like``
sampling) in eager mode and under ``torch.compile``.

A step is what a training loop does per batch: forward, loss, backward and ``torch.optim.Adam.step``
(default settings, the same for every contender); the GAN's is one discriminator step (on real images
and the detached fakes) then one generator step (through the updated discriminator), the noise drawn
in the step. The models have their classic sizes: the autoencoder 784-600-400-200 and back, the VAE
784-400-(20, 20) and back, the GAN 100-128-256-512-1024-784 / 784-512-256-128-1, the language model
16 x 32 embeddings -512-512-128 (GELU). torch.compile compiles the twin's loss (and the GAN's generator
and two losses) with ``dynamic=False``; backward and Adam run as they come.

Batches 64, 256 and 1024 on CUDA, in float32 and under bfloat16 autocast (the parameters and Adam stay
float32); 64 and 256 in float32 on the CPU. A case's time is per step; the report also gives steps
per second. ``flops`` counts the GEMMs a step must do: 2 x rows x in x out per layer forward, the same
for the weight gradient and for the input gradient of every layer whose input needs one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from benchmarks.cases.common import DTYPES, QUICK_DTYPE, Contender, genfast_backends, short_dtype
from genfast.models import GAN, VAE, Autoencoder, LanguageModel

MODELS = ("autoencoder", "vae", "gan", "lm")
_AUTOENCODER = (784, 600, 400, 200)
_VAE = (784, (400,), 20)  # in_features, hidden, latent
_GENERATOR, _DISCRIMINATOR = (100, 128, 256, 512, 1024, 784), (784, 512, 256, 128, 1)
_LM = (128, 16, 32, (512, 512))  # vocab_size (bytes up to 127), context, embedding, hidden


@dataclass(frozen=True)
class TrainingCase:
    model: str  # one of MODELS
    batch: int
    dtype: str  # "float32", or "bfloat16": float32 parameters under bfloat16 autocast
    mode: str = "step"

    @property
    def name(self) -> str:
        return f"{self.model} train step {self.batch} {short_dtype(self.dtype)}"

    @property
    def steps(self) -> int:
        """Training steps per timed call (the report's steps/s)."""
        return 1

    @property
    def flops(self) -> int:
        """GEMM FLOPs of one step (the module docstring)."""
        b = self.batch
        if self.model == "autoencoder":
            return _gemm_flops(_AUTOENCODER + _AUTOENCODER[-2::-1], b, b)
        if self.model == "vae":
            features, hidden, latent = _VAE
            return _gemm_flops((features, *hidden, 2 * latent), b, b) + _gemm_flops(
                (latent, *hidden[::-1], features), b, b, input_grad=True
            )
        if self.model == "gan":  # D on real + fake, then D on fake again with grad into G
            return (
                _gemm_flops(_GENERATOR, b, b)
                + _gemm_flops(_DISCRIMINATOR, 2 * b, 2 * b)
                + _gemm_flops(_DISCRIMINATOR, b, b, input_grad=True)
            )
        vocab, context, embedding, hidden = _LM
        return _gemm_flops((context * embedding, *hidden, vocab), b, b, input_grad=True)


def _gemm_flops(
    sizes: tuple[int, ...], forward_rows: int, backward_rows: int, input_grad: bool = False
) -> int:
    """An MLP of layer `sizes`: forward, weight gradients, and input gradients (the first layer's only if
    `input_grad`)."""
    products = [n_in * n_out for n_in, n_out in zip(sizes, sizes[1:])]
    backward = 2 * sum(products) - (0 if input_grad else products[0])
    return 2 * forward_rows * sum(products) + 2 * backward_rows * backward


_BATCHES = {"cpu": (64, 256), "cuda": (64, 256, 1024)}
CASES: dict[str, tuple[TrainingCase, ...]] = {
    device_type: tuple(
        TrainingCase(model, batch, dtype)
        for dtype in DTYPES[device_type]
        for model in MODELS
        for batch in _BATCHES[device_type]
    )
    for device_type in _BATCHES
}
QUICK_CASES: dict[str, tuple[TrainingCase, ...]] = {
    device_type: tuple(TrainingCase(model, 64, dtype) for model in MODELS)
    for device_type, dtype in QUICK_DTYPE.items()
}


def _build(name: str, device: torch.device) -> torch.nn.Module:
    if name == "autoencoder":
        model = Autoencoder(_AUTOENCODER)
    elif name == "vae":
        model = VAE(_VAE[0], hidden=_VAE[1], latent=_VAE[2])
    elif name == "gan":
        model = GAN(_GENERATOR, _DISCRIMINATOR)
    else:
        vocab, context, embedding, hidden = _LM
        model = LanguageModel(vocab, context=context, embedding=embedding, hidden=hidden)
    return model.to(device).train()


def _batch(case: TrainingCase, model: torch.nn.Module, device: torch.device) -> tuple[Tensor, ...]:
    """One batch of the model's training data, random: images in [0, 1] ([-1, 1] for the GAN), tokens."""
    if case.model == "lm":
        tokens = torch.randint(0, model.vocab_size, (case.batch, model.context + 1), device=device)
        return tokens[:, :-1], tokens[:, -1]
    images = torch.rand(case.batch, 784, device=device)
    return (images * 2 - 1,) if case.model == "gan" else (images,)


def _compiled(fn: Callable, compile: bool) -> Callable:
    return torch.compile(fn, dynamic=False) if compile else fn


def _train_step(
    model: torch.nn.Module, batch: tuple[Tensor, ...], autocast: torch.dtype | None, compile: bool
) -> Callable[[], None]:
    """One optimizer step of `model` on `batch`, its loss (and the GAN's generator) compiled if `compile`."""
    device_type = batch[0].device.type
    precision = functools.partial(torch.autocast, device_type, dtype=autocast, enabled=autocast is not None)
    if not isinstance(model, GAN):
        loss_of, optimizer = _compiled(model.loss, compile), torch.optim.Adam(model.parameters())

        def step() -> None:
            optimizer.zero_grad()
            with precision():
                loss = loss_of(*batch)
            loss.backward()
            optimizer.step()

        return step

    generate = _compiled(model.forward, compile)
    d_loss_of, g_loss_of = (
        _compiled(model.discriminator_loss, compile),
        _compiled(model.generator_loss, compile),
    )
    d_optimizer = torch.optim.Adam(model.discriminator.parameters())
    g_optimizer = torch.optim.Adam(model.generator.parameters())
    (real,) = batch

    def gan_step() -> None:
        with precision():
            fake = generate(model.noise(real.shape[0]))
            d_loss = d_loss_of(real, fake)
        d_optimizer.zero_grad()
        d_loss.backward()
        d_optimizer.step()
        with precision():
            g_loss = g_loss_of(fake)
        g_optimizer.zero_grad()
        g_loss.backward()
        g_optimizer.step()

    return gan_step


def contenders(case: TrainingCase, device: torch.device) -> dict[str, Contender]:
    """The fused model on each genfast backend of `device`, its plain twin in eager mode and compiled:
    each its own copy of the same initial weights, with its own Adam."""
    torch.manual_seed(0)
    model = _build(case.model, device)
    batch = _batch(case, model, device)
    autocast = None if case.dtype == "float32" else getattr(torch, case.dtype)
    torch._dynamo.reset()  # a fresh Dynamo state per case: no recompile limit, no shape made dynamic

    def make(twin: Callable[[], torch.nn.Module], compile: bool = False) -> Callable[[], Callable[[], None]]:
        return lambda: _train_step(twin(), batch, autocast, compile)

    result = {f"genfast:{b}": Contender(make(model.fused_copy), b) for b in genfast_backends(device)}
    result["eager"] = Contender(make(model.plain))
    result["compile"] = Contender(make(model.plain, compile=True))
    return result
