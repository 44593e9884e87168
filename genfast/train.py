"""Training loop behind `genfast train`: one model of genfast.models on one data set of genfast.data, in
one process or several under torchrun (DistributedDataParallel), with checkpoints that resume exactly,
pictures, loss curves and, for image models, the figures of a digit classifier on what the model makes.

Everything a user can get wrong (arguments, device, data, output folder, checkpoint) is checked before
anything is written or any process group joined; a run never replaces a good checkpoint with a bad one.

    >>> from genfast.train import train
    >>> result = train("vae", data="digits", out="runs/vae")
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DistributedSampler

from genfast import checkpoint
from genfast.checkpoint import CheckpointError
from genfast.data import ImageData, TextData, load_data
from genfast.models import GAN, VAE, Autoencoder, LanguageModel
from genfast.pictures import plot_losses, write_pictures
from genfast.quality import Quality, measure

MODEL_KINDS = ("autoencoder", "vae", "gan", "lm")
OPTIMIZERS = ("adam", "sgd")
CHECKPOINT = "checkpoint.pt"

# Model sizes per data set, by name, else by number of image features (image_defaults). digits (8x8): small
# models that train in seconds on a CPU. 784 features (MNIST): the models' own defaults, the classic MNIST
# architectures; digits28 too, but for a GAN of the digits' sizes: its 1797 images collapsed the classic
# GAN onto 1-3 digits in 30-60 epochs, at lr 2e-4 to 2e-3.
IMAGE_MODELS = {
    "digits": {
        "autoencoder": {"sizes": (64, 48, 32, 16)},
        "vae": {"in_features": 64, "hidden": (128,), "latent": 8},
        "gan": {"generator_sizes": (32, 128, 256, 64), "discriminator_sizes": (64, 256, 128, 1)},
    },
    "digits28": {
        "autoencoder": {},
        "vae": {},
        "gan": {"generator_sizes": (32, 128, 256, 784), "discriminator_sizes": (784, 256, 128, 1)},
    },
    784: {"autoencoder": {}, "vae": {}, "gan": {}},
}
LM_CONTEXT = 16

# Defaults, measured with genfast.quality (README, "Training"). On the 8x8 digits, at the former 10 epochs
# and Adam's 1e-3, the autoencoder drew every digit as the mean digit and the GAN (then 16-64-128-64 /
# 64-128-64-1) collapsed onto 2-3 digits. Now, seeds 0-4, fused and plain: autoencoder reconstructions
# classified right 90-94%, VAE 88-92% (samples: 10 of 10 digits), GAN samples 10 of 10 digits (at 30
# epochs: 6-7; at 40: 7-10). Adam's lr is 1e-3 but where IMAGE_LR says otherwise (by data set, as above).
DEFAULT_EPOCHS = {"autoencoder": 50, "vae": 50, "gan": 60, "lm": 10}
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 1e-3
IMAGE_LR = {
    "digits": {"autoencoder": 3e-3, "vae": 3e-3, "gan": 2e-3},
    "digits28": {"gan": 2e-3},
    784: {"gan": 2e-4},
}
GAN_BETAS = (0.5, 0.999)  # the DCGAN setting: beta1 = 0.5 damps the alternating updates
# The largest lr, l1, l2: float32's largest number (the weights' type; a larger lr fails inside SGD's step).
LARGEST = float(torch.finfo(torch.float32).max)


class NonFiniteError(FloatingPointError):
    """Training reached a NaN or infinite loss or weights; nothing was saved from that point on."""


@dataclass
class TrainResult:
    """model: the trained model (unwrapped); history: per-step losses by name ("loss", or "d_loss" and
    "g_loss"), averaged over the processes; epochs: epochs done in all; samples_per_second: training
    throughput of this call over all processes; out: the folder written (None without one); quality: the
    digit classifier's figures (image models, process 0, evaluate=True), with quality_report their line
    (or why they are missing)."""

    model: nn.Module
    history: dict[str, list[float]]
    epochs: int
    samples_per_second: float
    out: Path | None
    data: ImageData | TextData = field(repr=False)
    quality: Quality | None = None
    quality_report: str | None = None


@dataclass
class Hyperparameters:
    """What a checkpoint's run was trained with, beyond the model and data (config["hyperparameters"])."""

    optimizer: str
    lr: float
    l1: float
    l2: float
    batch_size: int


