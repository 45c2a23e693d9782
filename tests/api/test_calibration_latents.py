"""``index build --calibration-latents FILE``: percentiles against the latents a user's
pipeline sends (x0-predictions at step K, finished latents), recorded in the manifest and
``GET /models``, and recomputed from the same latents at a request's own sigma. Expected
percentiles are brute-force ranks among float64 equation (1) scores of those latents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from latentsieve.cli import main as cli
from latentsieve.index.store import LatentStore
from latentsieve.service.settings import Settings
from latentsieve.workers.density import log_density_reference

pytestmark = pytest.mark.anyio
MODEL = "previewed"
DIM, SIGMA = 6, 1.3


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A store whose percentiles come from 300 'preview' latents, shaped (n, 2, 3)."""
    folder = tmp_path_factory.mktemp("calibration-latents")
    rng = np.random.default_rng(5)
    training = rng.standard_normal((800, DIM)).astype(np.float32)
    previews = (rng.standard_normal((300, 2, 3)) * 0.7 + 0.4).astype(np.float32)
    np.save(folder / "train.npy", training)
    np.save(folder / "previews.npy", previews)
    code = cli(["index", "build", "--store", str(folder / "store"), "--model", MODEL,
                "--latents", str(folder / "train.npy"), "--sigma", str(SIGMA),
                "--space", "raw", "--sampler", "torch-cpu:float32:6",
                "--calibration-latents", str(folder / "previews.npy"), "--no-progress"])
    assert code == 0
    return folder / "store", training, previews.reshape(300, DIM)


def expected_percentiles(training: np.ndarray, reference: np.ndarray, queries: np.ndarray,
                         sigma: float) -> np.ndarray:
    calibration = np.sort(log_density_reference(reference, training, sigma))
    scores = log_density_reference(queries, training, sigma)
    return np.searchsorted(calibration, scores, side="right") / calibration.size


def test_the_manifest_names_the_calibration_set(
    built: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    store, _, previews = built
    manifest = LatentStore(store).read_manifest(MODEL, LatentStore(store).newest(MODEL) or "")
    calibration = manifest.calibration
    assert calibration.source == "latents" and calibration.count == 300
    assert calibration.latents_source is not None
    assert calibration.latents_source.endswith("previews.npy")
    assert calibration.latents_file in manifest.files  # checksummed like every stored file


async def test_percentiles_rank_against_the_given_latents(
    built: tuple[Path, np.ndarray, np.ndarray], serve: Any
) -> None:
    store, training, previews = built
    queries = np.random.default_rng(6).standard_normal((20, DIM)).astype(np.float32) * 0.8
    async with serve(Settings(store=store, reload_interval_s=60.0)) as client:  # type: ignore[call-arg]
        models = (await client.get("/models")).json()["models"]
        info = {model["name"]: model for model in models}[MODEL]
        for sigma in (None, 0.9):  # the build's, then one recalibrated from the same latents
            body: dict[str, Any] = {"model": MODEL, "latents": queries.tolist()}
            if sigma is not None:
                body["sigma"] = sigma
            answer = await client.post("/score", json=body)
            assert answer.status_code == 200, answer.text
            got = [result["percentile"] for result in answer.json()["results"]]
            want = expected_percentiles(training, previews, queries, sigma or SIGMA)
            np.testing.assert_allclose(got, want, atol=1.5 / 300)
    assert info["calibration"]["source"] == "latents"
    assert info["calibration"]["count"] == 300
    assert info["calibration"]["latents_source"].endswith("previews.npy")
    assert len(info["calibration"]["latents_source_sha256"]) == 64


@pytest.mark.parametrize(
    ("given", "says"),
    [
        (np.zeros((10, 5), np.float32), "each latent has 5 numbers"),
        (np.full((10, DIM), np.nan, np.float32), "finite"),
    ],
)
def test_bad_calibration_latents_exit_2_and_write_nothing(
    tmp_path: Path, given: np.ndarray, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "train.npy", np.random.default_rng(0).standard_normal((50, DIM)))
    np.save(tmp_path / "bad.npy", given)
    code = cli(["index", "build", "--store", str(tmp_path / "store"), "--model", MODEL,
                "--latents", str(tmp_path / "train.npy"), "--calibration-latents",
                str(tmp_path / "bad.npy"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "store").exists() or LatentStore(tmp_path / "store").models() == []


def test_gateway_models_schema_has_the_calibration() -> None:
    from latentsieve.service.schemas import ModelInfo

    assert "calibration" in json.dumps(ModelInfo.model_json_schema())
