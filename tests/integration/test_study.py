"""``latentsieve study`` on the bundled ``digits-ldm`` pipeline, small enough to run in seconds.

* Its frontier numbers (mean delivered quality, evaluations per image, gain over random, the
  equal-cost gains, the frontier, p-values) are recomputed here from the raw per-candidate file
  it writes, with the selection, the cost formulas and the bootstrap written out again.
* The raw file itself is checked against an independent rendering: the plain pipeline for each
  seed, the store's scorer, the classifier, the norm of the drawn noise.
* Every strategy's kept seeds are what ``best_of_g`` keeps when called directly on each group.
* The service path (``--url``), a quality function with labels, a quality CSV, and every bad
  input (exit 2, one line, ``--out`` not created).
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import free_port
from servers import running_server

from latentsieve.cli import main
from latentsieve.demo import ensure_demo_index, index_latents
from latentsieve.index.store import LatentStore
from latentsieve.integrations.diffusers import best_of_g, parse_strategy
from latentsieve.service.offline import SyncScorer
from latentsieve.study import StoreScorer, holm, label_entropy, pareto_front
from latentsieve.workers.demo_models.digits_ldm_pipeline import load_pipeline
from latentsieve.workers.demo_models.digits_quality import digits_quality

# diffusers' sigma schedulers call np.array on a tensor with copy=False (NumPy 2 deprecation).
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

MODEL = "digits-ldm"
GROUPS, G, M, T = 4, 6, 2, 10
STRATEGIES = ("noise", "prefix:3", "preview:2", "final")
FIRST = 500  # seeds 500-523
RESAMPLES = 200


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: one thread is fastest on a shared machine (and deterministic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ldm_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("study") / "store"
    root.mkdir()
    ensure_demo_index(root, MODEL)
    return root


@pytest.fixture(scope="module")
def store_scorer(ldm_store: Path) -> Iterator[SyncScorer]:
    """The index scored in process, as ``study --store`` opens it."""
    with SyncScorer(LatentStore(ldm_store).load(MODEL)) as scorer:
        yield scorer


def study_args(scoring: list[str], out: Path, *extra: str, groups: int = GROUPS,
               size: int = G, keep: int = M, steps: int = T,
               strategies: tuple[str, ...] = STRATEGIES) -> list[str]:
    return ["study", *scoring, "--groups", str(groups), "--group-size", str(size),
            "--keep", str(keep), "--steps", str(steps), "--strategies", ",".join(strategies),
            "--out", str(out), "--bootstrap", str(RESAMPLES), "--no-progress", *extra]


def read_candidates(out: Path) -> list[dict[str, str]]:
    with (out / "candidates.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def study(ldm_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("run") / "out"
    started = time.perf_counter()
    code = main(study_args(["--store", str(ldm_store)], out,
                           "--seeds", f"{FIRST}-{FIRST + GROUPS * G - 1}"))
    seconds = time.perf_counter() - started
    assert code == 0
    return {"numbers": json.loads((out / "study.json").read_text()),
            "rows": read_candidates(out), "page": (out / "study.html").read_text(),
            "seconds": seconds}


def by_group(rows: list[dict[str, str]], column: str) -> np.ndarray:
    """A candidates.csv column as (N, G), candidates in seed order within each group."""
    table = np.zeros((GROUPS, G))
    for row in rows:
        group = int(row["group"])
        table[group, int(row["seed"]) - FIRST - group * G] = float(row[column])
    return table


def formula(name: str) -> int:
    """Denoiser evaluations per group, from the cost formulas of docs/integrations.md."""
    point = name.partition("@")[2]
    if name in ("noise", "random") or point == "noise":
        return M * T
    if name == "final" or point == "final":
        return G * T
    kind, _, steps = name.partition(":")
    k = int(steps)
    return G * k + M * (T - k) if kind == "prefix" else G * k + M * T


def picks(values: np.ndarray, keeps: str) -> list[list[int]]:
    """Top M per group: highest (or lowest) value, ties to the earlier seed."""
    sign = -1.0 if keeps == "highest" else 1.0
    return [sorted(range(G), key=lambda j: (sign * row[j], j))[:M] for row in values]


# --- the run ------------------------------------------------------------------------------------


def test_study_runs_in_seconds_and_writes_its_three_files(study: dict[str, Any]) -> None:
    assert study["seconds"] < 60, study["seconds"]
    numbers = study["numbers"]
    names = [row["strategy"] for row in numbers["strategies"]]
    assert names == [*STRATEGIES, "random",
                     "prior_norm@noise", "mean_projection@noise", "nearest_neighbour@noise",
                     "prior_norm@final", "mean_projection@final", "nearest_neighbour@final"]
    assert [row["baseline"] for row in numbers["strategies"]] == [False] * 4 + [True] * 7
    assert numbers["seeds"] == {"first": FIRST, "last": FIRST + GROUPS * G - 1,
                                "count": GROUPS * G, "rule": numbers["seeds"]["rule"]}
    assert (numbers["groups"], numbers["group_size"], numbers["keep"], numbers["steps"]) == (
        GROUPS, G, M, T)
    assert numbers["quality"]["labels"] is True and numbers["omitted_baselines"] == {}
    assert len(study["rows"]) == GROUPS * G
    page = study["page"]
    assert page.count("<svg") == 2 and "The frontier" in page and "Verdict" in page
    assert page.count("data:image/png") == G  # the first group's candidates
    for name in names:
        assert name in page


def test_frontier_numbers_are_recomputed_from_the_raw_candidates(study: dict[str, Any]) -> None:
    numbers, rows = study["numbers"], study["rows"]
    quality = by_group(rows, "quality")
    group_mean = quality.mean(axis=1)
    labels = {int(row["seed"]): row["label"] for row in rows}
    assert numbers["random_quality_mean"] == pytest.approx(group_mean.mean(), abs=1e-12)
    delivered: dict[str, np.ndarray] = {}
    for entry in numbers["strategies"]:
        name = entry["strategy"]
        assert entry["denoiser_evaluations_per_group"] == formula(name)
        assert entry["denoiser_evaluations_per_image"] == pytest.approx(formula(name) / M)
        if name == "random":
            delivered[name] = group_mean
            assert entry["kept_seeds"] is None and entry["p_value"] is None
            assert entry["gain_vs_random"] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}
            continue
        keeps = "lowest" if name.split("@")[0] in ("prior_norm", "nearest_neighbour") else (
            "highest")
        assert entry["keeps"] == keeps and entry["column"] == name
        chosen = picks(by_group(rows, name), keeps)
        seeds = [[FIRST + g * G + j for j in group] for g, group in enumerate(chosen)]
        assert entry["kept_seeds"] == seeds
        delivered[name] = np.array([quality[g, group].mean() for g, group in enumerate(chosen)])
        assert entry["quality_mean"] == pytest.approx(delivered[name].mean(), abs=1e-12)
        gain = entry["gain_vs_random"]
        assert gain["value"] == pytest.approx((delivered[name] - group_mean).mean(), abs=1e-12)
        assert gain["ci_low"] <= gain["value"] <= gain["ci_high"]
        kept_labels = [labels[seed] for group in seeds for seed in group]
        assert entry["diversity"]["label_entropy"] == pytest.approx(label_entropy(kept_labels))
    # Equal cost: final against the baselines on final latents, noise against those on noise.
    for entry in numbers["strategies"]:
        expected = {f"{m}@{entry['strategy']}" for m in
                    ("prior_norm", "mean_projection", "nearest_neighbour")}
        if entry["strategy"] not in ("noise", "final"):
            expected = set()
        assert set(entry["gain_vs_equal_cost"]) == expected
        for other, gain in entry["gain_vs_equal_cost"].items():
            difference = delivered[entry["strategy"]] - delivered[other]
            assert gain["value"] == pytest.approx(difference.mean(), abs=1e-12)
    # The frontier from the two numbers of every row.
    entries = numbers["strategies"]
    front = pareto_front([e["denoiser_evaluations_per_image"] for e in entries],
                         [e["quality_mean"] for e in entries])
    assert numbers["frontier"] == [entries[i]["strategy"] for i in front]
    assert [e["on_frontier"] for e in entries] == [i in front for i in range(len(entries))]


def test_p_values_come_from_one_paired_bootstrap_over_groups(study: dict[str, Any]) -> None:
    """Every row resampled with the same group indices (seeded), one-sided p, then Holm."""
    numbers, rows = study["numbers"], study["rows"]
    quality = by_group(rows, "quality")
    group_mean = quality.mean(axis=1)
    resampled = np.random.default_rng(numbers["bootstrap"]["seed"]).integers(
        0, GROUPS, size=(RESAMPLES, GROUPS))
    tested = [e for e in numbers["strategies"] if e["strategy"] != "random"]
    raw = []
    for entry in tested:
        kept = picks(by_group(rows, entry["strategy"]), entry["keeps"])
        gain = np.array([quality[g, group].mean() for g, group in enumerate(kept)]) - group_mean
        draws = gain[resampled].mean(axis=1)
        raw.append((1 + np.count_nonzero(draws <= 0)) / (1 + RESAMPLES))
        assert entry["p_value"] == pytest.approx(raw[-1], abs=1e-15)
        low, high = np.quantile(draws, [0.025, 0.975])
        assert entry["gain_vs_random"]["ci_low"] == pytest.approx(low, abs=1e-12)
        assert entry["gain_vs_random"]["ci_high"] == pytest.approx(high, abs=1e-12)
    assert [e["p_holm"] for e in tested] == pytest.approx(holm(raw), abs=1e-15)
    assert numbers["bootstrap"]["holm_family"] == [e["strategy"] for e in tested]


def test_raw_candidates_are_the_plain_pipelines(
    study: dict[str, Any], store_scorer: SyncScorer
) -> None:
    """Group 0's raw columns against an independent rendering: ``pipe(seed)`` alone for the
    final latent and image, the classifier for the quality, the store's scorer for the
    final score, torch.randn for the noise's norm."""
    rows = [row for row in study["rows"] if row["group"] == "0"]
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    classifier = digits_quality().classifier
    for row in rows:
        seed = int(row["seed"])
        alone = pipe("", generator=torch.Generator("cpu").manual_seed(seed),
                     num_inference_steps=T, output_type="latent").images
        image = pipe("", generator=torch.Generator("cpu").manual_seed(seed),
                     num_inference_steps=T, output_type="np").images
        density = store_scorer.score(alone.reshape(1, -1).numpy()).log_density[0]
        assert float(row["final"]) == pytest.approx(density, abs=1e-9)
        assert float(row["prior_norm@final"]) == pytest.approx(
            float(alone.double().norm()), abs=1e-9)
        probabilities = classifier.predict_proba(image.reshape(1, -1).astype(np.float64))[0]
        assert float(row["quality"]) == pytest.approx(probabilities.max(), abs=1e-9)
        assert row["label"] == str(classifier.classes_[probabilities.argmax()])
        noise = torch.randn((1, 8, 1, 1), generator=torch.Generator("cpu").manual_seed(seed))
        assert float(row["prior_norm@noise"]) == pytest.approx(float(noise.double().norm()),
                                                               abs=1e-9)
        # The baselines' training latents: the index's, the encoder means of half A.
        means = index_latents().astype(np.float64)
        final = alone.reshape(-1).double().numpy()
        assert float(row["nearest_neighbour@final"]) == pytest.approx(
            np.linalg.norm(means - final, axis=1).min(), abs=1e-6)
        mu = means.mean(axis=0)
        assert float(row["mean_projection@final"]) == pytest.approx(
            final @ mu / np.linalg.norm(mu), abs=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_kept_seeds_are_what_best_of_g_keeps(
    study: dict[str, Any], store_scorer: SyncScorer, strategy: str
) -> None:
    """best_of_g called directly on every group: the same candidate scores (bit for bit), the
    same kept seeds in the same order, its counted cost the formula, its images' quality the
    raw file's."""
    numbers, rows = study["numbers"], study["rows"]
    entry = next(e for e in numbers["strategies"] if e["strategy"] == strategy)
    pipe = load_pipeline()
    scorer = StoreScorer(store_scorer)
    classifier = digits_quality().classifier
    column = by_group(rows, strategy)
    quality = {int(row["seed"]): float(row["quality"]) for row in rows}
    for group in range(GROUPS):
        seeds = list(range(FIRST + group * G, FIRST + (group + 1) * G))
        result = best_of_g(pipe, "", scorer, parse_strategy(strategy), seeds=seeds, keep=M,
                           num_inference_steps=T, guidance_scale=1.0, output_type="np")
        np.testing.assert_array_equal(result.candidate_scores, column[group])
        assert result.seeds == entry["kept_seeds"][group]
        assert result.cost.denoiser_evaluations == entry["denoiser_evaluations_per_group"]
        judged = classifier.predict_proba(
            np.asarray(result.images, dtype=np.float64).reshape(M, -1)).max(axis=1)
        np.testing.assert_allclose(judged, [quality[s] for s in result.seeds], rtol=0,
                                   atol=1e-12)


# --- other sources: a service, a quality function with labels, a CSV ---------------------------


QUALITY_MODULE = '''
import numpy as np

def brightness(images, prompts):
    assert images.dtype == np.float32 and images.ndim == 4 and len(prompts) == len(images)
    values = images.mean(axis=(1, 2, 3))
    return values, ["bright" if v > 0.3 else "dark" for v in values]

def short(images, prompts):
    return np.zeros(len(images) - 1)

def make_digits():
    from latentsieve.workers.demo_models.digits_ldm_pipeline import load_pipeline
    return load_pipeline()
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module of the user's own, importable as ``study_user_code``."""
    (tmp_path / "study_user_code.py").write_text(QUALITY_MODULE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "study_user_code"


def test_a_service_and_a_quality_function_with_labels(
    study: dict[str, Any], ldm_store: Path, tmp_path: Path, user_module: str
) -> None:
    """--url scores through the typed client; the training latents for the baselines come from
    a file; the user's quality function gives labels. The strategies keep what the in-process
    run kept (the same index, the same candidates)."""
    latents = tmp_path / "means.npy"
    np.save(latents, index_latents().reshape(-1, 8, 1, 1))  # the index's own latents
    out = tmp_path / "out"
    with running_server(ldm_store, 60.0, tmp_path / "serve.log") as server:
        code = main(study_args(
            ["--url", server.url], out, "--seeds", f"{FIRST}-{FIRST + GROUPS * G - 1}",
            "--pipeline", f"{user_module}:make_digits", "--model", MODEL,
            "--guidance-scale", "1.0", "--quality", f"{user_module}:brightness",
            "--training-latents", str(latents),
        ))
    assert code == 0
    numbers = json.loads((out / "study.json").read_text())
    assert numbers["quality"]["labels"] is True and numbers["omitted_baselines"] == {}
    assert numbers["scorer"] == f"the service at {server.url}"
    here = {e["strategy"]: e for e in numbers["strategies"]}
    for entry in study["numbers"]["strategies"]:
        if entry["strategy"] != "random":
            assert here[entry["strategy"]]["kept_seeds"] == entry["kept_seeds"]
    rows = read_candidates(out)
    first = study["rows"]
    for name in (*STRATEGIES, "nearest_neighbour@final", "mean_projection@noise"):
        np.testing.assert_allclose([float(r[name]) for r in rows],
                                   [float(r[name]) for r in first], rtol=0, atol=1e-5)
    assert {row["label"] for row in rows} <= {"bright", "dark"}
    quality = by_group(rows, "quality")
    assert here["random"]["quality_mean"] == pytest.approx(quality.mean(), abs=1e-12)


def test_a_quality_csv(ldm_store: Path, tmp_path: Path) -> None:
    seeds = range(40, 46)
    csv_path = tmp_path / "q.csv"
    csv_path.write_text("seed,quality\n" + "".join(f"{s},{s / 100}\n" for s in seeds))
    out = tmp_path / "out"
    assert main(study_args(["--store", str(ldm_store)], out, "--seeds", "40-45",
                           "--quality", str(csv_path), groups=2, size=3, keep=1, steps=4,
                           strategies=("final",))) == 0
    numbers = json.loads((out / "study.json").read_text())
    rows = read_candidates(out)
    assert [float(row["quality"]) for row in rows] == [s / 100 for s in seeds]
    assert all(row["label"] == "" for row in rows)
    assert numbers["quality"]["labels"] is False
    assert all(e["diversity"]["label_entropy"] is None for e in numbers["strategies"])
    assert numbers["random_quality_mean"] == pytest.approx(np.mean([s / 100 for s in seeds]))


# --- bad input ----------------------------------------------------------------------------------


BAD_INPUTS: list[tuple[str, list[str], str]] = [
    ("unknown strategy", ["--strategies", "noise,best"], "--strategies: unknown strategy 'best'"),
    ("K not below T", ["--strategies", "prefix:10"], "K = 10 must be below the T = 10"),
    ("repeated strategy", ["--strategies", "final,final"], "final appears twice"),
    ("M above G", ["--keep", "7"], r"--keep \(M = 7\) must not exceed --group-size \(G = 6\)"),
    ("seeds too short", ["--seeds", "0-9"],
     "--seeds 0-9 holds 10 seeds; --groups 4 x --group-size 6 needs 24"),
    ("unknown pipeline", ["--pipeline", "stable-diffusion"],
     "--pipeline 'stable-diffusion': unknown pipeline"),
    ("pipeline module missing", ["--pipeline", "no_such_module_here:make", "--model", MODEL,
                                 "--quality", "{module}:brightness"],
     "--pipeline 'no_such_module_here:make': cannot import module"),
    ("own pipeline without a model", ["--pipeline", "{module}:make_digits"],
     "--model is required with --pipeline package.module:factory"),
    ("own pipeline without a quality", ["--pipeline", "{module}:make_digits", "--model", MODEL],
     "--quality is required with --pipeline package.module:factory"),
    ("unknown model", ["--model", "nope"], "unknown model 'nope'"),
    ("quality of the wrong length", ["--quality", "{module}:short"],
     r"--quality \S+:short returned 5 scores \(shape \(5,\)\) for 6 images"),
    ("quality CSV missing seeds", ["--quality", "{csv}"],
     "3 of the 24 candidate seeds have no row"),
    ("too few bootstrap resamples", ["--bootstrap", "5"], "--bootstrap must be between 10"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_line_and_writes_nothing(
    ldm_store: Path, tmp_path: Path, user_module: str, capsys: pytest.CaptureFixture[str],
    case: tuple[str, list[str], str],
) -> None:
    _, extra, message = case
    partial = tmp_path / "partial.csv"
    partial.write_text("seed,quality\n" + "".join(f"{s},0.5\n" for s in range(500, 521)))
    extra = [arg.format(module=user_module, csv=partial) for arg in extra]
    out = tmp_path / "out"
    args = study_args(["--store", str(ldm_store)], out, "--seeds", "500-523")
    # The case's own options come last: argparse keeps the last of a repeated option.
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("latentsieve: error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()


def test_a_service_that_is_down_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(study_args(["--url", dead], out)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "did not answer GET /models" in lines[0], lines
    assert not out.exists()


# --- the pure statistics ------------------------------------------------------------------------


def test_holm_entropy_and_frontier_on_known_values() -> None:
    # Sorted 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005, 3 x 0.01, 2 x 0.03, max(0.06, 1 x 0.04).
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0]
    assert label_entropy(["a", "a", "b", "b"]) == pytest.approx(math.log(2))
    assert label_entropy(["3"] * 5) == 0.0
    # (cost, quality): b is beaten by a (cheaper and better); c and a are on the frontier.
    assert pareto_front([1.0, 2.0, 3.0], [0.5, 0.4, 0.9]) == [0, 2]
