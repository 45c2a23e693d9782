"""Every bad request gets its exact status and an actionable ``detail``, the next valid
request still works, and the store on disk is untouched."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from latentsieve.service.settings import Settings

pytestmark = pytest.mark.anyio
MODEL = "digits-vae"
GOOD = {"model": MODEL, "latents": [[0.1] * 8]}


def b64(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode()


def raw(text: str) -> bytes:
    return text.encode()


# (name, body: dict -> sent as JSON | bytes -> sent verbatim, path, status)
CASES: list[tuple[str, Any, str, int]] = [
    ("malformed json", raw('{"model": "digits-vae", "latents": [[1, 2'), "/score", 422),
    ("not an object", raw("[1, 2, 3]"), "/score", 422),
    ("empty body", b"", "/score", 422),
    ("NaN constant", raw('{"model": "digits-vae", "latents": [[NaN,0,0,0,0,0,0,0]]}'),
     "/score", 422),
    ("Infinity constant", raw('{"model": "digits-vae", "latents": [[Infinity,0,0,0,0,0,0,0]]}'),
     "/score", 422),
    ("-Infinity sigma", raw('{"model": "digits-vae", "latents": [[0,0,0,0,0,0,0,0]], '
                            '"sigma": -Infinity}'), "/score", 422),
    ("1e400 latent", raw('{"model": "digits-vae", "latents": [[1e400,0,0,0,0,0,0,0]]}'),
     "/score", 422),
    ("1e39 overflows float32", raw('{"model": "digits-vae", "latents": [[1e39,0,0,0,0,0,0,0]]}'),
     "/score", 422),
    ("1e400 sigma", raw('{"model": "digits-vae", "latents": [[0,0,0,0,0,0,0,0]], '
                        '"sigma": 1e400}'), "/score", 422),
    ("ragged rows", {"model": MODEL, "latents": [[0.0] * 8, [0.0] * 7]}, "/score", 422),
    ("ragged depth", {"model": MODEL, "latents": [[0.0] * 8, [[0.0] * 8]]}, "/score", 422),
    ("flat list", {"model": MODEL, "latents": [0.0] * 8}, "/score", 422),
    ("empty latents", {"model": MODEL, "latents": []}, "/score", 422),
    ("wrong dimension", {"model": MODEL, "latents": [[0.0] * 7]}, "/score", 422),
    ("wrong dimension base64", {"model": MODEL, "latents": {
        "dtype": "float32", "shape": [1, 9], "data": b64(np.zeros(9, "<f4"))}}, "/score", 422),
    ("string in latents", {"model": MODEL, "latents": [["a"] * 8]}, "/score", 422),
    ("bool in latents", {"model": MODEL, "latents": [[True] * 8]}, "/score", 422),
    ("null in latents", {"model": MODEL, "latents": [[None] * 8]}, "/score", 422),
    ("latents a string", {"model": MODEL, "latents": "0,1,2"}, "/score", 422),
    ("model a number", {"model": 3, "latents": [[0.0] * 8]}, "/score", 422),
    ("missing model", {"latents": [[0.0] * 8]}, "/score", 422),
    ("unknown field", {**GOOD, "extra": 1}, "/score", 422),
    ("both latents and seeds", {**GOOD, "seeds": [1]}, "/score", 422),
    ("neither latents nor seeds", {"model": MODEL}, "/score", 422),
    ("bad base64", {"model": MODEL, "latents": {
        "dtype": "float32", "shape": [1, 8], "data": "@@not base64@@"}}, "/score", 422),
    ("base64 length mismatch", {"model": MODEL, "latents": {
        "dtype": "float32", "shape": [2, 8], "data": b64(np.zeros(8, "<f4"))}}, "/score", 422),
    ("unknown dtype", {"model": MODEL, "latents": {
        "dtype": "int8", "shape": [1, 8], "data": b64(np.zeros(8, "i1"))}}, "/score", 422),
    ("base64 NaN", {"model": MODEL, "latents": {
        "dtype": "float32", "shape": [1, 8], "data": b64(np.full(8, np.nan, "<f4"))}},
     "/score", 422),
    ("unknown model", {"model": "no-such-model", "latents": [[0.0] * 8]}, "/score", 404),
    ("path-like model", {"model": "../digits-vae", "latents": [[0.0] * 8]}, "/score", 404),
    ("absolute path model", {"model": "/etc/passwd", "latents": [[0.0] * 8]}, "/score", 404),
    ("staging model", {"model": ".staging", "latents": [[0.0] * 8]}, "/score", 404),
    ("sigma zero", {**GOOD, "sigma": 0}, "/score", 422),
    ("sigma negative", {**GOOD, "sigma": -1.0}, "/score", 422),
    ("sigma string", {**GOOD, "sigma": "big"}, "/score", 422),
    # Found in review: NumPy reads JSON booleans as 0/1.
    ("boolean latent values", {"model": MODEL, "latents": [[True, False] + [1] * 6]},
     "/score", 422),
    ("boolean among floats", {"model": MODEL, "latents": [[0.5, True] + [1.0] * 6]},
     "/score", 422),
    ("declared batch over the limit", {"model": MODEL, "latents": {
        "dtype": "float32", "shape": [10**9, 8], "data": ""}}, "/score", 413),
    # Found by the audit: a float first axis skipped the check made before decoding anything.
    ("declared batch over the limit as a float", {"model": MODEL, "latents": {
        "dtype": "float32", "shape": [5000.0, 8], "data": "not base64!"}}, "/score", 413),
    ("adversarial string after deep brackets", raw("[" * 40 + '"' + '\\"' * 4096), "/score",
     422),
    # Found by schemathesis: sigma^2 underflows to 0 although sigma > 0.
    ("sigma subnormal", {**GOOD, "sigma": 5e-324}, "/score", 422),
    ("sigma below range", {**GOOD, "sigma": 1e-101}, "/score", 422),
    ("sigma above range", {**GOOD, "sigma": 1e101}, "/score", 422),
    ("select sigma subnormal", {"model": MODEL, "start": 0, "count": 1, "keep": 1,
                                "sigma": 5e-324}, "/select", 422),
    ("unknown descriptor", {**GOOD, "descriptors": ["psi", "curvature"]}, "/score", 422),
    ("descriptors without generator", {"model": "nosampler", "latents": [[0.1] * 6],
                                       "descriptors": ["psi"]}, "/score", 422),
    ("policy bound without generator", {"model": "nosampler", "latents": [[0.1] * 6],
                                        "policy": {"psi": {"min_percentile": 0.1}}},
     "/score", 422),
    ("policy bound unknown field", {**GOOD, "policy": {"psi": {"min": 0.1}}}, "/score", 422),
    ("policy number as string", {**GOOD, "policy": {"min_percentile": "0.5"}}, "/score", 422),
    ("policy bound out of range", {**GOOD, "policy": {"nu": {"max_percentile": 2}}},
     "/score", 422),
    ("policy unknown field", {**GOOD, "policy": {"max_percentile": 0.5}}, "/score", 422),
    ("policy out of range", {**GOOD, "policy": {"min_percentile": 1.5}}, "/score", 422),
    ("seeds no sampler", {"model": "nosampler", "seeds": [1, 2]}, "/score", 422),
    ("seed 2^64", {"model": MODEL, "seeds": [2**64]}, "/score", 422),
    ("seed negative", {"model": MODEL, "seeds": [-1]}, "/score", 422),
    ("seed float", {"model": MODEL, "seeds": [1.5]}, "/score", 422),
    ("seed 1e30", raw('{"model": "digits-vae", "seeds": [1e30]}'), "/score", 422),
    ("seed -2^64", {"model": MODEL, "seeds": [-(2**64)]}, "/score", 422),
    ("base64 excess padding", {"model": MODEL, "latents": {
        "dtype": "float32", "shape": [1, 8], "data": b64(np.zeros(8, "<f4")) + "=="}},
     "/score", 422),
    ("JSON in UTF-16", '{"model": "digits-vae", "seeds": [1]}'.encode("utf-16"), "/score", 422),
    ("lone surrogate escape", raw('{"model": "digits-\\ud800", "seeds": [1]}'), "/score", 422),
    ("seed bool", {"model": MODEL, "seeds": [True]}, "/score", 422),
    ("empty seeds", {"model": MODEL, "seeds": []}, "/score", 422),
    ("deep nesting", raw('{"model": "digits-vae", "latents": ' + "[" * 40 + "0" + "]" * 40 + "}"),
     "/score", 422),
    ("very deep nesting", raw("[" * 100_000 + "]" * 100_000), "/score", 422),
    ("select keep > count", {"model": MODEL, "start": 0, "count": 4, "keep": 5}, "/select", 422),
    ("select huge count", {"model": MODEL, "start": 0, "count": 10**9, "keep": 1},
     "/select", 413),
    ("select count zero", {"model": MODEL, "start": 0, "count": 0, "keep": 1}, "/select", 422),
    ("select past 2^64", {"model": MODEL, "start": 2**64 - 2, "count": 4, "keep": 1},
     "/select", 422),
    ("select min_distance zero", {"model": MODEL, "count": 4, "keep": 1, "min_distance": 0},
     "/select", 422),
    ("select no sampler", {"model": "nosampler", "count": 4, "keep": 1}, "/select", 422),
    ("select unknown model", {"model": "nope", "count": 4, "keep": 1}, "/select", 404),
]


async def post(client: httpx.AsyncClient, path: str, body: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return await client.post(path, content=body, headers={"content-type": "application/json"})
    return await client.post(path, json=body)


@pytest.mark.parametrize(("body", "path", "status"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
async def test_bad_request(
    app_client: httpx.AsyncClient,
    store_root: Path,
    snapshot_store: Callable[[Path], dict[str, int]],
    body: Any,
    path: str,
    status: int,
) -> None:
    before = snapshot_store(store_root)
    response = await post(app_client, path, body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail.strip()
    good = await app_client.post("/score", json=GOOD)
    assert good.status_code == 200, good.text
    assert snapshot_store(store_root) == before


async def test_details_say_what_is_allowed(app_client: httpx.AsyncClient) -> None:
    async def detail(body: Any) -> str:
        return str((await post(app_client, "/score", body)).json()["detail"])

    assert "psi, nu, delta" in await detail({**GOOD, "descriptors": ["curvature"]})
    assert "[1e-100, 1e100]" in await detail({**GOOD, "sigma": 0})
    nested = await detail({**GOOD, "policy": {"descriptors": 1}})
    assert nested.startswith("policy.descriptors") and "allowed fields" not in nested
    assert "has no generator" in await detail(
        {"model": "nosampler", "latents": [[0.0] * 6], "descriptors": ["nu"]}
    )
    assert "has no generator" in await detail(  # rank_sum needs psi
        {"model": "nosampler", "latents": [[0.0] * 6],
         "policy": {"rank_sum": {"min_score": 0.1}}}
    )
    assert "takes 8" in await detail({"model": MODEL, "latents": [[0.0] * 7]})
    assert "digits-vae" in await detail({"model": "nope", "latents": [[0.0] * 8]})
    assert "allowed fields" in await detail({**GOOD, "bogus": 1})
    assert "float32" in await detail(
        {"model": MODEL, "latents": {"dtype": "int8", "shape": [1], "data": ""}}
    )
    assert "ragged" in await detail({"model": MODEL, "latents": [[0.0] * 8, [0.0]]})
    assert "sampler" in await detail({"model": "nosampler", "seeds": [0]})
    assert "out of range" in await detail({"model": MODEL, "seeds": [2**64]})
    assert "valid integer" in await detail(raw('{"model": "digits-vae", "seeds": [1.5]}'))
    assert "integer literal" in await detail(raw('{"model": "digits-vae", "seeds": [1e17]}'))
    assert "NaN (character" in await detail(raw('{"model": "x", "latents": [[NaN]]}'))
    assert "-Infinity" not in await detail(raw('{"model": "x", "sigma": -Infinity}'))
    assert "Infinity (character" in await detail(raw('{"model": "x", "sigma": -Infinity}'))
    assert "Incorrect padding" in await detail({"model": MODEL, "latents": {
        "dtype": "float32", "shape": [1, 1], "data": "AAA"}})
    assert "padding past the end" in await detail({"model": MODEL, "latents": {
        "dtype": "float32", "shape": [1, 1], "data": "AAAAAAAA=="}})


@pytest.mark.parametrize("declared", [True, False])
async def test_oversized_body_is_413(
    settings: Settings, serve: Callable[..., Any], declared: bool
) -> None:
    body = json.dumps({"model": MODEL, "latents": [[0.25] * 8] * 100}).encode()
    async with serve(settings.model_copy(update={"max_body_bytes": 1000})) as client:
        if declared:
            response = await client.post("/score", content=body,
                                         headers={"content-type": "application/json"})
        else:
            async def chunks() -> Any:
                for start in range(0, len(body), 256):
                    yield body[start : start + 256]

            # A streamed body has no Content-Length: the limit must hold while reading.
            response = await client.post("/score", content=chunks(),
                                         headers={"content-type": "application/json"})
        # Precondition: the streamed case really sends no Content-Length.
        assert ("content-length" in response.request.headers) == declared
        assert response.status_code == 413, response.text
        assert "1000" in response.json()["detail"]
        small = await client.post("/score", json=GOOD)
        assert small.status_code == 200


async def test_batch_over_max_batch_is_413(settings: Settings, serve: Callable[..., Any]) -> None:
    async with serve(settings.model_copy(update={"max_batch": 4})) as client:
        latents = await client.post("/score", json={"model": MODEL, "latents": [[0.0] * 8] * 5})
        seeds = await client.post("/score", json={"model": MODEL, "seeds": list(range(5))})
        keep = await client.post("/select", json={"model": MODEL, "count": 10, "keep": 5})
        ok = await client.post("/score", json={"model": MODEL, "seeds": list(range(4))})
    assert latents.status_code == seeds.status_code == keep.status_code == 413
    assert "at most 4" in latents.json()["detail"]
    assert ok.status_code == 200


async def test_queue_full_is_429_with_retry_after(
    settings: Settings, serve: Callable[..., Any]
) -> None:
    # A long batching window keeps the first request queued while the second arrives.
    tight = settings.model_copy(
        update={"queue_limit": 4, "max_wait_ms": 300.0, "max_batch_size": 1024}
    )
    async with serve(tight) as client:
        too_big = await client.post("/score", json={"model": MODEL, "seeds": [1, 2, 3, 4, 5]})
        first, second = await asyncio.gather(
            client.post("/score", json={"model": MODEL, "latents": [[0.5] * 8] * 3}),
            client.post("/score", json={"model": MODEL, "latents": [[0.7] * 8] * 3}),
        )
        after = await client.post("/score", json={"model": MODEL, "seeds": [1]})
    assert too_big.status_code == 413
    statuses = sorted([first.status_code, second.status_code])
    assert statuses == [200, 429], (first.text, second.text)
    refused = first if first.status_code == 429 else second
    assert refused.headers["retry-after"] == "1"
    assert "queue" in refused.json()["detail"]
    assert after.status_code == 200


async def test_one_busy_model_cannot_fill_the_queue(
    settings: Settings, serve: Callable[..., Any]
) -> None:
    # Each model may queue 4 latents; the queue as a whole could hold 1000.
    tight = settings.model_copy(update={
        "queue_limit": 1000, "model_queue_limit": 4, "max_wait_ms": 300.0,
        "max_batch_size": 1024, "cache_bytes": 0,
    })
    async with serve(tight) as client:
        too_big = await client.post("/score", json={"model": MODEL, "seeds": [1, 2, 3, 4, 5]})
        first, second, other = await asyncio.gather(
            client.post("/score", json={"model": MODEL, "latents": [[0.5] * 8] * 3}),
            client.post("/score", json={"model": MODEL, "latents": [[0.7] * 8] * 3}),
            client.post("/score", json={"model": "nosampler", "latents": [[0.1] * 6] * 3}),
        )
    assert too_big.status_code == 413 and "MODEL_QUEUE_LIMIT" in too_big.json()["detail"]
    assert sorted([first.status_code, second.status_code]) == [200, 429]
    refused = first if first.status_code == 429 else second
    assert refused.headers["retry-after"] == "1"
    assert f"for {MODEL}" in refused.json()["detail"]
    assert other.status_code == 200, other.text  # another model still has its room


async def test_no_result_in_time_is_504(settings: Settings, serve: Callable[..., Any]) -> None:
    slow = settings.model_copy(update={"request_timeout_s": 0.05, "max_wait_ms": 1000.0})
    async with serve(slow) as client:
        response = await client.post("/score", json={"model": MODEL, "latents": [[0.3] * 8]})
    assert response.status_code == 504, response.text
    assert "0.05" in response.json()["detail"]


async def test_an_integral_number_is_the_integer_it_writes(app_client: httpx.AsyncClient) -> None:
    """JSON Schema's ``integer`` (the spec's type for seeds, count and keep) includes 2.0."""
    as_float = await app_client.post(
        "/score", content=b'{"model": "digits-vae", "seeds": [2.0, 7.0]}',
        headers={"content-type": "application/json"},
    )
    as_int = await app_client.post("/score", json={"model": "digits-vae", "seeds": [2, 7]})
    assert as_float.status_code == as_int.status_code == 200
    assert [r["seed"] for r in as_float.json()["results"]] == [2, 7]
    assert [r["log_density"] for r in as_float.json()["results"]] == [
        r["log_density"] for r in as_int.json()["results"]
    ]
    select = await app_client.post(
        "/select", content=b'{"model": "digits-vae", "count": 10.0, "keep": 2.0}',
        headers={"content-type": "application/json"},
    )
    assert select.status_code == 200 and len(select.json()["results"]) == 2



async def test_a_declared_length_over_the_limit_is_413_before_any_body_is_read(
    settings: Settings, serve: Callable[..., Any]
) -> None:
    # The body itself is small and valid JSON: only the declared length can make this a 413.
    async with serve(settings.model_copy(update={"max_body_bytes": 1000})) as client:
        response = await client.post(
            "/score", content=json.dumps(GOOD).encode(),
            headers={"content-type": "application/json", "content-length": "1000000"},
        )
    assert response.request.headers["content-length"] == "1000000"  # precondition
    assert response.status_code == 413, response.text
    assert "1000" in response.json()["detail"]


async def test_a_new_sigma_is_calibrated_within_a_small_model_queue(
    settings: Settings, serve: Callable[..., Any]
) -> None:
    """Calibrating another sigma goes through the queue in blocks that fit its limits, so a
    tight LATENTSIEVE_MODEL_QUEUE_LIMIT never refuses it (and it never floods the queue)."""
    tight = settings.model_copy(update={"model_queue_limit": 4, "cache_bytes": 0})
    async with serve(tight) as client:
        # Four uncached latents: exactly the limit, so they fit.
        response = await client.post(
            "/score",
            json={"model": MODEL, "latents": [[0.1 * row] * 8 for row in range(4)],
                  "sigma": 0.731},
        )
    assert response.status_code == 200, response.text
    assert all(0.0 <= row["percentile"] <= 1.0 for row in response.json()["results"])
