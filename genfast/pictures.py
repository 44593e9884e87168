"""Pictures of a training run: sample and reconstruction grids (PNG), text samples, loss curves."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from genfast.data import ImageData, TextData

PICTURE_COUNT = 64  # samples per grid; reconstruction grids show 32 originals, each above its copy


def write_pictures(
    kind: str,
    model: nn.Module,
    data: ImageData | TextData,
    tensors: list[Tensor],
    out: Path,
    epoch: int,
    seed: int,
) -> None:
    """Pictures of the model now, as out/NAME.png and out/NAME_epochEEE.png (lm: samples.txt). Sampling
    draws from its own generator, seeded the same every epoch: the epochs' pictures are comparable and
    the training's random stream is left alone."""
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu" if kind == "lm" else device).manual_seed(seed)
    if kind == "lm":
        text = data.decode(model.generate(data.encode("The "), 400, temperature=0.8, generator=generator))
        for name in ("samples.txt", f"samples_epoch{epoch:03d}.txt"):
            (out / name).write_text("The " + text + "\n", encoding="utf-8")
        return
    grids = {}
    if kind in ("autoencoder", "vae"):
        grids["reconstructions"] = interleave_rows(tensors[0][:32], model.reconstruct(tensors[0][:32]))
    if kind in ("vae", "gan"):
        grids["samples"] = model.sample(PICTURE_COUNT, generator=generator)
    for name, images in grids.items():
        for path in (out / f"{name}.png", out / f"{name}_epoch{epoch:03d}.png"):
            save_grid(images, data.shape, path)


def interleave_rows(originals: Tensor, copies: Tensor, columns: int = 8) -> Tensor:
    """A row of originals, the row of their copies below, and so on."""
    columns = min(columns, len(originals))
    n = len(originals) // columns * columns
    rows = torch.stack(
        [
            originals[:n].reshape(-1, columns, originals.shape[1]),
            copies[:n].reshape(-1, columns, copies.shape[1]),
        ],
        dim=1,
    )
    return rows.flatten(0, 2)


def save_grid(images: Tensor, shape: tuple[int, int], path: Path, columns: int = 8) -> None:
    """images (n, H*W) in [0, 1] as a grey grid PNG, 8 per row, each pixel enlarged to at least 1/64 of
    the picture's side so that 8x8 digits are visible."""
    from matplotlib.image import imsave

    h, w = shape
    rows, columns = math.ceil(len(images) / columns), min(columns, len(images))
    canvas = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1), 0.5, dtype=np.float32)
    for i, image in enumerate(images.float().cpu().numpy().reshape(-1, h, w)):
        r, c = divmod(i, columns)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = image
    scale = max(1, 64 // h)
    imsave(path, np.kron(canvas, np.ones((scale, scale), dtype=np.float32)), cmap="gray", vmin=0.0, vmax=1.0)


def plot_losses(history: dict[str, list[float]], steps_per_epoch: float, path: Path) -> None:
    """Each loss per step (faint) and its mean per epoch, against epochs. Drawn on an Agg canvas
    without pyplot, so that the backend of a program that imports genfast is left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for (name, values), color in zip(history.items(), ("C0", "C1")):
        values = np.asarray(values)
        axes.plot(np.arange(1, len(values) + 1) / steps_per_epoch, values, color=color, alpha=0.3, lw=0.8)
        per_epoch = int(round(steps_per_epoch))
        means = values[: len(values) // per_epoch * per_epoch].reshape(-1, per_epoch).mean(1)
        axes.plot(np.arange(1, len(means) + 1), means, "o-", color=color, label=f"{name} (epoch mean)")
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
