"""Quality proxies for generated 8x8 digits that never look at a LatentSieve score.

An MLP classifier (64 -> 64 ReLU -> 10) is trained on the real ``load_digits`` images, not on
anything a demo model generated, deterministically (``random_state`` 0). Its proxies for a
generated image:

- ``confidence``: the top-class probability (a crisp digit scores near 1, a blend of two near 0.5);
- ``realism``: Kynkaanniemi et al.'s realism score of the image's hidden-layer features among
  those of the real digits (see :func:`latentsieve.workers.evidence.realism`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import cast

import numpy as np
from sklearn.datasets import load_digits
from sklearn.neural_network import MLPClassifier

from latentsieve.workers.demo_models.digits_vae import digits_pixels
from latentsieve.workers.evidence import realism

HIDDEN_UNITS = 64


def hidden_features(classifier: MLPClassifier, images: np.ndarray) -> np.ndarray:
    """The classifier's hidden ReLU layer of images (n, 64): (n, HIDDEN_UNITS) float64."""
    weights, bias = classifier.coefs_[0], classifier.intercepts_[0]
    return np.maximum(np.asarray(images, dtype=np.float64) @ weights + bias, 0.0)


@dataclass(frozen=True)
class DigitsQuality:
    """The trained classifier and the hidden features of the real digits."""

    classifier: MLPClassifier
    real_features: np.ndarray  # (1797, HIDDEN_UNITS)

    def features(self, images: np.ndarray) -> np.ndarray:
        """Hidden-layer (ReLU) features of images (n, 64) in [0, 1]: (n, HIDDEN_UNITS)."""
        return hidden_features(self.classifier, images)

    def confidence(self, images: np.ndarray) -> np.ndarray:
        """Top-class probability of images (n, 64): (n,) in [0.1, 1]."""
        probabilities = self.classifier.predict_proba(np.asarray(images, dtype=np.float64))
        return cast(np.ndarray, probabilities.max(axis=1))

    def realism(self, images: np.ndarray) -> np.ndarray:
        """Realism score of images (n, 64) among the real digits' features: (n,)."""
        return realism(self.real_features, self.features(images))

    def proxies(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every proxy of images (n, 64): {"confidence": (n,), "realism": (n,)}."""
        return {"confidence": self.confidence(images), "realism": self.realism(images)}


@lru_cache(maxsize=1)
def digits_quality() -> DigitsQuality:
    """Train (about 2 s, once per process) the classifier on the real digits."""
    pixels = digits_pixels().astype(np.float64)
    classifier = MLPClassifier(hidden_layer_sizes=(HIDDEN_UNITS,), max_iter=500, random_state=0)
    classifier.fit(pixels, load_digits().target)
    return DigitsQuality(classifier, hidden_features(classifier, pixels))
