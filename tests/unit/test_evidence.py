"""``workers/evidence.py``: the report's statistics against direct recomputations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from latentsieve.workers.evidence import (
    kept_rows,
    manifold_radii,
    mask_gain,
    mean_interval,
    precision_recall,
    precision_recall_table,
    realism,
    rejection_table,
    spearman,
    spearman_interval,
)


def correlated(n: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    score = rng.standard_normal(n)
    return score, score + noise * rng.standard_normal(n)


def test_spearman_is_scipys_with_ties() -> None:
    score, quality = correlated(500, 1.0)
    quality = np.round(quality)  # many ties: average ranks
    assert spearman(score, quality) == pytest.approx(spearmanr(score, quality).statistic, abs=1e-12)


def test_spearman_interval_covers_and_separates() -> None:
    score, quality = correlated(2000, 1.0)
    interval = spearman_interval(score, quality, resamples=300)
    assert interval.ci_low < interval.value < interval.ci_high
    assert interval.ci_low > 0.5  # rho ~ 0.68 at this noise
    rng = np.random.default_rng(5)
    null = spearman_interval(rng.standard_normal(2000), rng.standard_normal(2000), 300)
    assert null.ci_low < 0 < null.ci_high
    # More samples, a narrower interval.
    small = spearman_interval(score[:200], quality[:200], resamples=300)
    assert small.ci_high - small.ci_low > interval.ci_high - interval.ci_low


def test_kept_rows_and_rejection_table_recomputed() -> None:
    score, quality = correlated(1000, 2.0)
    rows = kept_rows(score, 0.25)
    assert rows.size == 750 and score[rows].min() >= np.sort(score)[250]
    table = rejection_table(score, quality, (0.1, 0.25, 0.5), resamples=300)
    for row in table:
        fraction = row["reject_fraction"]
        assert isinstance(fraction, float)
        keep = 1000 - int(np.floor(fraction * 1000))
        expected = quality[np.argsort(-score)[:keep]].mean()
        assert row["kept"] == keep
        assert row["kept_by_score"] == pytest.approx(expected, abs=1e-12)
        gain = row["gain"]
        assert isinstance(gain, dict)
        assert gain["value"] == pytest.approx(expected - quality.mean(), abs=1e-12)
        assert gain["ci_low"] > 0  # quality follows the score: rejecting low scores pays
        at_random = row["kept_at_random"]
        assert isinstance(at_random, dict)
        assert at_random["ci_low"] < quality.mean() < at_random["ci_high"]
    rng = np.random.default_rng(9)
    unrelated = rejection_table(rng.standard_normal(1000), quality, (0.25,), resamples=300)
    gain = unrelated[0]["gain"]
    assert isinstance(gain, dict) and gain["ci_low"] < 0 < gain["ci_high"]


def brute_radius(points: np.ndarray, k: int) -> np.ndarray:
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    return np.sort(distances, axis=1)[:, k - 1]


def test_precision_recall_and_realism_by_brute_force() -> None:
    rng = np.random.default_rng(1)
    real = rng.standard_normal((60, 3))
    generated = np.vstack([rng.standard_normal((30, 3)), rng.standard_normal((10, 3)) + 6.0])
    np.testing.assert_allclose(manifold_radii(real, 3), brute_radius(real, 3), atol=1e-9)
    real_r, gen_r = brute_radius(real, 3), brute_radius(generated, 3)
    d = np.linalg.norm(generated[:, None] - real[None], axis=-1)
    precision = np.mean((d <= real_r[None, :]).any(axis=1))
    recall = np.mean((d.T <= gen_r[None, :]).any(axis=1))
    assert precision_recall(real, generated) == pytest.approx((precision, recall), abs=1e-12)
    assert precision < 0.8  # the 10 far points are outside the real manifold
    scores = realism(real, generated)
    dense = real_r <= np.median(real_r)
    expected = (real_r[dense][None, :] / d[:, dense]).max(axis=1)
    np.testing.assert_allclose(scores, expected, rtol=1e-9)
    assert scores[30:].max() < 1.0 <= scores[:30].max()


def test_precision_recall_table_kept_beats_random_when_score_marks_outliers() -> None:
    rng = np.random.default_rng(2)
    real = rng.standard_normal((200, 4))
    generated = np.vstack([rng.standard_normal((150, 4)), rng.standard_normal((50, 4)) + 5.0])
    score = np.concatenate([np.ones(150), np.zeros(50)]) + 0.01 * rng.standard_normal(200)
    row = precision_recall_table(score, real, generated, (0.25,), resamples=40)[0]
    precision, random_precision = row["precision"], row["random_precision"]
    assert isinstance(precision, dict) and isinstance(random_precision, dict)
    assert precision["value"] > random_precision["ci_high"]


def test_mask_gain_and_mean_interval() -> None:
    quality = np.arange(100, dtype=float)
    kept = quality >= 50
    gain = mask_gain(kept, quality, resamples=300)
    assert gain.value == pytest.approx(74.5 - 49.5)
    assert gain.ci_low > 0
    assert np.isnan(mask_gain(np.zeros(100, bool), quality).value)
    mean = mean_interval(quality, resamples=300)
    assert mean.value == pytest.approx(49.5) and mean.ci_low < 49.5 < mean.ci_high


def test_a_constant_quality_gives_no_correlation_and_no_gain() -> None:
    score = np.random.default_rng(4).standard_normal(200)
    flat = np.full(200, 0.7)
    interval = spearman_interval(score, flat, resamples=50)
    assert np.isnan(interval.value) and np.isnan(interval.ci_low)  # undefined, not a number
    gain = rejection_table(score, flat, (0.25,), resamples=50)[0]["gain"]
    assert isinstance(gain, dict) and gain["value"] == pytest.approx(0.0, abs=1e-12)


def test_blocked_computations_equal_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    import latentsieve.workers.evidence as evidence

    rng = np.random.default_rng(7)
    real, generated = rng.standard_normal((300, 5)), rng.standard_normal((200, 5))
    score, quality = correlated(300, 1.0)
    whole = (
        evidence.manifold_radii(real), evidence.realism(real, generated),
        evidence.precision_recall(real, generated), spearman_interval(score, quality, 64),
    )
    monkeypatch.setattr(evidence, "BLOCK_CELLS", 1000)  # blocks of 3-5 rows
    blocked = (
        evidence.manifold_radii(real), evidence.realism(real, generated),
        evidence.precision_recall(real, generated), spearman_interval(score, quality, 64),
    )
    np.testing.assert_allclose(whole[0], blocked[0], rtol=1e-12)  # BLAS order only
    np.testing.assert_allclose(whole[1], blocked[1], rtol=1e-12)
    assert whole[2] == blocked[2]
    assert whole[3].value == blocked[3].value  # the resamples differ by block layout, not rho


def test_mostly_undefined_resamples_give_no_interval() -> None:
    quality = np.zeros(200)
    quality[0] = 1.0  # a rare event: most resamples miss it and are constant
    interval = spearman_interval(np.arange(200.0), quality, resamples=200)
    assert np.isfinite(interval.value) and np.isnan(interval.ci_low)
