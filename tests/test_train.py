"""Training (genfast.train), data (genfast.data) and the genfast command (genfast.cli), on the bundled
digits and small models: the whole module runs in well under a minute on a 2-core CPU."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="the digits data set comes with scikit-learn")
pytest.importorskip("matplotlib", reason="pictures and loss curves need matplotlib")

from genfast import cli  # noqa: E402
from genfast.data import load_data, load_digits, load_mnist, load_text, read_idx  # noqa: E402
from genfast.train import Objective, build_model, train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Child processes: one thread each, as this test machine's cores are shared (more threads only contend).
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models on a shared 2-core CPU run ~100x faster on one thread than on two that contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loss_drop(history: list[float]) -> float:
    """1 - (mean of the last 5 step losses) / (the first step's loss, that of the untrained model)."""
    return 1.0 - sum(history[-5:]) / 5 / history[0]


# Measured drops, seeds 0..5, fused (the plain twin within 0.01 of these), at the default lr of the digits:
#   autoencoder 48 steps: 0.58 0.60 0.60 0.59 0.59 0.60 (lr 3e-3; at 1e-3: 0.52 0.52 0.45 0.46 0.42 0.49)
#   vae         48 steps: 0.38 0.40 0.39 0.39 0.37 0.40 (lr 3e-3; the loss is the negative ELBO, about 44 -> 27)
#   lm          96 steps: 0.49 0.47 0.48 0.48 0.45 0.49 (cross-entropy, about 3.8 -> 2.0 nats)
@pytest.mark.parametrize(
    "kind, settings, margin",
    [
        ("autoencoder", {"subset": 512, "epochs": 3}, 0.3),
        ("vae", {"subset": 512, "epochs": 3}, 0.2),
        ("lm", {"subset": 1024, "epochs": 3, "model_options": {"hidden": (128,)}}, 0.3),
    ],
)
@pytest.mark.parametrize("seed", [0, 7])
def test_training_lowers_the_loss(kind, settings, margin, seed):
    result = train(kind, batch_size=32, seed=seed, progress=False, **settings)
    losses = result.history["loss"]
    assert all(np.isfinite(losses))
    assert loss_drop(losses) > margin, f"{kind}: loss {losses[0]:.4f} -> {losses[-1]:.4f}"


def test_plain_twin_with_sgd_and_penalty_trains():
    result = train(
        "autoencoder",
        subset=512,
        batch_size=32,
        epochs=3,
        fused=False,
        optimizer="sgd",
        lr=0.5,
        l2=1e-4,
        progress=False,
    )
    assert not result.model.fused
    assert loss_drop(result.history["loss"]) > 0.1


def test_gan_discriminator_separates_real_from_fake():
    # Measured after 8 steps, seeds 0..5: mean logit real - fake 0.87 0.74 0.79 0.96 0.65 0.94; d_loss from
    # log 4 = 1.39 to 1.06..1.16. (The GAN and lr of the former digits defaults: the present ones, lr 2e-3,
    # alternate more in the first steps, 0.30..1.28 only after 16.)
    result = train(
        "gan",
        subset=256,
        batch_size=32,
        epochs=1,
        seed=3,
        progress=False,
        evaluate=False,
        lr=1e-3,
        model_options={"generator_sizes": (16, 64, 128, 64), "discriminator_sizes": (64, 128, 64, 1)},
    )
    assert all(np.isfinite(result.history["d_loss"] + result.history["g_loss"]))
    gan, real = result.model, result.data.images[:256] * 2 - 1
    with torch.no_grad():
        margin = gan.discriminate(real).mean() - gan.discriminate(gan(gan.noise(256))).mean()
    assert margin > 0.3
    assert result.history["d_loss"][-1] < result.history["d_loss"][0]


def test_weight_penalty_is_added_to_the_loss():
    model = build_model("autoencoder", load_digits())
    x = torch.rand(8, 64)
    weights = [p for p in model.parameters() if p.dim() > 1]
    expected = (
        model.loss(x)
        + 0.1 * sum(w.abs().sum() for w in weights)
        + 0.01 * sum(w.square().sum() for w in weights)
    )
    torch.testing.assert_close(Objective(model, l1=0.1, l2=0.01)("loss", x), expected)


def checkpoint(folder: Path) -> dict:
    return torch.load(folder / "checkpoint.pt", weights_only=True)


@pytest.mark.parametrize("kind", ["autoencoder", "vae", "gan", "lm"])
def test_resume_repeats_the_uninterrupted_run(kind, tmp_path):
    settings = dict(
        subset=64,
        batch_size=16,
        seed=5,
        progress=False,
        model_options={"hidden": (32,)} if kind == "lm" else None,
    )
    train(kind, epochs=2, out=tmp_path / "straight", **settings)
    train(kind, epochs=1, out=tmp_path / "resumed", **settings)
    # Random draws between the two calls must not matter: the checkpoint restores the RNG state.
    torch.rand(1000)
    train(kind, epochs=2, out=tmp_path / "resumed", resume=True, **settings)
    straight, resumed = checkpoint(tmp_path / "straight"), checkpoint(tmp_path / "resumed")
    assert resumed["epoch"] == 2
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert straight["history"] == resumed["history"]
    assert torch.equal(straight["rng"][0]["cpu"], resumed["rng"][0]["cpu"])


def test_resume_checks_the_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        train("vae", subset=32, epochs=1, out=tmp_path, resume=True, progress=False)
    train("vae", subset=32, epochs=1, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="subset"):
        train("vae", subset=16, epochs=2, out=tmp_path, resume=True, progress=False)


def test_two_processes_match_one_on_the_combined_batch(tmp_path):
    # torchrun --standalone picks a free port. 2 processes x 16 examples per step against 1 x 32: the same
    # batches (DistributedSampler in both), gradients averaged by DDP's all-reduce.
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "genfast",
        "train",
        "autoencoder",
        "--subset",
        "128",
        "--batch-size",
        "16",
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(tmp_path / "ddp"),
    ]
    done = subprocess.run(command, cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    train(
        "autoencoder", subset=128, batch_size=32, epochs=2, device="cpu", out=tmp_path / "one", progress=False
    )
    two, one = checkpoint(tmp_path / "ddp"), checkpoint(tmp_path / "one")
    # Half-batch gradient sums plus an all-reduce round differently from one full-batch sum: a relative
    # gradient error of ~1e-7..1e-6, which Adam turns into at most lr * 1e-6 = 1e-9 per step. Measured after
    # these 8 steps: 1.5e-8 (half a float32 ulp of the largest weight, 0.25). atol 1e-6 leaves room for a
    # different BLAS blocking; a wrong averaging (sum, or one rank's gradient) moves weights by ~1e-3.
    for name, tensor in one["model"].items():
        torch.testing.assert_close(
            two["model"][name], tensor, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}"
        )
    assert len(two["rng"]) == 2 and two["history"]["loss"] == pytest.approx(one["history"]["loss"], abs=1e-5)


