"""What every compute transport shares, free of any one transport (docs/contract.md §4).

- ``ScoreSpec``: the one frozen description of a computation (model, version, sigma,
  descriptors, space, max_error). The engine builds it once per request; batch keys
  (``ShardKey``), the Redis wire form (``Job``) and the cache key are derived from it, so a new
  field is this class, the HTTP schema, and the code that uses it.
- ``Work`` / ``Computed`` / ``merge``: one request's uncached latents for every shard of a
  version, and the merged result (eq. 1: the merge is the only place that divides by N).
- ``QueueLimits``: the queue limits, enforced by every transport through one method.
- ``Compute``: the protocol the engine talks to (in process: ``LocalCompute``; Redis workers:
  ``service.stream_compute.StreamCompute``), including what ``/models`` and ``/readyz`` show,
  so no caller needs to know which one it holds.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args, get_origin

import numpy as np

from latentsieve.index.errors import StoreError
from latentsieve.index.manifest import (
    DESCRIPTOR_NAMES,
    check_model_name,
    check_sigma,
    check_version_name,
)
from latentsieve.workers.batcher import QueueFull
from latentsieve.workers.log_sums import merge_intervals, merge_log_sums

if TYPE_CHECKING:
    from latentsieve.workers.shard_scoring import ShardQuery, ShardScorer, ShardScores

Space = Literal["raw", "index"]
# The shard that holds a version's generator and computes its descriptors (the others return
# log-sums only; the merge takes the descriptors from it).
DESCRIPTOR_SHARD = 0


@dataclass(frozen=True)
class ScoreSpec:
    """What every latent of one computation shares; everything that changes a score.

    ``space`` is ``"index"`` when the latents are already in the index's space (leave-one-out
    calibration rows), ``"raw"`` as sent. ``max_error`` is the bound (nats) a certified ivf
    version scores to (None: the index's own, and always None for exact kinds, so their batches
    and cache entries stay shared). ``descriptors`` is a set: stored sorted and unique.

    The wire form (``to_fields``/``from_fields``) and the cache key are generated from the
    fields: a str as is, a float by ``repr`` (exact: 1.0 and 1.0000000001 differ), a tuple
    comma-joined, None left out. The wire names and texts are those of protocol v1.
    """

    model: str
    version: str
    sigma: float
    descriptors: tuple[str, ...] = ()
    space: Space = "raw"
    max_error: float | None = None

    def __post_init__(self) -> None:
        # One value, one encoding: an int sigma is the same bandwidth as its float.
        object.__setattr__(self, "sigma", float(self.sigma))
        if self.max_error is not None:
            object.__setattr__(self, "max_error", float(self.max_error))
        object.__setattr__(self, "descriptors", tuple(sorted(set(self.descriptors))))

    def for_shard(self, shard: int) -> ScoreSpec:
        """The spec shard ``shard`` computes: descriptors come from ``DESCRIPTOR_SHARD``
        only (it alone holds the generator; the merge takes them from there)."""
        if shard == DESCRIPTOR_SHARD or not self.descriptors:
            return self
        return dataclasses.replace(self, descriptors=())

    def check(self) -> ScoreSpec:
        """``self`` when every field is in range (a spec read off the wire); else ValueError
        naming the field. The gateway's HTTP schema checks the same ranges on the way in."""
        try:
            check_model_name(self.model)
            check_version_name(self.version)
        except StoreError as exc:
            raise ValueError(str(exc)) from exc
        check_sigma(self.sigma)
        unknown = sorted(set(self.descriptors) - set(DESCRIPTOR_NAMES))
        if unknown:
            raise ValueError(
                f"unknown descriptors {unknown}; known: {', '.join(DESCRIPTOR_NAMES)}"
            )
        if self.space not in get_args(Space):
            raise ValueError(f"space {self.space!r} is not one of {get_args(Space)}")
        if self.max_error is not None and not (
            math.isfinite(self.max_error) and self.max_error >= 0
        ):
            raise ValueError(f"max_error {self.max_error!r} is not a bound in nats >= 0")
        return self

    def to_fields(self) -> dict[str, str]:
        """The spec as wire fields (name -> text); None fields are absent."""
        return {
            item.name: _encode(value)
            for item in dataclasses.fields(self)
            if (value := getattr(self, item.name)) is not None
        }

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> ScoreSpec:
        """The spec of wire fields (``to_fields`` encoded to bytes); KeyError for a missing
        required field, ValueError for a malformed one."""
        hints = _field_types(cls)
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            raw = fields.get(item.name.encode())
            if raw is None:
                if item.default is dataclasses.MISSING:
                    raise KeyError(item.name)
                continue
            values[item.name] = _decode(hints[item.name], raw.decode())
        return cls(**values)

    def key_bytes(self) -> bytes:
        """Every field for the cache key, each name and value length-prefixed (a tuple's
        items each, after their count): no two different specs share an encoding, and a new
        field reaches the key by being a field."""
        parts: list[bytes] = []
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            parts.append(_length_prefixed(item.name.encode()))
            if isinstance(value, tuple):
                parts.append(len(value).to_bytes(8, "big"))
                parts.extend(_length_prefixed(str(part).encode()) for part in value)
            else:
                parts.append(_length_prefixed(b"" if value is None else _encode(value).encode()))
        return b"".join(parts)


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints`` of a spec class, resolved once per class: it evaluates every
    annotation string again on each call, and ``from_fields`` runs once per job."""
    found = _FIELD_TYPES.get(cls)
    if found is None:
        found = _FIELD_TYPES[cls] = typing.get_type_hints(cls)
    return found


def _length_prefixed(part: bytes) -> bytes:
    return len(part).to_bytes(8, "big") + part


def _encode(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _decode(hint: Any, text: str) -> Any:
    """Wire text -> a value of type ``hint`` (str, float, int, Literal, tuple[str, ...] and
    ``X | None``)."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        (inner,) = (arg for arg in get_args(hint) if arg is not type(None))
        return _decode(inner, text)
    if origin is Literal:
        if text not in get_args(hint):
            raise ValueError(f"{text!r} is not one of {get_args(hint)}")
        return text
    if origin is tuple:
        return tuple(text.split(",")) if text else ()
    if hint is float:
        return float(text)
    if hint is int:
        return int(text)
    return text


