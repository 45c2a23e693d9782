"""How LatentSieve's processes are configured: one pydantic-settings base for the gateway and the
scoring workers, read from ``LATENTSIEVE_*`` variables (docs/contract.md §4).

``ProcessSettings`` holds what both kinds of process read; the gateway's ``Settings``
(service/settings.py) and the scoring worker's ``WorkerOptions`` (below) extend it. A field
annotated with ``Option`` is also an option of ``latentsieve serve`` or ``latentsieve worker``:
latentsieve/cli.py generates those options from the fields (help from the description, the
default, the choices, the variable), so an option, its variable and its default never drift
apart. A value comes from the flag when one is given, else from the variable, else from the
field's default.

No torch here: ``latentsieve --help`` imports this module to build its options.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

log = logging.getLogger(__name__)

ENV_PREFIX = "LATENTSIEVE_"
DEVICE_HELP = "auto (CUDA when PyTorch sees it, else the CPU), cpu, cuda or cuda:I"


_Mark = TypeVar("_Mark")


@dataclass(frozen=True)
class Option:
    """Marks a settings field as a command-line option: ``--<flag>`` (default: the field's name
    in kebab case), ``shown`` as its default in ``--help`` where None means something else
    ("all"), and ``deprecated`` flags that still set it, each with a warning."""

    flag: str | None = None
    shown: str | None = None
    deprecated: tuple[str, ...] = ()

    def flag_of(self, field_name: str) -> str:
        """``--flag`` of the field ``field_name``."""
        return "--" + (self.flag or field_name.replace("_", "-"))


@dataclass(frozen=True)
class Variable:
    """Marks a field read from a variable other than ``LATENTSIEVE_<FIELD>``: ``name``, the one
    the documentation gives it, and ``deprecated`` names still read, each with a warning."""

    name: str | None = None
    deprecated: tuple[str, ...] = ()


def _marker(field: FieldInfo, kind: type[_Mark]) -> _Mark | None:
    return next((item for item in field.metadata if isinstance(item, kind)), None)


def option_of(field: FieldInfo) -> Option | None:
    """The field's ``Option`` mark; None when it is not a command-line option."""
    return _marker(field, Option)


def variables(model: type[BaseSettings], name: str) -> tuple[str, ...]:
    """The variables field ``name`` of ``model`` is read from, the first one set winning: its
    own (``LATENTSIEVE_<FIELD>`` unless ``Variable`` names another), then deprecated ones."""
    marked = _marker(model.model_fields[name], Variable) or Variable()
    return (marked.name or ENV_PREFIX + name.upper(), *marked.deprecated)


class _OtherVariables(PydanticBaseSettingsSource):
    """The fields marked ``Variable``, read from the names it gives, before pydantic-settings'
    own ``LATENTSIEVE_<FIELD>``; a value from a deprecated name is logged as a warning."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        names = variables(self.settings_cls, field_name)
        for variable in names:
            if variable in os.environ:
                if variable != names[0]:
                    log.warning("deprecated variable", extra={
                        "variable": variable, "instead": names[0]})
                return os.environ[variable], field_name, False
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            if _marker(field, Variable) is not None:
                value, _, _ = self.get_field_value(field, name)
                if value is not None:
                    found[name] = value
        return found


def _split(value: object) -> object:
    """``"a, b"`` (a flag's or a variable's form) -> ``("a", "b")``; blank -> None (all)."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    items = tuple(part.strip() for part in value.split(",") if part.strip())
    if not items:
        raise ValueError("names nothing")
    return items


