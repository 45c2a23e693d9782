"""Build one immutable index version from a latents file.

The scoring of calibration latents is injected (``calibrate``) so that the store depends on no
scoring code; ``latentsieve index build`` passes the workers' implementation.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from pydantic import BaseModel

from latentsieve.index.bandwidth import AUTO_K, choose_bandwidth, parse_sigma
from latentsieve.index.checksums import sha256_file
from latentsieve.index.errors import StoreError
from latentsieve.index.kinds import build_kind
from latentsieve.index.latent_files import load_latents
from latentsieve.index.manifest import (
    DEFAULT_DELTA_DIRECTIONS,
    DEFAULT_MAX_ERROR,
    DEFAULT_PROJECTION_ROWS,
    KNOWN_SPACES,
    STORAGE_TYPES,
    TORCHSCRIPT_DESCRIPTORS,
    Calibration,
    CertifiedMeasure,
    DescriptorSettings,
    IndexKind,
    IndexManifest,
    IndexShard,
    ModuleReference,
    Policy,
    Projection,
    SamplerRecipe,
    check_model_name,
)
from latentsieve.index.module_refs import copy_module_file, resolve_module_spec
from latentsieve.index.projection import (
    ACTIVE_THRESHOLD,
    coordinate_variances,
    fit_active,
    fit_pca,
    project,
)
from latentsieve.index.store import LatentStore

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION_COUNT = 10_000
# Sampler calibration draws seeds far from the small seeds upstream pipelines usually send.
CALIBRATION_SEED_START = 1_000_000_000
CALIBRATION_INDEX_SEED = 0
CALIBRATION_LATENTS_FILE = "calibration_latents.npy"
# Chosen by docs/evidence.md: dropping inactive coordinates is what made the demo VAE's score
# predict quality at all, and it is the identity on latents whose coordinates are all active.
DEFAULT_SPACE = "active"
SPACE_REFERENCE_DRAWS = 2048  # mapped draws whose variance --space active compares against


@dataclass(frozen=True)
class CalibrationRequest:
    """What to score for the percentile reference of a new version."""

    latents: np.ndarray  # (N, d) float32 training latents
    sigma: float
    source: str  # "sampler" | "leave_one_out" | "latents"
    count: int
    seed_start: int | None
    indices: np.ndarray | None  # leave-one-out rows (count,)
    sampler: SamplerRecipe | None
    mapping: ModuleReference | None
    version_dir: Path
    progress: bool
    latent_shape: tuple[int, ...] = ()
    generator: ModuleReference | None = None
    descriptors: DescriptorOptions | None = None
    kind: str = "flat"  # its scorer: latentsieve.workers.kinds
    # The kind's manifest block (ivf: CertifiedLists; its lists are staged in version_dir)
    settings: BaseModel | None = None
    shards: tuple[IndexShard, ...] = ()  # --shards K: the staged shards
    projection: tuple[np.ndarray, np.ndarray] | None = None  # PCA mean (d,), components
    source_latents: np.ndarray | None = None  # (N, d) before PCA, for descriptors
    # --calibration-latents: (count, d) float32 as sent (before PCA), the calibration set
    calibration_latents: np.ndarray | None = None


@dataclass(frozen=True)
class DescriptorOptions:
    """Descriptor settings asked for at build time (docs/contract.md §2; defaults in docs)."""

    calibration_count: int = 1_000
    projection_rows: int = DEFAULT_PROJECTION_ROWS
    projection_seed: int = 0
    delta_directions: int = DEFAULT_DELTA_DIRECTIONS
    delta_radius: float | None = None  # None: 0.1 * sqrt(latent size)


@dataclass(frozen=True)
class DescriptorCalibration:
    """What the calibrator measured of a generator: its output size, the resolved radius and
    each descriptor's values over the descriptor calibration latents (unsorted)."""

    output_dim: int
    delta_radius: float
    values: dict[str, np.ndarray]


@dataclass(frozen=True)
class CalibrationResult:
    """Density calibration scores (count,) nats, descriptor calibration when asked, and for
    a certified ivf index its bound, error and speed against exact scoring."""

    scores: np.ndarray
    descriptors: DescriptorCalibration | None = None
    measured: CertifiedMeasure | None = None
    # role ("generator", "mapping") -> sha256 of the loaded import-path module's weights
    module_states: dict[str, str] = field(default_factory=dict)