@dataclass(frozen=True)
class Work:
    """One request's uncached latents for every shard of one version, under one spec.

    ``n`` and ``shards`` are the version's (a request in flight keeps its version's layout);
    ``scorers`` are this process's scorers of it (in process), empty in front of workers."""

    spec: ScoreSpec
    query: ShardQuery
    n: int  # training latents of the version, all shards together
    shards: int = 1
    scorers: tuple[ShardScorer, ...] = field(default=(), compare=False, repr=False)

    @property
    def model(self) -> str:
        return self.spec.model


@dataclass(frozen=True)
class Computed:
    """Merged scores of a ``Work``: log densities (n,) nats (eq. 1), descriptors, and for a
    certified ivf index each score's bound (n,) nats (None: exact)."""

    log_density: np.ndarray
    descriptors: dict[str, np.ndarray]
    error_bound: np.ndarray | None = None


def merge(work: Work, parts: Sequence[ShardScores]) -> Computed:
    """Shard results in shard order -> the version's scores (docs/contract.md §4): log-sums
    merged and divided by N here only; descriptors from ``DESCRIPTOR_SHARD``;
    certified parts merge as intervals (the ends of each part's interval merged alike)."""
    exclude = work.query.exclude
    if all(part.bound is None for part in parts):
        log_density = merge_log_sums([part.log_sum for part in parts], exclude, work.n)
        return Computed(log_density, dict(parts[DESCRIPTOR_SHARD].descriptors))
    estimate, half_width = merge_intervals(
        [part.log_sum for part in parts], [part.bound for part in parts], exclude, work.n
    )
    return Computed(estimate, dict(parts[DESCRIPTOR_SHARD].descriptors), half_width)


@dataclass(frozen=True)
class QueueLimits:
    """Latents a transport may hold queued: ``total`` over all models, ``per_model`` for each
    (one busy model cannot take the whole queue). The transport says what it counts: latents
    per shard queued in process, latents per request sent to workers."""

    total: int
    per_model: int

    @property
    def largest(self) -> int:
        """The most latents one request can ever queue: more is a 413, not a 429."""
        return min(self.total, self.per_model)

    def check(self, queued: Mapping[str, int], model: str, rows: int) -> None:
        """QueueFull when ``rows`` more latents of ``model`` would pass either limit, given
        the latents ``queued`` per model now."""
        mine = queued.get(model, 0)
        if mine + rows > self.per_model:
            raise QueueFull(
                f"{mine} latents queued for {model}, {rows} more would pass its limit of "
                f"{self.per_model}"
            )
        total = sum(queued.values())
        if total + rows > self.total:
            raise QueueFull(
                f"{total} latents queued, {rows} more would pass the limit of {self.total}"
            )


class Compute(Protocol):
    """A transport that scores a ``Work`` on every shard and merges the parts.

    ``compute`` raises QueueFull (429), ``WorkersUnavailable`` (503) or ``JobFailed`` (502)
    from workers/streams.py; the engine maps them to statuses."""

    mode: str  # what /models shows: "embedded" or "workers"
    limits: QueueLimits

    async def start(self) -> None: ...

    async def compute(self, work: Work, deadline: float) -> Computed: ...

    def queued_by_model(self) -> dict[str, int]: ...

    def describe(self, model: str, shards: int) -> dict[str, Any]:
        """Where ``model``'s scores are computed (the ``compute`` block of ``/models``)."""
        ...

    def missing(self) -> list[str]:
        """What keeps the served models from being scored now (empty: nothing; ``/readyz``)."""
        ...

    def live_workers(self) -> dict[tuple[str, int], list[str]] | None:
        """(model, shard) -> devices of its live remote workers; None when nothing computes
        remotely (no ``latentsieve_live_workers`` series then)."""
        ...

    async def stop(self) -> None: ...
