"""``--kind ivf`` and ``--pca``: scores in the stored space, said to be inexact; ivf scores
each carry a certified bound, measured at build and recorded in the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from latentsieve.cli import main
from latentsieve.index.errors import StoreError
from latentsieve.index.projection import project
from latentsieve.index.store import LatentStore, LoadedVersion, manifest_json
from latentsieve.service.offline import SyncScorer
from latentsieve.workers.density import DensityEngine, log_density_reference
from latentsieve.workers.log_sums import merge_log_sums


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (30, 16))
    latents = centres[rng.integers(0, 30, 3000)] + rng.normal(0, 1, (3000, 16))
    path = tmp_path_factory.mktemp("src") / "z.npy"
    np.save(path, latents.astype(np.float32))
    return path


def build(store: Path, source: Path, *extra: str) -> None:
    assert main(["index", "build", "--store", str(store), "--model", "m", "--latents",
                 str(source), "--sigma", "2", "--calibration-count", "800", "--no-progress",
                 *extra]) == 0


def stored_rows(loaded: LoadedVersion) -> np.ndarray:
    """The stored latents of a certified ivf version, float64, by input row."""
    assert loaded.shards[0].lists is not None
    return loaded.shards[0].lists.reconstruct()


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_ivf_kind_certifies_every_score(
    tmp_path: Path, source: Path, storage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    build(tmp_path / "s", source, "--kind", "ivf", "--storage", storage, "--nlist", "32")
    loaded = LatentStore(tmp_path / "s").load("m")
    manifest = loaded.manifest
    assert manifest.kind == "ivf" and manifest.exact is False and manifest.search is None
    certified = manifest.certified
    assert certified is not None and certified.nlist == 32 and certified.storage == storage
    assert certified.max_error == 0.01 and certified.measured is not None
    assert {"ivf_offsets.npy", "ivf_lists.npz"} <= set(manifest.files)
    assert loaded.index is None and loaded.latents.shape == (3000, 16)
    stored = stored_rows(loaded)
    latents = np.load(source)
    unit = 2.0**-24 if storage == "float32" else 2.0**-11
    assert np.abs(stored - latents).max() <= 2 * unit * np.abs(latents).max() * 4
    np.testing.assert_array_equal(loaded.latents[np.array([5, 2])], stored[[5, 2]].astype(
        np.float32))
    # The recorded measurement is what the scorer makes on the first calibration rows.
    measured = certified.measured
    rows = loaded.calibration_indices
    assert rows is not None and measured.sample == 500
    # Against exact scoring of the latents as given: the bound, plus the storage's rounding.
    shift = 1e-4 if storage == "float32" else 0.01
    assert measured.half_width_max <= 0.01
    assert measured.error_max <= measured.half_width_max + shift
    assert measured.lists_probed_mean >= 1 and measured.speedup > 0
    # Leave-one-out calibration scores: each within its bound of the float64 reference.
    calibration = np.sort(log_density_reference(stored[rows], stored, 2.0, exclude=rows))
    assert np.abs(loaded.calibration_scores - calibration).max() <= 0.01 + 1e-9

    capsys.readouterr()
    queries = latents[:40] + np.random.default_rng(1).normal(0, 0.5, (40, 16)).astype(np.float32)
    np.save(tmp_path / "q.npy", queries)
    for bound in ("0.2", "0"):
        assert main(["score", "--store", str(tmp_path / "s"), "--model", "m", "--latents",
                     str(tmp_path / "q.npy"), "--max-error", bound]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["exact"] is False
        got = np.array([r["log_density"] for r in report["results"]])
        bounds = np.array([r["error_bound"] for r in report["results"]])
        exact = log_density_reference(queries, stored, 2.0)
        assert np.all(bounds <= float(bound) + 1e-9) or bound == "0"
        assert np.all(np.abs(got - exact) <= bounds + 1e-9)
    assert bounds.max() < 1e-6  # max_error 0: every list summed, only rounding is left


@pytest.mark.parametrize("extra", [["--shards", "3"], ["--pca", "5"]])
def test_sharded_and_projected_ivf_versions_certify_too(
    tmp_path: Path, source: Path, extra: list[str]
) -> None:
    build(tmp_path / "s", source, "--kind", "ivf", "--nlist", "16", "--space", "raw", *extra)
    loaded = LatentStore(tmp_path / "s").load("m")
    assert loaded.manifest.certified is not None and loaded.manifest.certified.nlist == 16
    stored = np.concatenate([shard.lists.reconstruct() for shard in loaded.shards
                             if shard.lists is not None])
    assert len(loaded.shards) == (3 if "--shards" in extra else 1)
    rng = np.random.default_rng(3)
    sent = np.load(source)[:30] + rng.normal(0, 0.5, (30, 16)).astype(np.float32)
    queries = loaded.to_index_space(sent)
    with SyncScorer(loaded) as scorer:
        for max_error in (0.05, 0.0):
            scored = scorer.score(sent, max_error=max_error)
            assert scored.error_bound is not None
            assert np.all(scored.error_bound <= max(max_error, 1e-6))
            want = log_density_reference(queries, stored, 2.0)
            assert np.all(np.abs(scored.log_density - want) <= scored.error_bound + 1e-9)
    # Leave-one-out calibration over the merged shards: within the default bound of float64.
    rows = loaded.calibration_indices
    assert rows is not None
    calibration = np.sort(log_density_reference(stored[rows], stored, 2.0, exclude=rows))
    assert np.abs(loaded.calibration_scores - calibration).max() <= 0.01 + 1e-9
    measured = loaded.manifest.certified.measured
    assert measured is not None and measured.half_width_max <= 0.01


def test_old_approximate_versions_ask_to_be_rebuilt(tmp_path: Path, source: Path) -> None:
    build(tmp_path / "s", source)
    store = LatentStore(tmp_path / "s")
    loaded = store.load("m")
    old = loaded.manifest.model_copy(update={"kind": "hnsw"})
    (loaded.path / "manifest.json").write_text(json.dumps(manifest_json(old)))
    with pytest.raises(StoreError, match="built before scores were certified; rebuild"):
        store.load("m")


def test_pca_scores_in_the_projected_space(
    tmp_path: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build(tmp_path / "s", source, "--pca", "4", "--sampler", "torch-cpu")
    loaded = LatentStore(tmp_path / "s").load("m")
    manifest = loaded.manifest
    projection = manifest.projection
    assert projection is not None and projection.dim == 4 and manifest.exact is False
    assert manifest.dim == 16 and loaded.latents.shape == (3000, 4)
    assert 4 / 16 < projection.explained_variance_ratio <= 1.0  # top 4 beat the average
    assert loaded.projection is not None
    mean, components = loaded.projection
    np.testing.assert_allclose(components @ components.T, np.eye(4), atol=1e-10)
    latents = np.load(source)
    np.testing.assert_allclose(loaded.latents, project(latents, mean, components), atol=1e-6)
    # Seeds are drawn in the sent space (16 numbers) and projected before scoring.
    draws = torch.stack([
        torch.randn(16, generator=torch.Generator("cpu").manual_seed(s)) for s in (1, 2)
    ]).numpy()
    want = log_density_reference(project(draws, mean, components), loaded.latents, 2.0)
    with SyncScorer(loaded) as scorer:
        scored = scorer.score(scorer.draw([1, 2]))
    np.testing.assert_allclose(scored.log_density, want, atol=1e-4)
    in_stored_space = DensityEngine(loaded.latents).log_sum(project(draws, mean, components), 2.0)
    exact_in_stored_space = merge_log_sums([in_stored_space.log_sum], None, 3000)
    np.testing.assert_allclose(scored.log_density, exact_in_stored_space, atol=1e-9)
    capsys.readouterr()
    assert main(["score", "--store", str(tmp_path / "s"), "--model", "m", "--seeds", "1-2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["exact"] is False
    assert [r["error_bound"] for r in report["results"]] == [0.0, 0.0]


@pytest.mark.parametrize(("args", "message"), [
    (["--pca", "0"], "--pca"),
    (["--pca", "17"], "larger than the latent size"),
    (["--kind", "hnsw"], "--kind hnsw is retired"),
    (["--storage", "float16"], "--storage float16 needs --kind ivf"),
    (["--kind", "ivf", "--max-error", "-1"], "--max-error must be a finite number >= 0"),
    (["--kind", "ivf", "--nlist", "0"], "--nlist must be a whole number >= 1"),
])
def test_bad_approximate_options_write_nothing(
    tmp_path: Path, source: Path, args: list[str], message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["index", "build", "--store", str(tmp_path / "s"), "--model", "m",
                 "--latents", str(source), "--no-progress", *args])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_float16_offsets_beyond_range_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wide = tmp_path / "wide.npy"
    np.save(wide, np.random.default_rng(0).normal(0.0, 1e6, (300, 4)).astype(np.float32))
    code = main(["index", "build", "--store", str(tmp_path / "s"), "--model", "m", "--latents",
                 str(wide), "--kind", "ivf", "--storage", "float16", "--nlist", "2",
                 "--no-progress"])
    assert code == 2 and "beyond float16's range" in capsys.readouterr().err
    assert LatentStore(tmp_path / "s").models() == []
