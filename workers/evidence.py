"""Statistics of the evidence report: does rejecting low scores keep better samples?

Pure functions over arrays, each with a bootstrap 95% interval (percentile method, resampling
samples with replacement from a seeded generator):

- :func:`spearman_interval`: Spearman rank correlation of a score with a quality;
- :func:`rejection_table`: mean quality kept when the lowest fraction of scores is rejected,
  against rejecting the same number at random;
- :func:`manifold_radii`, :func:`precision_recall`, :func:`realism`: the improved precision and
  recall and the realism score of Kynkaanniemi et al., "Improved Precision and Recall Metric for
  Assessing Generative Models" (NeurIPS 2019), on feature vectors.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import rankdata

BOOTSTRAP = 1000
CONFIDENCE = 0.95
REJECT_FRACTIONS = (0.1, 0.25, 0.5)
NEIGHBOURS = 3  # k of the k-NN manifold estimate (Kynkaanniemi et al. use k = 3)
BLOCK_CELLS = 4_000_000  # largest (rows, n) block of bootstrap indices or distances at once


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap 95% interval."""

    value: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _interval(value: float, resampled: np.ndarray) -> Interval:
    """Percentile interval of the resampled statistic; undefined (NaN) when more than 1% of
    the resamples have no value (e.g. a rare binary quality often constant in a resample),
    since the rest would be a biased subset."""
    tail = (1.0 - CONFIDENCE) / 2.0
    finite = resampled[np.isfinite(resampled)]
    if finite.size == 0 or finite.size < 0.99 * resampled.size:
        return Interval(value, float("nan"), float("nan"))
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return Interval(float(value), float(low), float(high))


