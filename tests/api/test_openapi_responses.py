"""Every route's real answers validate against the OpenAPI document the app serves.

The document's response schemas are generated from the types the answers are built as
(``service/schemas.py``, ``workers/score_body.py``, ``service/errors.py``); this holds the
document to the bodies themselves (docs/contract.md §3): seeds, batch positions, descriptors,
certified error bounds and the error bodies included. The types are closed
(``additionalProperties: false``), so a key that an answer carries and the document lacks fails
here. Each body is checked against the schema of the status it came with, which the document
must list for that route.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from latentsieve.index.build import BuildOptions, build_version
from latentsieve.index.manifest import DESCRIPTOR_NAMES, Policy
from latentsieve.index.store import LatentStore
from latentsieve.service.client import encode_latents
from latentsieve.service.schemas import CalibrationInfo, ModelInfo, ModelsResponse
from latentsieve.service.settings import Settings
from latentsieve.workers.calibration import calibrate_build
from latentsieve.workers.score_body import Descriptors

pytestmark = pytest.mark.anyio
MODEL, NOSAMPLER, CERTIFIED = "digits-vae", "nosampler", "lists"
DOCUMENT = "urn:latentsieve:openapi"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def certified_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A certified ivf model (d = 8, with a sampler): every score carries its own bound."""
    root = tmp_path_factory.mktemp("certified") / "store"
    rng = np.random.default_rng(8)
    centres = rng.normal(0.0, 4.0, (12, 8))
    source = root.parent / "latents.npy"
    np.save(source, (centres[rng.integers(0, 12, 2000)]
                     + rng.normal(0.0, 1.0, (2000, 8))).astype(np.float32))
    build_version(LatentStore(root), BuildOptions(
        model=CERTIFIED, latents_file=source, sigma="1.5", space="raw", kind="ivf", nlist=16,
        sampler="torch-cpu", calibration_count=200, progress=False,
    ), calibrate_build)
    return root


class Document:
    """The app's ``/openapi.json`` with its ``$ref``s resolved by a JSON Schema registry."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        resource = Resource(contents=spec, specification=DRAFT202012)
        self.registry: Registry[Any] = Registry().with_resource(DOCUMENT, resource)

    def schema(self, method: str, path: str, status: int) -> dict[str, Any]:
        """The documented body of ``status`` answers, as a reference into the document."""
        responses = self.spec["paths"][path][method]["responses"]
        assert str(status) in responses, (
            f"{method.upper()} {path} answered {status}; the document lists {sorted(responses)}"
        )
        documented = responses[str(status)]["content"]["application/json"]["schema"]
        assert documented, (
            f"{method.upper()} {path} {status}: the document says nothing about the body"
        )
        pointer = "/".join(
            part.replace("~", "~0").replace("/", "~1")
            for part in ("paths", path, method, "responses", str(status), "content",
                         "application/json", "schema")
        )
        return {"$ref": f"{DOCUMENT}#/{pointer}"}

    def check(self, response: httpx.Response) -> Any:
        """Validate a real answer against its route's documented body; returns the body."""
        method = response.request.method.lower()
        path = response.request.url.path
        assert response.headers["content-type"] == "application/json", response.headers
        body = json.loads(response.content)
        jsonschema.Draft202012Validator(
            self.schema(method, path, response.status_code), registry=self.registry,
        ).validate(body)
        return body


@contextlib.asynccontextmanager
async def documented(serve: Any, settings: Settings) -> AsyncIterator[
    tuple[httpx.AsyncClient, Document]
]:
    async with serve(settings) as client:
        spec = await client.get("/openapi.json", headers={"X-API-Key": "k"})
        assert spec.status_code == 200, spec.text
        yield client, Document(spec.json())


