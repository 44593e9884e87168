"""Training loop behind `genfast train`: one model of genfast.models on one data set of genfast.data, in
one process or several under torchrun (DistributedDataParallel), with checkpoints that resume exactly,
pictures and loss curves.

    >>> from genfast.train import train
    >>> result = train("vae", data="digits", epochs=5, out="runs/vae")
"""

from __future__ import annotations

import importlib
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DistributedSampler

from genfast.data import ImageData, TextData, load_data
from genfast.models import GAN, VAE, Autoencoder, LanguageModel
from genfast.pictures import plot_losses, write_pictures

MODEL_KINDS = ("autoencoder", "vae", "gan", "lm")

# Model sizes per number of image features. 64 (the 8x8 digits): small models that train in seconds on
# a CPU. 784 (digits28, MNIST): the models' own defaults, the classic MNIST architectures.
IMAGE_MODELS = {
    64: {"autoencoder": {"sizes": (64, 48, 32, 16)},
         "vae": {"in_features": 64, "hidden": (128,), "latent": 8},
         "gan": {"generator_sizes": (16, 64, 128, 64), "discriminator_sizes": (64, 128, 64, 1)}},
    784: {"autoencoder": {}, "vae": {}, "gan": {}},
}
LM_CONTEXT = 16

# Adam's learning rate: 1e-3, but for the GAN on 784 features the DCGAN setting 2e-4 (with beta1 = 0.5,
# which damps the alternating updates). On the 8x8 digits, 2e-4 collapsed the small GAN to one digit in
# 30 epochs (spread of the samples, per pixel over 512 samples: 0.02..0.16 against the data's 0.23) while
# 1e-3 kept them varied (0.20).
DEFAULT_LR = 1e-3
GAN_LR_784 = 2e-4
GAN_BETAS = (0.5, 0.999)


@dataclass
class TrainResult:
    """model: the trained model (unwrapped); history: per-step losses by name ("loss", or "d_loss" and
    "g_loss"), averaged over the processes; epochs: epochs done in all; samples_per_second: training
    throughput of this call over all processes; out: the folder written (None without one)."""

    model: nn.Module
    history: dict[str, list[float]]
    epochs: int
    samples_per_second: float
    out: Path | None
    data: ImageData | TextData = field(repr=False)


def build_model(kind: str, data: ImageData | TextData, options: dict | None = None) -> nn.Module:
    """The fused model of `kind` sized for `data` (see IMAGE_MODELS); `options` (constructor arguments)
    override the defaults."""
    options = options or {}
    if kind == "lm":
        return LanguageModel(data.vocab_size, **{"context": data.context, **options})
    defaults = IMAGE_MODELS.get(data.features)
    if defaults is None and not options:
        raise ValueError(f"no default {kind} sizes for {data.features} features: pass model_options")
    options = {**(defaults or {}).get(kind, {}), **options}
    return {"autoencoder": Autoencoder, "vae": VAE, "gan": GAN}[kind](**options)


class Objective(nn.Module):
    """A model's losses behind forward(), so that DistributedDataParallel sees every call and averages the
    gradients it produces; adds the L1/L2 weight penalty of the parameters that loss trains."""

    def __init__(self, model: nn.Module, l1: float = 0.0, l2: float = 0.0) -> None:
        super().__init__()
        self.model, self.l1, self.l2 = model, l1, l2

    def forward(self, loss_name: str, *args: Tensor) -> Tensor:
        loss = getattr(self.model, loss_name)(*args)
        if self.l1 or self.l2:
            loss = loss + weight_penalty(trained_part(self.model, loss_name), self.l1, self.l2)
        return loss


def trained_part(model: nn.Module, loss_name: str) -> nn.Module:
    return {"discriminator_loss": getattr(model, "discriminator", None),
            "generator_loss": getattr(model, "generator", None)}.get(loss_name, model)


def weight_penalty(module: nn.Module, l1: float, l2: float) -> Tensor:
    """l1 * sum |w| + l2 * sum w^2 over weight matrices and embeddings; biases are left free, as
    penalizing them shifts outputs without limiting what the model can fit."""
    weights = [p for p in module.parameters() if p.requires_grad and p.dim() > 1]
    return sum(l1 * w.abs().sum() + l2 * w.square().sum() for w in weights)


def make_optimizers(kind: str, model: nn.Module, name: str, lr: float) -> list[torch.optim.Optimizer]:
    """Adam (fused=True: one kernel per step for all parameters, on CUDA and, since PyTorch 2.4, on the
    CPU; foreach on other devices) or SGD with momentum 0.9. The GAN gets one per network."""
    groups = [model.discriminator, model.generator] if kind == "gan" else [model]
    if name == "sgd":
        return [torch.optim.SGD(g.parameters(), lr=lr, momentum=0.9) for g in groups]
    if name != "adam":
        raise ValueError(f"optimizer: expected 'adam' or 'sgd', got {name!r}")
    device = next(model.parameters()).device.type
    speed = {"fused": True} if device in ("cuda", "cpu") else {"foreach": True}
    betas = GAN_BETAS if kind == "gan" else (0.9, 0.999)
    return [torch.optim.Adam(g.parameters(), lr=lr, betas=betas, **speed) for g in groups]


