"""Quality judges for generated 8x8 digits that never look at a LatentSieve score.

The 1,797 ``load_digits`` images are split 50/50, stratified by class (:func:`digits_split`):

- **half A** builds the demo indexes (``latentsieve demo``) and the *selection* judge that the
  defaults were chosen with (docs/evidence.md, ``benchmarks/preregistered.py``);
- **half B** trains the *evaluation* judges: an MLP classifier (64 -> 64 ReLU -> 10) and a random
  forest (another family), each deterministic (``random_state`` 0).

No judge is trained on anything a demo model generated. Proxies for a generated image:

- ``confidence``: the top-class probability (a crisp digit scores near 1, a blend of two near 0.5);
- ``realism``: Kynkaanniemi et al.'s realism score of the image's hidden-layer features among
  those of the judge's real digits (see :func:`latentsieve.workers.evidence.realism`).

:func:`digits_quality` (``latentsieve report``'s and ``latentsieve study``'s demo judge) is the
half-B MLP, so the demo index (half A) and the demo judge share no digit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, cast

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

from latentsieve.workers.demo_models.digits_vae import digits_pixels
from latentsieve.workers.evidence import realism

HIDDEN_UNITS = 64
FOREST_TREES = 300
SPLIT_SEED = 0
Half = Literal["a", "b"]
Family = Literal["mlp", "forest"]


@lru_cache(maxsize=1)
def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``load_digits`` in half A and half B: two sorted int arrays (898 and 899 rows),
    stratified by class, seeded (``train_test_split``, ``random_state`` ``SPLIT_SEED``)."""
    target = load_digits().target
    a, b = train_test_split(
        np.arange(target.size), test_size=0.5, stratify=target, random_state=SPLIT_SEED
    )
    return np.sort(a), np.sort(b)


def half_rows(half: Half) -> np.ndarray:
    """The ``load_digits`` rows of one half."""
    a, b = digits_split()
    return a if half == "a" else b


def hidden_features(classifier: MLPClassifier, images: np.ndarray) -> np.ndarray:
    """The classifier's hidden ReLU layer of images (n, 64): (n, HIDDEN_UNITS) float64."""
    weights, bias = classifier.coefs_[0], classifier.intercepts_[0]
    return np.maximum(np.asarray(images, dtype=np.float64) @ weights + bias, 0.0)


@dataclass(frozen=True)
class DigitsQuality:
    """A trained MLP judge and the hidden features of its real digits."""

    classifier: MLPClassifier
    real_features: np.ndarray  # (n_real, HIDDEN_UNITS)

    def features(self, images: np.ndarray) -> np.ndarray:
        """Hidden-layer (ReLU) features of images (n, 64) in [0, 1]: (n, HIDDEN_UNITS)."""
        return hidden_features(self.classifier, images)

    def confidence(self, images: np.ndarray) -> np.ndarray:
        """Top-class probability of images (n, 64): (n,) in [0.1, 1]."""
        probabilities = self.classifier.predict_proba(np.asarray(images, dtype=np.float64))
        return cast(np.ndarray, probabilities.max(axis=1))

    def realism(self, images: np.ndarray) -> np.ndarray:
        """Realism score of images (n, 64) among the judge's real digits' features: (n,)."""
        return realism(self.real_features, self.features(images))

    def proxies(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every proxy of images (n, 64): {"confidence": (n,), "realism": (n,)}."""
        return {"confidence": self.confidence(images), "realism": self.realism(images)}


@lru_cache(maxsize=4)
def judge(half: Half, family: Family = "mlp") -> ClassifierMixin:
    """A classifier of one ``family`` trained (seconds, once per process) on one half."""
    rows = half_rows(half)
    pixels = digits_pixels()[rows].astype(np.float64)
    classifier: ClassifierMixin
    if family == "mlp":
        classifier = MLPClassifier(
            hidden_layer_sizes=(HIDDEN_UNITS,), max_iter=500, random_state=0
        )
    else:
        classifier = RandomForestClassifier(n_estimators=FOREST_TREES, random_state=0, n_jobs=1)
    classifier.fit(pixels, load_digits().target[rows])
    return classifier


@lru_cache(maxsize=1)
def digits_quality() -> DigitsQuality:
    """The demo's evaluation judge: the half-B MLP and the hidden features of half B."""
    classifier = cast(MLPClassifier, judge("b", "mlp"))
    pixels = digits_pixels()[half_rows("b")].astype(np.float64)
    return DigitsQuality(classifier, hidden_features(classifier, pixels))


def confidence_and_labels(
    classifier: ClassifierMixin, images: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Top-class probability and predicted class of images (n, ...) with 64 pixels each."""
    pixels = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    probabilities = classifier.predict_proba(pixels)
    classes = classifier.classes_
    return probabilities.max(axis=1), classes[probabilities.argmax(axis=1)]


def forest_confidence(
    images: np.ndarray, prompts: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """``latentsieve study --quality`` function: the half-B random forest's top-class
    probability and class of each image (n, 8, 8, 1) in [0, 1]."""
    return confidence_and_labels(judge("b", "forest"), images)


def mlp_confidence(images: np.ndarray, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``latentsieve study --quality`` function: the half-B MLP's top-class probability and
    class of each image (n, 8, 8, 1) in [0, 1] (the study's demo default)."""
    return confidence_and_labels(judge("b", "mlp"), images)
