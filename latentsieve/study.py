"""``latentsieve study``: what each best-of-G strategy buys on the user's own pipeline.

N groups of G candidate seeds are rendered with the user's diffusers pipeline (group g: seeds
``A + g*G .. A + g*G + G-1``, prompt ``g mod P``). Each strategy of
:mod:`latentsieve.integrations.diffusers` ranks a group by ``log_density`` where it scores and
keeps the best M; the trivial baselines rank the same candidates without the index's density
(``prior_norm``: keep the smallest ``||z||``; ``mean_projection``: keep the largest
``<z, mu> / ||mu||`` with ``mu`` the mean training latent; ``nearest_neighbour``: keep the
smallest distance to a training latent), on the final latents at the cost of ``final`` and on the
starting noise at the cost of ``noise``. The orientations are fixed here, before any data.

How it runs: every candidate is rendered once, to the end, through the integration's own loop,
with its x0-prediction recorded after each K of a ``prefix:K`` and a separate S-step run for
each ``preview:S``; each strategy's scored latents are sent to the scorer as best_of_g sends
them (one call of the G candidates of a group) and ranked by best_of_g's own ranking. Every
candidate is computed alone (one UNet call per candidate, as best_of_g's default ``batch_size=1``
does), so its latents, and therefore every strategy's kept seeds, are exactly what
``best_of_g(pipe, prompt, scorer, strategy, seeds=..., keep=M)`` keeps
(tests/integration/test_study.py calls best_of_g and compares). The cost of a strategy is its
formula, not what this study spent: per group ``noise`` M*T, ``prefix:K`` G*K + M*(T-K),
``preview:S`` G*S + M*T, ``final`` G*T.

Every candidate's final image is judged once (``--quality``); what a row *delivers* is the
quality of its kept M. Statistics (pure functions below), over groups as the unit:

    delivered[r, n] = mean quality of the M candidates row r keeps in group n
    random[n]       = mean quality of group n's G candidates   (= E[M picked at random])
    gain_vs_random  = mean_n (delivered[r, n] - random[n])

95% percentile intervals from a paired bootstrap (every row resampled with the same group
indices), a one-sided p-value for gain > 0 from the same resamples (``(1 + #{gain* <= 0}) /
(1 + B)``), and Holm's step-down adjustment over every row that is tested.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch

from latentsieve.index.module_refs import IMPORT_SPEC

# The integration's own loop, checks, scoring call and ranking, so that the study computes
# what best_of_g computes (tests/integration/test_study.py holds it to that).
from latentsieve.integrations.diffusers import (
    DenoisingLoop,
    ScoringError,
    ServiceScorer,
    Strategy,
    check_request,
    check_shrinkable,
    parse_strategy,
    pipeline_latent_shape,
    ranked,
    scheduler_gives_x0,
    score_group,
)
from latentsieve.workers.evidence import CONFIDENCE, bootstrap_rows

DEMO_PIPELINE = "digits-ldm"
DEMO_MODEL = "digits-ldm"
DEMO_QUALITY = "latentsieve.workers.demo_models.digits_quality:mlp_confidence"
DEMO_GUIDANCE = 1.0
GUIDANCE = 7.5  # best_of_g's and Stable Diffusion's default
DEFAULT_STRATEGIES = "noise,prefix:10,preview:10,final"
# The report range of docs/evidence.md's pre-registration: the demo's defaults were chosen on
# seeds 0-9999 (benchmarks/preregistered.py), so a study reports on seeds nothing chose.
SEED_START = 100_000
MIN_RESAMPLES, MAX_RESAMPLES = 10, 100_000
THUMBNAIL_SIDE = 64  # the page shows the first group's candidates at most this many pixels wide
NEIGHBOUR_BLOCK = 4096  # training latents per block of the 1-NN distances

Keeps = Literal["highest", "lowest"]


class StudyError(ValueError):
    """A study that cannot be run from these inputs (one line on stderr, exit 2)."""


# --- rows: the strategies and the baselines -----------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the frontier: a strategy (ranked by ``log_density``) or a baseline (ranked by
    a measure that does not use the density). ``column`` names its candidates.csv column;
    ``per_group`` is its denoiser evaluations per group of G (its cost formula)."""

    name: str
    baseline: bool
    scored_on: str
    rule: str
    column: str | None
    keeps: Keeps | None
    per_group: int


@dataclass(frozen=True)
class Measure:
    """A trivial baseline's measure of a latent, and which end of it is kept (fixed a priori)."""

    name: str
    keeps: Keeps
    rule: str


MEASURES = (
    Measure("prior_norm", "lowest", "keep the smallest norm ||z||"),
    Measure("mean_projection", "highest",
            "keep the largest projection <z, mu>/||mu|| on the mean training latent mu"),
    Measure("nearest_neighbour", "lowest", "keep the smallest distance to a training latent"),
)
NEEDS_TRAINING = frozenset({"mean_projection", "nearest_neighbour"})
POINTS = {"noise": "the starting noise (the unscaled draw)", "final": "the final latent"}


