"""The gateway's one error type and its one JSON shape: ``{"detail": "..."}`` (``ErrorResponse``).

Nothing here imports the request schemas (``service/schemas.py`` imports this module)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from latentsieve.redaction import redact
from latentsieve.service.responses import FastJSONResponse

log = logging.getLogger(__name__)


class ErrorResponse(BaseModel):
    """Every error answer: what was wrong and what is allowed."""

    detail: str


class ServiceError(Exception):
    """A request that cannot be served: HTTP status, a detail a person can act on, headers."""

    def __init__(
        self, status: int, detail: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})


ERROR_MEANINGS = {
    401: "missing or wrong API key (when keys are configured)",
    404: "unknown model",
    413: "body, batch or seed range over the configured limit",
    422: "malformed body, wrong dimension, NaN/Inf, bad sigma, unknown descriptor",
    429: "queue full; retry after Retry-After seconds",
    502: "a worker failed on the job, or it went to the dead-letter stream (--compute workers)",
    503: "not ready (starting, no loadable index, no live worker for a shard, Redis down)",
    504: "no result within the request timeout",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, all with the one error body."""
    return {
        status: {"model": ErrorResponse, "description": ERROR_MEANINGS[status]}
        for status in statuses
    }


def error_response(
    status: int, detail: str, headers: Mapping[str, str] | None = None
) -> FastJSONResponse:
    """The one error body (credentials in any URL it quotes redacted)."""
    return FastJSONResponse(
        ErrorResponse(detail=redact(detail)), status_code=status, headers=dict(headers or {})
    )


def describe_validation_errors(
    errors: Sequence[Any], allowed_fields: Sequence[str] | None = None, limit: int = 3
) -> str:
    """Pydantic errors -> one readable line per error: ``field: what was wrong``."""
    lines: list[str] = []
    for error in list(errors)[:limit]:
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden" and allowed_fields and len(loc) == 1:
            message += f" (allowed fields: {', '.join(allowed_fields)})"
        lines.append(f"{'.'.join(loc)}: {message}" if loc else message)
    if len(errors) > limit:
        lines.append(f"... and {len(errors) - limit} more")
    return "; ".join(lines) or "invalid request"


async def _service_error(request: Request, exc: Exception) -> FastJSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc.status, exc.detail, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> FastJSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, describe_validation_errors(exc.errors()))


async def _http_error(request: Request, exc: Exception) -> FastJSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> FastJSONResponse:
    # A bug must still answer in the one error shape, and leave a trace in the logs.
    log.exception("unhandled error", extra={"path": request.url.path})
    return error_response(500, "internal error; the server logged the cause")


def install_error_handlers(app: FastAPI) -> None:
    """Map every error the app can raise to ``{"detail": ...}``."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
