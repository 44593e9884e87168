"""Checkpoint files of `genfast train`: written atomically with a SHA-256 of their contents, read back with
errors that name the file and what is wrong with it.

A checkpoint is a dict saved by torch.save: model, optimizers, epoch, rng, shuffle, history, config, and
sha256, the digest of all the others (tensors by dtype, shape and bytes; other values by their repr). A
bit flipped on disk in a tensor changes the digest; a flip in the container makes it unreadable.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

KEYS = ("model", "optimizers", "epoch", "rng", "shuffle", "history", "config")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: empty, unreadable, corrupt, or not of this run."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (the previous one, if any, is left as it was)."""


def digest(state: dict) -> str:
    """SHA-256 (hex) of `state`: its keys and values in order, tensors by dtype, shape and bytes."""
    sha = hashlib.sha256()
    _feed(sha, state)
    return sha.hexdigest()


def _feed(sha, value: object) -> None:
    if isinstance(value, Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        sha.update(f"tensor {flat.dtype} {tuple(value.shape)}\n".encode())
        sha.update(flat.view(torch.uint8).numpy())
    elif isinstance(value, dict):
        sha.update(f"dict {len(value)}\n".encode())
        for key, item in value.items():
            _feed(sha, key)
            _feed(sha, item)
    elif isinstance(value, (list, tuple)):
        sha.update(f"{type(value).__name__} {len(value)}\n".encode())
        for item in value:
            _feed(sha, item)
    else:
        sha.update(f"{type(value).__name__} {value!r}\n".encode())


def save(state: dict, path: Path) -> None:
    """Write `state` and its digest to `path` atomically: into a temporary file in the same folder, flushed
    to the disk, then renamed over `path`. A failure (disk full, a crash) leaves the old file whole."""
    buffer = io.BytesIO()
    torch.save({**state, "sha256": digest(state)}, buffer)
    try:
        write_atomically(path, buffer.getbuffer())
    except OSError as error:
        raise CheckpointWriteError(
            f"{path}: cannot write the checkpoint ({error.strerror or error}); "
            "the previous checkpoint, if any, is left as it was"
        ) from error


def write_atomically(path: Path, data: bytes | memoryview) -> None:
    """`data` into `path` through a temporary file in the same folder, fsync and os.replace."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private; the file gets what open() would give
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):  # the rename reaches the disk too (not every system opens folders)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def load(path: Path) -> dict:
    """The checkpoint at `path`, its digest verified and its layout checked; CheckpointError naming the file
    and the fault otherwise (FileNotFoundError when there is none)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (expected a checkpoint written by genfast train)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated archive, random bytes, foreign pickles: torch raises many kinds
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt?): {reason}"
        ) from None
    if not isinstance(state, dict) or not set(KEYS) <= state.keys():
        found = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path}: expected a checkpoint of genfast train with keys {', '.join(KEYS)}; found {found}"
        )
    stored = state.pop("sha256", None)
    if stored is None:
        warnings.warn(
            f"{path}: the checkpoint carries no checksum (written before genfast stored one): "
            "it is loaded unverified",
            stacklevel=2,
        )
    elif stored != digest(state):
        raise CheckpointError(
            f"{path}: checksum mismatch: the contents differ from what was written (SHA-256 "
            f"{digest(state)[:16]}..., stored {str(stored)[:16]}...): the file is corrupt"
        )
    check_layout(state, path)
    return state


def _tensors(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(t, Tensor) for t in value.values())


# What each entry of a checkpoint must be: the words for the message, and the test.
LAYOUT = {
    "model": ("a dict of tensors", _tensors),
    "optimizers": (
        "a list of optimizer states",
        lambda v: (
            isinstance(v, list)
            and len(v) > 0
            and all(
                isinstance(o, dict)
                and {"state", "param_groups"} <= o.keys()
                and isinstance(o["param_groups"], list)
                and len(o["param_groups"]) > 0
                and all(isinstance(g, dict) and "lr" in g for g in o["param_groups"])
                for o in v
            )
        ),
    ),
    "epoch": ("an integer >= 0", lambda v: isinstance(v, int) and v >= 0),
    "rng": (
        "a list of generator states",
        lambda v: (
            isinstance(v, list) and all(isinstance(r, dict) and isinstance(r.get("cpu"), Tensor) for r in v)
        ),
    ),
    "shuffle": (
        "a dict with seed and epoch",
        lambda v: isinstance(v, dict) and isinstance(v.get("seed"), int),
    ),
    "history": (
        "a dict of loss lists",
        lambda v: isinstance(v, dict) and all(isinstance(h, list) for h in v.values()),
    ),
    "config": (
        "a dict with model, data, subset and vocab",
        lambda v: isinstance(v, dict) and {"model", "data", "subset", "vocab"} <= v.keys(),
    ),
}


def check_layout(state: dict, path: Path) -> None:
    """The types a checkpoint's entries must have (LAYOUT), finite weights and losses."""
    for key, (expected, valid) in LAYOUT.items():
        if not valid(state[key]):
            raise CheckpointError(
                f"{path}: the checkpoint's {key} should be {expected}, got "
                f"{type(state[key]).__name__} {str(state[key])[:80]}"
            )
    bad = [name for name, t in state["model"].items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise CheckpointError(f"{path}: the checkpoint's weights hold NaN or infinity ({', '.join(bad[:3])})")
    if not all(
        math.isfinite(v) for values in state["history"].values() for v in values if isinstance(v, float)
    ):
        raise CheckpointError(f"{path}: the checkpoint's loss history holds NaN or infinity")


def load_model_state(model: torch.nn.Module, saved: dict[str, Tensor], path: Path) -> None:
    """`saved` into `model`, or CheckpointError naming the tensors whose names or shapes differ."""
    own = model.state_dict()
    missing, unexpected = [n for n in own if n not in saved], [n for n in saved if n not in own]
    reshaped = [
        f"{name} is {tuple(saved[name].shape)} in the checkpoint, {tuple(own[name].shape)} in the model"
        for name in own
        if name in saved and saved[name].shape != own[name].shape
    ]
    faults = (
        reshaped
        + ([f"missing {', '.join(missing)}"] if missing else [])
        + ([f"unexpected {', '.join(unexpected)}"] if unexpected else [])
    )
    if faults:
        raise CheckpointError(
            f"{path}: the checkpoint's weights do not fit this {type(model).__name__}: "
            + "; ".join(faults[:4])
            + ("; ..." if len(faults) > 4 else "")
        )
    model.load_state_dict(saved)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, path: Path) -> None:
    """`saved` into `optimizer`, after checking that each state tensor has its parameter's shape."""
    try:
        groups = [group["params"] for group in saved["param_groups"]]
        ours = [group["params"] for group in optimizer.param_groups]
        if [len(g) for g in groups] != [len(g) for g in ours]:
            raise ValueError(
                f"parameter groups of {[len(g) for g in groups]} parameters, the model has "
                f"{[len(g) for g in ours]}"
            )
        for indices, params in zip(groups, ours):
            for index, param in zip(indices, params):
                for name, value in saved["state"].get(index, {}).items():
                    if isinstance(value, Tensor) and value.dim() > 0 and value.shape != param.shape:
                        raise ValueError(
                            f"its {name} of parameter {index} is {tuple(value.shape)}, the parameter "
                            f"{tuple(param.shape)}"
                        )
        optimizer.load_state_dict(saved)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: the checkpoint's optimizer state does not fit: {error}") from None