def strategy_row(strategy: Strategy, candidates: int, keep: int, steps: int) -> Row:
    """The frontier row of a :class:`~latentsieve.integrations.diffusers.Strategy`."""
    kind, k = strategy.kind, strategy.steps
    scored_on = {
        "noise": POINTS["noise"],
        "prefix": f"the x0-prediction after step {k} of {steps}",
        "preview": f"the final latent of a separate {k}-step run",
        "final": POINTS["final"],
    }[kind]
    name = str(strategy)
    return Row(name, False, scored_on, "keep the highest log_density", name, "highest",
               strategy.evaluations(candidates, keep, steps))


def baseline_rows(candidates: int, keep: int, steps: int, training: bool) -> list[Row]:
    """The baselines: random at M*T, then each measure on the noise (M*T) and on the final
    latents (G*T); those that need training latents only when ``training``."""
    rows = [Row("random", True, "nothing (M of the G kept at random)",
                "expected quality of M picked at random: the group's mean", None, None,
                keep * steps)]
    for point, cost in (("noise", keep * steps), ("final", candidates * steps)):
        for measure in MEASURES:
            if measure.name in NEEDS_TRAINING and not training:
                continue
            name = f"{measure.name}@{point}"
            rows.append(Row(name, True, POINTS[point], measure.rule, name, measure.keeps, cost))
    return rows


# --- the statistics: pure functions over arrays -------------------------------------------------


def kept_positions(values: np.ndarray, keep: int, keeps: Keeps) -> np.ndarray:
    """Positions (N, M) of the ``keep`` candidates each group keeps, best first, from
    ``values`` (N, G): best_of_g's ranking (its ``ranked``: the highest, ties to the earlier
    candidate, NaN last), on ``-values`` when the lowest are kept."""
    oriented = values if keeps == "highest" else -values
    return np.array([ranked(row, None, keep) for row in oriented], dtype=np.int64).reshape(
        values.shape[0], keep
    )


