"""Data sets for training: handwritten digits (scikit-learn's bundled 8x8 set, no download), MNIST from
its IDX files, and character-level text.

Images come as float32 rows of features in [0, 1]; text as (context, target) windows of token ids with
index 0 reserved for padding, as LanguageModel expects.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_DATA = ("digits", "digits28", "mnist")
TEXT_DEFAULT = "text"

# IDX element types (the third byte of the magic number): numpy dtype, big-endian where it matters.
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class ImageData:
    """images (N, H*W) float32 in [0, 1]; labels (N,) int64 digit classes; shape (H, W) for pictures."""

    name: str
    images: Tensor
    labels: Tensor
    shape: tuple[int, int]

    @property
    def features(self) -> int:
        return self.images.shape[1]

    def tensors(self) -> tuple[Tensor, ...]:
        """What one training example is made of (generative models ignore the labels)."""
        return (self.images,)


@dataclass
class TextData:
    """tokens (N,) int64 ids of the characters of a text; vocab[i] is token i's character, vocab[0]
    is the padding token ("") that LanguageModel puts before the start."""

    name: str
    tokens: Tensor
    vocab: list[str]
    context: int

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        index = {c: i for i, c in enumerate(self.vocab)}
        return [index[c] for c in text if c in index]

    def decode(self, tokens: list[int]) -> str:
        return "".join(self.vocab[t] for t in tokens)

    def tensors(self) -> tuple[Tensor, ...]:
        """(windows (N, context), targets (N,)): window i holds the `context` tokens before token i,
        padded with 0 at the start. The windows are a strided view of the padded tokens: no copy."""
        padded = torch.cat([torch.zeros(self.context, dtype=torch.int64), self.tokens])
        return padded.unfold(0, self.context, 1)[: len(self.tokens)], self.tokens


def load_data(name: str, kind: str, data_dir: str | None = None, context: int = 16) -> ImageData | TextData:
    """The data set `name` for a model of `kind` ("autoencoder", "vae", "gan" or "lm").

    Images: "digits" (8x8, 64 features), "digits28" (the digits upscaled to 28x28), "mnist" (IDX files
    in `data_dir`). Text (kind "lm"): "text" (the bundled essay) or the path of a UTF-8 text file.
    """
    if kind == "lm":
        return load_text(None if name == TEXT_DEFAULT else name, context)
    if name == "digits":
        return load_digits()
    if name == "digits28":
        return load_digits(size=28)
    if name == "mnist":
        if data_dir is None:
            raise ValueError("--data mnist needs --data-dir: the folder of train-images-idx3-ubyte[.gz]")
        return load_mnist(data_dir)
    raise ValueError(f"data for {kind}: expected one of {', '.join(IMAGE_DATA)}, got {name!r}")


def load_digits(size: int = 8) -> ImageData:
    """scikit-learn's 1797 handwritten digits (8x8, values 0..16) scaled to [0, 1]; size 28 upscales
    them bilinearly to MNIST's 28x28 (a smooth picture, not new detail)."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise ModuleNotFoundError(
            "the digits data set comes with scikit-learn, which is not installed: "
            "pip install scikit-learn (or use --data mnist --data-dir PATH)"
        ) from error
    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images).float().div_(16.0)
    if size != 8:
        images = F.interpolate(images[:, None], size=(size, size), mode="bilinear", align_corners=False)
        images = images[:, 0].clamp_(0.0, 1.0)
    name = "digits" if size == 8 else f"digits{size}"
    return ImageData(
        name, images.flatten(1).contiguous(), torch.from_numpy(bunch.target).long(), (size, size)
    )


def load_mnist(data_dir: str | Path) -> ImageData:
    """MNIST's training set from train-images-idx3-ubyte and train-labels-idx1-ubyte (each gzipped or
    not) in `data_dir` or `data_dir`/MNIST/raw (torchvision's layout); through torchvision when the
    files are missing and torchvision is installed."""
    folder = Path(data_dir)
    images_path, labels_path = (
        find_idx(folder, stem) for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    )
    if images_path is None or labels_path is None:
        return load_mnist_torchvision(folder)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{images_path}, {labels_path}: expected (N, H, W) images and N labels, "
            f"got shapes {images.shape} and {labels.shape}"
        )
    pixels = torch.from_numpy(images.astype(np.float32) / 255.0)
    return ImageData("mnist", pixels.flatten(1), torch.from_numpy(labels.astype(np.int64)), images.shape[1:])


def find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (
        folder / stem,
        folder / f"{stem}.gz",
        folder / "MNIST" / "raw" / stem,
        folder / "MNIST" / "raw" / f"{stem}.gz",
    ):
        if candidate.is_file():
            return candidate
    return None


def load_mnist_torchvision(folder: Path) -> ImageData:
    try:
        from torchvision.datasets import MNIST
    except ImportError:
        raise FileNotFoundError(
            f"{folder}: expected MNIST's train-images-idx3-ubyte[.gz] and "
            "train-labels-idx1-ubyte[.gz] there (or torchvision installed to read them)"
        ) from None
    try:
        mnist = MNIST(str(folder), train=True, download=False)
    except RuntimeError as error:  # torchvision's "Dataset not found"
        raise FileNotFoundError(
            f"{folder}: no MNIST IDX files there, and torchvision found none: {error}"
        ) from error
    pixels = mnist.data.float().div_(255.0)
    return ImageData("mnist", pixels.flatten(1), mnist.targets.long(), tuple(pixels.shape[1:]))


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzipped when its name ends in .gz): magic 0x0000TTNN (element type TT, NN
    dimensions), NN big-endian uint32 sizes, then the elements in row-major order."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            raw = file.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:  # a truncated or corrupt .gz
        raise ValueError(f"{path}: expected a gzipped IDX file: {error}") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(
            f"{path}: not an IDX file (expected the magic 00 00 <type> <ndim>, got {raw[:4].hex()})"
        )
    dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{path}: IDX header says {ndim} dimensions but the file ends after {len(raw)} bytes"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX shape {shape} of {dtype} needs {expected} bytes, the file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def load_text(path: str | Path | None = None, context: int = 16) -> TextData:
    """Characters of a UTF-8 text file (default: the bundled essay about autoencoders) as tokens; the
    vocabulary is the sorted set of its characters after the padding token 0."""
    if path is None:
        name, text = TEXT_DEFAULT, resources.files("genfast").joinpath("data_text.txt").read_text("utf-8")
    else:
        name = str(path)
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"{path}: no such text file (expected a UTF-8 text file for the language model)"
            )
        try:
            text = Path(path).read_text("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: expected UTF-8 text: {error}") from error
    if len(text) < 2:
        raise ValueError(f"{path}: expected a text of at least 2 characters, got {len(text)}")
    vocab = ["", *sorted(set(text))]
    index = {c: i for i, c in enumerate(vocab)}
    tokens = torch.tensor([index[c] for c in text], dtype=torch.int64)
    return TextData(name, tokens, vocab, context)