THREADS_AFTER_TRAINING = """
import os, sys
from genfast.train import train

train("autoencoder", subset=32, batch_size=16, epochs=1, device="cpu", progress=False, evaluate=False)
others = sorted(open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")
                if int(task) != os.getpid())
print(f"rank {os.environ['RANK']} threads beside the main one after training: {others}")
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through Linux's /proc")
def test_torchrun_leaves_no_gloo_thread_behind(tmp_path):
    # torch.distributed.nn.functional takes group=group.WORLD as a default argument, evaluated at its first
    # import, which DistributedDataParallel does. After the group was made, that kept the group alive past
    # destroy_process_group(): gloo's threads ran on into interpreter shutdown, where they aborted a rank
    # now and then ("terminate called without an active exception"). Every thread must be gone by the time
    # train() returns.
    script = tmp_path / "threads.py"
    script.write_text(THREADS_AFTER_TRAINING)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
    ]
    done = subprocess.run(
        command,
        cwd=ROOT,
        env={**CHILD_ENV, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} threads beside the main one after training: []" in done.stdout, done.stdout


def test_gan_trains_under_torchrun(tmp_path):
    # The GAN's discriminator step leaves the generator unused: DDP must be told (find_unused_parameters).
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "genfast",
        "train",
        "gan",
        "--subset",
        "64",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "samples.png").is_file() and len(checkpoint(tmp_path)["history"]["d_loss"]) == 2


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_train_writes_checkpoint_pictures_and_curves(tmp_path, capsys):
    code = cli.main(
        ["train", "vae", "--epochs", "1", "--subset", "64", "--batch-size", "16", "--out", str(tmp_path)]
    )
    assert code == 0
    assert checkpoint(tmp_path)["epoch"] == 1
    for name in ("samples", "reconstructions", "samples_epoch001", "reconstructions_epoch001", "loss"):
        assert is_png(tmp_path / f"{name}.png"), name
    assert "samples/s" in capsys.readouterr().err  # the progress bar


def test_cli_lm_writes_text_samples(tmp_path):
    assert (
        cli.main(
            [
                "train",
                "lm",
                "--epochs",
                "1",
                "--subset",
                "256",
                "--no-progress",
                "--plain",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert (tmp_path / "samples.txt").read_text(encoding="utf-8").startswith("The ")
    assert is_png(tmp_path / "loss.png")


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["lm", "--data", "/no/such/text.txt"], "/no/such/text.txt"),
        (["vae", "--data", "/no/such/images"], "expected one of digits, digits28, mnist"),
        (["gan", "--data", "mnist"], "--data-dir"),
        (["autoencoder", "--data", "mnist", "--data-dir", "/no/such/folder"], "/no/such/folder"),
    ],
)
def test_cli_bad_data_is_a_clear_error(arguments, message, tmp_path, capsys):
    assert cli.main(["train", *arguments, "--epochs", "1", "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_python_m_genfast_exits_nonzero_on_a_bad_path(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "genfast", "train", "lm", "--data", str(tmp_path / "missing.txt")],
        env=CHILD_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "missing.txt" in done.stderr and "Traceback" not in done.stderr


def test_cli_bench_runs_the_suite_of_the_checkout_from_anywhere_without_touching_sys_path(
    tmp_path, monkeypatch, capfd
):
    monkeypatch.chdir(tmp_path)  # not the checkout: the suite is found from genfast's own location
    decoy = tmp_path / "benchmarks"  # a folder of that name where the user stands must not shadow the suite
    decoy.mkdir()
    (decoy / "__init__.py").write_text("")
    (decoy / "__main__.py").write_text("raise SystemExit('the decoy ran')\n")
    path = list(sys.path)
    assert cli.main(["bench", "--help"]) == 0
    assert "--quick" in capfd.readouterr().out
    assert cli.main(["bench", "--cases", "nosuchfamily"]) == 2  # the suite's own exit status comes back
    assert "nosuchfamily" in capfd.readouterr().err
    assert sys.path == path


def test_cli_bench_outside_a_source_checkout_says_what_it_needs(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(
        cli, "SOURCE_TREE", tmp_path
    )  # as in an installed wheel: no benchmarks/ beside genfast
    assert cli.main(["bench", "--device", "cpu", "--quick"]) == 2
    out, err = capfd.readouterr()
    assert out == "" and "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith("genfast bench: error: ") and "source checkout" in err and str(tmp_path) in err


def test_digits_data():
    digits = load_digits()
    assert digits.images.shape == (1797, 64) and digits.shape == (8, 8)
    assert digits.images.min() == 0 and digits.images.max() == 1 and digits.images.dtype == torch.float32
    upscaled = load_data("digits28", "vae")
    assert upscaled.images.shape == (1797, 784) and 0 <= upscaled.images.min() and upscaled.images.max() <= 1


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    (gzip.open if compress else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files(tmp_path, compress):
    images = np.random.randint(0, 256, (5, 28, 28), dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", np.arange(5), compress)
    mnist = load_mnist(tmp_path)
    assert mnist.shape == (28, 28) and mnist.labels.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(mnist.images, torch.from_numpy(images.reshape(5, 784) / 255.0).float())


def test_bad_idx_files_name_the_path(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"P5\n28 28\n255\n")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)
    write_idx(path, np.zeros((2, 3, 3)), compress=False)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: IDX shape \(2, 3, 3\)"):
        read_idx(path)


def test_text_data(tmp_path):
    text = load_text(context=4)
    assert text.vocab[0] == "" and len(text.tokens) > 2000 and text.tokens.min() >= 1
    assert text.decode(text.encode("The narrow door")) == "The narrow door"
    windows, targets = text.tensors()
    assert windows[0].tolist() == [0, 0, 0, 0] and windows[2].tolist() == [0, 0, *text.tokens[:2].tolist()]
    assert torch.equal(windows[10], text.tokens[6:10]) and torch.equal(targets, text.tokens)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: expected UTF-8"):
        load_text(tmp_path / "latin1.txt")
