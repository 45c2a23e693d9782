"""One shard's part of eq. (1) (docs/contract.md §4); the merge is
:mod:`latentsieve.workers.log_sums`.

A version split into K row-disjoint shards scores a latent as

    log_density(z) = logsumexp_k( log_sum_k(z) ) - log N,
    log_sum_k(z)   = log sum_{i in shard k} exp( -||z - z_i||^2 / (2 sigma^2) )

so each shard (in process or on a worker) returns its log-sum (with its certified bound for an
ivf version) and the caller merges them.
The types here are the batches the batcher combines and splits: ``ShardQuery`` in,
``ShardScores`` out, both concatenating and slicing along the batch axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Self

import numpy as np

from latentsieve.index.manifest import DEFAULT_MAX_ERROR
from latentsieve.index.store import LoadedShard, LoadedVersion
from latentsieve.workers.approximate import open_density
from latentsieve.workers.calibration import score_descriptors
from latentsieve.workers.density import DensityScorer
from latentsieve.workers.descriptors import DescriptorEngine
from latentsieve.workers.log_sums import NO_ROW
from latentsieve.workers.modules import load_module


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

    @classmethod
    def concat(cls, parts: Sequence[ShardScores]) -> Self:
        """One result of all ``parts``, in order (the batcher splits results; it never joins
        them, so this is the protocol's other half, kept for symmetry and tested)."""
        names = parts[0].descriptors
        bounds = None
        if any(part.bound is not None for part in parts):
            bounds = np.concatenate([
                np.zeros(len(part)) if part.bound is None else part.bound for part in parts
            ])
        return cls(
            np.concatenate([part.log_sum for part in parts]),
            {name: np.concatenate([part.descriptors[name] for part in parts]) for name in names},
            bounds,
        )


@dataclass(frozen=True)
class ShardKey:
    """What one computed shard batch shares; the scorer rides along (not compared), so a
    request keeps the version it was queued for across a reload."""

    model: str
    version: str
    shard: int
    sigma: float
    descriptors: tuple[str, ...]
    index_space: bool  # True: the latents are already projected (leave-one-out rows)
    scorer: ShardScorer = field(compare=False, hash=False, repr=False)
    max_error: float | None = None  # certified ivf: the bound asked for (None: the index's)


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
        certified = manifest.certified
        self.engine: DensityScorer = open_density(
            shard.latents, shard.lists, device,
            certified.max_error if certified is not None else DEFAULT_MAX_ERROR, shard.operand,
        )
        self.descriptor_engine: DescriptorEngine | None = None
        settings = manifest.descriptors
        if shard.number == 0 and settings is not None and manifest.generator is not None:
            self.descriptor_engine = DescriptorEngine(
                load_module(manifest.generator, loaded.path).to(device),
                manifest.latent_shape,
                settings.output_dim,
                m=settings.projection_rows,
                projection_seed=settings.projection_seed,
                delta_directions=settings.delta_directions,
                delta_radius=settings.delta_radius,
            )

    def score(self, key: ShardKey, query: ShardQuery) -> ShardScores:
        """This shard's log-sums (and shard 0's descriptors) for a batch of latents."""
        latents = np.asarray(query.latents, dtype=np.float32)
        index_space = latents if key.index_space else self.loaded.to_index_space(latents)
        log_sum = np.empty(len(query), dtype=np.float64)
        bound = np.zeros(len(query), dtype=np.float64)
        certified = False
        local = None if query.exclude is None else query.exclude - self.start
        inside = (
            np.zeros(len(query), dtype=bool) if local is None
            else (local >= 0) & (local < self.count)
        )
        plain = np.flatnonzero(~inside)
        if plain.size:
            scored = self.engine.log_density(index_space[plain], key.sigma,
                                             max_error=key.max_error)
            log_sum[plain] = scored.log_density + math.log(self.count)
            if scored.error_bound is not None:
                bound[plain], certified = scored.error_bound, True
        if inside.any():
            assert local is not None
            rows = np.flatnonzero(inside)
            scored = self.engine.log_density(
                index_space[rows], key.sigma, exclude=local[rows], max_error=key.max_error
            )
            log_sum[rows] = scored.log_density + math.log(self.count - 1)
            if scored.error_bound is not None:
                bound[rows], certified = scored.error_bound, True
        descriptors: dict[str, np.ndarray] = {}
        if key.descriptors and self.number == 0:
            if self.descriptor_engine is None:
                raise ValueError(f"model {key.model!r} has no generator for descriptors")
            values = score_descriptors(self.descriptor_engine, latents)
            descriptors = {name: values[name] for name in key.descriptors}
        return ShardScores(log_sum, descriptors, bound if certified else None)


def open_shards(loaded: LoadedVersion, device: str = "cpu") -> tuple[ShardScorer, ...]:
    """A scorer for every shard ``loaded`` opened, in shard order."""
    return tuple(ShardScorer(loaded, shard, device) for shard in loaded.shards)
