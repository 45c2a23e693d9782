"""Request bodies the hot routes read themselves: size limits, then JSON parsing (413/422)."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import ClientDisconnect, Request

from latentsieve.service.errors import ServiceError
from latentsieve.service.schemas import parse_json
from latentsieve.service.settings import Settings

# Large bodies are parsed in a worker thread so one upload does not stall every request.
THREADED_PARSE_BYTES = 1 << 20


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused with 413 past ``max_bytes`` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ServiceError(
            413, f"the body is {int(declared)} bytes; at most {max_bytes} are allowed"
        )
    chunks: list[bytes] = []
    size = 0
    while True:  # the ASGI messages themselves: Request.stream() adds a generator per request
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise ServiceError(413, f"the body is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_json(request: Request, settings: Settings) -> Any:
    """Body -> parsed JSON under the size, depth and finite-number rules (413/422)."""
    raw = await read_body(request, settings.max_body_bytes)
    if len(raw) > THREADED_PARSE_BYTES:
        return await asyncio.to_thread(parse_json, raw, settings.max_json_depth)
    return parse_json(raw, settings.max_json_depth)


def json_body(model: type[Any]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` for a route that parses its JSON body itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }
    }
