"""``latentsieve report``: does rejecting low scores keep better samples, for one model?

For the seeds of the model's sampler the report scores ``log_density`` (and the descriptors, when
the model has a generator), gets a per-seed quality (the user's ``--quality FILE.csv``, and for
the bundled demo models the digits classifier's proxies), and measures with bootstrap 95%
intervals (docs/evidence.md explains each experiment and its paper section):

- ``spearman``: rank correlation of every score with every quality, against baselines that do not
  use the index (prior log-likelihood of the draw, a random score) and the 1-NN distance;
- ``rejection``: mean quality kept when the lowest 10/25/50% (and the default policy's share)
  are rejected, against rejecting as many at random;
- ``bandwidth_sweep``: the correlation at other bandwidths, including ``--sigma auto`` rules;
- ``truncation``: mean score and quality of draws scaled by t (the truncation trick's analogue);
- ``precision_recall``: Kynkaanniemi precision/recall of the kept samples (demo models);
- grids of the best and worst samples by score when the generator's output is an image.

It writes ``report.json`` (every number) and ``index.html`` (the plots) into ``--out``.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from latentsieve.index.bandwidth import knn_median_sigma
from latentsieve.index.manifest import DESCRIPTOR_NAMES
from latentsieve.index.store import LatentStore
from latentsieve.report_data import ReportData
from latentsieve.report_page import write_page
from latentsieve.service.offline import SyncScorer
from latentsieve.workers.evidence import (
    REJECT_FRACTIONS,
    mask_gain,
    mean_interval,
    precision_recall_table,
    rejection_table,
    spearman_interval,
)
from latentsieve.workers.policy import decide
from latentsieve.workers.samplers import MAX_SEED, draw_latents

MIN_SEEDS = 20
SIGMA_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0)
AUTO_RULE_NEIGHBOURS = (1, 3, 10)
TRUNCATION_SCALES = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
TRUNCATION_SEEDS = 1000


class ReportError(ValueError):
    """A report that cannot be made from these inputs (reported as one line, exit 2)."""


@dataclass(frozen=True)
class QualityProxy:
    """Quality proxies of a known generator's outputs: ``proxies(images)`` -> {name: (n,)};
    ``features``/``real_features`` feed precision and recall."""

    proxies: Callable[[np.ndarray], dict[str, np.ndarray]]
    features: Callable[[np.ndarray], np.ndarray]
    real_features: np.ndarray
    description: dict[str, str]


def read_quality_csv(path: Path) -> dict[int, float]:
    """``seed,quality`` rows -> {seed: quality}; every problem names its line."""
    try:
        handle = path.open(newline="", encoding="utf-8-sig")  # a BOM from spreadsheets is fine
    except OSError as exc:
        raise ReportError(f"--quality {path}: {exc.strerror or exc}") from exc
    values: dict[int, float] = {}
    with handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [cell.strip() for cell in header] != ["seed", "quality"]:
            raise ReportError(f"--quality {path}: the first line must be the header 'seed,quality'")
        for line, row in enumerate(reader, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 2:
                raise ReportError(
                    f"--quality {path}, line {line}: expected 2 fields, got {len(row)}"
                )
            try:
                seed = int(row[0])
                quality = float(row[1])
            except ValueError as exc:
                raise ReportError(
                    f"--quality {path}, line {line}: seed must be an integer and quality a "
                    f"number, got {row[0]!r}, {row[1]!r}"
                ) from exc
            if not 0 <= seed <= MAX_SEED:
                raise ReportError(
                    f"--quality {path}, line {line}: seed {seed} is outside [0, 2^64)"
                )
            if not math.isfinite(quality):
                raise ReportError(f"--quality {path}, line {line}: quality must be finite")
            if seed in values:
                raise ReportError(f"--quality {path}, line {line}: seed {seed} appears twice")
            values[seed] = quality
    return values


def _images(outputs: np.ndarray) -> np.ndarray | None:
    """Generator outputs (n, ...) -> displayable images (n, H, W[, 3]) in [0, 1], or None."""
    n = outputs.shape[0]
    flat = outputs.reshape(n, -1)
    side = math.isqrt(flat.shape[1])
    if outputs.ndim == 2 and side * side == flat.shape[1]:
        pictures = flat.reshape(n, side, side)
    elif outputs.ndim == 4 and outputs.shape[1] in (1, 3):
        pictures = np.moveaxis(outputs, 1, -1)
        pictures = pictures[..., 0] if pictures.shape[-1] == 1 else pictures
    else:
        return None
    low, high = float(pictures.min()), float(pictures.max())
    if low < 0.0 or high > 1.0:  # e.g. [-1, 1] decoders: show the range the outputs span
        pictures = (pictures - low) / max(high - low, 1e-12)
    return np.asarray(pictures, dtype=np.float64)


def _render(generator: torch.nn.Module, latents: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Generator outputs of source-space latents (n, d), in blocks of 512: (n, ...)."""
    parts = []
    with torch.no_grad():
        for start in range(0, latents.shape[0], 512):
            block = torch.from_numpy(latents[start : start + 512]).reshape(-1, *shape)
            parts.append(generator(block).float().numpy())
    return np.concatenate(parts)


