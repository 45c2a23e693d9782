"""The ``ivf`` kind, workers' side: certified IVF scoring (:class:`CertifiedDensity`, on the
CPU: its probing is a loop of small GEMMs), every score with its bound."""

from __future__ import annotations

from latentsieve.index.build import CalibrationRequest
from latentsieve.index.ivf_lists import IvfLists
from latentsieve.index.manifest import CertifiedLists, IndexManifest
from latentsieve.index.store import LoadedShard
from latentsieve.workers.approximate import CertifiedDensity, ShardedCertified
from latentsieve.workers.density import DensityScorer
from latentsieve.workers.kinds.base import Scorer


def open_shard(manifest: IndexManifest, shard: LoadedShard, device: str) -> DensityScorer:
    """Certified scoring over the shard's lists, to the version's bound by default."""
    assert manifest.certified is not None and shard.lists is not None  # checked at load
    return CertifiedDensity(shard.lists, manifest.certified.max_error)


def open_build(request: CalibrationRequest) -> DensityScorer:
    """Certified scoring over the staged lists, each shard's interval summed with --shards."""
    settings = request.settings
    assert isinstance(settings, CertifiedLists)
    if request.shards:
        return ShardedCertified(
            [IvfLists.load(request.version_dir, shard.file) for shard in request.shards],
            [shard.start for shard in request.shards], settings.max_error,
        )
    return CertifiedDensity(IvfLists.load(request.version_dir), settings.max_error)


def paths(engine: DensityScorer) -> dict[str, int]:
    """Rows the certified scorer answered by each path (bounds, probed, dense, bailed)."""
    return dict(engine.index.decisions) if isinstance(engine, CertifiedDensity) else {}


SCORER = Scorer(name="ivf", open_shard=open_shard, open_build=open_build, paths=paths)
