"""A typed Python client for the LatentSieve HTTP API (docs/contract.md §3), sync and async.

    with LatentSieveClient("http://127.0.0.1:8000") as client:
        best = client.select("digits-vae", start=0, count=1000, keep=16)
        print([result.seed for result in best.results])

    async with AsyncLatentSieveClient("http://127.0.0.1:8000") as client:
        scored = await client.score("digits-vae", latents=np.zeros((4, 8), np.float32))

Latents go over the wire in the compact base64 form ``{"dtype": "float32", "shape": [n, ...],
"data": ...}`` (little-endian float32), several times smaller and faster to parse than nested
JSON lists. A non-2xx answer raises ``LatentSieveError(status, detail)``; transport failures
(connection refused, timeouts) raise httpx's own ``httpx.TransportError`` subclasses.

This module only needs httpx, NumPy and pydantic: it imports nothing from the server side.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx
import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

DEFAULT_TIMEOUT_S = 30.0
API_KEY_HEADER = "X-API-Key"


class LatentSieveError(Exception):
    """The service answered with a non-2xx status; ``detail`` says what was wrong."""

    def __init__(self, status: int, detail: Any, retry_after_s: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.retry_after_s = retry_after_s


class _Answer(BaseModel):
    # Fields added by a newer server are ignored, so an older client keeps working.
    model_config = ConfigDict(extra="ignore", frozen=True)


class ScoreResult(_Answer):
    """One latent's score (``log_density`` in nats, ``percentile`` in [0, 1]) and verdict."""

    log_density: float
    percentile: float
    accept: bool
    reasons: list[str] = []
    seed: int | None = None
    index: int | None = None  # position in a posted batch (``select`` over latents)
    descriptors: dict[str, float] | None = None
    error_bound: float | None = 0.0
    cached: bool = False


class ScoreResponse(_Answer):
    """A ``/score`` or ``/select`` answer; ``accepted`` holds seeds or batch positions."""

    model: str
    index_version: str
    sigma: float
    exact: bool
    results: list[ScoreResult]
    accepted: list[int]


class ModelInfo(_Answer):
    """One served model as ``GET /models`` lists it (``n`` training latents of dimension ``d``)."""

    name: str
    index_version: str
    d: int
    n: int = Field(validation_alias=AliasChoices("N", "n"))
    sigma: float
    kind: str
    exact: bool
    sampler: str | None = None
    descriptors: bool = False
    policy: dict[str, Any] = {}
    latent_shape: list[int] = []
    # source (sampler | leave_one_out | latents), count, sigma, and for latents their file
    calibration: dict[str, Any] = {}


def encode_latents(latents: np.ndarray) -> dict[str, Any]:
    """(n, ...) array -> ``{"dtype": "float32", "shape": [n, ...], "data": base64}``.

    The first axis is the batch; values are sent as little-endian float32 (the index's
    precision), so float64 input is rounded here exactly as the server would round it.
    """
    array = np.asarray(latents)
    if array.ndim < 2:
        raise ValueError(
            f"latents must have a batch axis first, shape (n, ...); got shape {array.shape} "
            "(use latents[None] for a single latent)"
        )
    little = np.ascontiguousarray(array, dtype="<f4")
    return {
        "dtype": "float32",
        "shape": [int(size) for size in little.shape],
        "data": base64.b64encode(little.tobytes()).decode("ascii"),
    }


@dataclass(frozen=True)
class _Call:
    """One HTTP request, built once and sent by either client."""

    method: str
    path: str
    body: dict[str, Any] | None = None


def _score_call(
    model: str,
    latents: np.ndarray | None,
    seeds: Sequence[int] | None,
    sigma: float | None,
    policy: dict[str, Any] | None,
    descriptors: Sequence[str] | None,
) -> _Call:
    if (latents is None) == (seeds is None):
        raise ValueError("pass exactly one of latents or seeds")
    body: dict[str, Any] = {"model": model}
    if latents is not None:
        body["latents"] = encode_latents(latents)
    else:
        body["seeds"] = [int(seed) for seed in seeds or ()]
    if sigma is not None:
        body["sigma"] = float(sigma)
    if policy is not None:
        body["policy"] = dict(policy)
    if descriptors is not None:
        body["descriptors"] = list(descriptors)
    return _Call("POST", "/score", body)


