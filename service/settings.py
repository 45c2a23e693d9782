"""The gateway's one configuration object, read once from ``LATENTSIEVE_*`` variables; the
fields marked ``Option`` are also ``latentsieve serve``'s options (workers/settings.py)."""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from latentsieve.workers.settings import Option, ProcessSettings, Variable

MIB = 1024 * 1024


class Settings(ProcessSettings):
    """Limits, timeouts and locations of one gateway process; passed to ``create_app``."""

    host: Annotated[str, Option()] = Field(
        default="127.0.0.1", description="address to listen on")
    port: Annotated[int, Option()] = Field(
        default=8000, ge=0, le=65535, description="port to listen on")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_body_bytes: int = Field(default=64 * MIB, ge=1)
    max_batch: int = Field(default=4096, ge=1)
    max_json_depth: int = Field(default=32, ge=2, le=1024)  # 1024: the JSON parser's own cap
    # Latents one model may have queued: one busy model cannot take the whole queue.
    model_queue_limit: int = Field(default=65_536, ge=1)
    request_timeout_s: float = Field(default=30.0, gt=0)
    # At SIGTERM/SIGINT (service/drain.py): serve on with ``Connection: close`` and a 503
    # /readyz for the linger, then give requests in flight up to the timeout before a JSON 503.
    drain_linger_s: float = Field(default=0.5, ge=0)
    drain_timeout_s: float = Field(default=8.0, ge=0)
    reload_interval_s: float = Field(default=2.0, gt=0)
    cache_bytes: int = Field(default=64 * MIB, ge=0)
    cache_ttl_s: float = Field(default=3600.0, ge=0)
    select_max_count: int = Field(default=100_000, ge=1)
    # docs/service.md, "Bounded work".
    allow_request_sigma: Annotated[bool, Option()] = Field(
        default=True, description="take a request's own sigma (off: a sigma other than the "
        "index's is 422, and no request makes the service rescore a calibration set)")
    # uvicorn's processes sharing the port (service/main.py); --workers and LATENTSIEVE_WORKERS
    # are their old names (docs/contract.md, migration notes).
    processes: Annotated[
        int, Option(deprecated=("workers",)), Variable(deprecated=("LATENTSIEVE_WORKERS",))
    ] = Field(default=1, ge=1, le=64, description="gateway processes sharing the port "
              "(docs/service.md, 'Gateway processes')")
    compute: Annotated[Literal["embedded", "workers"], Option()] = Field(
        default="embedded", description="embedded: score in this process; workers: send "
        "uncached batches to scoring workers ('latentsieve worker') over Redis Streams (needs "
        "--redis)")
    # ``device`` (ProcessSettings): auto | cpu | cuda | cuda:I, resolved once at start-up when
    # this process scores (embedded compute).
    opentelemetry: bool = False
    # One JSON line per request on the latentsieve.access logger (service/access.py).
    access_log: bool = True
    # Bounds (nats) of latentsieve_score_log_density; None derives them from the store at
    # start-up. ``serve --processes N`` fixes them in the parent so that every gateway process,
    # replacements included, writes the same buckets.
    log_density_buckets: Annotated[list[float] | None, NoDecode] = None

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        """``"k1,k2"`` (the environment form) -> ``["k1", "k2"]``; blanks are dropped."""
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("log_density_buckets", mode="before")
    @classmethod
    def _split_bounds(cls, value: object) -> object:
        """``"-40.5,-30,-20"`` (the environment form) -> floats."""
        if isinstance(value, str):
            return [float(bound) for bound in value.split(",") if bound.strip()]
        return value

    @model_validator(mode="after")
    def _workers_need_redis(self) -> Self:
        if self.compute == "workers" and not self.redis_url:
            raise ValueError("--compute workers needs --redis URL (LATENTSIEVE_REDIS_URL)")
        return self
