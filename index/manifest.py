"""The manifest of one immutable index version, and the recipes it records.

A manifest is input like any other: reading one refuses a file name that is not one plain
name inside its version folder (``check_file_name``), and version names read from a job or a
request must be what ``index build`` writes (``check_version_name``) before they choose a path.
"""

from __future__ import annotations

import functools
import math
import re
from datetime import datetime
from typing import Literal, get_args

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from latentsieve.index.errors import StoreError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
MODEL_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# What ``index build`` names a version: its UTC build time and a digest of its files.
VERSION_NAME_PATTERN = re.compile(r"^[0-9]{8}T[0-9]{12}Z-[0-9a-f]{8}$")
# A file of a version: one path segment inside the version folder (no '/', '\\', '..', '.x').
FILE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
# The registered kinds and the retired ones (index/kinds/__init__.py: KINDS, RETIRED, which
# ``index build --kind`` offers); a test keeps the three lists equal.
IndexKind = Literal["flat", "ivf", "hnsw"]
KNOWN_KINDS: tuple[str, ...] = get_args(IndexKind)
STORAGE_TYPES: tuple[str, ...] = ("float32", "float16")
DEFAULT_MAX_ERROR = 0.01  # nats: a certified index's bound when a request names none
IVF_OFFSETS_FILE = "ivf_offsets.npy"  # a certified ivf index's stored offsets (N, d)
IVF_LISTS_FILE = "ivf_lists.npz"  # its row order, list boundaries, origins and statistics
SamplerDType = Literal["float32", "float16"]
# Bandwidths outside this range make sigma^2 or d^2 / (2 sigma^2) leave float64's range for
# float32 latents (d^2 <= ~1e83), so no score could be represented: they are refused.
SIGMA_MIN = 1e-100
SIGMA_MAX = 1e100


def check_sigma(sigma: float) -> float:
    """``sigma`` as a float if finite and within [SIGMA_MIN, SIGMA_MAX], else ValueError."""
    value = float(sigma)
    if not (math.isfinite(value) and SIGMA_MIN <= value <= SIGMA_MAX):
        raise ValueError(f"sigma must be a finite number in [1e-100, 1e100], got {sigma!r}")
    return value


