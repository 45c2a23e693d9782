"""Descriptor calibration at build time, generator references, and policy bounds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from latentsieve.cli import main
from latentsieve.index.manifest import PercentileBounds, Policy
from latentsieve.index.store import LatentStore
from latentsieve.service.errors import ServiceError
from latentsieve.service.offline import SyncScorer
from latentsieve.workers.demo_models.digits_vae import decoder, training_latents
from latentsieve.workers.modules import ModuleLoadError
from latentsieve.workers.policy import PERCENTILE_BELOW_MIN, decide

GENERATOR = "latentsieve.workers.demo_models.digits_vae:decoder"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("latents") / "digits.npy"
    np.save(path, training_latents()[:400])
    return path


def build(store: Path, source: Path, *extra: str) -> int:
    return main(["index", "build", "--store", str(store), "--model", "m", "--latents",
                 str(source), "--sigma", "0.5", "--no-progress", *extra])


def test_import_path_and_torchscript_generators_calibrate_alike(
    tmp_path: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert build(tmp_path / "a", source, "--generator", GENERATOR,
                 "--descriptor-calibration-count", "150") == 0
    scripted = tmp_path / "decoder.pt"
    torch.jit.script(decoder()).save(str(scripted))
    assert build(tmp_path / "b", source, "--generator", str(scripted),
                 "--descriptor-calibration-count", "150") == 0
    capsys.readouterr()
    by_import = LatentStore(tmp_path / "a").load("m")
    by_file = LatentStore(tmp_path / "b").load("m")
    settings = by_import.manifest.descriptors
    assert settings is not None and settings.calibration_count == 150
    assert settings.output_dim == 64 and settings.projection_rows == 120
    assert settings.delta_radius == pytest.approx(0.1 * np.sqrt(8))
    assert by_file.manifest.generator is not None
    assert by_file.manifest.generator.source == "torchscript"
    assert "generator.pt" in by_file.manifest.files
    assert by_import.descriptor_calibration is not None
    assert by_file.descriptor_calibration is not None
    assert by_import.manifest.descriptors is not None
    assert by_import.manifest.descriptors.names == ("delta", "nu", "psi")
    # TorchScript refuses forward hooks, so a scripted generator has no delta (not a silent 0).
    assert by_file.manifest.descriptors is not None
    assert by_file.manifest.descriptors.names == ("nu", "psi")
    assert set(by_file.descriptor_calibration) == {"psi", "nu"}
    for name in ("psi", "nu"):
        reference = by_import.descriptor_calibration[name]
        assert reference.shape == (150,) and np.all(np.diff(reference) >= 0)
        np.testing.assert_allclose(by_file.descriptor_calibration[name], reference, rtol=1e-9)
    assert np.ptp(by_import.descriptor_calibration["delta"]) > 0
    # Scoring through either reference gives the same descriptors.
    queries = training_latents()[400:405]
    with SyncScorer(by_import) as scorer:
        one = scorer.score(queries, None, ["psi", "nu"])
    with SyncScorer(by_file) as scorer:
        two = scorer.score(queries, None, ["psi", "nu"])
        with pytest.raises(ServiceError, match="psi and nu only") as refused:
            scorer.score(queries, None, ["delta"])
    assert refused.value.status == 422
    for name in ("psi", "nu"):
        np.testing.assert_allclose(one.descriptors[name], two.descriptors[name], rtol=1e-9)


def test_models_without_a_generator_have_no_descriptors(tmp_path: Path, source: Path) -> None:
    assert build(tmp_path / "s", source) == 0
    loaded = LatentStore(tmp_path / "s").load("m")
    assert loaded.manifest.descriptors is None and loaded.descriptor_calibration is None
    with SyncScorer(loaded) as scorer, pytest.raises(ServiceError, match="no generator"):
        scorer.score(training_latents()[:2], None, ["psi"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--delta-radius", "-1"], "--delta-radius"),
        (["--delta-radius", "nan"], "--delta-radius"),
        (["--delta-directions", "0"], "--delta-directions"),
        (["--projection-rows", "0"], "projection rows"),
    ],
)
def test_bad_descriptor_options_write_nothing(
    tmp_path: Path, source: Path, args: list[str], message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert build(tmp_path / "s", source, "--generator", GENERATOR, *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_score_cli_descriptors(
    tmp_path: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert build(tmp_path / "s", source, "--generator", GENERATOR,
                 "--descriptor-calibration-count", "50") == 0
    queries = tmp_path / "q.npy"
    np.save(queries, training_latents()[:3])
    capsys.readouterr()
    assert main(["score", "--store", str(tmp_path / "s"), "--model", "m", "--latents",
                 str(queries), "--descriptors", "nu"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert all(set(r["descriptors"]) == {"nu", "nu_percentile"} for r in results)
    assert main(["score", "--store", str(tmp_path / "s"), "--model", "m", "--latents",
                 str(queries), "--descriptors", "curvature"]) == 2
    assert "unknown descriptor" in capsys.readouterr().err


def test_decide_names_every_failed_rule() -> None:
    policy = Policy(
        min_percentile=0.5,
        psi=PercentileBounds(min_percentile=0.2, max_percentile=0.8),
        delta=PercentileBounds(max_percentile=0.9),
    )
    percentiles = np.array([0.1, 0.9, 0.6, 0.7])
    descriptor = {"psi": np.array([0.1, 0.9, 0.5, 0.5]), "delta": np.array([1.0, 0.0, 0.95, 0.5])}
    assert decide(percentiles, policy, descriptor) == [
        [PERCENTILE_BELOW_MIN, "psi_percentile_below_min", "delta_percentile_above_max"],
        ["psi_percentile_above_max"],
        ["delta_percentile_above_max"],
        [],
    ]
    with pytest.raises(ValueError, match="not computed"):
        decide(percentiles, policy, {"psi": descriptor["psi"]})


def test_changed_weights_behind_an_import_path_are_refused(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The module source alone does not pin a generator whose factory loads weights from a
    file: the build records the weights' sha256 and loading checks it."""
    weights = tmp_path / "weights.pt"
    torch.manual_seed(0)
    torch.save(torch.nn.Linear(8, 16).state_dict(), weights)
    module = tmp_path / "file_weights_generator.py"
    module.write_text(
        "import torch\n\n\ndef factory() -> torch.nn.Module:\n"
        "    layer = torch.nn.Linear(8, 16)\n"
        f"    layer.load_state_dict(torch.load({str(weights)!r}, weights_only=True))\n"
        "    return torch.nn.Sequential(layer, torch.nn.ReLU())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    # A module of that name imported by an earlier run in this process points at other weights.
    monkeypatch.delitem(sys.modules, "file_weights_generator", raising=False)
    assert build(tmp_path / "s", source, "--generator", "file_weights_generator:factory",
                 "--descriptor-calibration-count", "20") == 0
    loaded = LatentStore(tmp_path / "s").load("m")
    assert loaded.manifest.generator is not None
    assert loaded.manifest.generator.state_sha256 is not None
    SyncScorer(loaded).close()  # loads and verifies
    torch.manual_seed(1)
    torch.save(torch.nn.Linear(8, 16).state_dict(), weights)  # "retrained"
    with pytest.raises(ModuleLoadError, match="weights changed"):
        SyncScorer(LatentStore(tmp_path / "s").load("m"))
