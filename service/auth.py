"""API keys: when configured, every route but /healthz and /readyz needs one."""

from __future__ import annotations

import hmac
import json
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def presented_keys(headers: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
    """Every key offered by ``Authorization: Bearer K`` or ``X-API-Key: K``, as raw bytes
    (keys are compared as UTF-8 bytes, so non-ASCII keys work)."""
    found: list[bytes] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"x-api-key" and value.strip():
            found.append(value.strip())
        elif lowered == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                found.append(token.strip())
    return found


def key_matches(presented: Sequence[bytes], keys: Sequence[str]) -> bool:
    """Constant-time comparison of every offered key against every configured key."""
    matched = False
    for candidate in presented:
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
        presented = presented_keys(scope["headers"])
        if not presented:
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
