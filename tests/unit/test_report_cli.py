"""``latentsieve report``: the demo model's evidence page on a small sample, its numbers
recomputed independently, and the user's own ``--quality`` file with every bad input refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import NOSAMPLER, store_listing
from scipy.stats import spearmanr

from latentsieve.cli import main
from latentsieve.index.store import LatentStore
from latentsieve.service.offline import SyncScorer
from latentsieve.workers.demo_models.digits_quality import digits_quality
from latentsieve.workers.demo_models.digits_vae import decoder
from latentsieve.workers.policy import decide

MODEL = "digits-vae"
SEEDS = range(0, 300)


def run_report(store: Path, out: Path, *extra: str) -> int:
    return main(["report", "--store", str(store), "--model", MODEL, "--out", str(out),
                 "--bootstrap", "100", "--no-progress", *extra])


@pytest.fixture(scope="module")
def demo_report(store_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("report")
    before = store_listing(store_root)
    assert run_report(store_root, out, "--seeds", f"{SEEDS[0]}-{SEEDS[-1]}") == 0
    assert store_listing(store_root) == before  # a report never writes to the store
    page = (out / "index.html").read_text(encoding="utf-8")
    return {"numbers": json.loads((out / "report.json").read_text()), "page": page, "out": out}


@pytest.fixture(scope="module")
def recomputed(store_root: Path) -> dict[str, np.ndarray]:
    """log_density and the classifier's confidence of the same seeds, computed here directly."""
    with SyncScorer(LatentStore(store_root).load(MODEL)) as scorer:
        latents = scorer.draw(SEEDS)
        scored = scorer.score(latents, None, {"psi"})
    with torch.no_grad():
        images = decoder()(torch.from_numpy(latents)).numpy()
    return {
        "log_density": scored.log_density,
        "percentile": scored.percentile,
        "psi_percentile": scored.descriptor_percentiles["psi"],
        "confidence": digits_quality().confidence(images),
        "prior": -0.5 * (latents.astype(np.float64) ** 2).sum(axis=1),
    }


def test_report_numbers_match_an_independent_recomputation(
    demo_report: dict[str, Any], recomputed: dict[str, np.ndarray], store_root: Path
) -> None:
    numbers = demo_report["numbers"]
    policy = LatentStore(store_root).load(MODEL).manifest.policy
    assert numbers["model"] == MODEL and numbers["seeds"]["count"] == len(SEEDS)
    log_density, confidence = recomputed["log_density"], recomputed["confidence"]
    rho = numbers["spearman"]["confidence"]["log_density"]
    assert rho["value"] == pytest.approx(spearmanr(log_density, confidence).statistic, abs=1e-9)
    assert rho["ci_low"] <= rho["value"] <= rho["ci_high"]
    prior = numbers["spearman"]["confidence"]["prior_log_likelihood"]["value"]
    assert prior == pytest.approx(spearmanr(recomputed["prior"], confidence).statistic, abs=1e-9)
    quarter = next(r for r in numbers["rejection"]["confidence"] if r["reject_fraction"] == 0.25)
    kept = confidence[np.argsort(-log_density, kind="stable")[: len(SEEDS) - 75]]
    assert quarter["kept"] == 225
    assert quarter["kept_by_score"] == pytest.approx(kept.mean(), abs=1e-12)
    assert quarter["gain"]["value"] == pytest.approx(kept.mean() - confidence.mean(), abs=1e-12)
    reasons = decide(recomputed["percentile"], policy, {"psi": recomputed["psi_percentile"]})
    rejected = float(np.mean([bool(why) for why in reasons]))
    assert numbers["policy"]["rejected_share"] == pytest.approx(rejected)
    assert numbers["policy"]["min_percentile"] == policy.min_percentile
    assert numbers["policy"]["rules"] == policy.model_dump(exclude_none=True)
    assert numbers["log_density"]["q0.5"] == pytest.approx(np.quantile(log_density, 0.5))


def test_report_has_every_experiment(demo_report: dict[str, Any]) -> None:
    numbers = demo_report["numbers"]
    assert set(numbers["spearman"]) == {"confidence", "realism"}
    assert set(numbers["spearman"]["realism"]) == {
        "log_density", "psi", "nu", "delta", "prior_log_likelihood", "nearest_neighbour", "random",
    }
    assert [r["reject_fraction"] for r in numbers["precision_recall"]] == [0.1, 0.25, 0.5]
    rules = [row["rule"] for row in numbers["bandwidth_sweep"]]
    assert "1 x index sigma" in rules and "auto, k = 1" in rules and "auto, k = 10" in rules
    assert [row["scale"] for row in numbers["truncation"]] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    # Shrinking the draws towards the mode raises their density: the truncation analogue.
    means = [row["log_density"]["value"] for row in numbers["truncation"]]
    assert means == sorted(means, reverse=True)
    assert "psi_high_rejected" in numbers["rejection_by_score"]
    page = demo_report["page"]
    assert page.count("<svg") >= 5 and page.count("data:image/png") == 32
    assert "Verdict" in page and "Rejecting the lowest 25%" in page


