"""What every index kind provides on the workers' side (:class:`Scorer`): its density scorer
for serving one shard and for the build's calibration, and the counts its scorer keeps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from latentsieve.index.build import CalibrationRequest
from latentsieve.index.manifest import IndexManifest
from latentsieve.index.store import LoadedShard
from latentsieve.workers.density import DensityScorer


def _no_paths(engine: DensityScorer) -> dict[str, int]:
    return {}


@dataclass(frozen=True)
class Scorer:
    """One index kind, workers' side (its index side: ``latentsieve.index.kinds``)."""

    name: str
    # (manifest, one opened shard, device) -> the shard's scorer, served
    open_shard: Callable[[IndexManifest, LoadedShard, str], DensityScorer]
    # the build's calibration request (its shards staged in version_dir) -> a scorer of all rows
    open_build: Callable[[CalibrationRequest], DensityScorer]
    # a scorer this kind opened -> rows it scored by each path (the certified-paths metric)
    paths: Callable[[DensityScorer], dict[str, int]] = _no_paths