def delivered_quality(quality: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Mean quality of the kept candidates per group: (N, G), (N, M) -> (N,)."""
    return np.asarray(np.take_along_axis(quality, kept, axis=1).mean(axis=1))


def resampled_means(per_group: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Means of (S, N) per-group values over each bootstrap row of group indices (B, N):
    (S, B). Every series is resampled with the same rows (a paired bootstrap)."""
    return np.stack([series[rows].mean(axis=1) for series in per_group])


def group_resamples(groups: int, resamples: int, seed: int) -> np.ndarray:
    """(B, N) group indices drawn with replacement (workers/evidence.py's generator)."""
    return np.concatenate(list(bootstrap_rows(groups, resamples, seed)))


def interval(value: float, resampled: np.ndarray) -> dict[str, float]:
    """``value`` with the percentile interval of its resamples (B,) at ``CONFIDENCE``."""
    tail = (1.0 - CONFIDENCE) / 2.0
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return {"value": float(value), "ci_low": float(low), "ci_high": float(high)}


def one_sided_p(resampled_gain: np.ndarray) -> float:
    """Bootstrap p-value of "gain > 0": ``(1 + #{gain* <= 0}) / (1 + B)`` over the resampled
    gains (B,), never 0."""
    return float((1 + np.count_nonzero(resampled_gain <= 0)) / (1 + resampled_gain.size))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of m p-values: the i-th smallest becomes
    ``max_{j <= i} min(1, (m - j + 1) p_(j))``, returned in the input order."""
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, index in enumerate(np.argsort(p, kind="stable")):
        running = max(running, min(1.0, (p.size - rank) * float(p[index])))
        adjusted[index] = running
    return [float(value) for value in adjusted]


def label_entropy(labels: Sequence[str]) -> float:
    """Shannon entropy (nats) of the labels' empirical distribution."""
    _, counts = np.unique(np.asarray(labels, dtype=str), return_counts=True)
    share = counts / counts.sum()
    return float(-(share * np.log(share)).sum())


def mean_pairwise_distance(latents: np.ndarray) -> float:
    """Mean L2 distance over the pairs of the rows of ``latents`` (k, d), k >= 2."""
    flat = np.asarray(latents, dtype=np.float64).reshape(latents.shape[0], -1)
    rows, cols = np.triu_indices(flat.shape[0], k=1)
    return float(np.linalg.norm(flat[rows] - flat[cols], axis=1).mean())


def pareto_front(costs: Sequence[float], qualities: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats (cost <= and quality >=, one strict),
    cheapest first."""
    points = list(zip(costs, qualities, strict=True))
    front = [
        i for i, (cost, quality) in enumerate(points)
        if not any(c <= cost and q >= quality and (c, q) != (cost, quality) for c, q in points)
    ]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


# --- the baselines' measures ---------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingLatents:
    """The latents the baselines compare with, in the space ``to_space`` maps a flattened
    pipeline latent (n, d) into: (N, d') float32, their mean and squared norms (float64)."""

    latents: np.ndarray
    to_space: Callable[[np.ndarray], np.ndarray]
    source: str
    mean: np.ndarray = field(init=False)
    squared_norms: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        total = np.zeros(self.latents.shape[1])
        norms = np.empty(self.latents.shape[0])
        for start in range(0, self.latents.shape[0], NEIGHBOUR_BLOCK):  # no float64 copy
            block = np.asarray(self.latents[start:start + NEIGHBOUR_BLOCK], dtype=np.float64)
            total += block.sum(axis=0)
            norms[start:start + len(block)] = (block * block).sum(axis=1)
        object.__setattr__(self, "mean", total / self.latents.shape[0])
        object.__setattr__(self, "squared_norms", norms)

    def mean_projection(self, flat: np.ndarray) -> np.ndarray:
        """``<z, mu> / ||mu||`` of latents (n, d) in the training space: (n,)."""
        mapped = np.asarray(self.to_space(flat), dtype=np.float64)
        return np.asarray(mapped @ self.mean / max(float(np.linalg.norm(self.mean)), 1e-300))

    def nearest_distance(self, flat: np.ndarray) -> np.ndarray:
        """L2 distance of latents (n, d) to the nearest training latent: (n,), float64, in
        blocks of ``NEIGHBOUR_BLOCK`` training rows."""
        mapped = np.asarray(self.to_space(flat), dtype=np.float64)
        best = np.full(mapped.shape[0], np.inf)
        query_norms = (mapped * mapped).sum(axis=1)
        for start in range(0, self.latents.shape[0], NEIGHBOUR_BLOCK):
            block = np.asarray(self.latents[start:start + NEIGHBOUR_BLOCK], dtype=np.float64)
            squared = (query_norms[:, None] + self.squared_norms[None, start:start + len(block)]
                       - 2.0 * mapped @ block.T)
            best = np.minimum(best, squared.min(axis=1))
        return np.asarray(np.sqrt(np.maximum(best, 0.0)))


def measures(flat: np.ndarray, training: TrainingLatents | None) -> dict[str, np.ndarray]:
    """Every baseline measure of latents (n, d): {measure name: (n,)}."""
    values = {"prior_norm": np.linalg.norm(np.asarray(flat, dtype=np.float64), axis=1)}
    if training is not None:
        values["mean_projection"] = training.mean_projection(flat)
        values["nearest_neighbour"] = training.nearest_distance(flat)
    return values


# --- quality ------------------------------------------------------------------------------------


class Quality:
    """Judges a group's final images: ``(images (G, H, W, C) float32 in [0, 1], prompts,
    seeds) -> (quality (G,), labels or None)``."""

    description: str
    has_labels: bool

    def __call__(
        self, images: np.ndarray, prompts: list[str], seeds: list[int]
    ) -> tuple[np.ndarray, list[str] | None]:
        raise NotImplementedError


class FunctionQuality(Quality):
    """``fn(images, prompts)`` -> (n,) scores, or (scores, labels)."""

    def __init__(self, spec: str, function: Callable[..., Any], description: str) -> None:
        self.spec = spec
        self.function = function
        self.description = description
        self.has_labels = False

    def __call__(
        self, images: np.ndarray, prompts: list[str], seeds: list[int]
    ) -> tuple[np.ndarray, list[str] | None]:
        try:
            answer = self.function(images, prompts)
        except Exception as exc:  # the user's judge may raise anything: one line out
            raise StudyError(f"--quality {self.spec} raised {type(exc).__name__}: {exc}") from exc
        scores, labels = checked_quality(answer, len(images), f"--quality {self.spec}")
        self.has_labels = labels is not None
        return scores, labels


def checked_quality(answer: Any, count: int, where: str) -> tuple[np.ndarray, list[str] | None]:
    """A quality function's answer for ``count`` images -> (quality (count,) float64, labels
    or None); anything else is one :class:`StudyError` saying what was wrong."""
    labels: list[str] | None = None
    if isinstance(answer, tuple) and len(answer) == 2 and np.ndim(answer[0]) == 1:
        answer, raw_labels = answer
        flat = np.asarray(raw_labels, dtype=object).reshape(-1)
        if flat.size != count:
            raise StudyError(f"{where} returned {flat.size} labels for {count} images; it must "
                             f"return (n,) scores or (scores (n,), labels (n,))")
        labels = [str(label) for label in flat]
    try:
        scores = np.asarray(answer, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise StudyError(f"{where} returned {type(answer).__name__}, not numbers: {exc}") from exc
    if scores.shape != (count,):
        raise StudyError(f"{where} returned {scores.size} scores (shape {scores.shape}) for "
                         f"{count} images; it must return (n,) scores or (scores, labels)")
    if not np.isfinite(scores).all():
        raise StudyError(f"{where} returned a score that is not finite (NaN or infinite)")
    return scores, labels


class TableQuality(Quality):
    """Quality per seed from the user's ``seed,quality`` CSV (no labels)."""

    def __init__(self, table: dict[int, float], path: Path) -> None:
        self.table = table
        self.description = f"the user's per-seed quality file {path.name}"
        self.has_labels = False

    def __call__(
        self, images: np.ndarray, prompts: list[str], seeds: list[int]
    ) -> tuple[np.ndarray, list[str] | None]:
        return np.array([self.table[seed] for seed in seeds], dtype=np.float64), None


def import_callable(spec: str, option: str) -> Callable[..., Any]:
    """``package.module:name`` -> the callable; one :class:`StudyError` for every failure."""
    if not IMPORT_SPEC.fullmatch(spec):
        raise StudyError(f"{option} {spec!r}: expected an import path package.module:name")
    module_name, name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StudyError(f"{option} {spec!r}: cannot import module {module_name!r} "
                         f"({type(exc).__name__}: {exc})") from exc
    found = getattr(module, name, None)
    if not callable(found):
        raise StudyError(f"{option} {spec!r}: module {module_name!r} has no callable {name!r}")
    return cast(Callable[..., Any], found)


def load_quality(spec: str | None, demo: bool, seeds: Sequence[int]) -> Quality:
    """``--quality``: a ``seed,quality`` CSV covering every candidate seed, an import path
    ``package.module:fn``, or (None) the demo's classifier for the demo pipeline."""
    if spec is None:
        if not demo:
            raise StudyError("--quality is required with --pipeline package.module:factory "
                             "(a CSV 'seed,quality' or package.module:fn judging the images)")
        from latentsieve.workers.demo_models.digits_quality import mlp_confidence

        return FunctionQuality(DEMO_QUALITY, mlp_confidence, "top-class probability of the "
                               "half-B digits classifier (label: its class)")
    if spec.lower().endswith(".csv") or Path(spec).is_file():
        from latentsieve.report import read_quality_csv

        table = read_quality_csv(Path(spec))
        missing = [seed for seed in seeds if seed not in table]
        if missing:
            raise StudyError(f"--quality {spec}: {len(missing)} of the {len(seeds)} candidate "
                             f"seeds have no row (first: {missing[0]}); it needs every seed "
                             f"{seeds[0]}-{seeds[-1]}")
        return TableQuality(table, Path(spec))
    return FunctionQuality(spec, import_callable(spec, "--quality"), f"{spec}(images, prompts)")


# --- the pipeline and the scorer ----------------------------------------------------------------


def check_pipeline_spec(spec: str) -> None:
    """Refuse a ``--pipeline`` that is neither the demo's name nor an import path."""
    if spec != DEMO_PIPELINE and not IMPORT_SPEC.fullmatch(spec):
        raise StudyError(f"--pipeline {spec!r}: unknown pipeline; use {DEMO_PIPELINE} or an "
                         f"import path package.module:factory returning a diffusers pipeline")


def load_pipeline_spec(spec: str) -> Any:
    """``--pipeline``: ``digits-ldm`` (the bundled model as a diffusers pipeline) or
    ``package.module:factory``, called with no arguments, returning the pipeline."""
    check_pipeline_spec(spec)
    if spec == DEMO_PIPELINE:
        from latentsieve.workers.demo_models.digits_ldm_pipeline import load_pipeline

        return load_pipeline()
    factory = import_callable(spec, "--pipeline")
    try:
        return factory()
    except Exception as exc:  # the user's factory may raise anything: one line out
        raise StudyError(f"--pipeline {spec}: the factory raised {type(exc).__name__}: "
                         f"{exc}") from exc


class StoreScorer:
    """A ``LatentScorer`` over a store's model, in process (``SyncScorer``: the service's
    engine behind synchronous calls, as reports use it): ``latents (n, ...)`` ->
    ``log_density (n,)``, flattened as ``POST /score`` flattens them."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer
        self.dimension: int | None = math.prod(scorer.manifest.latent_shape)

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        flat = np.asarray(latents, dtype=np.float32).reshape(len(latents), -1)
        return np.asarray(self.scorer.score(flat).log_density)


def stored_training_latents(scorer: Any) -> TrainingLatents:
    """A store version's training latents in its index space (the space log_density uses)."""
    loaded = scorer.loaded
    rows = np.concatenate([np.asarray(shard.latents, dtype=np.float32)
                           for shard in loaded.shards])
    return TrainingLatents(rows, loaded.to_index_space,
                           f"the index's {len(rows)} training latents, in its space")


def file_training_latents(path: Path, dimension: int) -> TrainingLatents:
    """``--training-latents FILE`` (the latents the index was built from), flattened."""
    from latentsieve.index.latent_files import load_latents

    rows = load_latents(path, min_count=1)
    rows = rows.reshape(rows.shape[0], -1)
    if rows.shape[1] != dimension:
        raise StudyError(f"--training-latents {path}: latents of {rows.shape[1]} values, the "
                         f"pipeline's have {dimension}")
    return TrainingLatents(rows, lambda flat: flat, f"{len(rows)} latents of {path.name}")


# --- the study ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyOptions:
    """Everything ``latentsieve study`` takes (cli.py documents each)."""

    pipeline: str
    out: Path
    store: Path | None = None
    url: str | None = None
    api_key: str | None = None
    model: str | None = None
    prompts_file: Path | None = None
    groups: int = 50
    group_size: int = 16
    keep: int = 4
    seeds: range | None = None
    strategies: str = DEFAULT_STRATEGIES
    steps: int = 25
    guidance_scale: float | None = None
    quality: str | None = None
    training_latents: Path | None = None
    resamples: int = 1000
    bootstrap_seed: int = 0
    device: str = "auto"
    progress: bool = True


@dataclass(frozen=True)
class Plan:
    """The validated inputs: prompts, the N x G candidate seeds, M, the strategies, T."""

    prompts: list[str]
    groups: int
    group_size: int
    keep: int
    seeds: range
    strategies: list[Strategy]  # in the order asked
    steps: int
    guidance_scale: float

    def group_seeds(self, group: int) -> list[int]:
        start = group * self.group_size
        return list(self.seeds[start:start + self.group_size])

    def prompt_index(self, group: int) -> int:
        return group % len(self.prompts)


def _whole(value: int, option: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise StudyError(f"{option} must be a whole number >= {low}, got {value!r}")
    return value


def read_prompts(path: Path | None) -> list[str]:
    """One prompt per line (blank lines skipped); no file: one empty prompt."""
    if path is None:
        return [""]
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise StudyError(f"--prompts {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise StudyError(f"--prompts {path}: no prompt in it (one per line)")
    return prompts


def make_plan(options: StudyOptions, demo: bool) -> Plan:
    """Check the sizes, seeds, strategies and prompts (nothing loaded yet)."""
    groups = _whole(options.groups, "--groups", 1)
    size = _whole(options.group_size, "--group-size", 1)
    keep = _whole(options.keep, "--keep", 1)
    steps = _whole(options.steps, "--steps", 1)
    if keep > size:
        raise StudyError(f"--keep (M = {keep}) must not exceed --group-size (G = {size})")
    if not MIN_RESAMPLES <= options.resamples <= MAX_RESAMPLES:
        raise StudyError(f"--bootstrap must be between {MIN_RESAMPLES} and {MAX_RESAMPLES}, "
                         f"got {options.resamples}")
    needed = groups * size
    seeds = options.seeds if options.seeds is not None else range(SEED_START,
                                                                 SEED_START + needed)
    if len(seeds) < needed:
        raise StudyError(f"--seeds {seeds[0]}-{seeds[-1]} holds {len(seeds)} seeds; --groups "
                         f"{groups} x --group-size {size} needs {needed}")
    strategies: list[Strategy] = []
    for text in options.strategies.split(","):
        try:
            strategy = parse_strategy(text)
            strategy.check_steps(steps)
        except ValueError as exc:
            raise StudyError(f"--strategies: {exc}") from None
        if str(strategy) in map(str, strategies):
            raise StudyError(f"--strategies: {strategy} appears twice")
        strategies.append(strategy)
    prompts = read_prompts(options.prompts_file)
    if len(prompts) > groups:
        raise StudyError(f"--prompts has {len(prompts)} prompts and --groups is {groups}: "
                         f"group g renders prompt g mod {len(prompts)}, so some would never "
                         f"be rendered; give at least as many groups as prompts")
    guidance = options.guidance_scale
    if guidance is None:
        guidance = DEMO_GUIDANCE if demo else GUIDANCE
    if not math.isfinite(guidance):
        raise StudyError(f"--guidance-scale must be a finite number, got {guidance}")
    return Plan(prompts, groups, size, keep, seeds[:needed], strategies, steps, float(guidance))


@dataclass
class GroupRecord:
    """One group's candidates: each row's column of values (G,), final latents (G, d) and
    quality (G,), labels when the quality gives them."""

    seeds: list[int]
    prompt_index: int
    columns: dict[str, np.ndarray]
    final: np.ndarray
    quality: np.ndarray
    labels: list[str] | None


@dataclass
class Rendered:
    """What rendering one group gave: every strategy's log densities (G,), the starting noise
    and the final latents flattened (G, d) float64, the decoded images (G, H, W, C), and the
    denoiser evaluations this rendering took."""

    scores: dict[str, np.ndarray]
    noise: np.ndarray
    final: np.ndarray
    images: np.ndarray
    evaluations: int


class Renderer:
    """The integration's own loop over one pipeline, checked once as best_of_g checks it."""

    def __init__(self, pipe: Any, plan: Plan, scorer: Any) -> None:
        self.pipe, self.plan, self.scorer = pipe, plan, scorer
        first = plan.group_seeds(0)
        for strategy in plan.strategies:
            check_request(strategy, first, plan.keep, plan.steps, 1, "np")
        self.latent_shape = pipeline_latent_shape(pipe, None, None)
        self.x0_from_step = True
        prefixes = [s for s in plan.strategies if s.kind == "prefix"]
        if prefixes:
            self.x0_from_step = scheduler_gives_x0(pipe.scheduler, plan.steps, self.latent_shape)
            check_shrinkable(pipe.scheduler, prefixes[0])
        dimension = getattr(scorer, "dimension", None)
        if dimension is not None and dimension != math.prod(self.latent_shape):
            raise StudyError(
                f"the scorer's index takes latents of {dimension} values, the pipeline makes "
                f"{'x'.join(map(str, self.latent_shape))} = {math.prod(self.latent_shape)}: "
                f"build the index from this pipeline's latents"
            )

    def render(self, prompt: str, seeds: list[int]) -> Rendered:
        """Every candidate once, to the end, scored at every strategy's point (module
        docstring): previews first, each its own S-step run as best_of_g's preview; then the
        T-step run, cut after each K of a prefix for its x0-prediction."""
        plan, pipe = self.plan, self.pipe
        scheduler, device = pipe.scheduler, pipe.device
        scores: dict[str, np.ndarray] = {}

        def score(name: str, latents: torch.Tensor) -> None:
            scores[name] = score_group(self.scorer, latents, False)[0]

        with torch.no_grad():
            guided = plan.guidance_scale > 1.0
            embeds, negative = pipe.encode_prompt(prompt, device, 1, guided, None)
            loop = DenoisingLoop(pipe, plan.guidance_scale, 0.0, 1, self.latent_shape, embeds,
                         negative if guided else None, self.x0_from_step)
            for strategy in plan.strategies:
                if strategy.kind == "preview":
                    scheduler.set_timesteps(strategy.steps, device=device)
                    preview, _ = loop.start(seeds)
                    loop.denoise(preview, scheduler.timesteps)
                    score(str(strategy), preview.latents)
            scheduler.set_timesteps(plan.steps, device=device)
            group, draws = loop.start(seeds)
            done = 0
            cuts = sorted((cast(int, s.steps), s) for s in plan.strategies if s.kind == "prefix")
            for cut, strategy in cuts:  # one T-step run, cut after each K for its x0
                x0 = loop.denoise(group, scheduler.timesteps[done:cut], want_x0=True)
                score(str(strategy), cast(torch.Tensor, x0))
                done = cut
            loop.denoise(group, scheduler.timesteps[done:])
            for strategy in plan.strategies:
                if strategy.kind in ("noise", "final"):
                    score(str(strategy), draws if strategy.kind == "noise" else group.latents)
            images, _ = loop.decode(group, "np")

        def flat(latents: torch.Tensor) -> np.ndarray:
            return latents.detach().to("cpu", torch.float64).numpy().reshape(len(seeds), -1)

        return Rendered(scores, flat(draws), flat(group.latents),
                        np.asarray(images, dtype=np.float32), loop.evaluations)


@dataclass
class StudyResult:
    """The numbers (``study.json``), the raw table (``candidates.csv``) and the first group's
    thumbnails for the page."""

    numbers: dict[str, Any]
    table: list[dict[str, Any]]
    thumbnails: np.ndarray | None


def thumbnail(images: np.ndarray) -> np.ndarray:
    """(n, H, W, C) images in [0, 1] -> at most ``THUMBNAIL_SIDE`` pixels wide, grey as
    (n, h, w), colour as (n, h, w, 3) (every k-th pixel)."""
    step = max(1, -(-max(images.shape[1:3]) // THUMBNAIL_SIDE))
    small = np.clip(images[:, ::step, ::step], 0.0, 1.0)
    return small[..., 0] if small.shape[-1] == 1 else small[..., :3]


@contextlib.contextmanager
def opened_scorer(
    options: StudyOptions, model: str
) -> Iterator[tuple[Any, str, TrainingLatents | None]]:
    """The scorer (in process over ``--store``, or ``ServiceScorer`` over ``--url``), its
    index version, and the store's training latents (None for a service)."""
    if options.store is not None:
        from latentsieve.index.store import LatentStore
        from latentsieve.service.offline import SyncScorer

        store = LatentStore(options.store)
        if model not in store.models():
            hint = " (latentsieve demo --store DIR builds it)" if model == DEMO_MODEL else ""
            raise StudyError(f"unknown model {model!r} in {options.store}{hint}; see "
                             f"'index list'")
        with SyncScorer(store.load(model), options.device) as scorer:
            yield StoreScorer(scorer), scorer.manifest.version, stored_training_latents(scorer)
        return
    from latentsieve.service.client import LatentSieveClient

    assert options.url is not None
    with LatentSieveClient(options.url, options.api_key) as client:
        try:
            service = ServiceScorer(client, model)
        except ScoringError as exc:
            raise StudyError(str(exc)) from exc
        yield service, service.info.index_version, None


def run_study(options: StudyOptions) -> StudyResult:
    """``latentsieve study``: render, score, judge and measure (module docstring); writes
    nothing (:func:`write_study` does)."""
    from latentsieve.redaction import redact

    started = time.perf_counter()
    # The page's charts need the report extra: fail before the work, not after it.
    import latentsieve.study_page  # noqa: F401
    demo = options.pipeline == DEMO_PIPELINE
    if (options.store is None) == (options.url is None):
        raise StudyError("give one of --store (score in process) or --url (a running service); "
                         "check LATENTSIEVE_STORE and LATENTSIEVE_URL")
    check_pipeline_spec(options.pipeline)
    model = options.model or (DEMO_MODEL if demo else None)
    if model is None:
        raise StudyError("--model is required with --pipeline package.module:factory (the "
                         "index built from that pipeline's latents)")
    plan = make_plan(options, demo)
    quality = load_quality(options.quality, demo, plan.seeds)
    pipe = load_pipeline_spec(options.pipeline)
    with opened_scorer(options, model) as (scorer, version, stored):
        renderer = Renderer(pipe, plan, scorer)
        dimension = math.prod(renderer.latent_shape)
        if options.training_latents is not None:
            training: TrainingLatents | None = file_training_latents(options.training_latents,
                                                                     dimension)
        else:
            training = stored
        records, thumbnails, evaluations = _render_groups(renderer, plan, quality, training,
                                                          options.progress)
    rows = [strategy_row(s, plan.group_size, plan.keep, plan.steps) for s in plan.strategies]
    rows += baseline_rows(plan.group_size, plan.keep, plan.steps, training is not None)
    numbers = summarise(records, rows, plan, options.resamples, options.bootstrap_seed)
    numbers.update({
        "pipeline": options.pipeline,
        "model": model,
        "index_version": version,
        "scorer": (f"in process over the store {options.store}" if options.store is not None
                   else f"the service at {redact(str(options.url))}"),
        "prompts": {"count": len(plan.prompts),
                    "source": str(options.prompts_file) if options.prompts_file else "one empty "
                    "prompt", "rule": "group g renders prompt g mod count"},
        "quality": {"source": quality.description, "labels": quality.has_labels},
        "training_latents": None if training is None else training.source,
        "omitted_baselines": {} if training is not None else {
            f"{measure}@{point}": "needs training latents: --training-latents FILE "
                                  "(or --store)"
            for point in ("noise", "final") for measure in sorted(NEEDS_TRAINING)
        },
        "run": {"denoiser_evaluations": evaluations,
                "wall_s": round(time.perf_counter() - started, 3)},
        "files": {"candidates": "candidates.csv", "page": "study.html"},
    })
    return StudyResult(numbers, candidate_table(records, rows), thumbnails)


def _render_groups(
    renderer: Renderer, plan: Plan, quality: Quality, training: TrainingLatents | None,
    progress: bool,
) -> tuple[list[GroupRecord], np.ndarray | None, int]:
    """Render and judge every group (tqdm on stderr): the records, the first group's
    thumbnails and the denoiser evaluations spent."""
    from tqdm import tqdm

    records: list[GroupRecord] = []
    thumbnails = None
    evaluations = 0
    bar = tqdm(range(plan.groups), desc="study", unit="group", file=sys.stderr,
               disable=not progress)
    for group in bar:
        seeds = plan.group_seeds(group)
        prompt_index = plan.prompt_index(group)
        prompt = plan.prompts[prompt_index]
        try:
            rendered = renderer.render(prompt, seeds)
        except ScoringError as exc:
            raise StudyError(str(exc)) from exc
        evaluations += rendered.evaluations
        judged, labels = quality(rendered.images, [prompt] * len(seeds), seeds)
        columns = dict(rendered.scores)
        for point, latents in (("noise", rendered.noise), ("final", rendered.final)):
            for name, values in measures(latents, training).items():
                columns[f"{name}@{point}"] = values
        records.append(GroupRecord(seeds, prompt_index, columns, rendered.final, judged, labels))
        if thumbnails is None:
            thumbnails = thumbnail(rendered.images)
    bar.close()
    return records, thumbnails, evaluations


def summarise(
    records: list[GroupRecord], rows: list[Row], plan: Plan, resamples: int, seed: int
) -> dict[str, Any]:
    """The numbers of study.json from the group records (module docstring)."""
    quality = np.stack([record.quality for record in records])  # (N, G)
    group_mean = quality.mean(axis=1)
    has_labels = all(record.labels is not None for record in records)
    labels = np.array([record.labels for record in records], dtype=str) if has_labels else None
    finals = np.stack([record.final for record in records])  # (N, G, d)
    kept: dict[str, np.ndarray | None] = {}
    delivered = np.empty((len(rows), len(records)))
    for i, row in enumerate(rows):
        if row.column is None:
            kept[row.name], delivered[i] = None, group_mean
            continue
        assert row.keeps is not None
        values = np.stack([record.columns[row.column] for record in records])
        kept[row.name] = kept_positions(values, plan.keep, row.keeps)
        delivered[i] = delivered_quality(quality, cast(np.ndarray, kept[row.name]))
    indices = group_resamples(len(records), resamples, seed)
    resampled_quality = resampled_means(delivered, indices)
    resampled_gain = resampled_means(delivered - group_mean, indices)
    tested = [i for i, row in enumerate(rows) if row.name != "random"]
    p_values = {i: one_sided_p(resampled_gain[i]) for i in tested}
    adjusted = dict(zip(tested, holm([p_values[i] for i in tested]), strict=True))
    name_index = {row.name: i for i, row in enumerate(rows)}
    costs = [row.per_group / plan.keep for row in rows]
    qualities = [float(delivered[i].mean()) for i in range(len(rows))]
    front = pareto_front(costs, qualities)
    entries = []
    for i, row in enumerate(rows):
        picks = kept[row.name]
        quality_interval = interval(qualities[i], resampled_quality[i])
        entry: dict[str, Any] = {
            "strategy": row.name,
            "baseline": row.baseline,
            "scored_on": row.scored_on,
            "rule": row.rule,
            "column": row.column,
            "keeps": row.keeps,
            "denoiser_evaluations_per_group": row.per_group,
            "denoiser_evaluations_per_image": costs[i],
            "quality_mean": qualities[i],
            "quality_ci": {"ci_low": quality_interval["ci_low"],
                           "ci_high": quality_interval["ci_high"]},
            "gain_vs_random": interval(float((delivered[i] - group_mean).mean()),
                                       resampled_gain[i]),
            "p_value": p_values.get(i),
            "p_holm": adjusted.get(i),
            "gain_vs_equal_cost": _equal_cost_gains(row, rows, name_index, delivered, indices),
            "on_frontier": i in front,
            "diversity": _diversity(picks, labels, finals),
            "kept_seeds": None if picks is None else [
                [record.seeds[j] for j in positions]
                for record, positions in zip(records, picks, strict=True)
            ],
        }
        entries.append(entry)
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "groups": plan.groups,
        "group_size": plan.group_size,
        "keep": plan.keep,
        "steps": plan.steps,
        "guidance_scale": plan.guidance_scale,
        "seeds": {"first": plan.seeds[0], "last": plan.seeds[-1], "count": len(plan.seeds),
                  "rule": "group g uses seeds first + g*G .. first + g*G + G - 1"},
        "bootstrap": {
            "resamples": resamples, "seed": seed, "confidence": CONFIDENCE, "unit": "group",
            "paired": "every row is resampled with the same group indices",
            "p_value": "one-sided for gain_vs_random > 0: (1 + #{resampled gain <= 0}) / "
                       "(1 + resamples)",
            "holm_family": [rows[i].name for i in tested],
        },
        "random_quality_mean": float(group_mean.mean()),
        "frontier": [rows[i].name for i in front],
        "strategies": entries,
    }


def _equal_cost_gains(
    row: Row, rows: list[Row], name_index: dict[str, int], delivered: np.ndarray,
    indices: np.ndarray,
) -> dict[str, dict[str, float]]:
    """``noise`` and ``final`` against each baseline at their own point (same cost): the
    paired difference in delivered quality with its bootstrap interval."""
    if row.baseline or row.name not in POINTS:
        return {}
    gains = {}
    for other in rows:
        if other.baseline and other.name.endswith(f"@{row.name}"):
            difference = delivered[name_index[row.name]] - delivered[name_index[other.name]]
            gains[other.name] = interval(float(difference.mean()),
                                         resampled_means(difference[None], indices)[0])
    return gains


def _diversity(
    picks: np.ndarray | None, labels: np.ndarray | None, finals: np.ndarray
) -> dict[str, float | None]:
    """Label entropy (nats) of every delivered image's label, and the mean over groups of the
    mean pairwise L2 distance of the delivered final latents; for random (``picks`` None),
    the same over all candidates (the expected pairwise distance of a random M-subset)."""
    if picks is None:
        chosen = finals
        chosen_labels = None if labels is None else labels.reshape(-1)
    else:
        chosen = np.take_along_axis(finals, picks[:, :, None], axis=1)
        chosen_labels = None if labels is None else np.take_along_axis(labels, picks, 1).ravel()
    distance = None
    if chosen.shape[1] >= 2:
        distance = float(np.mean([mean_pairwise_distance(group) for group in chosen]))
    return {
        "label_entropy": None if chosen_labels is None else label_entropy(list(chosen_labels)),
        "mean_pairwise_latent_distance": distance,
    }


def candidate_table(records: list[GroupRecord], rows: list[Row]) -> list[dict[str, Any]]:
    """candidates.csv's rows: group, seed, prompt_index, every row's column (strategies:
    log_density; baselines: their measure), quality, label."""
    columns = [row.column for row in rows if row.column is not None]
    table = []
    for group, record in enumerate(records):
        for j, seed in enumerate(record.seeds):
            line: dict[str, Any] = {"group": group, "seed": seed,
                                    "prompt_index": record.prompt_index}
            line.update({name: float(record.columns[name][j]) for name in columns})
            line["quality"] = float(record.quality[j])
            line["label"] = "" if record.labels is None else record.labels[j]
            table.append(line)
    return table


def candidates_csv(table: list[dict[str, Any]]) -> str:
    """The table as CSV text; floats written with ``repr`` (read back exactly)."""
    sink = io.StringIO()
    writer = csv.DictWriter(sink, fieldnames=list(table[0]), lineterminator="\n")
    writer.writeheader()
    for line in table:
        writer.writerow({key: repr(value) if isinstance(value, float) else value
                         for key, value in line.items()})
    return sink.getvalue()


def write_study(result: StudyResult, out: Path) -> None:
    """``study.json``, ``candidates.csv`` and ``study.html`` into ``out`` (made here, once
    everything is computed)."""
    import json

    from latentsieve.report_page import finite_json
    from latentsieve.study_page import page_html

    page = page_html(result.numbers, result.thumbnails)
    out.mkdir(parents=True, exist_ok=True)
    (out / "candidates.csv").write_text(candidates_csv(result.table), encoding="utf-8")
    (out / "study.json").write_text(
        json.dumps(finite_json(result.numbers), indent=2, allow_nan=False) + "\n",
        encoding="utf-8",
    )
    (out / "study.html").write_text(page, encoding="utf-8")
