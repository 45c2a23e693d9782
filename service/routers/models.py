"""``GET /models``: what each served model is and how it decides."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from latentsieve.service.errors import error_responses
from latentsieve.service.registry import ServedModel
from latentsieve.service.responses import FastJSONResponse
from latentsieve.service.runtime import Runtime, RuntimeDep
from latentsieve.service.schemas import (
    COMPUTE_INFO,
    CalibrationInfo,
    ModelInfo,
    ModelsResponse,
)

router = APIRouter(tags=["models"])


def describe_compute(runtime: Runtime, served: ServedModel) -> dict[str, Any]:
    """Where a model's scores are computed: this process's device, or the live workers (and
    their devices) of each shard."""
    manifest = served.view.manifest
    return runtime.engine.compute.describe(manifest.model, len(manifest.shard_layout()))


def describe_model(runtime: Runtime, served: ServedModel) -> ModelInfo:
    """One ``ModelInfo`` row for a served version."""
    view = served.view
    manifest = view.manifest
    calibration = manifest.calibration
    return ModelInfo(
        name=manifest.model,
        index_version=manifest.version,
        d=manifest.dim,
        N=manifest.n,
        latent_shape=list(manifest.latent_shape),
        sigma=manifest.bandwidth.sigma,
        kind=manifest.kind,
        exact=manifest.exact,
        sampler=str(manifest.sampler) if manifest.sampler is not None else None,
        descriptors=view.has_descriptors,
        generator=manifest.generator is not None,
        policy=manifest.policy,
        shards=len(manifest.shard_layout()),
        compute=COMPUTE_INFO.validate_python(describe_compute(runtime, served)),
        calibration=CalibrationInfo(
            source=calibration.source,
            count=calibration.count,
            sigma=calibration.sigma,
            seed_start=calibration.seed_start,
            latents_source=calibration.latents_source,
            latents_source_sha256=calibration.latents_source_sha256,
        ),
    )


@router.get(
    "/models",
    response_class=FastJSONResponse,
    responses={200: {"model": ModelsResponse}, **error_responses(401, 503)},
)
async def list_models(runtime: RuntimeDep) -> FastJSONResponse:
    """Every served model, sorted by name."""
    served = runtime.engine.registry.snapshot()
    return FastJSONResponse(
        ModelsResponse(models=[describe_model(runtime, served[name]) for name in sorted(served)])
    )
