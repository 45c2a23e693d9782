"""One shard's part of eq. (1) (docs/contract.md §4); the merge is
:mod:`latentsieve.workers.log_sums`.

A version split into K row-disjoint shards scores a latent as

    log_density(z) = logsumexp_k( log_sum_k(z) ) - log N,
    log_sum_k(z)   = log sum_{i in shard k} exp( -||z - z_i||^2 / (2 sigma^2) )

so each shard (in process or on a worker) returns its log-sum (with its certified bound for an
ivf version) and the caller merges them.
The types here are the batches the batcher combines and splits: ``ShardQuery`` in,
``ShardScores`` out, sliced along the batch axis (queries are concatenated too).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Self

import numpy as np

from latentsieve.index.store import LoadedShard, LoadedVersion
from latentsieve.workers.calibration import score_descriptors
from latentsieve.workers.density import DensityScorer
from latentsieve.workers.descriptors import DescriptorEngine
from latentsieve.workers.kinds import scorer_of
from latentsieve.workers.log_sums import NO_ROW
from latentsieve.workers.modules import load_module
from latentsieve.workers.transport import DESCRIPTOR_SHARD, ScoreSpec


@dataclass(frozen=True)
class ShardQuery:
    """Latents to score on a shard: (n, d) float32, as sent or already in the index's space
    (``ShardKey.index_space``), and per latent the global training row it leaves out (n,)
    int64 (leave-one-out calibration), ``NO_ROW`` for none; ``exclude`` None: none at all."""

    latents: np.ndarray
    exclude: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def take(self, start: int, stop: int) -> ShardQuery:
        return ShardQuery(
            self.latents[start:stop], None if self.exclude is None else self.exclude[start:stop]
        )

    @classmethod
    def concat(cls, parts: Sequence[ShardQuery]) -> Self:
        """One query of all ``parts``, in order."""
        if len(parts) == 1:
            return cls(parts[0].latents, parts[0].exclude)
        latents = np.concatenate([part.latents for part in parts])
        if all(part.exclude is None for part in parts):
            return cls(latents)
        exclude = np.concatenate(
            [
                np.full(len(part), NO_ROW, np.int64) if part.exclude is None else part.exclude
                for part in parts
            ]
        )
        return cls(latents, exclude)


@dataclass(frozen=True)
class ShardScores:
    """What a shard returns for n latents: ``log_sum`` (n,) float64 nats (see the module
    docstring), from a certified ivf index its ``bound`` (n,) nats (the exact log-sum lies
    within ``log_sum +- bound``; None: exact) and, from shard 0 only, the descriptors asked
    for, name -> (n,) float64."""

    log_sum: np.ndarray
    descriptors: dict[str, np.ndarray] = field(default_factory=dict)
    bound: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.log_sum.shape[0])

    def take(self, start: int, stop: int) -> ShardScores:
        return ShardScores(
            self.log_sum[start:stop],
            {name: values[start:stop] for name, values in self.descriptors.items()},
            None if self.bound is None else self.bound[start:stop],
        )


@dataclass(frozen=True)
class ShardKey:
    """What one computed shard batch shares: the request's spec as this shard computes it
    (``ScoreSpec.for_shard``) and the shard number. The scorer rides along (not compared), so
    a request keeps the version it was queued for across a reload."""

    spec: ScoreSpec
    shard: int
    scorer: ShardScorer = field(compare=False, hash=False, repr=False)

    @property
    def model(self) -> str:
        return self.spec.model


class ShardScorer:
    """The density engine of one shard of one version on ``device`` (and, on shard 0 of a
    model with a generator, its descriptor engine)."""

    def __init__(self, loaded: LoadedVersion, shard: LoadedShard, device: str = "cpu") -> None:
        manifest = loaded.manifest
        self.loaded = loaded
        self.number = shard.number
        self.start = shard.start
        self.count = int(shard.latents.shape[0])
        self.device = device
        self.engine: DensityScorer = scorer_of(manifest.kind).open_shard(manifest, shard, device)
        self.descriptor_engine: DescriptorEngine | None = None
        settings = manifest.descriptors
        if (shard.number == DESCRIPTOR_SHARD and settings is not None
                and manifest.generator is not None):
            self.descriptor_engine = DescriptorEngine(
                load_module(manifest.generator, loaded.path).to(device),
                manifest.latent_shape,
                settings.output_dim,
                m=settings.projection_rows,
                projection_seed=settings.projection_seed,
                delta_directions=settings.delta_directions,
                delta_radius=settings.delta_radius,
            )

    def paths(self) -> dict[str, int]:
        """Rows each certified ivf path scored on this shard since it was opened (empty for
        a flat index): the ``latentsieve_certified_rows`` gauge, wherever this shard runs."""
        return scorer_of(self.loaded.manifest.kind).paths(self.engine)

    def score(self, key: ShardKey, query: ShardQuery) -> ShardScores:
        """This shard's log-sums (and shard 0's descriptors) for a batch of latents."""
        spec = key.spec
        latents = np.asarray(query.latents, dtype=np.float32)
        index_space = latents if spec.space == "index" else self.loaded.to_index_space(latents)
        log_sum = np.empty(len(query), dtype=np.float64)
        bound = np.zeros(len(query), dtype=np.float64)
        certified = False
        local = None if query.exclude is None else query.exclude - self.start
        inside = (
            np.zeros(len(query), dtype=bool) if local is None
            else (local >= 0) & (local < self.count)
        )
        # The engine's log-sums as they are: rows leaving one of this shard's latents out sum
        # without it (the merge divides by N - 1).
        for rows, exclude in ((np.flatnonzero(~inside), None), (np.flatnonzero(inside), local)):
            if not rows.size:
                continue
            scored = self.engine.log_sum(index_space[rows], spec.sigma,
                                         None if exclude is None else exclude[rows],
                                         spec.max_error)
            log_sum[rows] = scored.log_sum
            if scored.error_bound is not None:
                bound[rows], certified = scored.error_bound, True
        descriptors: dict[str, np.ndarray] = {}
        if spec.descriptors:  # only ever on DESCRIPTOR_SHARD (ScoreSpec.for_shard)
            if self.descriptor_engine is None:
                raise ValueError(f"model {spec.model!r} shard {self.number} has no generator "
                                 "for descriptors")
            values = score_descriptors(self.descriptor_engine, latents)
            descriptors = {name: values[name] for name in spec.descriptors}
        return ShardScores(log_sum, descriptors, bound if certified else None)


def sum_paths(shards: Iterable[ShardScorer]) -> dict[str, int]:
    """Rows each certified ivf path scored, summed over ``shards``."""
    totals: dict[str, int] = {}
    for shard in shards:
        for path, count in shard.paths().items():
            totals[path] = totals.get(path, 0) + count
    return totals


def open_shards(loaded: LoadedVersion, device: str = "cpu") -> tuple[ShardScorer, ...]:
    """A scorer for every shard ``loaded`` opened, in shard order."""
    return tuple(ShardScorer(loaded, shard, device) for shard in loaded.shards)
