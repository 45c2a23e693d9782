"""``--kind ivf|hnsw`` and ``--pca``: scores in the stored space, said to be inexact, with the
approximate kinds' error measured at build and recorded in the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from latentsieve.cli import main
from latentsieve.index.projection import project
from latentsieve.index.store import LatentStore
from latentsieve.workers.approximate import NeighbourDensity
from latentsieve.workers.density import DensityEngine, log_density_reference
from latentsieve.workers.scoring import ModelScorer


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


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kind_records_its_measured_error(
    tmp_path: Path, source: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    build(tmp_path / "s", source, "--kind", kind)
    loaded = LatentStore(tmp_path / "s").load("m")
    manifest = loaded.manifest
    assert manifest.kind == kind and manifest.exact is False
    search = manifest.search
    assert search is not None and search.k == 256 and search.measured_error is not None
    assert (search.nprobe is not None) == (kind == "ivf")
    assert (search.ef_search is not None) == (kind == "hnsw")
    latents = np.load(source)
    np.testing.assert_array_equal(loaded.latents, latents)
    # The recorded error is what the scorer really makes on those calibration rows.
    rows = loaded.calibration_indices
    assert rows is not None
    sample = rows[: search.measured_error.sample]
    approx = NeighbourDensity(loaded.index, loaded.latents, search)
    got = approx.log_density(latents[sample], 2.0, exclude=sample).log_density
    want = log_density_reference(latents[sample], latents, 2.0, exclude=sample)
    assert np.all(got <= want + 1e-9)  # a lower bound: only dropped terms
    # Measured against the exact engine, itself within ~1e-5 nats of float64.
    assert np.abs(got - want).max() == pytest.approx(search.measured_error.max, abs=1e-6)
    assert search.measured_error.max < 0.05  # 256 neighbours carry nearly all the mass here

    capsys.readouterr()
    assert main(["score", "--store", str(tmp_path / "s"), "--model", "m", "--latents",
                 str(source)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["exact"] is False
    assert all(result["error_bound"] is None for result in report["results"])


def test_fewer_neighbours_measure_a_larger_error(tmp_path: Path, source: Path) -> None:
    build(tmp_path / "few", source, "--kind", "hnsw", "--neighbours", "3")
    build(tmp_path / "many", source, "--kind", "hnsw", "--neighbours", "256")
    few = LatentStore(tmp_path / "few").load("m").manifest.search
    many = LatentStore(tmp_path / "many").load("m").manifest.search
    assert few is not None and many is not None
    assert few.measured_error is not None and many.measured_error is not None
    assert few.measured_error.mean > 10 * many.measured_error.mean


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
    scored = ModelScorer(loaded).score(ModelScorer(loaded).draw([1, 2]))
    np.testing.assert_allclose(scored.log_density, want, atol=1e-4)
    exact_in_stored_space = DensityEngine(loaded.latents).log_density(
        project(draws, mean, components), 2.0
    )
    np.testing.assert_allclose(scored.log_density, exact_in_stored_space.log_density, atol=1e-9)
    capsys.readouterr()
    assert main(["score", "--store", str(tmp_path / "s"), "--model", "m", "--seeds", "1-2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["exact"] is False
    assert [r["error_bound"] for r in report["results"]] == [0.0, 0.0]


@pytest.mark.parametrize(("args", "message"), [
    (["--pca", "0"], "--pca"),
    (["--pca", "17"], "larger than the latent size"),
    (["--kind", "ivf", "--neighbours", "0"], "neighbour count"),
])
def test_bad_approximate_options_write_nothing(
    tmp_path: Path, source: Path, args: list[str], message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["index", "build", "--store", str(tmp_path / "s"), "--model", "m",
                 "--latents", str(source), "--no-progress", *args])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
