"""``index build --space raw|active|standardized``: the space is chosen from the data, recorded
in the manifest, and every score is equation (1) in that space."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from latentsieve.cli import main
from latentsieve.index.manifest import IndexManifest
from latentsieve.index.store import LatentStore, LoadedVersion
from latentsieve.service.offline import SyncScorer
from latentsieve.workers.density import log_density_reference

ACTIVE = [0, 2, 5]


@pytest.fixture(scope="module")
def vae_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 x 6 latents like a VAE's encoder means: 3 active coordinates (variance ~1) and 3
    collapsed onto the prior's centre (variance ~1e-4)."""
    rng = np.random.default_rng(0)
    latents = rng.normal(0, 0.01, (600, 6))
    latents[:, ACTIVE] = rng.normal(0, 1, (600, 3))
    path = tmp_path_factory.mktemp("src") / "z.npy"
    np.save(path, latents.astype(np.float32))
    return path


def build(store: Path, source: Path, *extra: str) -> int:
    return main(["index", "build", "--store", str(store), "--model", "m", "--latents",
                 str(source), "--sigma", "0.3", "--calibration-count", "300", "--no-progress",
                 *extra])


def queries(count: int = 40) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((count, 6)).astype(np.float32)


def scored(loaded: LoadedVersion, latents: np.ndarray, sigma: float) -> np.ndarray:
    """log_density of ``latents`` (as sent) at ``sigma``, through the scoring engine."""
    with SyncScorer(loaded) as scorer:
        return scorer.score(latents, sigma).log_density


def test_active_space_drops_collapsed_coordinates_and_scores_there(
    tmp_path: Path, vae_like: Path
) -> None:
    assert build(tmp_path / "s", vae_like, "--sampler", "torch-cpu") == 0  # default: active
    loaded = LatentStore(tmp_path / "s").load("m")
    projection = loaded.manifest.projection
    assert projection is not None and projection.method == "active"
    assert projection.kept == tuple(ACTIVE) and projection.dim == 3
    assert projection.threshold == 0.1 and "N(0, 1)" in (projection.reference_variance or "")
    assert loaded.manifest.exact is False
    source = np.load(vae_like)
    q = queries()
    got = scored(loaded, q, 0.3)
    want = log_density_reference(q[:, ACTIVE], source[:, ACTIVE], 0.3)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_raw_space_keeps_every_coordinate(tmp_path: Path, vae_like: Path) -> None:
    assert build(tmp_path / "s", vae_like, "--sampler", "torch-cpu", "--space", "raw") == 0
    loaded = LatentStore(tmp_path / "s").load("m")
    assert loaded.manifest.projection is None and loaded.manifest.exact is True
    q = queries()
    got = scored(loaded, q, 0.3)
    np.testing.assert_allclose(got, log_density_reference(q, np.load(vae_like), 0.3), atol=1e-4)


def test_standardized_space_is_a_per_coordinate_bandwidth(tmp_path: Path, vae_like: Path) -> None:
    assert build(tmp_path / "s", vae_like, "--sampler", "torch-cpu", "--space",
                 "standardized") == 0
    loaded = LatentStore(tmp_path / "s").load("m")
    projection = loaded.manifest.projection
    assert projection is not None and projection.method == "standardized"
    assert projection.kept == tuple(ACTIVE)
    source = np.load(vae_like).astype(np.float64)
    sd = source[:, ACTIVE].std(axis=0)
    q = queries()
    got = scored(loaded, q, 0.3)
    # sigma 0.3 in standardized units = bandwidth 0.3 * sd_j along coordinate j.
    want = log_density_reference(q[:, ACTIVE] / sd, source[:, ACTIVE] / sd, 0.3)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_without_a_sampler_active_keeps_everything(tmp_path: Path, vae_like: Path) -> None:
    assert build(tmp_path / "s", vae_like) == 0
    assert LatentStore(tmp_path / "s").load("m").manifest.projection is None


