"""The Redis Streams protocol between gateways and workers (CONTRACT §4, ``--compute workers``).

    latentsieve:jobs:{model}:{shard}      one stream per model shard, consumer group
                                          ``latentsieve-workers``: a job is one request's
                                          uncached latents for that shard
    latentsieve:replies:{gateway}         one stream per gateway process, read by one task
    latentsieve:dead:{model}:{shard}      jobs delivered more than ``max_deliveries`` times
    latentsieve:live:{model}:{shard}      sorted set: worker "id|device" -> heartbeat expiry
                                          (Redis server time, ms)

A worker reads several jobs at once, batches them, writes each result to its job's reply stream,
then XACKs and XDELs the job (at-least-once compute; the gateway keeps the first reply).
Arrays travel as raw little-endian bytes next to their shape.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from latentsieve.workers.shard_scoring import ShardQuery, ShardScores

GROUP = "latentsieve-workers"
Fields = dict[bytes, bytes]
ReplyStatus = Literal["ok", "error", "dead_letter"]


class WorkersUnavailable(Exception):
    """No live worker for a shard, or Redis unreachable: the caller answers 503 at once."""


class JobFailed(Exception):
    """A worker answered with an error, or the job went to the dead-letter stream (5xx)."""


def job_stream(model: str, shard: int) -> str:
    return f"latentsieve:jobs:{model}:{shard}"


def dead_letter_stream(model: str, shard: int) -> str:
    return f"latentsieve:dead:{model}:{shard}"


def live_key(model: str, shard: int) -> str:
    return f"latentsieve:live:{model}:{shard}"


def reply_stream(gateway: str) -> str:
    return f"latentsieve:replies:{gateway}"


def parse_job_stream(name: str) -> tuple[str, int]:
    """``latentsieve:jobs:{model}:{shard}`` -> (model, shard)."""
    _, _, model, shard = name.split(":")
    return model, int(shard)


def _text(fields: Fields, name: str) -> str:
    return fields[name.encode()].decode()


@dataclass(frozen=True)
class Job:
    """One shard's part of one request. ``deadline`` is Unix time in seconds: a worker that
    reads the job after it drops it instead of computing it."""

    id: str
    reply: str
    deadline: float
    model: str
    version: str
    shard: int
    sigma: float
    descriptors: tuple[str, ...]
    index_space: bool
    query: ShardQuery
    max_error: float | None = None  # certified ivf: the bound asked for (None: the index's)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.deadline

    def to_fields(self) -> dict[str, bytes | str]:
        latents = np.ascontiguousarray(self.query.latents, dtype="<f4")
        fields: dict[str, bytes | str] = {
            "id": self.id,
            "reply": self.reply,
            "deadline": repr(self.deadline),
            "model": self.model,
            "version": self.version,
            "shard": str(self.shard),
            "sigma": repr(self.sigma),
            "descriptors": ",".join(self.descriptors),
            "space": "index" if self.index_space else "raw",
            "shape": f"{latents.shape[0]},{latents.shape[1]}",
            "latents": latents.tobytes(),
        }
        if self.query.exclude is not None:
            fields["exclude"] = np.ascontiguousarray(self.query.exclude, dtype="<i8").tobytes()
        if self.max_error is not None:
            fields["max_error"] = repr(float(self.max_error))
        return fields

    @classmethod
    def from_fields(cls, fields: Fields) -> Job:
        """Decode a stream entry; KeyError or ValueError for a malformed one."""
        rows, dim = (int(part) for part in _text(fields, "shape").split(","))
        latents = np.frombuffer(fields[b"latents"], dtype="<f4").reshape(rows, dim)
        exclude = (
            np.frombuffer(fields[b"exclude"], dtype="<i8") if b"exclude" in fields else None
        )
        if exclude is not None and exclude.shape != (rows,):
            raise ValueError(f"exclude has {exclude.size} rows for {rows} latents")
        names = _text(fields, "descriptors")
        return cls(
            id=_text(fields, "id"),
            reply=_text(fields, "reply"),
            deadline=float(_text(fields, "deadline")),
            model=_text(fields, "model"),
            version=_text(fields, "version"),
            shard=int(_text(fields, "shard")),
            sigma=float(_text(fields, "sigma")),
            descriptors=tuple(names.split(",")) if names else (),
            index_space=_text(fields, "space") == "index",
            query=ShardQuery(latents, exclude),
            max_error=float(_text(fields, "max_error")) if b"max_error" in fields else None,
        )


@dataclass(frozen=True)
class Reply:
    """A worker's answer to one job: the shard's scores, or why there are none."""

    id: str
    shard: int
    status: ReplyStatus
    scores: ShardScores | None = None
    detail: str = ""

    def to_fields(self) -> dict[str, bytes | str]:
        fields: dict[str, bytes | str] = {
            "id": self.id, "shard": str(self.shard), "status": self.status, "detail": self.detail
        }
        if self.scores is not None:
            fields["log_sum"] = np.ascontiguousarray(self.scores.log_sum, dtype="<f8").tobytes()
            for name, values in self.scores.descriptors.items():
                fields[f"d:{name}"] = np.ascontiguousarray(values, dtype="<f8").tobytes()
            if self.scores.bound is not None:
                fields["bound"] = np.ascontiguousarray(self.scores.bound, dtype="<f8").tobytes()
        return fields

    @classmethod
    def from_fields(cls, fields: Fields) -> Reply:
        scores = None
        if b"log_sum" in fields:
            descriptors = {
                key[2:].decode(): np.frombuffer(value, dtype="<f8")
                for key, value in fields.items()
                if key.startswith(b"d:")
            }
            bound = np.frombuffer(fields[b"bound"], dtype="<f8") if b"bound" in fields else None
            scores = ShardScores(np.frombuffer(fields[b"log_sum"], dtype="<f8"), descriptors,
                                 bound)
        status = _text(fields, "status")
        if status not in ("ok", "error", "dead_letter"):
            raise ValueError(f"unknown reply status {status!r}")
        return cls(
            id=_text(fields, "id"),
            shard=int(_text(fields, "shard")),
            status=status,  # type: ignore[arg-type]
            scores=scores,
            detail=_text(fields, "detail"),
        )


def stopping(error: BaseException | None = None) -> None:
    """Raise CancelledError when this task was asked to stop: a cancellation that reached a
    Redis call can come back as a connection error, or not at all (seen with redis-py 8 in a
    claim loop), and a loop that retries Redis must still stop when its task is cancelled."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError() from error
