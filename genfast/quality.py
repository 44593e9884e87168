"""How good a trained image model's pictures are, judged by a digit classifier (scikit-learn's logistic
regression) fitted on the data set's own images and labels.

- reconstruction accuracy (autoencoder, VAE): the share of reconstructions classified as their input's digit;
- classes covered (VAE, GAN): the digits that get at least half their share of the data among the
  classifier's verdicts on generated samples (a generator that collapsed onto a few digits covers few).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from genfast.data import ImageData

SAMPLES = 1000  # judged per figure: the figures move by about 1.5% between seeds of the sampler
CLASSIFIER_EXAMPLES = 10_000  # a logistic regression on more (MNIST's 60000) takes minutes and gains little
RECONSTRUCTION_GOAL, COVERAGE_GOAL = 0.8, 8


@dataclass
class Quality:
    """classifier_accuracy: the classifier on the data itself (an upper bound for reconstructions);
    reconstruction_accuracy, classes_covered (of classes): None where the model has no such output."""

    classifier_accuracy: float
    classes: int
    reconstruction_accuracy: float | None = None
    classes_covered: int | None = None
    sample_counts: list[int] | None = None

    def summary(self) -> str:
        parts = []
        if self.reconstruction_accuracy is not None:
            parts.append(
                f"reconstructions classified as their input's digit {self.reconstruction_accuracy:.1%} "
                f"(goal >= {RECONSTRUCTION_GOAL:.0%})"
            )
        if self.classes_covered is not None:
            parts.append(
                f"samples cover {self.classes_covered} of {self.classes} digits (goal >= {COVERAGE_GOAL}; "
                f"per digit {self.sample_counts} of {sum(self.sample_counts)})"
            )
        return (
            f"quality: {'; '.join(parts)}; judged by a logistic-regression digit classifier that is "
            f"{self.classifier_accuracy:.1%} right on the data"
        )


_classifiers: dict[tuple, tuple] = {}


def classifier(data: ImageData):
    """A logistic regression fitted on (up to CLASSIFIER_EXAMPLES of) `data`, and its accuracy there;
    kept for the next call with the same data."""
    key = (data.name, tuple(data.images.shape), float(data.images[:64].sum()))
    if key not in _classifiers:
        from sklearn.linear_model import LogisticRegression

        images, labels = data.images[:CLASSIFIER_EXAMPLES].numpy(), data.labels[:CLASSIFIER_EXAMPLES].numpy()
        model = LogisticRegression(max_iter=1000).fit(images, labels)
        _classifiers[key] = model, float(model.score(images, labels))
    return _classifiers[key]


@torch.no_grad()
def measure(
    kind: str, model: nn.Module, data: ImageData, images: torch.Tensor, labels: torch.Tensor, seed: int = 0
) -> Quality:
    """The figures of `model` ("autoencoder", "vae" or "gan"): reconstructions of (up to SAMPLES of) `images`
    whose digits are `labels`, and SAMPLES samples drawn from a generator seeded `seed`."""
    judge, accuracy = classifier(data)
    classes = len(judge.classes_)
    quality = Quality(accuracy, classes)
    was_training = model.training
    model.eval()
    try:
        if kind in ("autoencoder", "vae"):
            copies = model.reconstruct(images[:SAMPLES]).float().cpu().numpy()
            quality.reconstruction_accuracy = float(
                np.mean(judge.predict(copies) == labels[:SAMPLES].numpy())
            )
        if kind in ("vae", "gan"):
            device = next(model.parameters()).device
            samples = model.sample(SAMPLES, generator=torch.Generator(device=device).manual_seed(seed))
            counts = class_counts(judge, judge.predict(samples.float().cpu().numpy()))
            share = class_counts(judge, data.labels.numpy()) / len(data.labels)
            quality.classes_covered = int(np.sum(counts >= 0.5 * share * SAMPLES))
            quality.sample_counts = counts.tolist()
    finally:
        model.train(was_training)
    return quality


def class_counts(judge, labels: np.ndarray) -> np.ndarray:
    """How many of `labels` fall in each of the classifier's classes."""
    return np.bincount(np.searchsorted(judge.classes_, labels), minlength=len(judge.classes_))
