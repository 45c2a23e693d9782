"""The Redis Streams protocol between gateways and workers (docs/contract.md §4, ``--compute
workers``).

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

A job is input: :func:`read_job` decodes it and checks it against the stream it was read from
before it chooses anything. Its model and shard must be the stream's, its version a version
name (``check_version_name``: one path segment, never a path out of the store), its reply stream
``latentsieve:replies:`` and a gateway id (``GATEWAY_ID_PATTERN``: no other key is ever written),
its sigma, deadline, bound and descriptor names in range. A job that fails is acknowledged,
deleted and recorded (without its latents) in its stream's dead-letter stream, never computed.

Every reply stream a worker writes expires ``REPLY_TTL_S`` after its last reply (XADD and
PEXPIRE together): a gateway refreshes its own stream's expiry while it runs (every liveness
read), so only the stream of a gateway that is gone, or one deleted at its shutdown and
re-created by a late reply, runs out; neither outlives its last reply by more than that.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from latentsieve.workers.shard_scoring import ShardQuery, ShardScores
from latentsieve.workers.transport import ScoreSpec

GROUP = "latentsieve-workers"
REPLY_PREFIX = "latentsieve:replies:"
# A gateway process's id (service/stream_compute.py: 16 hex digits): one key segment.
GATEWAY_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Far past any reply's use (a request's deadline) and the gateway's refresh (every 0.5 s).
REPLY_TTL_S = 600
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
    """The reply stream of gateway process ``gateway``; ValueError for an id that is not one."""
    if not GATEWAY_ID_PATTERN.fullmatch(gateway):
        raise ValueError(f"invalid gateway id {gateway!r}: 1-64 letters, digits, '_' or '-'")
    return f"{REPLY_PREFIX}{gateway}"


def check_reply_stream(name: str) -> str:
    """``name`` if it is a gateway's reply stream (``latentsieve:replies:{gateway}``), the only
    keys a worker writes a reply to; else ValueError."""
    if not (name.startswith(REPLY_PREFIX)
            and GATEWAY_ID_PATTERN.fullmatch(name.removeprefix(REPLY_PREFIX))):
        raise ValueError(
            f"reply stream {name!r} is not {REPLY_PREFIX}{{gateway}} with a gateway id of 1-64 "
            "letters, digits, '_' or '-'"
        )
    return name


def parse_job_stream(name: str) -> tuple[str, int]:
    """``latentsieve:jobs:{model}:{shard}`` -> (model, shard)."""
    _, _, model, shard = name.split(":")
    return model, int(shard)


def _text(fields: Fields, name: str) -> str:
    return fields[name.encode()].decode()


@dataclass(frozen=True)
class Job:
    """One shard's part of one request: its spec as the shard computes it
    (``ScoreSpec.for_shard``) and its latents. ``deadline`` is Unix time in seconds: a worker
    that reads the job after it drops it instead of computing it.

    The wire fields are the job's own (``id``, ``reply``, ``deadline``, ``shard``, ``shape``,
    ``latents``, ``exclude``) and the spec's, generated from ``ScoreSpec`` (protocol v1)."""

    id: str
    reply: str
    deadline: float
    shard: int
    spec: ScoreSpec
    query: ShardQuery

    @property
    def model(self) -> str:
        return self.spec.model

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.deadline

    def to_fields(self) -> dict[str, bytes | str]:
        latents = np.ascontiguousarray(self.query.latents, dtype="<f4")
        fields: dict[str, bytes | str] = {
            "id": self.id,
            "reply": self.reply,
            "deadline": repr(self.deadline),
            "shard": str(self.shard),
            **self.spec.to_fields(),
            "shape": f"{latents.shape[0]},{latents.shape[1]}",
            "latents": latents.tobytes(),
        }
        if self.query.exclude is not None:
            fields["exclude"] = np.ascontiguousarray(self.query.exclude, dtype="<i8").tobytes()
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
        return cls(
            id=_text(fields, "id"),
            reply=_text(fields, "reply"),
            deadline=float(_text(fields, "deadline")),
            shard=int(_text(fields, "shard")),
            spec=ScoreSpec.from_fields(fields),
            query=ShardQuery(latents, exclude),
        )


def read_job(stream: str, fields: Fields) -> Job:
    """The job of one entry of ``stream``, checked before it chooses a path, a module or a
    key (see the module docstring); KeyError or ValueError naming what is wrong."""
    job = Job.from_fields(fields)
    model, shard = parse_job_stream(stream)
    if (job.model, job.shard) != (model, shard):
        raise ValueError(
            f"job for {job.model!r} shard {job.shard} read from {stream}, the stream of "
            f"{model!r} shard {shard}"
        )
    job.spec.check()
    check_reply_stream(job.reply)
    if not math.isfinite(job.deadline):
        raise ValueError(f"deadline {job.deadline!r} is not a time")
    return job


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
