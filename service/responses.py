"""The gateway's JSON response: rendered by orjson, about 10x the standard library's speed."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import JSONResponse


class FastJSONResponse(JSONResponse):
    """Compact UTF-8 JSON; NumPy scalars and arrays are written as numbers and lists.

    Unlike ``json.dumps`` orjson writes a non-finite float as ``null`` instead of failing; every
    number the gateway returns is finite by construction (scores are log-space, percentiles in
    [0, 1]), and the response tests parse each body strictly.
    """

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