def check_options(
    kind: str,
    epochs: int | None,
    batch_size: int | None,
    subset: int | None,
    lr: float | None,
    l1: float | None,
    l2: float | None,
    optimizer: str | None,
    seed: int | None,
) -> None:
    """ValueError naming the first argument that is not what train() takes (None: the default)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"model: expected one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("subset", subset)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
    for name, value, low in (("lr", lr, "> 0"), ("l1", l1, ">= 0"), ("l2", l2, ">= 0")):
        if value is not None and not (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and (0 < value if low == "> 0" else 0 <= value)
            and value <= LARGEST
        ):
            raise ValueError(f"{name}: expected a finite number {low} (at most {LARGEST:.4g}), got {value!r}")
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected 'adam' or 'sgd', got {optimizer!r}")


def image_defaults(table: dict, data: ImageData | TextData) -> dict | None:
    """The entry of `table` (IMAGE_MODELS, IMAGE_LR) for `data`: by its name, else its number of features."""
    return table.get(data.name, table.get(getattr(data, "features", None)))


def default_lr(kind: str, data: ImageData | TextData) -> float:
    return (image_defaults(IMAGE_LR, data) or {}).get(kind, DEFAULT_LR)


def build_model(kind: str, data: ImageData | TextData, options: dict | None = None) -> nn.Module:
    """The fused model of `kind` sized for `data` (see IMAGE_MODELS); `options` (constructor arguments)
    override the defaults."""
    options = options or {}
    if kind == "lm":
        return LanguageModel(data.vocab_size, **{"context": data.context, **options})
    defaults = image_defaults(IMAGE_MODELS, data)
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
    return {
        "discriminator_loss": getattr(model, "discriminator", None),
        "generator_loss": getattr(model, "generator", None),
    }.get(loss_name, model)


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


def optimizer_name(saved: dict) -> str:
    """The optimizer a saved optimizer state belongs to (Adam's groups carry betas, SGD's momentum)."""
    return "adam" if "betas" in saved["param_groups"][0] else "sgd"


def train_step(
    kind: str, objective: nn.Module, model: nn.Module, optimizers: list, batch: list[Tensor]
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
    """This process's place among those torchrun started (RANK, WORLD_SIZE, LOCAL_RANK) and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | None) -> torch.device:
    """`device` ("cpu", "cuda", "cuda:N"; None: cuda when present) as a torch.device that exists here."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected cpu, cuda or cuda:N, got {device!r}")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r}: no CUDA GPU is available here (torch.cuda.is_available() is "
            "False); use --device cpu"
        )
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return chosen


def find_processes(device: str | None) -> Processes:
    """This process's rank among torchrun's processes and its device (cuda:LOCAL_RANK under torchrun),
    checked; the process group is joined later, by join_group()."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    chosen = resolve_device(device)
    if chosen.type == "cuda" and world > 1:
        chosen = resolve_device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}")
    return Processes(rank, world, chosen)


def join_group(procs: Processes) -> None:
    """Join the process group (nccl on GPUs, gloo on the CPU) unless the caller already made one."""
    if procs.world == 1:
        return
    if procs.device.type == "cuda":
        torch.cuda.set_device(procs.device)
    if not dist.is_initialized():
        # torch.distributed.nn.functional evaluates `group=group.WORLD` as a default argument when first
        # imported, and DistributedDataParallel imports it (through torch._dynamo). Imported after the group
        # exists, those defaults hold the group for good: destroy_process_group() then leaves gloo's threads
        # running into interpreter shutdown, where they abort the process now and then ("terminate called
        # without an active exception"). Imported first, the defaults are None.
        importlib.import_module("torch.distributed.nn.functional")

        dist.init_process_group("nccl" if procs.device.type == "cuda" else "gloo")
        procs.owns_group = True


