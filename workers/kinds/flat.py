"""The ``flat`` kind, workers' side: the exact GEMM engine (:class:`DensityEngine`)."""

from __future__ import annotations

from latentsieve.index.build import CalibrationRequest
from latentsieve.index.manifest import IndexManifest
from latentsieve.index.store import LoadedShard
from latentsieve.workers.density import DensityEngine, DensityScorer
from latentsieve.workers.kinds.base import Scorer


def open_shard(manifest: IndexManifest, shard: LoadedShard, device: str) -> DensityScorer:
    """The exact engine over the shard's latents on ``device``, with its stored GEMM operand
    when the version has one."""
    return DensityEngine(shard.latents, device=device, operand=shard.operand)


def open_build(request: CalibrationRequest) -> DensityScorer:
    """The exact engine over every training latent (shards or not)."""
    return DensityEngine(request.latents)


SCORER = Scorer(name="flat", open_shard=open_shard, open_build=open_build)
