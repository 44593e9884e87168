"""`genfast train` never loses or silently replaces a good checkpoint, and answers what a user can get wrong
(arguments, device, data, output folder, checkpoint, a diverging run) with one line on stderr and exit
status 2, never a traceback, before writing anything where it can."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="the digits data set comes with scikit-learn")
pytest.importorskip("matplotlib", reason="pictures and loss curves need matplotlib")

from genfast import cli  # noqa: E402
from genfast.checkpoint import CheckpointWriteError, save  # noqa: E402
from genfast.data import load_digits  # noqa: E402
from genfast.train import NonFiniteError, default_lr, train  # noqa: E402
from tests.test_train import CHILD_ENV, ROOT, _one_thread, checkpoint  # noqa: E402, F401

SMALL = ["--subset", "64", "--batch-size", "32", "--no-progress"]


def run_cli(capsys, *arguments: str) -> tuple[int, str]:
    """genfast train ARGUMENTS in this process: the exit status (argparse's too) and stderr."""
    try:
        code = cli.main(["train", *arguments])
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    """A folder holding a good 1-epoch VAE run (tests copy it before changing anything)."""
    folder = tmp_path_factory.mktemp("good") / "vae"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as _one_thread does for each test, which this module-wide fixture precedes
    try:
        assert cli.main(["train", "vae", "--epochs", "1", *SMALL, "--out", str(folder)]) == 0
    finally:
        torch.set_num_threads(threads)
    return folder


@pytest.fixture
def run_folder(good_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good_run, tmp_path / "vae"))


# --- checkpoints that cannot be used (item 11) ---


def flip_a_weight_bit(path: Path) -> None:
    """Flip one exponent bit of a weight in the file, where its bytes lie (the archive stores them raw)."""
    weight = torch.load(path, weights_only=True)["model"]["encoder.0.weight"]
    raw = bytearray(path.read_bytes())
    offset = raw.find(weight.numpy().tobytes())
    assert offset > 0
    raw[offset + 4 * 10 + 3] ^= 0x10
    path.write_bytes(bytes(raw))


def drop_the_optimizer_state(path: Path) -> None:
    """A checkpoint with a valid checksum but no optimizer state (as a program other than genfast might write)."""
    state = torch.load(path, weights_only=True)
    del state["sha256"]
    save(dict(state, optimizers=[]), path)


