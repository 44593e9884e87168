"""Default `genfast train` runs make pictures a digit classifier recognises (genfast.quality): autoencoder
and VAE reconstructions classified as their input's digit at least 80% of the time, GAN samples covering
at least 8 of the 10 digits; the figures are printed at the end of training."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn", reason="the digits data set and the digit classifier come with scikit-learn")
pytest.importorskip("matplotlib", reason="pictures and loss curves need matplotlib")

from genfast import cli, quality  # noqa: E402
from genfast.data import load_digits  # noqa: E402
from genfast.train import train  # noqa: E402
from tests.test_train import _one_thread  # noqa: E402, F401


# Measured, seeds 0-4 (fused; the plain twins alike): autoencoder 0.90-0.94, VAE 0.88-0.92 and 10 of 10
# digits, GAN 10 of 10 digits; one thread of the 2-core test machine: about 2 s, 2 s and 5 s.
@pytest.mark.parametrize("kind", ["autoencoder", "vae", "gan"])
def test_default_runs_make_digits_the_classifier_recognises(kind):
    result = train(kind, progress=False)
    figures = result.quality
    assert result.quality_report == figures.summary()
    if kind in ("autoencoder", "vae"):
        assert figures.reconstruction_accuracy >= quality.RECONSTRUCTION_GOAL, result.quality_report
    if kind in ("vae", "gan"):
        assert figures.classes_covered >= quality.COVERAGE_GOAL, result.quality_report


class Copier(nn.Module):
    """A stand-in model: reconstructions are `copy(x)`, samples are the first n rows of `pool`."""

    def __init__(self, copy, pool: torch.Tensor) -> None:
        super().__init__()
        self.copy, self.pool, self.weight = copy, pool, nn.Parameter(torch.zeros(1))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.copy(x)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.pool[torch.arange(n) % len(self.pool)]


def test_the_figures_tell_digits_from_the_mean_digit_and_a_collapse():
    digits = load_digits()
    images, labels = digits.images, digits.labels
    ones = images[labels == 1]
    faithful = quality.measure("vae", Copier(lambda x: x, images), digits, images, labels)
    blurred = quality.measure(
        "vae", Copier(lambda x: images.mean(0).expand_as(x), ones), digits, images, labels
    )
    assert faithful.reconstruction_accuracy == pytest.approx(faithful.classifier_accuracy, abs=0.02)
    assert faithful.reconstruction_accuracy > 0.95 and faithful.classes_covered == 10
    assert blurred.reconstruction_accuracy < 0.2 and blurred.classes_covered == 1


def test_the_cli_prints_the_figures(tmp_path, capsys):
    assert (
        cli.main(["train", "gan", "--epochs", "1", "--subset", "64", "--no-progress", "--out", str(tmp_path)])
        == 0
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("quality: samples cover ") and " of 10 digits" in last


def test_without_sklearn_the_report_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(quality, "_classifiers", {})
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)  # import fails as if not installed
    assert (
        cli.main(
            [
                "train",
                "autoencoder",
                "--epochs",
                "1",
                "--subset",
                "64",
                "--no-progress",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("quality: not measured") and "pip install scikit-learn" in last