def write_quality(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_user_quality_file_learns_whether_filtering_pays(
    store_root: Path, tmp_path: Path, recomputed: dict[str, np.ndarray]
) -> None:
    # A quality the score predicts: filtering must show a positive gain, interval above 0.
    noise = np.random.default_rng(0).normal(0, 0.5, len(SEEDS))
    quality = recomputed["log_density"] + noise
    # Written as a spreadsheet would: a byte-order mark and Windows line endings.
    rows = ["seed,quality", *[f"{s},{q:.17g}" for s, q in zip(SEEDS, quality, strict=True)]]
    csv = tmp_path / "q.csv"
    csv.write_bytes(("\ufeff" + "\r\n".join(rows) + "\r\n").encode("utf-8"))
    assert run_report(store_root, tmp_path / "out", "--quality", str(csv)) == 0
    numbers = json.loads((tmp_path / "out" / "report.json").read_text())
    rho = numbers["spearman"]["quality"]["log_density"]
    assert rho["value"] == pytest.approx(spearmanr(recomputed["log_density"], quality).statistic)
    assert rho["ci_low"] > 0.5
    assert all(row["gain"]["ci_low"] > 0 for row in numbers["rejection"]["quality"])
    assert numbers["quality_sources"]["quality"] == "the user's --quality file"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (["seed,score", "0,1.0"], "header 'seed,quality'"),
        (["seed,quality", "0,1.0", "x,2"], "line 3: seed must be an integer"),
        (["seed,quality", "0,1.0", "0,2"], "seed 0 appears twice"),
        (["seed,quality", "0,nan"], "quality must be finite"),
        (["seed,quality", "-1,0.5"], "outside [0, 2^64)"),
        (["seed,quality", "0,1,2"], "expected 2 fields"),
        (["seed,quality", *[f"{s},1" for s in range(5)]], "at least 20 seeds"),
    ],
)
def test_bad_quality_files_exit_2_with_the_line(
    store_root: Path, tmp_path: Path, rows: list[str], message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    csv = write_quality(tmp_path / "q.csv", rows)
    assert run_report(store_root, tmp_path / "out", "--quality", str(csv)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--model", NOSAMPLER], "has no sampler"),
        (["--seeds", "5-1"], "before the start"),
        (["--seeds", "0-9"], "at least 20 seeds"),
        (["--bootstrap", "3"], "--bootstrap must be between"),
        (["--quality", "/nonexistent/q.csv"], "--quality /nonexistent/q.csv"),
    ],
)
def test_bad_report_arguments_exit_2(
    store_root: Path, tmp_path: Path, extra: list[str], message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_report(store_root, tmp_path / "out", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_quality_seeds_must_agree_with_seeds(
    store_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = write_quality(tmp_path / "q.csv", ["seed,quality", *[f"{s},1" for s in range(30)]])
    assert run_report(store_root, tmp_path / "out", "--quality", str(csv), "--seeds", "0-39") == 2
    assert "not exactly --seeds" in capsys.readouterr().err


def test_grid_png_holds_the_best_samples(
    demo_report: dict[str, Any], recomputed: dict[str, np.ndarray], store_root: Path
) -> None:
    from PIL import Image  # Pillow comes with the report extra (in the dev extra)

    grid = Image.open(demo_report["out"] / "grid_highest.png")
    assert grid.size == ((8 * 9 - 1) * 4, (2 * 9 - 1) * 4) and grid.mode == "L"
    pixels = np.asarray(grid, dtype=np.float64)[::4, ::4]  # one value per 4 x 4 block
    best = int(np.argmax(recomputed["log_density"]))
    with SyncScorer(LatentStore(store_root).load(MODEL)) as scorer:
        latent = scorer.draw([SEEDS[best]])
    with torch.no_grad():
        image = decoder()(torch.from_numpy(latent)).numpy().reshape(8, 8)
    np.testing.assert_allclose(pixels[:8, :8], np.round(image * 255), atol=0.5)
