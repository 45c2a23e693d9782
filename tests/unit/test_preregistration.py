"""The pre-registered study's guards (docs/evidence.md): what chose a default never reports it,
and the judges that evaluate the demo share no digit with its index."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from sklearn.datasets import load_digits

from latentsieve.demo import DEMO_RECIPES, index_latents
from latentsieve.study import SEED_START
from latentsieve.workers.demo_models.digits_quality import digits_split, half_rows
from latentsieve.workers.demo_models.digits_vae import training_latents
from latentsieve.workers.evidence import paired_gain_difference

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def study() -> ModuleType:
    path = ROOT / "benchmarks" / "preregistered.py"
    spec = importlib.util.spec_from_file_location("preregistered", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("preregistered", module)
    spec.loader.exec_module(module)
    return module


def test_the_selection_and_report_seed_ranges_do_not_overlap(study: ModuleType) -> None:
    chosen = set(study.SELECTION_SEEDS)
    assert chosen.isdisjoint(study.REPORT_SEEDS)
    assert chosen.isdisjoint(study.FRONTIER_SEEDS)
    assert min(study.REPORT_SEEDS) > max(chosen) and min(study.FRONTIER_SEEDS) > max(chosen)
    # latentsieve study reports on seeds nothing chose, by default
    assert SEED_START == study.REPORT_SEEDS.start


def test_the_page_names_the_ranges_the_script_uses(study: ModuleType) -> None:
    page = (ROOT / "docs" / "evidence.md").read_text(encoding="utf-8")
    prereg = page.split("## Pre-registration", 1)[1].split("\n## ", 1)[0]
    ranges = {tuple(map(int, m)) for m in re.findall(r"seeds (\d+)-(\d+)", prereg)}
    last = study.SELECTION_SEEDS.stop - 1
    assert (study.SELECTION_SEEDS.start, last) in ranges
    assert (study.REPORT_SEEDS.start, study.REPORT_SEEDS.stop - 1) in ranges
    assert (study.FRONTIER_SEEDS.start, study.FRONTIER_SEEDS.stop - 1) in ranges


def test_no_file_that_chose_a_default_reads_the_report_seeds(study: ModuleType) -> None:
    """The selection phase and the demo's defaults mention no seed of the report range."""
    import inspect

    selection = inspect.getsource(study.select) + inspect.getsource(study._choose_setting)
    assert "REPORT_SEEDS" not in selection and "FRONTIER_SEEDS" not in selection
    demo = (ROOT / "latentsieve" / "demo.py").read_text(encoding="utf-8")
    for number in re.findall(r"\b\d{5,}\b", demo.replace("_", "")):
        assert int(number) not in study.REPORT_SEEDS


def test_the_split_is_a_stratified_partition_and_the_index_is_half_a() -> None:
    a, b = digits_split()
    assert np.intersect1d(a, b).size == 0 and a.size + b.size == 1797
    target = load_digits().target
    counts_a, counts_b = np.bincount(target[a]), np.bincount(target[b])
    assert np.abs(counts_a - counts_b).max() <= 1  # stratified: every class halved
    np.testing.assert_array_equal(index_latents(), training_latents()[half_rows("a")])
    assert {recipe.latent_set for recipe in DEMO_RECIPES.values()} == {"encoder-means-half-a"}


def test_paired_difference_recomputed_and_signed() -> None:
    rng = np.random.default_rng(0)
    quality = rng.standard_normal(400)
    good, bad = quality + rng.normal(0, 0.5, 400), rng.standard_normal(400)
    difference = paired_gain_difference(good, bad, quality, 0.25, resamples=200)
    keep = 300
    expected = quality[np.argsort(-good)[:keep]].mean() - quality[np.argsort(-bad)[:keep]].mean()
    assert difference.value == pytest.approx(expected)
    assert difference.ci_low > 0
    same = paired_gain_difference(good, good, quality, 0.25, resamples=50)
    assert same.value == 0 and same.ci_low == 0 and same.ci_high == 0
