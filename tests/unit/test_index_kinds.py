"""The index kinds' registry is the one list of them (issue 20): the CLI's ``--kind``
choices, the manifest's ``kind`` Literal and both sides' registries agree, and every
registered kind builds, opens and scores a tiny store within its guarantee (exact, or within
each score's certified bound)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

import numpy as np
import pytest

from latentsieve.cli import build_parser
from latentsieve.index.build import BuildOptions, build_version
from latentsieve.index.errors import StoreError
from latentsieve.index.kinds import BUILD_KINDS, KINDS, RETIRED, build_kind, default_bound
from latentsieve.index.manifest import IndexKind
from latentsieve.index.store import LatentStore
from latentsieve.workers.calibration import calibrate_build
from latentsieve.workers.density import DensityEngine
from latentsieve.workers.kinds import SCORERS, scorer_of


def subparser(parser: argparse.ArgumentParser, *words: str) -> argparse.ArgumentParser:
    for word in words:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[word]
    return parser


def test_the_registry_is_the_one_list_of_kinds() -> None:
    assert BUILD_KINDS == tuple(KINDS) == tuple(SCORERS)
    assert all(KINDS[name].name == name == SCORERS[name].name for name in KINDS)
    assert set(get_args(IndexKind)) == set(KINDS) | set(RETIRED)
    assert not set(KINDS) & set(RETIRED)
    kind = next(a for a in subparser(build_parser(), "index", "build")._actions
                if "--kind" in a.option_strings)
    assert kind.help is not None and f"choices: {', '.join(BUILD_KINDS)};" in kind.help
    assert all(KINDS[name].help in kind.help for name in KINDS)


def test_retired_and_unknown_kinds_are_refused_with_their_reasons() -> None:
    for name, reason in RETIRED.items():
        with pytest.raises(StoreError, match=f"--kind {name} is retired"):
            build_kind(name)
        assert reason
    with pytest.raises(StoreError, match="unknown --kind 'annoy'; choose one of flat, ivf"):
        build_kind("annoy")


@pytest.mark.parametrize("name", BUILD_KINDS)
def test_every_kind_builds_opens_and_scores_within_its_guarantee(
    tmp_path: Path, name: str
) -> None:
    rng = np.random.default_rng(1)
    latents = (rng.normal(0, 3, (8, 6))[rng.integers(0, 8, 400)]
               + rng.normal(0, 1, (400, 6))).astype(np.float32)
    np.save(tmp_path / "z.npy", latents)
    build_version(LatentStore(tmp_path / "store"), BuildOptions(
        model="m", latents_file=tmp_path / "z.npy", sigma="1.5", kind=name, space="raw",
        calibration_count=100, progress=False,
    ), calibrate_build)
    loaded = LatentStore(tmp_path / "store").load("m")
    manifest = loaded.manifest
    kind = KINDS[name]
    assert manifest.kind == name and manifest.exact is kind.exact
    assert (kind.settings(manifest) is not None) is (kind.block is not None)
    assert manifest.shard_layout()[0].file == kind.main_file
    assert kind.main_file in manifest.files
    assert (default_bound(manifest) is None) is kind.exact
    engine = scorer_of(name).open_shard(manifest, loaded.shards[0], "cpu")
    queries = rng.normal(0, 3, (50, 6))
    scored = engine.log_sum(queries, 1.5)
    exact = DensityEngine(latents.astype(np.float64)).log_sum(queries, 1.5).log_sum
    if kind.exact:
        assert scored.error_bound is None
        np.testing.assert_allclose(scored.log_sum, exact, rtol=0, atol=1e-6)
    else:
        bound = default_bound(manifest)
        assert bound is not None and scored.error_bound is not None
        assert np.all(scored.error_bound <= bound + 1e-12)
        assert np.all(np.abs(scored.log_sum - exact) <= scored.error_bound + 1e-9)
    assert isinstance(scorer_of(name).paths(engine), dict)