class ProcessSettings(BaseSettings):
    """What the gateway and a scoring worker both read. Made once at start-up and passed on."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    store: Annotated[Path, Option()] = Field(description="the store folder")
    redis_url: Annotated[str | None, Option(flag="redis")] = Field(
        default=None, description="redis://... : the shared score cache and the scoring "
        "workers' streams")
    device: Annotated[str, Option()] = Field(default="auto", description=DEVICE_HELP)
    max_batch_size: Annotated[int, Option()] = Field(
        default=1024, ge=1, description="latents per computed batch")
    max_wait_ms: Annotated[float, Option()] = Field(
        default=2.0, ge=0, description="wait to fill a batch (ms)")
    float64_operand_bytes: Annotated[int, Option()] = Field(
        default=0, ge=0, description="bytes per process that exact engines may keep as float64 "
        "copies of their "
        "latents, N x (d + 2) x 8 each, made at the first query that needs float64 (fresh "
        "high-dimensional latents): 1.8x faster there; 0 = none")
    # Latents queued to be computed; past it a request is refused (429 at the gateway).
    queue_limit: int = Field(default=262_144, ge=1)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments (the command line's flags), then the variables: a field's own name as
        ``Variable`` gives it, then ``LATENTSIEVE_<FIELD>``."""
        return (init_settings, _OtherVariables(settings_cls), env_settings, dotenv_settings,
                file_secret_settings)

    @field_validator("redis_url")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("device")
    @classmethod
    def _device_named(cls, value: str) -> str:
        from latentsieve.workers.devices import DEVICE_PATTERN  # torch: not for --help

        if not DEVICE_PATTERN.fullmatch(value):
            raise ValueError("must be auto, cpu, cuda or cuda:I")
        return value

    def environment(self) -> dict[str, str]:
        """The variables from which the same class rebuilds these settings, each under its own
        name (unset optional fields are absent: the caller removes them from the environment
        it passes)."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            text = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
            env[variables(type(self), name)[0]] = text
        return env


class WorkerOptions(ProcessSettings):
    """How one scoring worker runs (``latentsieve worker``, docs/contract.md §4)."""

    model_config = SettingsConfigDict(frozen=True)

    redis_url: Annotated[str, Option(flag="redis")] = Field(
        description="redis://... shared with the gateways")
    models: Annotated[tuple[str, ...] | None, NoDecode, Option(shown="all")] = Field(
        default=None, description="comma-separated model names")
    shards: Annotated[tuple[int, ...] | None, NoDecode, Option(shown="all")] = Field(
        default=None, description="comma-separated shard numbers")
    metrics_port: Annotated[int | None, Option()] = Field(
        default=None, ge=0, le=65535, description="serve Prometheus /metrics on this port")
    metrics_host: Annotated[str, Option()] = Field(
        default="127.0.0.1", description="address /metrics listens on (0.0.0.0: every "
        "interface, e.g. in a container whose network is the boundary)")
    read_count: Annotated[int, Option()] = Field(
        default=64, ge=1, description="jobs read from Redis at once")
    claim_idle_ms: Annotated[int, Option()] = Field(
        default=10_000, ge=1, description="reclaim a job pending this long on another (dead) "
        "scoring worker")
    max_deliveries: Annotated[int, Option()] = Field(
        default=3, ge=1, description="deliveries before a job goes to the dead-letter stream")
    heartbeat_ttl_s: Annotated[
        float, Option(flag="heartbeat-ttl"), Variable("LATENTSIEVE_HEARTBEAT_TTL")
    ] = Field(default=3.0, gt=0, description="seconds a heartbeat counts as live")
    # How often the store is checked for new models and shards: the gateway's variable.
    refresh_interval_s: Annotated[float, Variable("LATENTSIEVE_RELOAD_INTERVAL_S")] = Field(
        default=2.0, gt=0)

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        return _split(value)

    @field_validator("shards", mode="before")
    @classmethod
    def _split_shards(cls, value: object) -> object:
        items = _split(value)
        if isinstance(items, tuple) and not all(str(item).isdigit() for item in items):
            raise ValueError("must be shard numbers like 0,1")
        return items

    @field_validator("device")
    @classmethod
    def _resolve_device(cls, value: str) -> str:
        """``auto`` -> ``cpu`` or ``cuda:0``, ``cuda`` -> ``cuda:0``: the device scores on."""
        from latentsieve.workers.devices import resolve_device

        return resolve_device(value)