def _nearest_neighbour_score(scorer: SyncScorer, queries: np.ndarray) -> np.ndarray:
    """Minus the L2 distance to the nearest training latent (higher = closer): (n,); exact,
    by the version's own FAISS index for ``flat`` and a flat copy for ``ivf``."""
    import faiss

    index = scorer.loaded.index
    if index is None:  # certified ivf: a flat copy of its stored rows
        index = faiss.IndexFlatL2(scorer.loaded.latents.shape[1])
        index.add(np.ascontiguousarray(scorer.loaded.latents, dtype=np.float32))
    squared, _ = index.search(np.ascontiguousarray(queries, dtype=np.float32), 1)
    return np.asarray(-np.sqrt(np.maximum(squared[:, 0].astype(np.float64), 0.0)))


SECTIONS = frozenset(
    {"descriptors", "curves", "bandwidth_sweep", "truncation", "precision_recall"}
)


def make_report(
    scorer: SyncScorer,
    seeds: Sequence[int],
    given_quality: dict[str, np.ndarray] | None = None,
    proxy: QualityProxy | None = None,
    resamples: int = 1000,
    progress: bool = True,
    sections: frozenset[str] = SECTIONS,
) -> ReportData:
    """Score ``seeds`` with ``scorer``'s model and measure every experiment (module docstring);
    correlations and rejection tables always, the optional ``sections`` when named. Quality
    comes from ``given_quality`` ({name: (n,)} per seed, e.g. the user's file) and from
    ``proxy`` applied to the generator's outputs."""
    manifest = scorer.manifest
    if scorer.seed_latents is None:
        raise ReportError(
            f"model {manifest.model!r} has no sampler, so it has no seeds to report on; "
            "build it with --sampler"
        )
    if len(seeds) < MIN_SEEDS:
        raise ReportError(f"a report needs at least {MIN_SEEDS} seeds, got {len(seeds)}")
    stages = tqdm(total=7, desc="report", unit="stage", disable=not progress, file=sys.stderr)

    def stage(name: str) -> None:
        stages.set_postfix_str(name)
        stages.update(1)

    sigma = manifest.bandwidth.sigma
    draws = draw_latents(scorer.seed_latents.recipe, seeds)
    source = scorer.seed_latents.map(draws)
    index_space = scorer.loaded.to_index_space(source)
    # The descriptors the policy bounds are always computed: the policy needs them.
    wanted = scorer.descriptor_names if "descriptors" in sections else frozenset()
    names = sorted(wanted | manifest.policy.needed_descriptors())
    batch = scorer.score(source, sigma, names)
    log_density = batch.log_density
    stage("scored")

    images = None
    quality: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    generator = scorer.descriptor_engine.generator if scorer.descriptor_engine else None
    outputs = None
    if generator is not None:
        outputs = _render(generator, source, manifest.latent_shape)
        images = _images(outputs)
    for name, values in (given_quality or {}).items():
        quality[name] = values
        sources[name] = "the user's --quality file" if name == "quality" else "given"
    if proxy is not None and outputs is not None:
        flat = outputs.reshape(outputs.shape[0], -1)
        quality.update(proxy.proxies(flat))
        sources.update(proxy.description)
    stage("rendered")

    rng = np.random.default_rng(0)
    scores: dict[str, np.ndarray] = {"log_density": log_density}
    scores.update({name: batch.descriptors[name] for name in names})
    scores["prior_log_likelihood"] = (
        -0.5 * (draws.double().reshape(len(seeds), -1) ** 2).sum(1).numpy()
    )
    scores["nearest_neighbour"] = _nearest_neighbour_score(scorer, index_space)
    scores["random"] = rng.random(len(seeds))
    spearman = {
        q: {s: spearman_interval(v, quality[q], resamples).as_dict() for s, v in scores.items()}
        for q in quality
    }
    reasons = decide(batch.percentile, manifest.policy, batch.descriptor_percentiles)
    accepted = np.array([not why for why in reasons])
    policy_fraction = float(1.0 - accepted.mean())
    rejection = {
        q: rejection_table(log_density, quality[q], REJECT_FRACTIONS, resamples) for q in quality
    }
    by_score = {
        name: {
            q: rejection_table(values, quality[q], REJECT_FRACTIONS, max(100, resamples // 5))
            for q in quality
        }
        for name, values in _oriented(scores).items()
    }
    curve = (
        {}
        if "curves" not in sections
        else {
            q: rejection_table(
                log_density,
                quality[q],
                tuple(np.round(np.arange(0, 0.95, 0.1), 2)),
                max(100, resamples // 5),
            )
            for q in quality
        }
    )
    stage("correlations")

    sweep = (
        _bandwidth_sweep(scorer, source, quality, sigma, resamples)
        if "bandwidth_sweep" in sections
        else []
    )
    stage("bandwidths")
    truncation = (
        _truncation(scorer, draws, generator, proxy, resamples) if "truncation" in sections else []
    )
    stage("truncation")
    precision_recall = None
    if proxy is not None and outputs is not None and "precision_recall" in sections:
        generated = proxy.features(outputs.reshape(outputs.shape[0], -1))
        precision_recall = precision_recall_table(
            log_density, proxy.real_features, generated, REJECT_FRACTIONS, max(50, resamples // 5)
        )
    stage("precision and recall")

    numbers: dict[str, Any] = {
        "model": manifest.model,
        "index_version": manifest.version,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seeds": {"count": len(seeds), "first": int(seeds[0]), "last": int(seeds[-1])},
        "sigma": sigma,
        "bandwidth": manifest.bandwidth.model_dump(),
        "space": manifest.projection.model_dump() if manifest.projection else {"method": "raw"},
        "latent_set": manifest.latent_set,
        "mapping": manifest.mapping.spec if manifest.mapping else None,
        "bootstrap_resamples": resamples,
        "quality_sources": sources,
        "log_density": _quantiles(log_density),
        "calibration": manifest.calibration.quantiles,
        "policy": {
            "rules": manifest.policy.model_dump(exclude_none=True),
            "min_percentile": manifest.policy.min_percentile,
            "rejected_share": policy_fraction,
            "gain": {q: mask_gain(accepted, quality[q], resamples).as_dict() for q in quality},
        },
        "spearman": spearman,
        "rejection": rejection,
        "rejection_by_score": by_score,
        "keep_curve": curve,
        "bandwidth_sweep": sweep,
        "truncation": truncation,
        "precision_recall": precision_recall,
    }
    stage("done")
    stages.close()
    return ReportData(
        numbers,
        log_density,
        scorer.calibration(sigma),
        quality,
        images,
        [int(seed) for seed in seeds],
    )


def _oriented(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scores other than log_density and random, each both ways round for the descriptors
    (``psi_high_rejected`` is -psi: rejecting its lowest rejects the highest psi)."""
    oriented: dict[str, np.ndarray] = {}
    for name, values in scores.items():
        if name in ("log_density", "random"):
            continue
        if name in DESCRIPTOR_NAMES:
            oriented[f"{name}_low_rejected"] = values
            oriented[f"{name}_high_rejected"] = -values
        else:
            oriented[name] = values
    return oriented


def _quantiles(values: np.ndarray) -> dict[str, float]:
    levels = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
    return {
        f"q{level:g}": float(v)
        for level, v in zip(levels, np.quantile(values, levels), strict=True)
    }


def _bandwidth_sweep(
    scorer: SyncScorer,
    source: np.ndarray,
    quality: dict[str, np.ndarray],
    sigma: float,
    resamples: int,
) -> list[dict[str, object]]:
    """Spearman of log_density of ``source`` (latents as sent) with each quality at multiples
    of the index's sigma and at the ``--sigma auto`` rules (median distance to the k-th nearest
    training latent)."""
    candidates: list[tuple[float, str]] = [
        (sigma * m, f"{m:g} x index sigma") for m in SIGMA_MULTIPLES
    ]
    for k in AUTO_RULE_NEIGHBOURS:
        rule = knn_median_sigma(np.ascontiguousarray(scorer.loaded.latents), k)
        candidates.append((rule.sigma, f"auto, k = {k}"))
    rows: list[dict[str, object]] = []
    for value, label in sorted(candidates):
        density = scorer.score(source, value).log_density
        rows.append(
            {
                "sigma": value,
                "rule": label,
                "spearman": {
                    q: spearman_interval(density, quality[q], resamples).as_dict() for q in quality
                },
            }
        )
    return rows


def _truncation(
    scorer: SyncScorer,
    draws: torch.Tensor,
    generator: torch.nn.Module | None,
    proxy: QualityProxy | None,
    resamples: int,
) -> list[dict[str, object]]:
    """Draws scaled by t (the truncation trick's analogue): mean log_density and, when the
    generator's outputs have proxies, mean quality, each with its bootstrap interval."""
    assert scorer.seed_latents is not None
    base = draws[:TRUNCATION_SEEDS].float()
    rows: list[dict[str, object]] = []
    for scale in TRUNCATION_SCALES:
        source = scorer.seed_latents.map(base * scale)
        density = scorer.score(source, scorer.manifest.bandwidth.sigma).log_density
        row: dict[str, object] = {
            "scale": scale,
            "log_density": mean_interval(density, resamples).as_dict(),
        }
        if generator is not None and proxy is not None:
            outputs = _render(generator, source, scorer.manifest.latent_shape)
            row["quality"] = {
                name: mean_interval(values, resamples).as_dict()
                for name, values in proxy.proxies(outputs.reshape(outputs.shape[0], -1)).items()
            }
        rows.append(row)
    return rows


def demo_quality_proxy(generator_spec: str | None) -> QualityProxy | None:
    """The digits classifier's proxies when the generator is a bundled digits generator."""
    from latentsieve.demo import DIGITS_GENERATORS

    if generator_spec not in DIGITS_GENERATORS:
        return None
    from latentsieve.workers.demo_models.digits_quality import digits_quality

    judge = digits_quality()
    return QualityProxy(
        judge.proxies,
        judge.features,
        judge.real_features,
        {
            "confidence": "top-class probability of an MLP classifier trained on the real digits",
            "realism": "realism score (Kynkaanniemi et al., 2019) in that classifier's features",
        },
    )


def run_report(
    store_root: Path,
    model: str,
    out: Path,
    seeds: Sequence[int] | None = None,
    quality_file: Path | None = None,
    resamples: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """``latentsieve report``: build the report of ``model`` and write it into ``out``."""
    store = LatentStore(store_root)
    if model not in store.models():
        raise ReportError(f"unknown model {model!r} in {store_root}; see 'index list'")
    user_quality = None
    if quality_file is not None:
        table = read_quality_csv(quality_file)
        if seeds is not None and set(seeds) != set(table):
            raise ReportError(
                f"--quality {quality_file} has {len(table)} seeds that are not exactly --seeds "
                f"({len(seeds)} seeds); give one or make them agree"
            )
        seeds = sorted(table)
        user_quality = np.array([table[seed] for seed in seeds])
    seeds = range(0, 2000) if seeds is None else seeds
    with SyncScorer(store.load(model)) as scorer:
        generator = scorer.manifest.generator
        proxy = demo_quality_proxy(generator.spec if generator else None)
        given = {"quality": user_quality} if user_quality is not None else None
        data = make_report(scorer, seeds, given, proxy, resamples, progress)
    write_page(data, out)
    return data.numbers