async def test_scores_selections_and_models_match_the_document(
    settings: Settings, serve: Any
) -> None:
    rng = np.random.default_rng(3)
    posted = rng.standard_normal((12, 8)).astype(np.float32)
    async with documented(serve, settings) as (client, document):
        by_seed = document.check(
            await client.post("/score", json={"model": MODEL, "seeds": [0, 1, 2, 3]})
        )
        assert [result["seed"] for result in by_seed["results"]] == [0, 1, 2, 3]
        # The demo policy's rank-sum rule makes psi computed for every latent it decides.
        assert all("psi" in result["descriptors"] for result in by_seed["results"])

        asked = document.check(await client.post("/score", json={
            "model": MODEL, "latents": posted[:4].tolist(), "descriptors": list(DESCRIPTOR_NAMES),
        }))
        for result in asked["results"]:
            assert set(result["descriptors"]) == set(Descriptors.__annotations__)
            assert isinstance(result["descriptors"]["delta"], int)
            assert "seed" not in result and "index" not in result

        for latents in (posted[:, :6].tolist(), encode_latents(posted[:, :6])):
            plain = document.check(
                await client.post("/score", json={"model": NOSAMPLER, "latents": latents})
            )
            assert plain["exact"] is True
            assert all("descriptors" not in result for result in plain["results"])
            assert all(result["error_bound"] == 0.0 for result in plain["results"])

        seeds = document.check(await client.post(
            "/select", json={"model": MODEL, "start": 10, "count": 50, "keep": 5,
                             "min_distance": 0.5},
        ))
        assert all(10 <= result["seed"] < 60 for result in seeds["results"])
        batch = document.check(await client.post(
            "/select", json={"model": MODEL, "latents": encode_latents(posted), "keep": 4},
        ))
        assert all(0 <= result["index"] < 12 for result in batch["results"])

        models = document.check(await client.get("/models"))["models"]
        assert {row["name"] for row in models} == {MODEL, NOSAMPLER}
        nosampler = next(row for row in models if row["name"] == NOSAMPLER)
        assert nosampler["sampler"] is None  # null, not left out
        assert nosampler["calibration"]["seed_start"] is None
        assert document.check(await client.get("/healthz")) == {"status": "ok"}
        ready = document.check(await client.get("/readyz"))
        assert ready["status"] == "ready"


async def test_certified_scores_carry_their_bound_in_the_document(
    certified_store: Path, serve: Any
) -> None:
    settings = Settings(store=certified_store, reload_interval_s=60.0)
    queries = np.random.default_rng(2).normal(0.0, 4.0, (6, 8)).astype(np.float32)
    async with documented(serve, settings) as (client, document):
        for extra in ({}, {"max_error": 0.2}):
            body = document.check(await client.post(
                "/score", json={"model": CERTIFIED, "latents": queries.tolist(), **extra}
            ))
            assert body["exact"] is False
            assert all(result["error_bound"] >= 0.0 for result in body["results"])
        selected = document.check(await client.post(
            "/select", json={"model": CERTIFIED, "count": 20, "keep": 3, "max_error": 0.1}
        ))
        assert all(result["error_bound"] <= 0.1 for result in selected["results"])
        row = document.check(await client.get("/models"))["models"][0]
        assert row["kind"] == "ivf" and row["exact"] is False