CORRUPTIONS = {
    "truncated": (
        lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        "not a readable checkpoint",
    ),
    "empty": (lambda p: p.write_bytes(b""), "the file is empty"),
    "random bytes": (
        lambda p: p.write_bytes(np.random.default_rng(0).bytes(p.stat().st_size)),
        "not a readable checkpoint",
    ),
    "{}": (lambda p: torch.save({}, p), "expected a checkpoint of genfast train"),
    "a flipped bit": (flip_a_weight_bit, "checksum mismatch"),
    "no optimizer state": (drop_the_optimizer_state, "optimizers should be a list of optimizer states"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_checkpoint_is_a_clear_error(corruption, run_folder, capsys):
    path = run_folder / "checkpoint.pt"
    corrupt, message = CORRUPTIONS[corruption]
    corrupt(path)
    damaged = path.read_bytes()
    code, err = run_cli(capsys, "vae", "--epochs", "2", *SMALL, "--out", str(run_folder), "--resume")
    assert_user_error(code, err, str(path), message)
    assert path.read_bytes() == damaged


def test_a_checkpoint_of_other_sizes_names_the_tensors(tmp_path, capsys):
    train(
        "vae",
        subset=64,
        batch_size=32,
        epochs=1,
        out=tmp_path,
        progress=False,
        evaluate=False,
        model_options={"hidden": (32,)},
    )
    code, err = run_cli(capsys, "vae", "--epochs", "2", *SMALL, "--out", str(tmp_path), "--resume")
    assert_user_error(
        code,
        err,
        str(tmp_path / "checkpoint.pt"),
        "do not fit",
        "encoder.0.weight is (32, 64) in the checkpoint, (128, 64) in the model",
    )


def test_the_checkpoint_carries_the_checksum_of_its_contents(good_run):
    state = checkpoint(good_run)
    from genfast.checkpoint import digest

    stored = state.pop("sha256")
    assert len(stored) == 64 and stored == digest(state)
    state["model"]["encoder.0.weight"][0, 0] += 1e-7
    assert digest(state) != stored


# --- output folders (item 14) ---


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write into: chmod'ed for a normal user; for root, which chmod does not
    stop, one of sysfs's (Linux)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        return folder
    folder = Path("/sys/kernel")
    try:
        (folder / "genfast-probe").touch()
    except OSError:
        return folder
    pytest.skip("no folder this root process cannot write into (no sysfs)")


@pytest.mark.parametrize(
    "where, message",
    [
        ("a file", "expected a folder, found a file"),
        ("under a file", "cannot create it"),
        ("unwritable", "cannot write there"),
        ("uncreatable", "cannot write there"),
    ],
)
def test_a_bad_output_folder_is_a_clear_error(where, message, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a folder")
    out = {
        "a file": lambda: tmp_path / "notes.txt",
        "under a file": lambda: tmp_path / "notes.txt" / "run",
        "unwritable": lambda: unwritable_folder(tmp_path),
        "uncreatable": lambda: unwritable_folder(tmp_path) / "run",
    }[where]()
    code, err = run_cli(capsys, "vae", "--epochs", "1", *SMALL, "--out", str(out))
    assert_user_error(code, err, str(out), message)


DISK_FULL = """
import resource, signal, sys
from genfast.cli import main

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="limits file sizes through RLIMIT_FSIZE")
def test_a_full_disk_keeps_the_last_checkpoint(run_folder):
    path = run_folder / "checkpoint.pt"
    before = path.read_bytes()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            DISK_FULL,
            "vae",
            "--epochs",
            "2",
            *SMALL,
            "--out",
            str(run_folder),
            "--resume",
        ],
        cwd=ROOT,
        env=CHILD_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_user_error(
        done.returncode,
        done.stderr,
        f"{path}: cannot write the checkpoint (File too large)",
        "left as it was",
    )
    assert path.read_bytes() == before
    assert sorted(p.name for p in run_folder.iterdir() if "checkpoint" in p.name) == ["checkpoint.pt"]


def test_checkpoint_writes_replace_the_file_whole(tmp_path, monkeypatch):
    from genfast import checkpoint as checkpoints

    path = tmp_path / "checkpoint.pt"
    checkpoints.write_atomically(path, b"good")

    def fail(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        checkpoints.save({"model": {}}, path)
    assert path.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_bad_data_leaves_no_output_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(capsys, "vae", "--data", "nope", "--out", str(out))
    assert_user_error(code, err, "expected one of digits, digits28, mnist", "'nope'")
    assert not out.exists()


@pytest.mark.parametrize(
    "device, message",
    [
        ("bogus", "device: expected cpu, cuda or cuda:N, got 'bogus'"),
        pytest.param(
            "cuda",
            "no CUDA GPU is available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present"),
        ),
        ("cuda:99", "cuda:99"),
    ],
)
def test_a_bad_device_is_a_clear_error(device, message, tmp_path, capsys):
    code, err = run_cli(capsys, "vae", "--device", device, "--out", str(tmp_path / "run"))
    assert_user_error(code, err, message)
    assert not (tmp_path / "run").exists()


def test_python_m_genfast_prints_no_traceback_for_a_user_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a folder")
    done = subprocess.run(
        [sys.executable, "-m", "genfast", "train", "vae", "--out", str(tmp_path / "notes.txt")],
        cwd=ROOT,
        env=CHILD_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_user_error(done.returncode, done.stderr, "notes.txt")


# --- non-finite numbers (item 12) ---


@pytest.mark.parametrize(
    "option, value",
    [
        ("--lr", "inf"),
        ("--lr", "nan"),
        ("--lr", "0"),
        ("--lr", "-1e-3"),
        ("--lr", "1e39"),
        ("--l1", "nan"),
        ("--l2", "-1"),
        ("--l2", "inf"),
        ("--epochs", "0"),
        ("--batch-size", "2.5"),
    ],
)
def test_invalid_hyperparameters_stop_at_parsing(option, value, tmp_path, capsys):
    code, err = run_cli(capsys, "vae", f"{option}={value}", "--out", str(tmp_path / "run"))
    assert_user_error(code, err, f"argument {option}: expected", repr(value))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argument, value", [("lr", float("nan")), ("l1", float("inf")), ("l2", -1.0), ("epochs", 0), ("seed", -1)]
)
def test_train_rejects_invalid_hyperparameters(argument, value):
    with pytest.raises(ValueError, match=f"^{argument}: expected"):
        train("vae", **{argument: value}, progress=False)


def test_resume_with_a_nan_penalty_keeps_the_checkpoint(run_folder, capsys):
    before = (run_folder / "checkpoint.pt").read_bytes()
    code, err = run_cli(
        capsys, "vae", "--epochs", "2", *SMALL, "--out", str(run_folder), "--resume", "--l1", "nan"
    )
    assert_user_error(code, err, "--l1")
    assert (run_folder / "checkpoint.pt").read_bytes() == before


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(run_folder, capsys):
    # lr 1e10 takes the VAE's log-variances past exp's range within two steps: the loss becomes NaN.
    path = run_folder / "checkpoint.pt"
    before = path.read_bytes()
    code, err = run_cli(
        capsys, "vae", "--epochs", "3", *SMALL, "--out", str(run_folder), "--resume", "--lr", "1e10"
    )
    assert code == 2 and "Traceback" not in err
    assert "loss is nan" in err and f"training stopped; {path} is left as it was, at epoch 1" in err
    assert path.read_bytes() == before
    code, err = run_cli(
        capsys, "vae", "--epochs", "1", *SMALL, "--out", str(run_folder), "--overwrite", "--lr", "1e10"
    )
    assert code == 2 and "is left as it was" in err and path.read_bytes() == before


def test_weights_that_became_infinite_are_never_saved(tmp_path):
    # One step per epoch whose loss is finite, whose update (l1 gradient 1e10 x lr 1e30) overflows float32.
    with pytest.raises(
        NonFiniteError, match=r"encoder.0.weight.*NaN or infinite after epoch 1.*no checkpoint"
    ):
        train(
            "autoencoder",
            optimizer="sgd",
            lr=1e30,
            l1=1e10,
            subset=32,
            batch_size=32,
            epochs=1,
            out=tmp_path,
            progress=False,
        )
    assert not (tmp_path / "checkpoint.pt").exists()


# --- new runs, resumed runs and their hyperparameters (item 13) ---


def test_a_new_run_does_not_replace_a_checkpoint_without_overwrite(run_folder, capsys):
    path = run_folder / "checkpoint.pt"
    before = path.read_bytes()
    code, err = run_cli(capsys, "vae", "--epochs", "1", *SMALL, "--out", str(run_folder))
    assert_user_error(code, err, str(path), "--resume", "--overwrite")
    assert path.read_bytes() == before
    code, err = run_cli(
        capsys, "vae", "--epochs", "1", *SMALL, "--seed", "3", "--out", str(run_folder), "--overwrite"
    )
    assert code == 0 and checkpoint(run_folder)["shuffle"]["seed"] == 3


def test_resume_applies_a_changed_learning_rate_and_says_so(run_folder, capsys):
    code, err = run_cli(
        capsys, "vae", "--epochs", "2", *SMALL, "--out", str(run_folder), "--resume", "--lr", "0.01"
    )
    assert code == 0 and f"with lr 0.01 (was {default_lr('vae', load_digits())})" in err
    assert [o["param_groups"][0]["lr"] for o in checkpoint(run_folder)["optimizers"]] == [0.01]


def test_resume_keeps_the_hyperparameters_it_is_not_given(tmp_path):
    # A run started with a penalty, an lr and a batch size of its own and resumed without them repeats the
    # uninterrupted run (before: the penalty and batch size fell back to the defaults).
    settings = dict(subset=64, seed=2, progress=False, evaluate=False)
    given = dict(lr=0.002, l2=0.05, batch_size=16)
    train("autoencoder", epochs=2, out=tmp_path / "straight", **given, **settings)
    train("autoencoder", epochs=1, out=tmp_path / "resumed", **given, **settings)
    train("autoencoder", epochs=2, out=tmp_path / "resumed", resume=True, **settings)
    straight, resumed = checkpoint(tmp_path / "straight"), checkpoint(tmp_path / "resumed")
    assert resumed["history"] == straight["history"]
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


@pytest.mark.parametrize(
    "arguments, fragments",
    [
        (["--optimizer", "sgd"], ["trained with adam", "drop --optimizer"]),
        (["--seed", "4"], ["seed 0", "--seed 4"]),
        (["--overwrite"], ["not allowed with argument --resume"]),
    ],
)
def test_resume_refuses_what_cannot_continue(arguments, fragments, run_folder, capsys):
    before = (run_folder / "checkpoint.pt").read_bytes()
    code, err = run_cli(
        capsys, "vae", "--epochs", "2", *SMALL, "--out", str(run_folder), "--resume", *arguments
    )
    assert_user_error(code, err, *fragments)
    assert (run_folder / "checkpoint.pt").read_bytes() == before
