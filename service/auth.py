"""API keys: when configured, every route but /healthz and /readyz needs one."""

from __future__ import annotations

import hmac
import json
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def presented_key(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The key from ``Authorization: Bearer K`` or ``X-API-Key: K``, if any."""
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"x-api-key":
            return value.decode("latin-1").strip()
        if lowered == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def key_matches(presented: str, keys: Sequence[str]) -> bool:
    """Constant-time comparison against every configured key."""
    candidate = presented.encode()
    matched = False
    for key in keys:
        # Compare with every key, so timing does not reveal which one nearly matched.
        matched |= hmac.compare_digest(candidate, key.encode())
    return matched


class ApiKeyMiddleware:
    """Answer 401 ``{"detail": ...}`` before routing when the key is missing or wrong."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = tuple(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        presented = presented_key(scope["headers"])
        if presented is None:
            detail = "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
        elif not key_matches(presented, self.keys):
            detail = "wrong API key"
        else:
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