Calibrator = Callable[[CalibrationRequest], CalibrationResult]
# (sampler, mapping, staged version folder, seeds) -> the index-space queries those seeds make
QueryDraws = Callable[[SamplerRecipe, ModuleReference, Path, range], np.ndarray]


@dataclass(frozen=True)
class BuildOptions:
    """The options of ``latentsieve index build`` (docs/contract.md §4)."""

    model: str
    latents_file: Path
    sigma: str = "auto"
    kind: str = "flat"
    pca: int | None = None
    space: str | None = None  # raw | active | standardized; None: DEFAULT_SPACE unless --pca
    active_threshold: float = ACTIVE_THRESHOLD
    latent_set: str | None = None
    bandwidth_neighbours: int = AUTO_K  # k of --sigma auto
    sampler: str | None = None
    generator: str | None = None
    mapping: str | None = None
    calibration_count: int = DEFAULT_CALIBRATION_COUNT
    # Latents the user's pipeline sends (x0-predictions at step K, finished latents...): the
    # percentile reference instead of sampler draws or leave-one-out; all of them are scored.
    calibration_latents: Path | None = None
    min_percentile: float = Policy().min_percentile
    policy: Policy | None = None  # the whole default policy (--policy JSON); wins over the above
    descriptors: DescriptorOptions = DescriptorOptions()
    shards: int = 1  # --shards K: K row-disjoint flat indexes (docs/contract.md §4)
    storage: str = "float32"  # ivf: precision of the stored offsets
    max_error: float = DEFAULT_MAX_ERROR  # ivf: nats, a request's bound when it names none
    nlist: int | None = None  # ivf: lists; None: choose_nlist(N, d)
    progress: bool = True


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("latentsieve")
    except PackageNotFoundError:
        return "0+unknown"


def check_options(options: BuildOptions) -> None:
    """Refuse bad options before any file is read or written."""
    check_model_name(options.model)
    kind = build_kind(options.kind)
    if options.storage not in STORAGE_TYPES:
        raise StoreError(
            f"unknown --storage {options.storage!r}; choose one of {', '.join(STORAGE_TYPES)}"
        )
    kind.check(options)
    if not (math.isfinite(options.max_error) and options.max_error >= 0):
        raise StoreError(f"--max-error must be a finite number >= 0 nats, got {options.max_error}")
    if options.nlist is not None and options.nlist < 1:
        raise StoreError(f"--nlist must be a whole number >= 1, got {options.nlist}")
    if options.pca is not None and options.pca < 1:
        raise StoreError(f"--pca must be a whole number >= 1, got {options.pca}")
    if options.space is not None and options.space not in KNOWN_SPACES:
        raise StoreError(
            f"unknown --space {options.space!r}; choose one of {', '.join(KNOWN_SPACES)}"
        )
    if options.pca is not None and options.space not in (None, "raw"):
        raise StoreError(f"--pca and --space {options.space} both choose the space; give one")
    bounded = options.policy.needed_descriptors() if options.policy is not None else frozenset()
    if bounded and options.generator is None:
        raise StoreError(
            f"the policy bounds {', '.join(sorted(bounded))}, which needs a --generator"
        )
    threshold = options.active_threshold
    if not (math.isfinite(threshold) and threshold > 0):
        raise StoreError(f"--active-threshold must be a finite number > 0, got {threshold}")
    if options.bandwidth_neighbours < 1:
        raise StoreError("--bandwidth-neighbours must be a whole number >= 1")
    if options.calibration_count < 1:
        raise StoreError("the calibration count must be >= 1")
    if options.shards < 1:
        raise StoreError(f"--shards must be a whole number >= 1, got {options.shards}")
    descriptors = options.descriptors
    if descriptors.calibration_count < 1 or descriptors.projection_rows < 1:
        raise StoreError("descriptor calibration count and projection rows must be >= 1")
    if descriptors.delta_directions < 1:
        raise StoreError("--delta-directions must be >= 1")
    radius = descriptors.delta_radius
    if radius is not None and not (math.isfinite(radius) and radius > 0):
        raise StoreError(f"--delta-radius must be a finite number > 0, got {radius}")