def test_threshold_moves_the_cut(tmp_path: Path, vae_like: Path) -> None:
    # 1e-5 is below the collapsed coordinates' variance (~1e-4): all six are active.
    assert build(tmp_path / "s", vae_like, "--sampler", "torch-cpu",
                 "--active-threshold", "1e-5") == 0
    assert LatentStore(tmp_path / "s").load("m").manifest.projection is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--space", "whitened"], "unknown --space"),
        (["--space", "active", "--pca", "2"], "--pca and --space"),
        (["--active-threshold", "0"], "--active-threshold"),
        (["--active-threshold", "nan"], "--active-threshold"),
        (["--bandwidth-neighbours", "0"], "--bandwidth-neighbours"),
    ],
)
def test_bad_space_options_exit_2_and_store_nothing(
    tmp_path: Path, vae_like: Path, extra: list[str], message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert build(tmp_path / "s", vae_like, "--sampler", "torch-cpu", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists() or LatentStore(tmp_path / "s").models() == []


def test_manifests_written_with_pca_still_load(tmp_path: Path, vae_like: Path) -> None:
    assert build(tmp_path / "s", vae_like, "--sampler", "torch-cpu", "--pca", "3") == 0
    store = LatentStore(tmp_path / "s")
    version = store.newest("m")
    assert version is not None
    written = json.loads((tmp_path / "s" / "m" / version / "manifest.json").read_text())
    written["pca"] = written.pop("projection")  # the name releases before this one wrote
    written.pop("latent_set")
    old = IndexManifest.model_validate(written)
    assert old.projection is not None and old.projection.method == "pca"
    assert old.projection == store.read_manifest("m", version).projection


def test_bandwidth_neighbours_is_recorded(tmp_path: Path, vae_like: Path) -> None:
    assert main(["index", "build", "--store", str(tmp_path / "s"), "--model", "m", "--latents",
                 str(vae_like), "--sampler", "torch-cpu", "--bandwidth-neighbours", "5",
                 "--latent-set", "encoder-means", "--calibration-count", "100",
                 "--no-progress"]) == 0
    manifest = LatentStore(tmp_path / "s").load("m").manifest
    assert manifest.bandwidth.rule == "knn_median" and manifest.bandwidth.k == 5
    assert manifest.latent_set == "encoder-means"


@pytest.fixture(scope="module")
def digits_means(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from latentsieve.workers.demo_models.digits_vae import training_latents

    path = tmp_path_factory.mktemp("digits") / "means.npy"
    np.save(path, training_latents())
    return path


def build_digits(store: Path, source: Path, *extra: str) -> int:
    return main(["index", "build", "--store", str(store), "--model", "d", "--latents",
                 str(source), "--sampler", "torch-cpu", "--calibration-count", "200",
                 "--generator", "latentsieve.workers.demo_models.digits_vae:decoder",
                 "--descriptor-calibration-count", "100", "--no-progress", *extra])


def test_policy_json_becomes_the_default_policy(
    tmp_path: Path, digits_means: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = '{"min_percentile": 0.1, "psi": {"max_percentile": 0.8}}'
    assert build_digits(tmp_path / "s", digits_means, "--policy", policy) == 0
    manifest = LatentStore(tmp_path / "s").load("d").manifest
    assert manifest.policy.min_percentile == 0.1
    assert manifest.policy.psi is not None and manifest.policy.psi.max_percentile == 0.8
    capsys.readouterr()
    assert main(["score", "--store", str(tmp_path / "s"), "--model", "d", "--seeds",
                 "0-199"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    for result in results:  # the default policy computes psi and applies its bound
        too_high = result["descriptors"]["psi_percentile"] > 0.8
        assert ("psi_percentile_above_max" in result["reasons"]) == too_high
    assert any("psi_percentile_above_max" in result["reasons"] for result in results)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--policy", "{"], "--policy"),
        (["--policy", '{"min_percentile": "0.5"}'], "min_percentile"),
        (["--policy", '{"psi": {"max": 0.5}}'], "psi.max"),
        (["--policy", "{}", "--min-percentile", "0.1"], "give one"),
    ],
)
def test_bad_policies_exit_2(
    tmp_path: Path, digits_means: Path, extra: list[str], message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert build_digits(tmp_path / "s", digits_means, *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists() or LatentStore(tmp_path / "s").models() == []


def test_a_descriptor_bound_needs_a_generator(
    tmp_path: Path, vae_like: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert build(tmp_path / "s", vae_like, "--sampler", "torch-cpu", "--policy",
                 '{"psi": {"max_percentile": 0.9}}') == 2
    assert "needs a --generator" in capsys.readouterr().err


def test_latents_on_a_smaller_scale_than_the_sampler_keep_every_coordinate(
    tmp_path: Path
) -> None:
    # Every coordinate's variance (0.0625) is under 0.1 x the sampler's 1, but none is small
    # against the others: nothing collapsed, so nothing is dropped.
    source = tmp_path / "small.npy"
    np.save(source, np.random.default_rng(1).normal(0, 0.25, (500, 16)).astype(np.float32))
    assert build(tmp_path / "s", source, "--sampler", "torch-cpu") == 0
    assert LatentStore(tmp_path / "s").load("m").manifest.projection is None
