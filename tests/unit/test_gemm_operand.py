"""A flat version stores the exact engine's GEMM operand; serving maps it instead of building a
second copy of the latents, and scores exactly as an engine that builds its own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from latentsieve.index.build import BuildOptions, build_version
from latentsieve.index.errors import StoreError
from latentsieve.index.gemm_operand import gemm_operand, operand_files
from latentsieve.index.store import LatentStore, manifest_json
from latentsieve.workers.calibration import calibrate_build
from latentsieve.workers.density import DensityEngine, log_sum_reference


@pytest.fixture
def store(tmp_path: Path) -> Path:
    rng = np.random.default_rng(4)
    source = tmp_path / "z.npy"
    np.save(source, (rng.normal(0.0, 1.0, (500, 6)) + 40.0).astype(np.float32))
    for shards in (1, 2):
        build_version(LatentStore(tmp_path / f"s{shards}"), BuildOptions(
            model="m", latents_file=source, sigma="0.7", space="raw", calibration_count=100,
            shards=shards, progress=False,
        ), calibrate_build)
    return tmp_path


@pytest.mark.parametrize("shards", [1, 2])
def test_served_engines_use_the_stored_operand(store: Path, shards: int) -> None:
    loaded = LatentStore(store / f"s{shards}").load("m")
    queries = np.random.default_rng(5).normal(40.0, 1.0, (7, 6)).astype(np.float32)
    for shard, layout in zip(loaded.shards, loaded.manifest.shard_layout(), strict=True):
        assert set(operand_files(layout.file)) <= set(loaded.manifest.files)
        operand = shard.operand
        assert operand is not None
        assert isinstance(operand.augmented, np.memmap)
        assert not operand.augmented.flags.writeable  # read-only: a file mapping
        fresh = gemm_operand(shard.latents)
        np.testing.assert_array_equal(operand.augmented, fresh.augmented)
        np.testing.assert_array_equal(operand.sq_norms, fresh.sq_norms)
        mapped = DensityEngine(shard.latents, operand=operand)
        assert mapped.augmented is operand.augmented  # no copy
        got = mapped.log_sum(queries, 0.7).log_sum
        np.testing.assert_array_equal(got, DensityEngine(shard.latents).log_sum(
            queries, 0.7).log_sum)
        np.testing.assert_allclose(got, log_sum_reference(queries, shard.latents, 0.7),
                                   atol=1e-4, rtol=0)


def test_versions_without_an_operand_still_load(store: Path) -> None:
    root = LatentStore(store / "s1")
    loaded = root.load("m")
    for name in operand_files("index.faiss"):
        (loaded.path / name).unlink()
    dropped = set(operand_files("index.faiss"))
    files = {k: v for k, v in loaded.manifest.files.items() if k not in dropped}
    older = loaded.manifest.model_copy(update={"files": files})
    (loaded.path / "manifest.json").write_text(json.dumps(manifest_json(older)))
    again = root.load("m")
    assert again.shards[0].operand is None  # the engine builds its own, as before


def test_a_damaged_operand_is_refused(store: Path) -> None:
    root = LatentStore(store / "s1")
    loaded = root.load("m")
    np.save(loaded.path / "index.gemm.npy", np.zeros((500, 7), dtype=np.float32))
    with pytest.raises(StoreError, match="index.gemm.npy: checksum mismatch"):
        root.load("m")
    with pytest.raises(StoreError, match="GEMM operand"):
        root.load("m", verify=False)


def test_an_operand_of_other_latents_is_refused() -> None:
    with pytest.raises(ValueError, match="GEMM operand is 3 x 2"):
        DensityEngine(np.zeros((4, 2), np.float32),
                      operand=gemm_operand(np.zeros((3, 2), np.float32)))


def test_only_the_opened_shards_files_are_hashed(store: Path) -> None:
    root = LatentStore(store / "s2")
    loaded = root.load("m")
    np.save(loaded.path / "shard-1.gemm.npy", np.zeros((250, 8), dtype=np.float32))
    assert [s.number for s in root.load("m", shards=[0]).shards] == [0]
    assert root.load("m", shards=()).shards == ()  # a gateway that only routes
    with pytest.raises(StoreError, match="shard-1.gemm.npy: checksum mismatch"):
        root.load("m")