def _select_call(
    model: str,
    start: int | None,
    count: int | None,
    keep: int | None,
    min_distance: float | None,
    sigma: float | None,
    latents: np.ndarray | None = None,
) -> _Call:
    if keep is None:
        raise ValueError("pass keep, the number of seeds or latents to keep")
    body: dict[str, Any] = {"model": model, "keep": int(keep)}
    if latents is not None:
        if count is not None or start is not None:
            raise ValueError("pass a seed range (start, count) or latents, not both")
        body["latents"] = encode_latents(latents)
    elif count is None:
        raise ValueError("pass count (seeds start .. start + count - 1) or latents")
    else:
        body.update({"start": int(start or 0), "count": int(count)})
    if min_distance is not None:
        body["min_distance"] = float(min_distance)
    if sigma is not None:
        body["sigma"] = float(sigma)
    return _Call("POST", "/select", body)


_MODELS = _Call("GET", "/models")
_READY = _Call("GET", "/readyz")


def _payload(response: httpx.Response) -> Any:
    """The JSON body of a 2xx answer; anything else raises ``LatentSieveError``."""
    if response.is_success:
        return response.json()
    try:
        detail: Any = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text or response.reason_phrase
    retry_after = response.headers.get("Retry-After")
    try:
        retry_after_s = float(retry_after) if retry_after is not None else None
    except ValueError:
        retry_after_s = None
    raise LatentSieveError(response.status_code, detail, retry_after_s)


def _models(payload: Any) -> list[ModelInfo]:
    return [ModelInfo.model_validate(entry) for entry in payload["models"]]


def _headers(api_key: str | None) -> dict[str, str]:
    return {API_KEY_HEADER: api_key} if api_key else {}


class LatentSieveClient:
    """Blocking client; use as a context manager or call ``close()``. Timeouts in seconds."""

    def __init__(
        self, base_url: str = "", api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S, *, transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``transport``: httpx's, e.g. ``httpx.WSGITransport`` or a mounted proxy."""
        self._http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout,
                                  transport=transport)

    def _send(self, call: _Call) -> Any:
        return _payload(self._http.request(call.method, call.path, json=call.body))

    def score(
        self,
        model: str,
        latents: np.ndarray | None = None,
        seeds: Sequence[int] | None = None,
        sigma: float | None = None,
        policy: dict[str, Any] | None = None,
        descriptors: Sequence[str] | None = None,
    ) -> ScoreResponse:
        """Score latents (n, ...) or the latents the model's sampler draws for ``seeds``."""
        call = _score_call(model, latents, seeds, sigma, policy, descriptors)
        return ScoreResponse.model_validate(self._send(call))

    def select(
        self,
        model: str,
        start: int | None = None,
        count: int | None = None,
        keep: int | None = None,
        min_distance: float | None = None,
        sigma: float | None = None,
        *,
        latents: np.ndarray | None = None,
    ) -> ScoreResponse:
        """The ``keep`` best seeds of ``start .. start + count - 1``, or of ``latents``
        (n, ...) (each result's ``index`` is its row), best first."""
        call = _select_call(model, start, count, keep, min_distance, sigma, latents)
        return ScoreResponse.model_validate(self._send(call))

    def models(self) -> list[ModelInfo]:
        """Every served model."""
        return _models(self._send(_MODELS))

    def ready(self) -> bool:
        """Whether ``/readyz`` answers 200 (indexes loaded)."""
        return self._http.request(_READY.method, _READY.path).is_success

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncLatentSieveClient:
    """The asyncio twin of ``LatentSieveClient``: same methods, awaited."""

    def __init__(
        self, base_url: str = "", api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S, *, transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``transport``: httpx's, e.g. ``httpx.ASGITransport(app)`` to call an app in
        process (its lifespan entered by the caller)."""
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    async def _send(self, call: _Call) -> Any:
        return _payload(await self._http.request(call.method, call.path, json=call.body))

    async def score(
        self,
        model: str,
        latents: np.ndarray | None = None,
        seeds: Sequence[int] | None = None,
        sigma: float | None = None,
        policy: dict[str, Any] | None = None,
        descriptors: Sequence[str] | None = None,
    ) -> ScoreResponse:
        """Score latents (n, ...) or the latents the model's sampler draws for ``seeds``."""
        call = _score_call(model, latents, seeds, sigma, policy, descriptors)
        return ScoreResponse.model_validate(await self._send(call))

    async def select(
        self,
        model: str,
        start: int | None = None,
        count: int | None = None,
        keep: int | None = None,
        min_distance: float | None = None,
        sigma: float | None = None,
        *,
        latents: np.ndarray | None = None,
    ) -> ScoreResponse:
        """As ``LatentSieveClient.select``."""
        call = _select_call(model, start, count, keep, min_distance, sigma, latents)
        return ScoreResponse.model_validate(await self._send(call))

    async def models(self) -> list[ModelInfo]:
        """Every served model."""
        return _models(await self._send(_MODELS))

    async def ready(self) -> bool:
        """Whether ``/readyz`` answers 200 (indexes loaded)."""
        return (await self._http.request(_READY.method, _READY.path)).is_success

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