def choose_space(
    options: BuildOptions,
    latents: np.ndarray,
    has_sampler: bool,
    query_variance: np.ndarray | float | None,
) -> tuple[Projection, tuple[np.ndarray, np.ndarray]] | None:
    """The index space of ``--pca`` / ``--space`` over (N, d) latents: the manifest's
    Projection and its (mean, components), or None when the space is the latents as sent.

    ``active`` drops coordinate j when the training latents' variance there is below
    ``threshold`` times both the variance of what the sampler sends there (``query_variance``:
    1 for N(0, I) draws scored as drawn, measured on mapped draws; None: a mapped sampler nobody
    measured, the largest training variance) and the largest training variance (see
    :func:`fit_active`). Without a sampler nothing says what queries look like, so every
    coordinate is kept.
    """
    dim = latents.shape[1]
    if options.pca is not None:  # build_version has checked pca <= dim
        mean, components, ratio = fit_pca(latents, options.pca)
        return Projection(dim=options.pca, explained_variance_ratio=ratio), (mean, components)
    space = options.space or DEFAULT_SPACE
    if space == "raw" or (space == "active" and not has_sampler):
        return None
    # fit_active compares against min(reference, largest training variance): an infinite
    # reference leaves the largest training variance, a zero one keeps every coordinate.
    reference: np.ndarray | float
    if isinstance(query_variance, float):
        reference, described = query_variance, "the sampler's N(0, 1) draws"
    elif query_variance is not None:
        reference = query_variance
        described = f"the mapped sampler's draws ({SPACE_REFERENCE_DRAWS} calibration seeds)"
    elif has_sampler:
        reference, described = math.inf, "the largest training-latent variance"
    else:  # standardized without a sampler: scale every coordinate, drop none
        reference, described = 0.0, "none: no sampler, every coordinate kept"
    mean, components, ratio, kept = fit_active(
        latents, options.active_threshold, reference, standardize=space == "standardized"
    )
    if space == "active" and kept.size == dim:
        return None  # every coordinate is active: the space is the latents as sent
    projection = Projection(
        method=cast(Literal["active", "standardized"], space),
        dim=int(kept.size),
        explained_variance_ratio=ratio,
        kept=tuple(int(j) for j in kept),
        threshold=options.active_threshold,
        reference_variance=described,
    )
    log.info("index space", extra={"space": space, "kept": projection.kept, "dim": dim})
    if 2 * kept.size < dim:
        log.warning(
            "--space %s keeps %d of %d coordinates (%.0f%% of the variance); check the latents' "
            "scale against the sampler's, or pass --space raw",
            space, kept.size, dim, 100 * ratio,
        )
    return projection, (mean, components)


def summarise(scores: np.ndarray) -> dict[str, float]:
    """Quantiles of calibration scores (nats), for dashboards and docs."""
    levels = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999)
    values = np.quantile(scores, levels)
    return {f"q{level:g}": float(value) for level, value in zip(levels, values, strict=True)}


def write_descriptor_calibration(
    measured: DescriptorCalibration, wanted: DescriptorOptions, staged: Path
) -> DescriptorSettings:
    """Store sorted descriptor calibration values and describe them for the manifest."""
    values = {name: np.sort(np.asarray(v, dtype=np.float64)) for name, v in measured.values.items()}
    for name, array in values.items():
        if array.ndim != 1 or array.size < 1 or not np.all(np.isfinite(array)):
            raise StoreError(f"descriptor calibration of {name!r} is empty or not finite")
    settings = DescriptorSettings(
        names=tuple(sorted(values)),
        output_dim=measured.output_dim,
        projection_rows=wanted.projection_rows,
        projection_seed=wanted.projection_seed,
        delta_directions=wanted.delta_directions,
        delta_radius=measured.delta_radius,
        calibration_count=int(next(iter(values.values())).size),
        quantiles={name: summarise(array) for name, array in values.items()},
    )
    np.savez(staged / settings.calibration_file, **values)  # type: ignore[arg-type]
    return settings


