"""Two deployments share one Redis cache and serve versions with the same model and version
names but different generators: descriptors cached by one must never answer the other. The
expected ``psi`` comes from the closed form of a linear generator (docs/contract.md §2:
``psi = 0.5 log det(A^T A)`` when ``P = I``), not from the service."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from latentsieve.cli import main
from latentsieve.index.manifest import MANIFEST_NAME
from latentsieve.index.store import LatentStore
from latentsieve.service.settings import Settings

pytestmark = pytest.mark.anyio
LATENT_DIM, OUTPUT_DIM = 4, 6


def linear_generator(path: Path, scale: float) -> np.ndarray:
    """A scripted ``G(z) = A z + b`` saved at ``path``; returns ``A`` (float64)."""
    torch.manual_seed(0)
    layer = nn.Linear(LATENT_DIM, OUTPUT_DIM)
    with torch.no_grad():
        layer.weight.mul_(scale)
    torch.jit.script(layer).save(str(path))
    return layer.weight.detach().double().numpy()


def build(store: Path, latents: Path, generator: Path) -> str:
    assert main(["index", "build", "--store", str(store), "--model", "lin", "--latents",
                 str(latents), "--sigma", "1.0", "--space", "raw", "--generator",
                 str(generator), "--descriptor-calibration-count", "40", "--no-progress"]) == 0
    version = LatentStore(store).newest("lin")
    assert version is not None
    return version


async def test_equal_version_names_with_other_generators_never_share_cached_descriptors(
    tmp_path: Path, redis_url: str, serve: object, capsys: pytest.CaptureFixture[str]
) -> None:
    latents = tmp_path / "latents.npy"
    np.save(latents, np.random.default_rng(0).standard_normal((80, LATENT_DIM)).astype("f4"))
    weights = {}
    versions = {}
    for name, scale in (("a", 1.0), ("b", 2.0)):
        weights[name] = linear_generator(tmp_path / f"{name}.pt", scale)
        versions[name] = build(tmp_path / name, latents, tmp_path / f"{name}.pt")
    capsys.readouterr()
    # Store b's version takes store a's name: same model, same version, another generator.
    folder_b = tmp_path / "b" / "lin"
    shutil.move(folder_b / versions["b"], folder_b / versions["a"])
    manifest_path = folder_b / versions["a"] / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = versions["a"]
    manifest_path.write_text(json.dumps(manifest))

    body = {"model": "lin", "latents": [[0.1, -0.2, 0.3, 0.4]] * 2, "descriptors": ["psi"]}
    answers = {}
    for name in ("a", "b"):  # a first: its descriptors are in Redis when b asks
        settings = Settings(store=tmp_path / name, redis_url=redis_url, reload_interval_s=60.0)
        async with serve(settings) as client:  # type: ignore[operator]
            response = await client.post("/score", json=body)
            assert response.status_code == 200, response.text
            answers[name] = response.json()
    assert answers["a"]["index_version"] == answers["b"]["index_version"]
    for name in ("a", "b"):
        matrix = weights[name]
        expected = 0.5 * np.linalg.slogdet(matrix.T @ matrix)[1]
        results = answers[name]["results"]
        assert [r["cached"] for r in results] == [False, False]  # b never reads a's entries
        for result in results:
            assert result["descriptors"]["psi"] == pytest.approx(expected, abs=1e-3)