def leave_group(procs: Processes, finished: bool) -> None:
    """Tear down the group this process made; after a finished run, only once every process is done with it."""
    if procs.owns_group:
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def notice(procs: Processes, text: str) -> None:
    """A line for the user on stderr, from process 0 only."""
    if procs.main:
        print(f"genfast train: {text}", file=sys.stderr, flush=True)


def check_tools(pictures: bool, progress: bool) -> None:
    """The optional packages this run needs, before it starts rather than after its first epoch."""
    for needed, module, use in (
        (pictures, "matplotlib", "pictures and loss curves (--out)"),
        (progress, "tqdm", "the progress bar (or --no-progress)"),
    ):
        if needed:
            try:
                __import__(module)
            except ImportError:
                raise ModuleNotFoundError(f"{use} need {module}: pip install {module}", name=module) from None


class OutputError(OSError):
    """The output folder is not a folder, or cannot be created or written."""


def check_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Before anything is written: `out` is (or can become) a folder, and holds a checkpoint to resume
    from, or none to replace unless `overwrite`."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output folder {out}: expected a folder, found a file")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise OutputError(f"output folder {out}: cannot create it, {existing} is a file")
    path = out / CHECKPOINT
    if resume and not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    if not resume and not overwrite and path.exists():
        raise FileExistsError(
            f"{path}: a checkpoint is there already; --resume continues its run, --overwrite "
            "starts a new one that replaces it at the end of its first epoch"
        )


