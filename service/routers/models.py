"""``GET /models``: what each served model is and how it decides."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.app import RuntimeDep
from service.errors import error_responses
from service.responses import FastJSONResponse
from service.schemas import ModelsResponse
from workers.scoring import ModelScorer

router = APIRouter(tags=["models"])


def describe_model(scorer: ModelScorer) -> dict[str, Any]:
    """One ``ModelInfo`` row for a served version."""
    manifest = scorer.manifest
    return {
        "name": manifest.model,
        "index_version": manifest.version,
        "d": manifest.dim,
        "N": manifest.n,
        "latent_shape": list(manifest.latent_shape),
        "sigma": manifest.bandwidth.sigma,
        "kind": manifest.kind,
        "exact": manifest.exact,
        "sampler": str(manifest.sampler) if manifest.sampler is not None else None,
        "descriptors": scorer.has_descriptors,
        "generator": manifest.generator is not None,
        "policy": manifest.policy.model_dump(exclude_none=True),
        "shards": 1,
        "compute": {"mode": "embedded", "device": scorer.device},
    }


@router.get(
    "/models",
    response_class=FastJSONResponse,
    responses={200: {"model": ModelsResponse}, **error_responses(401, 503)},
)
async def list_models(runtime: RuntimeDep) -> FastJSONResponse:
    """Every served model, sorted by name."""
    served = runtime.registry.snapshot()
    return FastJSONResponse({"models": [describe_model(served[name]) for name in sorted(served)]})