def _calibration_latents(path: Path | None, dim: int) -> np.ndarray | None:
    """``--calibration-latents``: (count, dim) float32 (any trailing shape of ``dim`` numbers,
    finite, at least 2), or None; StoreError saying what is wrong."""
    if path is None:
        return None
    given = load_latents(path)
    flat = np.ascontiguousarray(given.reshape(given.shape[0], -1), dtype=np.float32)
    if flat.shape[1] != dim:
        raise StoreError(
            f"--calibration-latents {path}: each latent has {flat.shape[1]} numbers, the index "
            f"latents have {dim}; give latents as the pipeline sends them to /score"
        )
    return flat


def build_version(
    store: LatentStore,
    options: BuildOptions,
    calibrate: Calibrator,
    draw_queries: QueryDraws | None = None,
) -> Path:
    """Validate, build, calibrate and publish a new version; returns its folder.

    ``draw_queries`` (the workers' sampler and mapping) shows ``--space active`` what a mapped
    sampler sends; without it a mapped sampler's reference is the largest training variance.
    Any failure raises StoreError (or the calibrator's error) and leaves nothing in the store.
    """
    check_options(options)
    raw = load_latents(options.latents_file)
    latent_shape = tuple(int(size) for size in raw.shape[1:])
    source_latents = raw.reshape(raw.shape[0], -1)
    n, dim = source_latents.shape
    sampler = SamplerRecipe.parse(options.sampler, latent_shape) if options.sampler else None
    if sampler is not None and options.mapping is None:
        numel = int(np.prod(sampler.shape))
        if numel != dim:
            raise StoreError(
                f"--sampler draws {numel} numbers per latent ({sampler}), the index latents "
                f"have {dim}; give a --mapping or a matching shape"
            )
    if options.pca is not None and options.pca > dim:
        raise StoreError(f"--pca {options.pca} is larger than the latent size {dim}")
    parse_sigma(options.sigma)  # refused before the staging folder is made
    generator = resolve_module_spec(options.generator, "generator") if options.generator else None
    mapping = resolve_module_spec(options.mapping, "mapping") if options.mapping else None
    given = _calibration_latents(options.calibration_latents, dim)
    source_sha = sha256_file(options.latents_file)
    created = datetime.now(UTC)
    with store.staging(options.model) as staged:
        for reference in (generator, mapping):
            if reference is not None:
                copy_module_file(reference, staged)
        query_variance: np.ndarray | float | None = None
        if given is not None:  # what upstream sends, given outright
            query_variance = coordinate_variances(given)[1]
        elif sampler is not None and mapping is None:
            query_variance = 1.0  # N(0, I) draws scored as drawn
        elif sampler is not None and mapping is not None and draw_queries is not None:
            seeds = range(CALIBRATION_SEED_START, CALIBRATION_SEED_START + SPACE_REFERENCE_DRAWS)
            queries = draw_queries(sampler, mapping, staged, seeds)
            if queries.shape[1] != dim:
                raise StoreError(
                    f"--mapping {mapping.spec} sends {queries.shape[1]} numbers per latent, "
                    f"the index latents have {dim}"
                )
            query_variance = coordinate_variances(queries)[1]
        space = choose_space(options, source_latents, sampler is not None, query_variance)
        projection = space[0] if space is not None else None
        pca_arrays = space[1] if space is not None else None
        latents = source_latents if pca_arrays is None else project(source_latents, *pca_arrays)
        bandwidth = choose_bandwidth(options.sigma, latents, options.bandwidth_neighbours)
        kind = build_kind(options.kind)
        shards, settings = kind.write(latents, staged, options)
        if projection is not None and pca_arrays is not None:
            np.savez(staged / projection.file, mean=pca_arrays[0], components=pca_arrays[1])
        wanted = options.descriptors if generator is not None else None
        rows: np.ndarray | None = None
        source = "sampler" if sampler is not None else "leave_one_out"
        if given is not None:
            source, count = "latents", given.shape[0]
            np.save(staged / CALIBRATION_LATENTS_FILE, given)
        elif sampler is not None:
            count = options.calibration_count
        else:
            count = min(options.calibration_count, n)
            rng = np.random.default_rng(CALIBRATION_INDEX_SEED)
            rows = np.sort(rng.choice(n, size=count, replace=False)).astype(np.int64)
            np.save(staged / "calibration_indices.npy", rows)
        request = CalibrationRequest(
            latents=latents,
            sigma=bandwidth.sigma,
            source=source,
            count=count,
            seed_start=CALIBRATION_SEED_START if source == "sampler" else None,
            indices=rows,
            sampler=sampler,
            mapping=mapping,
            version_dir=staged,
            progress=options.progress,
            latent_shape=latent_shape,
            generator=generator,
            descriptors=wanted,
            kind=kind.name,
            settings=settings,
            shards=shards,
            projection=pca_arrays,
            source_latents=source_latents,
            calibration_latents=given,
        )
        result = calibrate(request)
        if generator is not None and generator.source == "import":
            generator = generator.model_copy(
                update={"state_sha256": result.module_states.get("generator")}
            )
        if mapping is not None and mapping.source == "import":
            mapping = mapping.model_copy(
                update={"state_sha256": result.module_states.get("mapping")}
            )
        if not kind.exact and settings is not None:
            if result.measured is None:
                raise StoreError("a certified index needs its bound measured at build")
            settings = settings.model_copy(update={"measured": result.measured})
        scores = np.sort(np.asarray(result.scores, dtype=np.float64))
        if scores.shape != (count,) or not np.all(np.isfinite(scores)):
            raise StoreError(f"calibration produced {scores.shape} scores, some not finite")
        np.save(staged / "calibration.npy", scores)
        descriptor_settings = (
            write_descriptor_calibration(result.descriptors, wanted, staged)
            if wanted is not None and result.descriptors is not None
            else None
        )
        computed = set(descriptor_settings.names) if descriptor_settings is not None else set()
        bounded = set(options.policy.needed_descriptors()) if options.policy else set()
        if bounded - computed:
            raise StoreError(
                f"the policy bounds {', '.join(sorted(bounded - computed))}, which this "
                f"generator does not compute ({TORCHSCRIPT_DESCRIPTORS})"
            )
        calibration = Calibration(
            source=request.source,  # type: ignore[arg-type]
            count=count,
            sigma=bandwidth.sigma,
            seed_start=request.seed_start,
            indices_file="calibration_indices.npy" if request.indices is not None else None,
            latents_file=CALIBRATION_LATENTS_FILE if given is not None else None,
            latents_source=(
                str(options.calibration_latents) if options.calibration_latents else None
            ),
            latents_source_sha256=(
                sha256_file(options.calibration_latents) if options.calibration_latents else None
            ),
            log_density_min=float(scores[0]),
            log_density_max=float(scores[-1]),
            quantiles=summarise(scores),
        )
        files = {path.name: sha256_file(path) for path in sorted(staged.iterdir())}
        digest = hashlib.sha256((source_sha + repr(sorted(files.items()))).encode()).hexdigest()
        # the kind's manifest block under its field (ivf: certified)
        block: dict[str, Any] = {kind.block: settings} if kind.block is not None else {}
        manifest = IndexManifest(
            model=options.model,
            version=f"{created:%Y%m%dT%H%M%S%f}Z-{digest[:8]}",
            created_at=created,
            package_version=_package_version(),
            kind=cast(IndexKind, kind.name),
            exact=kind.exact and projection is None,
            n=n,
            dim=dim,
            latent_shape=latent_shape,
            projection=projection,
            latent_set=options.latent_set,
            bandwidth=bandwidth,
            sampler=sampler,
            generator=generator,
            mapping=mapping,
            calibration=calibration,
            descriptors=descriptor_settings,
            policy=options.policy or Policy(min_percentile=options.min_percentile),
            source_file=str(options.latents_file),
            source_sha256=source_sha,
            files=files,
            shards=shards,
            **block,
        )
        target = store.publish(staged, manifest)
    log.info(
        "built index version",
        extra={"model": options.model, "version": manifest.version, "n": n, "dim": dim},
    )
    return target