def create_output(out: Path) -> None:
    """Create `out` and make sure it takes files: fail now, not after the first epoch."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise OutputError(f"output folder {out}: cannot write there ({error.strerror or error})") from None


def choose_hyperparameters(
    kind: str,
    data: ImageData | TextData,
    requested: dict,
    saved: dict | None,
    path: Path | None,
    procs: Processes,
) -> Hyperparameters:
    """The requested hyperparameters, the rest from the checkpoint (resuming) or the defaults. Resuming
    applies a changed lr, l1, l2 or batch size and says so; another optimizer cannot continue the state."""
    defaults = {
        "optimizer": "adam",
        "lr": default_lr(kind, data),
        "l1": 0.0,
        "l2": 0.0,
        "batch_size": DEFAULT_BATCH_SIZE,
    }
    if saved is None:
        return Hyperparameters(**{k: defaults[k] if v is None else v for k, v in requested.items()})
    stored = saved["config"].get("hyperparameters") or {}  # none in checkpoints of genfast before 2026-12
    first = saved["optimizers"][0]
    trained = {
        **defaults,
        **{k: v for k, v in stored.items() if k in defaults},
        "optimizer": optimizer_name(first),
        "lr": first["param_groups"][0]["lr"],
    }
    if requested["optimizer"] not in (None, trained["optimizer"]):
        raise CheckpointError(
            f"{path}: the run was trained with {trained['optimizer']}, whose state "
            f"{requested['optimizer']} cannot continue; drop --optimizer, or start a new run "
            "with --overwrite"
        )
    changed = {k: v for k, v in requested.items() if v is not None and v != trained[k]}
    if changed:
        notice(
            procs,
            f"resuming {path} with " + ", ".join(f"{k} {v} (was {trained[k]})" for k, v in changed.items()),
        )
    return Hyperparameters(**{**trained, **changed})


def train(
    model_name: str,
    *,
    data: str | None = None,
    data_dir: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    l1: float | None = None,
    l2: float | None = None,
    device: str | None = None,
    seed: int | None = None,
    fused: bool = True,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    subset: int | None = None,
    model_options: dict | None = None,
    progress: bool = True,
    evaluate: bool = True,
) -> TrainResult:
    """Train `model_name` ("autoencoder", "vae", "gan" or "lm") for `epochs` epochs in all.

    data: "digits" (default for images), "digits28", "mnist" (with data_dir), or for "lm" a text file
    (default: the bundled essay). batch_size is per process. None means the default (DEFAULT_EPOCHS,
    DEFAULT_BATCH_SIZE, default_lr(), adam, l1 = l2 = 0, seed 0) or, resuming, the checkpoint's. out: folder
    for checkpoint.pt (every epoch), pictures (PNG) or samples.txt, and loss.png; a checkpoint there is
    replaced only with overwrite=True; resume continues from it (epochs counts the epochs already done).
    subset: train on the first `subset` examples only. fused=False trains the plain PyTorch twin
    (model.plain()). evaluate: measure image models with a digit classifier (genfast.quality) at the end.
    Under torchrun every process calls this; process 0 writes.

    Raises ValueError (CheckpointError), OSError (FileNotFoundError, FileExistsError, OutputError,
    CheckpointWriteError) or ImportError for what the user can fix, before writing anything where it can,
    and NonFiniteError when the loss or the weights stop being finite (the last good checkpoint is kept).
    """
    check_options(model_name, epochs, batch_size, subset, lr, l1, l2, optimizer, seed)
    out = Path(out) if out is not None else None
    if resume and out is None:
        raise ValueError("resume needs out, the folder of checkpoint.pt")
    if resume and overwrite:
        raise ValueError("--resume continues the checkpoint, --overwrite replaces it: pass one of them")
    procs = find_processes(device)
    check_tools(out is not None, progress and procs.main)
    if out is not None:
        check_output(out, resume, overwrite)
    saved = checkpoint.load(out / CHECKPOINT) if resume else None
    model_options = model_options or {}
    dataset = load_data(
        data or ("text" if model_name == "lm" else "digits"),
        model_name,
        data_dir,
        model_options.get("context", LM_CONTEXT),
    )
    requested = {"optimizer": optimizer, "lr": lr, "l1": l1, "l2": l2, "batch_size": batch_size}
    hyper = choose_hyperparameters(model_name, dataset, requested, saved, out and out / CHECKPOINT, procs)
    if saved is not None and seed is not None and seed != saved["shuffle"]["seed"]:
        raise CheckpointError(
            f"{out / CHECKPOINT}: the run has seed {saved['shuffle']['seed']}, which a resumed "
            f"run keeps (got --seed {seed}); start a new run with --overwrite for another"
        )
    run = Run(model_name, procs, dataset, seed or 0, out, progress)
    run.prepare(model_options, fused, hyper, subset, saved)
    if out is not None and procs.main:
        create_output(out)
    finished = False
    join_group(procs)
    try:
        run.connect()
        result = run.fit(epochs or DEFAULT_EPOCHS[model_name])
        if evaluate and procs.main:
            result.quality, result.quality_report = run.measure()
        finished = True
    finally:
        run.objective = None  # DistributedDataParallel holds the group: let it go before the group does
        leave_group(procs, finished)
    return result


class Run:
    """The state of one training run: model, optimizers, data, history; checkpoints and pictures."""

    def __init__(
        self,
        kind: str,
        procs: Processes,
        data: ImageData | TextData,
        seed: int,
        out: Path | None,
        progress: bool,
    ) -> None:
        self.kind, self.procs, self.data, self.seed, self.out, self.progress = (
            kind,
            procs,
            data,
            seed,
            out,
            progress,
        )
        self.epoch, self.history = 0, {}
        self.saved_epoch: int | None = (
            None  # the epoch of the checkpoint in `out` that this run wrote or resumed
        )

    def prepare(
        self, model_options: dict, fused: bool, hyper: Hyperparameters, subset: int | None, saved: dict | None
    ) -> None:
        """Build the model and optimizers (seeded) and restore the checkpoint `saved` into them."""
        self.hyper = hyper
        if saved is not None:
            self.seed = saved["shuffle"]["seed"]
        # Each process its own random stream (VAE noise, GAN noise); process 0's weights reach all of them
        # through DistributedDataParallel, and process 0 draws what a single process would.
        torch.manual_seed(self.seed + self.procs.rank)
        model = build_model(self.kind, self.data, model_options)
        self.model = (model if fused else model.plain()).to(self.procs.device)
        self.optimizers = make_optimizers(self.kind, self.model, hyper.optimizer, hyper.lr)
        self.tensors = [t[:subset].to(self.procs.device) for t in self.data.tensors()]
        self.labels = getattr(self.data, "labels", None)
        self.labels = self.labels[:subset] if self.labels is not None else None
        self.config = {
            "model": self.kind,
            "data": self.data.name,
            "subset": subset,
            "vocab": getattr(self.data, "vocab", None),
            "hyperparameters": asdict(hyper),
        }
        if saved is not None:
            self.restore(saved)

    def restore(self, state: dict) -> None:
        path = self.out / CHECKPOINT
        for key in ("model", "data", "subset", "vocab"):
            if state["config"][key] != self.config[key]:
                raise CheckpointError(
                    f"{path}: the checkpoint's {key} is {state['config'][key]!r}, "
                    f"this run's {self.config[key]!r}"
                )
        checkpoint.load_model_state(self.model, state["model"], path)
        if len(state["optimizers"]) != len(self.optimizers):
            raise CheckpointError(
                f"{path}: the checkpoint has {len(state['optimizers'])} optimizer states, "
                f"this {self.kind} {len(self.optimizers)}"
            )
        for optimizer, saved in zip(self.optimizers, state["optimizers"]):
            checkpoint.load_optimizer_state(optimizer, saved, path)
            for group in optimizer.param_groups:
                group["lr"] = self.hyper.lr
        self.epoch, self.history = state["epoch"], state["history"]
        self.saved_epoch = self.epoch
        if len(state["rng"]) == self.procs.world:
            set_rng_state(state["rng"][self.procs.rank], self.procs.device)
        else:
            warnings.warn(
                f"{path}: saved by {len(state['rng'])} processes, resumed by {self.procs.world}: the "
                "random streams are not restored, the run will not repeat an uninterrupted one"
            )

    def connect(self) -> None:
        """The objective, under DistributedDataParallel when there are several processes."""
        objective = Objective(self.model, self.hyper.l1, self.hyper.l2)
        if self.procs.world > 1:
            # The GAN's discriminator step leaves the generator without gradients: without the flag it fails.
            # (DDP's one-time warning that it found no unused parameters is then a false positive.)
            objective = DistributedDataParallel(
                objective,
                find_unused_parameters=self.kind == "gan",
                device_ids=[self.procs.device] if self.procs.device.type == "cuda" else None,
            )
        self.objective = objective

    def fit(self, epochs: int) -> TrainResult:
        # DistributedSampler with one replica too, so that N processes see, step for step, the batches one
        # process sees at N times the batch size. It shuffles with a generator seeded seed + epoch.
        sampler = DistributedSampler(
            range(len(self.tensors[0])),
            num_replicas=self.procs.world,
            rank=self.procs.rank,
            shuffle=True,
            seed=self.seed,
        )
        batches = BatchSampler(sampler, self.hyper.batch_size, drop_last=False)
        if self.epoch >= epochs:
            notice(
                self.procs,
                f"{self.out / CHECKPOINT} has {self.epoch} epochs already, --epochs {epochs}: "
                "nothing to train",
            )
        seen, busy = 0, 0.0
        for epoch in range(self.epoch, epochs):
            sampler.set_epoch(epoch)
            bar = progress_bar(
                batches, self.progress and self.procs.main, f"{self.kind} {epoch + 1}/{epochs}"
            )
            start = time.perf_counter()
            for indices in bar:
                losses = train_step(
                    self.kind, self.objective, self.model, self.optimizers, [t[indices] for t in self.tensors]
                )
                seen += len(indices) * self.procs.world
                self.record(losses, epoch)
                if bar is not batches:
                    rate = seen / (busy + time.perf_counter() - start)
                    bar.set_postfix(
                        {k: f"{v[-1]:.4f}" for k, v in self.history.items()} | {"samples/s": f"{rate:.0f}"},
                        refresh=False,
                    )
            busy += time.perf_counter() - start
            self.check_weights(epoch)
            self.epoch = epoch + 1
            self.end_epoch()
        return TrainResult(
            self.model, self.history, self.epoch, seen / busy if busy else 0.0, self.out, self.data
        )

    def record(self, losses: dict[str, Tensor], epoch: int) -> None:
        """Append the step's losses (averaged over the processes, so every process sees the same values) and
        stop at a non-finite one, before it reaches a checkpoint."""
        values = torch.stack(list(losses.values())).float()
        if self.procs.world > 1:
            dist.all_reduce(values)
            values /= self.procs.world
        for name, value in zip(losses, values.tolist()):
            if not math.isfinite(value):
                raise NonFiniteError(
                    f"{name} is {value} at step {len(self.history.get(name, [])) + 1} (epoch "
                    f"{epoch + 1}): training stopped; {self.kept()} (lower --lr, --l1, --l2?)"
                )
            self.history.setdefault(name, []).append(value)

    def check_weights(self, epoch: int) -> None:
        """A finite last loss can still be followed by an update to NaN or infinite weights."""
        bad = [name for name, p in self.model.named_parameters() if not p.isfinite().all()]
        if bad:
            raise NonFiniteError(
                f"the weights ({', '.join(bad[:3])}) are NaN or infinite after epoch {epoch + 1}: "
                f"training stopped; {self.kept()} (lower --lr, --l1, --l2?)"
            )

    def kept(self) -> str:
        """What is left on disk after a stop."""
        path = self.out and self.out / CHECKPOINT
        if path is None:
            return "nothing was saved"
        if not path.is_file():
            return f"no checkpoint was written to {self.out}"
        return f"{path} is left as it was" + (f", at epoch {self.saved_epoch}" if self.saved_epoch else "")

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
                write_pictures(
                    self.kind, self.model, self.data, self.tensors, self.out, self.epoch, self.seed
                )
            plot_losses(
                self.history, len(self.history[next(iter(self.history))]) / self.epoch, self.out / "loss.png"
            )

    def save_checkpoint(self, rng: list[dict]) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "epoch": self.epoch,
            "rng": rng,
            # DistributedSampler reseeds its generator with seed + epoch: that is its whole state.
            "shuffle": {"seed": self.seed, "epoch": self.epoch},
            "history": self.history,
            "config": self.config,
        }
        checkpoint.save(state, self.out / CHECKPOINT)
        self.saved_epoch = self.epoch

    def measure(self) -> tuple[Quality | None, str | None]:
        """The digit classifier's figures of an image model, and their line (or why there are none)."""
        if self.kind == "lm":
            return None, None
        try:
            quality = measure(self.kind, self.model, self.data, self.tensors[0], self.labels, self.seed)
        except ImportError as error:
            return (
                None,
                f"quality: not measured, the digit classifier needs scikit-learn ({error.name or error} "
                "is missing: pip install scikit-learn)",
            )
        return quality, quality.summary()


def rng_state(device: torch.device) -> dict:
    """The generators this process draws from: the CPU's and, training on a GPU, that GPU's."""
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


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
        raise ModuleNotFoundError(
            "the progress bar needs tqdm: pip install tqdm (or --no-progress)"
        ) from error
    return tqdm(batches, desc=desc, unit="batch", dynamic_ncols=True)