def bootstrap_rows(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of ``(b, n)`` row indices drawn with replacement, one bootstrap sample a row,
    ``resamples`` rows in all; blocks hold at most ~``BLOCK_CELLS`` indices, so memory stays
    bounded for any n. The same seed gives the same resamples."""
    rng = np.random.default_rng(seed)
    per_block = max(1, BLOCK_CELLS // max(n, 1))
    for start in range(0, resamples, per_block):
        yield rng.integers(0, n, size=(min(per_block, resamples - start), n))


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: (B, n) -> (B,)."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray((a * b).sum(axis=1) / denominator)


def spearman(score: np.ndarray, quality: np.ndarray) -> float:
    """Spearman's rho: Pearson correlation of the average ranks of (n,) and (n,)."""
    ranks = rankdata(np.vstack([score, quality]), axis=1)
    return float(_rowwise_pearson(ranks[:1], ranks[1:])[0])


def spearman_interval(
    score: np.ndarray, quality: np.ndarray, resamples: int = BOOTSTRAP, seed: int = 0
) -> Interval:
    """Spearman's rho of ``score`` (n,) with ``quality`` (n,) and its bootstrap 95% interval
    (each resample re-ranks its own draw, ties get average ranks)."""
    score = np.asarray(score, dtype=np.float64)
    quality = np.asarray(quality, dtype=np.float64)
    resampled = np.concatenate([
        _rowwise_pearson(rankdata(score[rows], axis=1), rankdata(quality[rows], axis=1))
        for rows in bootstrap_rows(score.size, resamples, seed)
    ])
    return _interval(spearman(score, quality), resampled)


def kept_rows(score: np.ndarray, reject_fraction: float) -> np.ndarray:
    """Rows kept when the lowest ``reject_fraction`` of scores is rejected: the
    ``n - floor(fraction * n)`` highest scores (ties broken by position, stable)."""
    n = score.size
    keep = n - int(np.floor(reject_fraction * n))
    return np.argsort(-score, kind="stable")[:keep]


def rejection_table(
    score: np.ndarray,
    quality: np.ndarray,
    fractions: tuple[float, ...] = REJECT_FRACTIONS,
    resamples: int = BOOTSTRAP,
    seed: int = 0,
) -> list[dict[str, object]]:
    """For each fraction f: mean quality of the samples kept when the lowest f of ``score`` is
    rejected, of the same number kept at random (its mean is the mean of all samples, its
    interval the spread of random subsets), and the gain (kept - all) with bootstrap intervals."""
    score = np.asarray(score, dtype=np.float64)
    quality = np.asarray(quality, dtype=np.float64)
    n = score.size
    rng = np.random.default_rng(seed)
    table: list[dict[str, object]] = []
    for fraction in fractions:
        keep = n - int(np.floor(fraction * n))
        kept = float(quality[kept_rows(score, fraction)].mean())
        overall = float(quality.mean())
        random_means = np.array(
            [quality[rng.choice(n, size=keep, replace=False)].mean() for _ in range(resamples)]
        )
        # Bootstrap the gain: each resample ranks its own draw by score.
        gains = np.concatenate([
            _kept_gain(score[rows], quality[rows], keep)
            for rows in bootstrap_rows(n, resamples, seed + 1)
        ])
        table.append(
            {
                "reject_fraction": fraction,
                "kept": keep,
                "kept_by_score": kept,
                "kept_at_random": _interval(overall, random_means).as_dict(),
                "gain": _interval(kept - overall, gains).as_dict(),
            }
        )
    return table


def _kept_gain(scores: np.ndarray, qualities: np.ndarray, keep: int) -> np.ndarray:
    """Per resample row: mean quality of the ``keep`` highest scores minus the row's mean."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
    kept = np.take_along_axis(qualities, order, axis=1).mean(axis=1)
    return np.asarray(kept - qualities.mean(axis=1))


def paired_gain_difference(
    score_a: np.ndarray,
    score_b: np.ndarray,
    quality: np.ndarray,
    reject_fraction: float,
    resamples: int = BOOTSTRAP,
    seed: int = 3,
) -> Interval:
    """Mean quality kept by ``score_a`` minus that kept by ``score_b`` when each rejects the
    lowest ``reject_fraction`` of the same (n,) samples, with a paired bootstrap interval: each
    resample draws one set of rows and both scores rank it."""
    score_a, score_b = np.asarray(score_a, dtype=np.float64), np.asarray(score_b, np.float64)
    quality = np.asarray(quality, dtype=np.float64)
    n = quality.size
    keep = n - int(np.floor(reject_fraction * n))
    value = quality[kept_rows(score_a, reject_fraction)].mean() - quality[
        kept_rows(score_b, reject_fraction)].mean()
    differences = np.concatenate([
        _kept_gain(score_a[rows], quality[rows], keep) - _kept_gain(score_b[rows], quality[rows],
                                                                    keep)
        for rows in bootstrap_rows(n, resamples, seed)
    ])
    return _interval(float(value), differences)


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise squared L2 distances (n, f), (m, f) -> (n, m), float64, clamped at 0."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    out = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.asarray(np.maximum(out, 0.0))


def _row_blocks(rows: int, cols: int) -> Iterator[slice]:
    """Row blocks whose (block, cols) float64 distance matrix stays ~BLOCK_CELLS."""
    step = max(1, BLOCK_CELLS // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def manifold_radii(features: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """Distance of each feature vector (n, f) to its k-th nearest other one: (n,), exact
    float64, in row blocks (memory ~BLOCK_CELLS doubles for any n)."""
    n = features.shape[0]
    k = min(k, n - 1)
    out = np.empty(n)
    for block in _row_blocks(n, n):
        squared = _squared_distances(features[block], features)
        rows = np.arange(squared.shape[0])
        squared[rows, block.start + rows] = np.inf  # not its own neighbour
        out[block] = np.sqrt(np.partition(squared, k - 1, axis=1)[:, k - 1])
    return out


def _covered(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Whether each point (n, f) lies in some ball B(centre_j, radius_j): (n,) bool."""
    out = np.empty(points.shape[0], dtype=bool)
    for block in _row_blocks(points.shape[0], centres.shape[0]):
        squared = _squared_distances(points[block], centres)
        out[block] = (squared <= radii[None, :] ** 2).any(axis=1)
    return out


def coverage(
    real: np.ndarray, generated: np.ndarray, k: int = NEIGHBOURS
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample indicators of improved precision and recall (Kynkaanniemi et al., eq. 1-2):
    (generated inside the real k-NN manifold (n_g,), real inside the generated one (n_r,))."""
    inside_real = _covered(generated, real, manifold_radii(real, k))
    inside_generated = _covered(real, generated, manifold_radii(generated, k))
    return inside_real, inside_generated


def precision_recall(
    real: np.ndarray, generated: np.ndarray, k: int = NEIGHBOURS
) -> tuple[float, float]:
    """Improved precision (share of generated features inside the real k-NN manifold) and
    recall (share of real features inside the generated one); Kynkaanniemi et al., eq. 1-2."""
    inside_real, inside_generated = coverage(real, generated, k)
    return float(inside_real.mean()), float(inside_generated.mean())


def realism(real: np.ndarray, generated: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """Realism score of each generated feature vector (Kynkaanniemi et al., eq. 3):
    ``max_r radius_k(r) / ||g - r||`` over the real vectors whose k-NN radius is at most the
    median (the paper drops the sparsest half); >= 1 means inside the real manifold. (n,)."""
    radii = manifold_radii(real, k)
    dense = radii <= np.median(radii)
    centres, reach = real[dense], radii[dense]
    out = np.empty(generated.shape[0])
    for block in _row_blocks(generated.shape[0], centres.shape[0]):
        distances = np.sqrt(_squared_distances(generated[block], centres))
        with np.errstate(divide="ignore"):
            out[block] = (reach[None, :] / distances).max(axis=1)
    return out


def precision_recall_table(
    score: np.ndarray,
    real: np.ndarray,
    generated: np.ndarray,
    fractions: tuple[float, ...] = REJECT_FRACTIONS,
    resamples: int = 200,
    seed: int = 0,
) -> list[dict[str, object]]:
    """Precision and recall of the generated samples kept when the lowest fraction of ``score``
    is rejected, against the same number kept at random.

    The kept row's intervals bootstrap the per-sample indicators (precision: the kept samples,
    recall: the real samples; the manifolds stay fixed, so no resample holds duplicate points).
    The random row is the mean and 95% spread of ``resamples // 4`` random subsets of that size.
    """
    n = score.size
    rng = np.random.default_rng(seed)
    table: list[dict[str, object]] = []
    for fraction in fractions:
        rows = kept_rows(score, fraction)
        inside_real, inside_generated = coverage(real, generated[rows])
        random_draws = np.array(
            [
                precision_recall(real, generated[rng.choice(n, size=rows.size, replace=False)])
                for _ in range(max(1, resamples // 4))
            ]
        )
        table.append(
            {
                "reject_fraction": fraction,
                "kept": int(rows.size),
                "precision": mean_interval(inside_real, resamples, seed).as_dict(),
                "recall": mean_interval(inside_generated, resamples, seed).as_dict(),
                "random_precision": _interval(random_draws[:, 0].mean(), random_draws[:, 0])
                .as_dict(),
                "random_recall": _interval(random_draws[:, 1].mean(), random_draws[:, 1]).as_dict(),
            }
        )
    return table


def mean_interval(values: np.ndarray, resamples: int = BOOTSTRAP, seed: int = 0) -> Interval:
    """Mean of (n,) values with its bootstrap 95% interval."""
    values = np.asarray(values, dtype=np.float64)
    means = [values[rows].mean(axis=1) for rows in bootstrap_rows(values.size, resamples, seed)]
    return _interval(float(values.mean()), np.concatenate(means))


def mask_gain(
    kept: np.ndarray, quality: np.ndarray, resamples: int = BOOTSTRAP, seed: int = 2
) -> Interval:
    """Mean quality of the ``kept`` (n,) bool samples minus the mean of all (n,), with its
    bootstrap interval (e.g. the gain of a policy's accepted samples)."""
    quality = np.asarray(quality, dtype=np.float64)
    if not kept.any():
        return Interval(float("nan"), float("nan"), float("nan"))
    parts = []
    for rows in bootstrap_rows(quality.size, resamples, seed):
        mask, q = kept[rows], quality[rows]
        with np.errstate(invalid="ignore", divide="ignore"):
            parts.append((q * mask).sum(axis=1) / mask.sum(axis=1) - q.mean(axis=1))
    return _interval(float(quality[kept].mean() - quality.mean()), np.concatenate(parts))