async def test_error_bodies_match_the_document(
    settings: Settings, serve: Any, tmp_path: Path
) -> None:
    tight = settings.model_copy(update={"max_body_bytes": 2000, "max_batch": 4})
    async with documented(serve, tight) as (client, document):
        answers = [
            await client.post("/score", content=b'{"model": ', headers=JSON),
            await client.post("/score", content=b'{"model": ' + b"[" * 100 + b"]" * 100 + b"}",
                              headers=JSON),
            await client.post("/score", json={"model": MODEL}),
            await client.post("/select", json={"model": MODEL, "count": 5, "keep": 9}),
            await client.post("/score", json={"model": "nope", "seeds": [1]}),
            await client.post("/select", json={"model": "nope", "count": 5, "keep": 1}),
            await client.post("/score", json={"model": MODEL, "seeds": list(range(5))}),
            await client.post("/score", json={"model": MODEL, "latents": [[0.5] * 8] * 100}),
        ]
        assert [answer.status_code for answer in answers] == [
            422, 422, 422, 422, 404, 404, 413, 413]
        for answer in answers:
            assert document.check(answer)["detail"]
    async with documented(serve, settings.model_copy(update={"api_keys": ["k"]})) as (
        client, document,
    ):
        for answer in (await client.post("/score", json={"model": MODEL, "seeds": [1]}),
                       await client.get("/models")):
            assert answer.status_code == 401
            document.check(answer)
    slow = settings.model_copy(update={"request_timeout_s": 0.05, "max_wait_ms": 1000.0})
    async with documented(serve, slow) as (client, document):
        late = await client.post("/score", json={"model": MODEL, "latents": [[0.3] * 8]})
        assert late.status_code == 504
        document.check(late)
    empty = tmp_path / "empty"
    empty.mkdir()
    async with documented(serve, Settings(store=empty)) as (client, document):
        unready = await client.get("/readyz")
        assert unready.status_code == 503
        document.check(unready)



async def test_a_key_the_document_lacks_fails_validation(
    app_client: httpx.AsyncClient,
) -> None:
    """The check above is not vacuous: the response types are closed."""
    document = Document((await app_client.get("/openapi.json")).json())
    response = await app_client.post("/score", json={"model": MODEL, "seeds": [4]})
    schema = document.schema("post", "/score", 200)
    validator = jsonschema.Draft202012Validator(schema, registry=document.registry)
    body = response.json()
    validator.validate(body)
    for doctored in (
        {**body, "extra": 1},
        {**body, "results": [{**body["results"][0], "extra": 1}]},
        {**body, "results": [{**body["results"][0],
                              "descriptors": {**body["results"][0]["descriptors"], "chi": 0.1}}]},
        {**body, "results": [{key: value for key, value in body["results"][0].items()
                              if key != "cached"}]},
    ):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(doctored)


def test_the_descriptor_keys_are_the_descriptors_and_their_percentiles() -> None:
    expected = {key for name in DESCRIPTOR_NAMES for key in (name, f"{name}_percentile")}
    assert set(Descriptors.__annotations__) == expected
    assert Descriptors.__optional_keys__ == expected  # only those asked for are sent


def test_a_model_policy_is_written_without_its_null_fields() -> None:
    """``GET /models`` writes a policy as its set rules (nested bounds included), under the
    ``Policy`` schema, and every other null as null."""
    policy = Policy.model_validate(
        {"min_percentile": 0.1, "psi": {"max_percentile": 0.9}, "rank_sum": {"min_score": 0.3}}
    )
    row = ModelInfo(
        name="m", index_version="v", d=2, N=3, latent_shape=[2], sigma=1.0, kind="flat",
        exact=True, sampler=None, descriptors=False, generator=False, policy=policy, shards=1,
        compute={"mode": "embedded", "device": "cpu"},
        calibration=CalibrationInfo(source="leave_one_out", count=3, sigma=1.0, seed_start=None,
                                    latents_source=None, latents_source_sha256=None),
    )
    written = json.loads(ModelsResponse(models=[row]).model_dump_json())["models"][0]
    assert written["policy"] == policy.model_dump(exclude_none=True) == {
        "min_percentile": 0.1, "psi": {"max_percentile": 0.9}, "rank_sum": {"min_score": 0.3}}
    assert written["sampler"] is None and written["calibration"]["latents_source"] is None
    assert written["compute"] == {"mode": "embedded", "device": "cpu"}
    schema = ModelsResponse.model_json_schema(mode="serialization")
    assert schema["$defs"]["ModelInfo"]["properties"]["policy"] == {"$ref": "#/$defs/Policy"}
