"""Per-request observation: latency metrics, a request id and one JSON access-log line.

One ASGI middleware wraps every route (the direct ones included) and does all three with one
timer and one ``send`` wrapper:

- ``latentsieve_request_duration_seconds{route, status}`` (docs/contract.md §6);
- the request id: the caller's ``X-Request-ID`` when it is a sane token (1-128 characters of
  ``A-Za-z0-9._:-``), else a fresh random one; echoed as ``X-Request-ID`` on every response,
  errors included, so a caller can quote it and an operator can find the log line;
- one ``latentsieve.access`` log line (``logs.JsonFormatter``: method, path, status,
  duration_ms, request_id, client) when ``Settings.access_log`` is on (the default).

A client that disconnects before its body has arrived is nobody's error: it is logged and
counted with status ``499`` (nginx's "client closed request"), without a traceback, and kept
out of the 5xx that the server-error alert watches.
"""

from __future__ import annotations

import logging
import re
import secrets
import time

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from latentsieve.service.runtime import Runtime

CLIENT_CLOSED = 499
ROUTES = frozenset({"/score", "/select", "/models", "/healthz", "/readyz", "/metrics"})
REQUEST_ID_HEADER = b"x-request-id"
_SANE_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")

access_log = logging.getLogger("latentsieve.access")


def request_id(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The caller's ``X-Request-ID`` when it is a sane token, else 16 random hex digits."""
    for name, value in headers:
        if name.lower() == REQUEST_ID_HEADER and _SANE_ID.fullmatch(value):
            return value
    return secrets.token_hex(8).encode()


class RequestObserver:
    """Time, label, identify and log every HTTP request (see the module docstring)."""

    def __init__(self, app: ASGIApp, log_requests: bool = True) -> None:
        self.app = app
        self.log_requests = log_requests
        if log_requests and access_log.level == logging.NOTSET:
            # Access lines are INFO records, kept at any --log-level; LATENTSIEVE_ACCESS_LOG
            # =false turns them off.
            access_log.setLevel(logging.INFO)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = request_id(scope["headers"])
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", ()), (REQUEST_ID_HEADER, rid)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            status = CLIENT_CLOSED  # nothing to answer: the client is gone
        finally:
            seconds = time.perf_counter() - started
            runtime = getattr(scope["app"].state, "runtime", None) if "app" in scope else None
            if isinstance(runtime, Runtime):
                # Unknown paths share one label so scanners cannot blow up the series count.
                route = scope["path"] if scope["path"] in ROUTES else "other"
                runtime.metrics.observe_request(route, status, seconds)
            if self.log_requests:
                client = scope.get("client")
                access_log.info("request", extra={
                    "method": scope["method"], "path": scope["path"], "status": status,
                    "duration_ms": round(seconds * 1000, 3), "request_id": rid.decode(),
                    "client": f"{client[0]}:{client[1]}" if client else None,
                })