def train_step(kind: str, objective: nn.Module, model: nn.Module, optimizers: list, batch: list[Tensor]
               ) -> dict[str, Tensor]:
    """One optimizer step (the GAN: one discriminator step, then one generator step); the losses."""
    if kind != "gan":
        return {"loss": optimize(objective("loss", *batch), optimizers[0])}
    real = batch[0] * 2 - 1  # the generator's Tanh makes images in [-1, 1]
    fake = model(model.noise(len(real)))
    d_loss = optimize(objective("discriminator_loss", real, fake), optimizers[0])
    # the same fakes, now judged by the updated discriminator; its gradients are cleared at the next D step
    g_loss = optimize(objective("generator_loss", fake), optimizers[1])
    return {"d_loss": d_loss, "g_loss": g_loss}


def optimize(loss: Tensor, optimizer: torch.optim.Optimizer) -> Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


@dataclass
class Processes:
    """This process's place among those torchrun started (RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def join_processes(device: str | None) -> Processes:
    """Read torchrun's environment, pick the device (cuda:LOCAL_RANK under torchrun) and join the process
    group (nccl on GPUs, gloo on the CPU) unless the caller already made one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if chosen.type == "cuda" and world > 1:
        chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(chosen)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        # torch.distributed.nn.functional evaluates `group=group.WORLD` as a default argument when first
        # imported, and DistributedDataParallel imports it (through torch._dynamo). Imported after the group
        # exists, those defaults hold the group for good: destroy_process_group() then leaves gloo's threads
        # running into interpreter shutdown, where they abort the process now and then ("terminate called
        # without an active exception"). Imported first, the defaults are None.
        importlib.import_module("torch.distributed.nn.functional")
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Processes(rank, world, chosen, owns)


def train(model_name: str, *, data: str | None = None, data_dir: str | None = None, epochs: int = 10,
          batch_size: int = 64, lr: float | None = None, optimizer: str = "adam", l1: float = 0.0, l2: float = 0.0,
          device: str | None = None, seed: int = 0, fused: bool = True, out: str | Path | None = None,
          resume: bool = False, subset: int | None = None, model_options: dict | None = None,
          progress: bool = True) -> TrainResult:
    """Train `model_name` ("autoencoder", "vae", "gan" or "lm") for `epochs` epochs in all.

    data: "digits" (default for images), "digits28", "mnist" (with data_dir), or for "lm" a text file
    (default: the bundled essay). batch_size is per process. out: folder for checkpoint.pt (every epoch),
    pictures (PNG) or samples.txt, and loss.png; resume continues from out/checkpoint.pt (epochs counts
    the epochs already done). subset: train on the first `subset` examples only. fused=False trains the
    plain PyTorch twin (model.plain()). Under torchrun every process calls this; process 0 writes.
    """
    if model_name not in MODEL_KINDS:
        raise ValueError(f"model: expected one of {', '.join(MODEL_KINDS)}, got {model_name!r}")
    if epochs < 1 or batch_size < 1 or (subset is not None and subset < 1):
        raise ValueError(f"epochs, batch_size and subset must be >= 1, got {epochs}, {batch_size}, {subset}")
    if resume and out is None:
        raise ValueError("resume needs out, the folder of checkpoint.pt")
    procs = join_processes(device)
    try:
        run = Run(model_name, procs, seed=seed, out=Path(out) if out is not None else None, progress=progress)
        run.prepare(data, data_dir, model_options or {}, fused, optimizer, lr, l1, l2, subset, resume)
        result = run.fit(epochs, batch_size)
        if procs.owns_group:  # no process tears the group down while another still talks through it
            dist.barrier()
        return result
    finally:
        if procs.owns_group:
            dist.destroy_process_group()