def check_model_name(name: str) -> str:
    """Model names are one path segment: lowercase letters, digits, '.', '_', '-' (<= 64)."""
    if not MODEL_NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise StoreError(
            f"invalid model name {name!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_version_name(name: str) -> str:
    """Version names are what ``index build`` writes (``20261123T121314123456Z-1a2b3c4d``):
    one path segment, so a name read from a job or a request never leaves the model's folder."""
    if not VERSION_NAME_PATTERN.fullmatch(name):
        raise StoreError(
            f"invalid version name {name!r}: expected the build time and digest "
            "'YYYYMMDDTHHMMSSffffffZ-xxxxxxxx' of a version in the store"
        )
    return name


def check_file_name(name: str) -> str:
    """A file named by a manifest is one path segment inside its version folder; else
    ValueError (a manifest naming ``../x`` or ``/etc/x`` is refused when read)."""
    if not FILE_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"file name {name!r} is not one plain name inside the version folder "
            "(letters, digits, '.', '_', '-'; no '/', '..' or leading '.')"
        )
    return name


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SamplerRecipe(_Frozen):
    """Seed -> latent recipe (docs/contract.md §5): one CPU torch.Generator per seed, N(0, I)
    draws."""

    device: Literal["torch-cpu"] = "torch-cpu"
    dtype: SamplerDType = "float32"
    shape: tuple[int, ...]

    @field_validator("shape")
    @classmethod
    def _positive_shape(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if not shape or any(size < 1 for size in shape):
            raise ValueError(f"sampler shape must be non-empty positive sizes, got {shape}")
        return shape

    @classmethod
    def parse(cls, text: str, default_shape: tuple[int, ...]) -> SamplerRecipe:
        """``torch-cpu[:DTYPE][:SHAPE]``, e.g. ``torch-cpu:float16:4x64x64``."""
        parts = text.strip().split(":")
        if parts[0] != "torch-cpu":
            raise StoreError(
                f"unknown sampler {parts[0]!r} in {text!r}; supported: torch-cpu[:DTYPE][:SHAPE]"
            )
        dtype = "float32"
        shape = default_shape
        for part in parts[1:]:
            if part in ("float32", "float16"):
                dtype = part
            elif re.fullmatch(r"\d+(x\d+)*", part):
                shape = tuple(int(size) for size in part.split("x"))
            else:
                raise StoreError(
                    f"bad sampler field {part!r} in {text!r}: expected float32|float16 or a "
                    "shape like 4x64x64"
                )
        try:
            return cls(dtype=dtype, shape=shape)  # type: ignore[arg-type]
        except ValueError as exc:
            raise StoreError(f"bad sampler {text!r}: {exc}") from exc

    def __str__(self) -> str:
        return f"{self.device}:{self.dtype}:{'x'.join(str(size) for size in self.shape)}"


class ModuleReference(_Frozen):
    """A generator or mapping: a TorchScript copy in the version, or an import path."""

    spec: str
    source: Literal["torchscript", "import"]
    file: str | None = None  # the copy inside the version directory (torchscript)
    sha256: str  # of the TorchScript file, or of the imported module's source file
    # Import paths: sha256 of the built module's parameters and buffers, so weights the
    # factory loads from elsewhere are covered too (None for TorchScript: the file holds them).
    state_sha256: str | None = None


class Bandwidth(_Frozen):
    """The kernel bandwidth and how it was chosen."""

    sigma: float = Field(ge=SIGMA_MIN, le=SIGMA_MAX)
    rule: Literal["fixed", "knn_median"]
    k: int | None = None
    sample_size: int | None = None
    seed: int | None = None
    detail: str


class Calibration(_Frozen):
    """Where the percentile reference scores came from (docs/contract.md §1)."""

    source: Literal["sampler", "leave_one_out", "latents"]
    count: int = Field(ge=1)
    sigma: float = Field(gt=0)
    seed_start: int | None = None  # sampler: seeds seed_start .. seed_start + count - 1
    indices_file: str | None = None  # leave-one-out: the training rows scored
    # latents (``--calibration-latents``): the user's latents as sent, float32 (count, d), and
    # where they came from (the file given at build and its sha256)
    latents_file: str | None = None
    latents_source: str | None = None
    latents_source_sha256: str | None = None
    scores_file: str = "calibration.npy"  # sorted float64 log densities at ``sigma``
    log_density_min: float
    log_density_max: float
    quantiles: dict[str, float]


DESCRIPTOR_NAMES = ("psi", "nu", "delta")
# Why a TorchScript generator lacks delta, for every message that refuses it.
TORCHSCRIPT_DESCRIPTORS = "a TorchScript generator has psi and nu only"
DEFAULT_PROJECTION_ROWS = 120  # m, the rows of P (docs/contract.md §2)
DEFAULT_DELTA_DIRECTIONS = 8  # P, the cross-polytope's directions


class PercentileBounds(_Frozen):
    """Accept a descriptor only between these calibration percentiles (either may be absent)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    min_percentile: float | None = Field(default=None, ge=0.0, le=1.0)
    max_percentile: float | None = Field(default=None, ge=0.0, le=1.0)


class RankSum(_Frozen):
    """Reject a latent when the mean of its density percentile and one minus its ``psi``
    percentile is below ``min_score``: ``(p + (1 - p_psi)) / 2 < min_score``. Both percentiles
    are against the model's calibration set, so the rule is a rank-sum of the two scores that
    does not depend on the rest of the batch (docs/evidence.md chose it on held-out seeds)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    min_score: float = Field(ge=0.0, le=1.0)


SpaceName = Literal["raw", "active", "standardized"]
KNOWN_SPACES: tuple[str, ...] = get_args(SpaceName)


class Projection(_Frozen):
    """A linear map into the index's space, index space = (z - mean) @ components.T, with the
    arrays in ``file`` (float64 ``mean`` (d,), ``components`` (dim, d)). ``method``:

    - ``pca`` (``--pca DIM``): the top ``dim`` principal axes;
    - ``active`` (``--space active``): the coordinates ``kept`` whose variance among the training
      latents is at least ``threshold`` times the reference variance (inactive VAE dimensions,
      where every training latent sits at the prior's centre, are dropped);
    - ``standardized`` (``--space standardized``): the active coordinates, each divided by its
      standard deviation among the training latents (a per-dimension bandwidth sigma * sd_j).
    """

    method: Literal["pca", "active", "standardized"] = "pca"
    dim: int = Field(ge=1)
    file: str = "pca.npz"
    explained_variance_ratio: float = Field(ge=0.0, le=1.0)
    kept: tuple[int, ...] | None = None  # active, standardized: source coordinates kept
    threshold: float | None = None  # active, standardized
    reference_variance: str | None = None  # active, standardized: what the threshold scales


class MeasuredError(_Frozen):
    """|approximate - exact| log density (nats) over a sample of calibration latents."""

    sample: int = Field(ge=1)
    max: float
    p99: float
    mean: float


class ApproximateSearch(_Frozen):
    """How an IVF or HNSW index is scored: the kernel sum over the ``k`` retrieved neighbours
    (exact float64 distances), a lower bound of the full sum; its error is measured at build."""

    k: int = Field(ge=1)
    nlist: int | None = None  # ivf
    nprobe: int | None = None  # ivf
    hnsw_m: int | None = None  # hnsw
    ef_search: int | None = None  # hnsw
    measured_error: MeasuredError | None = None  # filled by the build before publishing


class CertifiedMeasure(_Frozen):
    """A certified index against exact scoring on held-out calibration latents at the build
    sigma and the index's max_error: its bound, its true error, lists probed and speed."""

    sample: int = Field(ge=1)
    half_width_max: float = Field(ge=0.0)  # nats: the largest certified bound
    error_max: float = Field(ge=0.0)  # nats: the largest |estimate - exact|
    lists_probed_mean: float = Field(ge=0.0)
    speedup: float = Field(gt=0.0)  # exact (flat GEMM) time / certified time, same process


class CertifiedLists(_Frozen):
    """How a certified ``ivf`` index is stored and scored (docs/contract.md §1): ``nlist``
    lists from k-means on ``train_size`` rows, offsets in ``storage``, ``rank`` principal axes
    per list, and the bound a request gets when it names none (``max_error``, nats)."""

    nlist: int = Field(ge=1)
    train_size: int = Field(ge=1)
    rank: int = Field(ge=0)
    storage: Literal["float32", "float16"] = "float32"
    max_error: float = Field(ge=0.0)
    measured: CertifiedMeasure | None = None  # filled by the build before publishing


class Policy(_Frozen):
    """The default accept/reject rules of a model (overridable per request).

    ``min_percentile`` bounds the density percentile. ``psi``, ``nu`` and ``delta`` bound the
    descriptors' calibration percentiles (Humayun et al.: very low ``psi`` marks memorisation,
    very high ``psi`` or ``nu`` out-of-distribution latents); a bound makes the descriptor be
    computed for every request the policy decides. ``rank_sum`` combines the density's and
    ``psi``'s percentiles into one rule (:class:`RankSum`); it needs ``psi``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)  # "0.5" is no number

    min_percentile: float = Field(default=0.05, ge=0.0, le=1.0)
    psi: PercentileBounds | None = None
    nu: PercentileBounds | None = None
    delta: PercentileBounds | None = None
    rank_sum: RankSum | None = None

    @functools.cached_property
    def _bounds(self) -> dict[str, PercentileBounds]:
        bounds = {name: getattr(self, name) for name in DESCRIPTOR_NAMES}
        return {name: bound for name, bound in bounds.items() if bound is not None}

    def descriptor_bounds(self) -> dict[str, PercentileBounds]:
        """The descriptors this policy has rules for, with their bounds (computed once per
        policy: it is frozen, and every request asks)."""
        return dict(self._bounds)

    def needed_descriptors(self) -> frozenset[str]:
        """Every descriptor a decision by this policy needs computed: the bounded ones, and
        ``psi`` for ``rank_sum``."""
        return frozenset(self._bounds) | (frozenset({"psi"}) if self.rank_sum else frozenset())


class DescriptorSettings(_Frozen):
    """How a model's local-geometry descriptors are computed (docs/contract.md §2), and their
    calibration: sorted values of each descriptor over the first ``calibration_count`` latents
    of the density calibration set, in ``calibration_file``."""

    # The descriptors this model computes (no delta for TorchScript generators).
    names: tuple[str, ...] = DESCRIPTOR_NAMES
    output_dim: int = Field(ge=1)
    projection_rows: int = Field(ge=1)
    projection_seed: int
    delta_directions: int = Field(ge=1)
    delta_radius: float = Field(gt=0)
    calibration_count: int = Field(ge=1)
    calibration_file: str = "descriptor_calibration.npz"
    quantiles: dict[str, dict[str, float]]


class IndexShard(_Frozen):
    """One row-disjoint part of a sharded version: its own flat FAISS index of rows
    ``start .. start + count - 1`` of the training latents (docs/contract.md §4, ``--shards``)."""

    file: str
    start: int = Field(ge=0)
    count: int = Field(ge=1)


class IndexManifest(_Frozen):
    """Everything needed to load and trust one version; written last, read first."""

    format_version: int = FORMAT_VERSION
    model: str
    version: str
    created_at: datetime
    package_version: str
    kind: IndexKind = "flat"
    exact: bool = True
    metric: Literal["l2"] = "l2"
    n: int = Field(ge=2)
    dim: int = Field(ge=1)  # numbers per latent as sent (prod(latent_shape))
    latent_shape: tuple[int, ...]
    # The index space when it is not the latents as sent (read from "pca" in older manifests).
    projection: Projection | None = Field(
        default=None, validation_alias=AliasChoices("projection", "pca")
    )
    latent_set: str | None = None  # what the training latents are (--latent-set), for the record
    search: ApproximateSearch | None = None  # ivf and hnsw built before certified scoring
    # The kinds' manifest blocks (index/kinds/: a kind's ``block`` names its field).
    certified: CertifiedLists | None = None  # ivf: certified scoring (ivf_*.npy/npz)
    bandwidth: Bandwidth
    sampler: SamplerRecipe | None = None
    generator: ModuleReference | None = None
    mapping: ModuleReference | None = None
    calibration: Calibration
    descriptors: DescriptorSettings | None = None
    policy: Policy = Policy()
    source_file: str
    source_sha256: str
    files: dict[str, str]  # file name in the version directory -> sha256
    # Row-disjoint shards (``--shards K``, K >= 2); empty: one shard, ``index.faiss``.
    shards: tuple[IndexShard, ...] = ()

    @model_validator(mode="after")
    def _files_inside_the_version(self) -> IndexManifest:
        """Every file this manifest names stays inside its version folder."""
        for name in self.file_names():
            check_file_name(name)
        return self

    def file_names(self) -> list[str]:
        """Every file name the manifest records: checksummed files, shards, calibration,
        projection, descriptor calibration and TorchScript module copies."""
        names = [*self.files, *(shard.file for shard in self.shards)]
        names += [self.calibration.scores_file]
        names += [name for name in (
            self.calibration.indices_file,
            self.calibration.latents_file,
            self.projection.file if self.projection is not None else None,
            self.descriptors.calibration_file if self.descriptors is not None else None,
            self.generator.file if self.generator is not None else None,
            self.mapping.file if self.mapping is not None else None,
        ) if name is not None]
        return names

    def shard_layout(self) -> tuple[IndexShard, ...]:
        """Every shard of this version, unsharded versions as one shard over all N rows."""
        from latentsieve.index.kinds import main_file  # the kinds read manifests

        if self.shards:
            return self.shards
        return (IndexShard(file=main_file(self), start=0, count=self.n),)