class Run:
    """The state of one training run: model, optimizers, data, history; checkpoints and pictures."""

    def __init__(self, kind: str, procs: Processes, seed: int, out: Path | None, progress: bool) -> None:
        self.kind, self.procs, self.seed, self.out, self.progress = kind, procs, seed, out, progress
        self.epoch, self.history = 0, {}
        if out is not None and procs.main:
            import matplotlib  # noqa: F401  (fail now, not after the first epoch)
            out.mkdir(parents=True, exist_ok=True)

    def prepare(self, data_name: str | None, data_dir: str | None, model_options: dict, fused: bool, optimizer: str,
                lr: float | None, l1: float, l2: float, subset: int | None, resume: bool) -> None:
        context = model_options.get("context", LM_CONTEXT)
        data_name = data_name or ("text" if self.kind == "lm" else "digits")
        self.data = load_data(data_name, self.kind, data_dir, context)
        # Each process its own random stream (VAE noise, GAN noise); process 0's weights reach all of them
        # through DistributedDataParallel, and process 0 draws what a single process would.
        torch.manual_seed(self.seed + self.procs.rank)
        model = build_model(self.kind, self.data, model_options)
        self.model = (model if fused else model.plain()).to(self.procs.device)
        if lr is None:
            lr = GAN_LR_784 if self.kind == "gan" and self.data.features == 784 else DEFAULT_LR
        self.optimizers = make_optimizers(self.kind, self.model, optimizer, lr)
        self.tensors = [t[:subset].to(self.procs.device) for t in self.data.tensors()]
        self.config = {"model": self.kind, "data": self.data.name, "subset": subset,
                       "vocab": getattr(self.data, "vocab", None)}
        if resume:
            self.load_checkpoint()
        objective = Objective(self.model, l1, l2)
        if self.procs.world > 1:
            # The GAN's discriminator step leaves the generator without gradients: without the flag it fails.
            # (DDP's one-time warning that it found no unused parameters is then a false positive.)
            objective = DistributedDataParallel(objective, find_unused_parameters=self.kind == "gan",
                                                device_ids=[self.procs.device] if self.procs.device.type == "cuda"
                                                else None)
        self.objective = objective

    def fit(self, epochs: int, batch_size: int) -> TrainResult:
        # DistributedSampler with one replica too, so that N processes see, step for step, the batches one
        # process sees at N times the batch size. It shuffles with a generator seeded seed + epoch.
        sampler = DistributedSampler(range(len(self.tensors[0])), num_replicas=self.procs.world,
                                     rank=self.procs.rank, shuffle=True, seed=self.seed)
        batches = BatchSampler(sampler, batch_size, drop_last=False)
        seen, busy = 0, 0.0
        for epoch in range(self.epoch, epochs):
            sampler.set_epoch(epoch)
            bar = progress_bar(batches, self.progress and self.procs.main, f"{self.kind} {epoch + 1}/{epochs}")
            start = time.perf_counter()
            for indices in bar:
                losses = train_step(self.kind, self.objective, self.model, self.optimizers,
                                    [t[indices] for t in self.tensors])
                seen += len(indices) * self.procs.world
                self.record(losses)
                if bar is not batches:
                    rate = seen / (busy + time.perf_counter() - start)
                    bar.set_postfix({k: f"{v[-1]:.4f}" for k, v in self.history.items()} | {"samples/s": f"{rate:.0f}"},
                                    refresh=False)
            busy += time.perf_counter() - start
            self.epoch = epoch + 1
            self.end_epoch()
        return TrainResult(self.model, self.history, self.epoch, seen / busy if busy else 0.0, self.out, self.data)

    def record(self, losses: dict[str, Tensor]) -> None:
        values = torch.stack(list(losses.values())).float()
        if self.procs.world > 1:
            dist.all_reduce(values)
            values /= self.procs.world
        for name, value in zip(losses, values.tolist()):
            self.history.setdefault(name, []).append(value)

    def end_epoch(self) -> None:
        if self.out is None:
            return
        rng = [None] * self.procs.world
        if self.procs.world > 1:
            dist.all_gather_object(rng, rng_state(self.procs.device))
        else:
            rng[0] = rng_state(self.procs.device)
        if self.procs.main:
            self.save_checkpoint(rng)
            with torch.no_grad():
                write_pictures(self.kind, self.model, self.data, self.tensors, self.out, self.epoch, self.seed)
            plot_losses(self.history, len(self.history[next(iter(self.history))]) / self.epoch, self.out / "loss.png")

    def save_checkpoint(self, rng: list[dict]) -> None:
        state = {"model": self.model.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers],
                 "epoch": self.epoch, "rng": rng,
                 # DistributedSampler reseeds its generator with seed + epoch: that is its whole state.
                 "shuffle": {"seed": self.seed, "epoch": self.epoch},
                 "history": self.history, "config": self.config}
        path = self.out / "checkpoint.pt"
        torch.save(state, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)  # a crash mid-write leaves the last checkpoint whole

    def load_checkpoint(self) -> None:
        path = self.out / "checkpoint.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no checkpoint to resume from")
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("model", "data", "subset", "vocab"):
            if state["config"][key] != self.config[key]:
                raise ValueError(f"{path}: the checkpoint's {key} is {state['config'][key]!r}, "
                                 f"this run's {self.config[key]!r}")
        self.model.load_state_dict(state["model"])
        for optimizer, saved in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        self.epoch, self.history, self.seed = state["epoch"], state["history"], state["shuffle"]["seed"]
        if len(state["rng"]) == self.procs.world:
            set_rng_state(state["rng"][self.procs.rank], self.procs.device)
        else:
            warnings.warn(f"{path}: saved by {len(state['rng'])} processes, resumed by {self.procs.world}: the "
                          "random streams are not restored, the run will not repeat an uninterrupted one")


def rng_state(device: torch.device) -> dict:
    """The generators this process draws from: the CPU's and, training on a GPU, that GPU's."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def progress_bar(batches, enabled: bool, desc: str):
    """A tqdm bar over the batches, or the batches themselves (other processes, or progress off)."""
    if not enabled:
        return batches
    try:
        from tqdm import tqdm
    except ImportError as error:
        raise ModuleNotFoundError("the progress bar needs tqdm: pip install tqdm (or --no-progress)") from error
    return tqdm(batches, desc=desc, unit="batch", dynamic_ncols=True)
