"""Sharded versions (``index build --shards K``), the exact merge of shard log-sums, the typed
batches, and the Redis Streams wire format; expected values from float64 equation (1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latentsieve.index.build import BuildOptions, build_version
from latentsieve.index.errors import StoreError
from latentsieve.index.store import LatentStore
from latentsieve.service.offline import SyncScorer
from latentsieve.workers.calibration import calibrate_build
from latentsieve.workers.density import log_density_reference
from latentsieve.workers.log_sums import NO_ROW, merge_intervals, merge_log_sums
from latentsieve.workers.shard_scoring import ShardQuery, ShardScores
from latentsieve.workers.streams import Job, Reply
from latentsieve.workers.transport import ScoreSpec

DIM = 5


def build(root: Path, latents: np.ndarray, shards: int, name: str = "m") -> Path:
    source = root.parent / f"{name}.npy"
    np.save(source, latents)
    options = BuildOptions(model=name, latents_file=source, sigma="0.7", space="raw",
                           calibration_count=60, shards=shards, progress=False)
    return build_version(LatentStore(root), options, calibrate_build)


@pytest.fixture(scope="module")
def latents() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((101, DIM)).astype(np.float32)


def test_a_sharded_version_scores_as_float64_equation_one(
    tmp_path: Path, latents: np.ndarray
) -> None:
    folder = build(tmp_path / "store", latents, shards=3)
    loaded = LatentStore(tmp_path / "store").load("m")
    manifest = loaded.manifest
    assert [s.count for s in manifest.shards] == [34, 33, 34]  # contiguous, near-equal
    assert {s.file for s in manifest.shards} <= set(manifest.files)
    assert not (folder / "index.faiss").exists()
    queries = np.random.default_rng(1).standard_normal((7, DIM)).astype(np.float32)
    rows = loaded.calibration_indices
    assert rows is not None
    with SyncScorer(loaded) as scorer:
        for sigma in (0.7, 0.05, 40.0):  # every exp underflows at 0.05: still finite and exact
            got = scorer.score(queries, sigma).log_density
            np.testing.assert_allclose(got, log_density_reference(queries, latents, sigma),
                                       atol=1e-4, rtol=0)
        # Leave-one-out calibration at a new sigma, summed across shards, equals brute force.
        want = np.sort(log_density_reference(latents[rows], latents, 0.3, exclude=rows))
        np.testing.assert_allclose(scorer.calibration(0.3), want, atol=1e-4, rtol=0)


def test_a_worker_opens_only_its_shards(tmp_path: Path, latents: np.ndarray) -> None:
    build(tmp_path / "store", latents, shards=2)
    store = LatentStore(tmp_path / "store")
    one = store.load("m", shards=[1])
    assert [s.number for s in one.shards] == [1] and one.shards[0].start == 50
    none = store.load("m", shards=())
    assert none.shards == ()
    with pytest.raises(StoreError, match="shards 0..1, not \\[2\\]"):
        store.load("m", shards=[2])
    with pytest.raises(StoreError, match="split into 2 shards"):
        _ = none.latents


def test_bad_shard_counts_are_refused_before_anything_is_written(
    tmp_path: Path, latents: np.ndarray
) -> None:
    source = tmp_path / "l.npy"
    np.save(source, latents)
    store = LatentStore(tmp_path / "store")
    for options, message in (
        (BuildOptions(model="m", latents_file=source, shards=0), "--shards must be"),
        (BuildOptions(model="m", latents_file=source, shards=60, kind="ivf", space="raw",
                      progress=False), "at least 120 latents"),
        (BuildOptions(model="m", latents_file=source, shards=60, space="raw",
                      progress=False), "at least 120 latents"),
    ):
        with pytest.raises(StoreError, match=message):
            build_version(store, options, calibrate_build)
    assert store.models() == []


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4),
    st.floats(1e-3, 1e3),
    st.integers(0, 2**31 - 1),
)
def test_merged_log_sums_equal_the_whole_sum(shards: int, sigma: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((12, 3)) * rng.uniform(0.1, 10)
    query = rng.standard_normal((4, 3))
    sq = ((query[:, None, :] - data[None, :, :]) ** 2).sum(-1)
    logits = -sq / (2 * sigma * sigma)
    bounds = np.linspace(0, 12, shards + 1).astype(int)
    parts = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        block = logits[:, start:stop]
        top = block.max(axis=1)
        parts.append(top + np.log(np.exp(block - top[:, None]).sum(axis=1)))
    whole = log_density_reference(query, data, sigma)
    np.testing.assert_allclose(merge_log_sums(parts, None, 12), whole, atol=1e-9, rtol=0)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_merged_intervals_hold_the_merged_density(seed: int) -> None:
    """Parts known within +- bound (one exact, bound None): the merged interval holds the
    density of every choice of part log-sums inside theirs, with N - 1 where a row is left out,
    and is no wider than the widest part's."""
    rng = np.random.default_rng(seed)
    truth = [rng.normal(-10.0, 3.0, 5) for _ in range(3)]  # below the cap log_density <= 0
    bounds = [rng.uniform(0.0, 0.5, 5), None, rng.uniform(0.0, 0.5, 5)]
    shown = [part if bound is None else part + rng.uniform(-1, 1, 5) * bound
             for part, bound in zip(truth, bounds, strict=True)]
    exclude = np.array([NO_ROW, 3, NO_ROW, 0, NO_ROW])
    middle, half = merge_intervals(shown, bounds, exclude, 40)
    exact = merge_log_sums(truth, exclude, 40)
    assert np.all(np.abs(exact - middle) <= half + 1e-9)
    assert np.all(half <= 0.5 + 1e-12) and np.all(half >= 0)
    # The ends are the merged ends: all lows, all highs (an exact part adds no width).
    low = merge_log_sums([shown[0] - bounds[0], shown[1], shown[2] - bounds[2]], exclude, 40)
    high = merge_log_sums([shown[0] + bounds[0], shown[1], shown[2] + bounds[2]], exclude, 40)
    np.testing.assert_allclose(middle - half, low, atol=1e-9, rtol=0)
    np.testing.assert_allclose(middle + half, high, atol=1e-9, rtol=0)
    # Leaving a row out divides by N - 1 instead of N.
    kept, _ = merge_intervals(shown, bounds, None, 40)
    np.testing.assert_allclose((middle - kept)[exclude != NO_ROW], np.log(40 / 39), atol=1e-9)
    np.testing.assert_allclose((middle - kept)[exclude == NO_ROW], 0.0, atol=1e-12)


def test_typed_batches_concatenate_and_split() -> None:
    a = ShardQuery(np.ones((2, 3), np.float32))
    b = ShardQuery(np.zeros((1, 3), np.float32), np.array([7]))
    both = ShardQuery.concat([a, b])
    assert len(both) == 3 and both.exclude is not None
    assert both.exclude.tolist() == [NO_ROW, NO_ROW, 7]
    assert both.take(2, 3).exclude.tolist() == [7]  # type: ignore[union-attr]
    assert both.take(0, 2).latents.tolist() == [[1.0] * 3] * 2
    assert a.take(0, 1).exclude is None and len(a.take(0, 1)) == 1
    # One part keeps its leave-one-out rows; parts without any stay without.
    alone = ShardQuery.concat([b])
    assert alone.exclude is not None and alone.exclude.tolist() == [7]
    plain = ShardQuery.concat([a, a])
    assert plain.exclude is None and plain.latents.shape == (4, 3)
    assert ShardQuery.concat([b, b]).exclude.tolist() == [7, 7]  # type: ignore[union-attr]
    # Results are only split: each slice keeps its descriptors and bounds (None: exact).
    scores = ShardScores(np.array([1.0, 3.0]), {"psi": np.array([2.0, 4.0])})
    assert scores.take(1, 2).log_sum.tolist() == [3.0]
    assert scores.take(1, 2).descriptors["psi"].tolist() == [4.0]
    assert scores.take(0, 1).bound is None
    certified = ShardScores(np.array([1.0, 2.0, 3.0]), bound=np.array([0.1, 0.2, 0.3]))
    assert certified.take(1, 3).bound.tolist() == [0.2, 0.3]  # type: ignore[union-attr]
    assert certified.take(1, 3).log_sum.tolist() == [2.0, 3.0]


def test_jobs_and_replies_survive_the_wire() -> None:
    query = ShardQuery(np.arange(6, dtype=np.float32).reshape(2, 3), np.array([4, NO_ROW]))
    spec = ScoreSpec("m", "v1", 0.5, ("psi", "nu"), "index")
    job = Job("j1", "latentsieve:replies:g", 1e9, 1, spec, query)
    fields = {key.encode(): value if isinstance(value, bytes) else value.encode()
              for key, value in job.to_fields().items()}
    back = Job.from_fields(fields)
    assert (back.id, back.shard, back.spec) == ("j1", 1, spec)
    assert (back.spec.sigma, back.spec.descriptors, back.spec.space) == (0.5, ("nu", "psi"),
                                                                          "index")
    np.testing.assert_array_equal(back.query.latents, query.latents)
    assert back.query.exclude is not None and back.query.exclude.tolist() == [4, NO_ROW]
    assert back.expired(now=1e9) and not back.expired(now=1e9 - 1)
    reply = Reply("j1", 1, "ok", ShardScores(np.array([-1.5, 2.0]), {"psi": np.array([3.0])}))
    raw = {key.encode(): value if isinstance(value, bytes) else value.encode()
           for key, value in reply.to_fields().items()}
    again = Reply.from_fields(raw)
    assert again.scores is not None and again.scores.log_sum.tolist() == [-1.5, 2.0]
    assert again.scores.descriptors["psi"].tolist() == [3.0]
    for status in ("error", "dead_letter"):
        failed = Reply("j2", 0, status, detail="worker said why")  # type: ignore[arg-type]
        raw = {key.encode(): value if isinstance(value, bytes) else value.encode()
               for key, value in failed.to_fields().items()}
        back_reply = Reply.from_fields(raw)
        assert (back_reply.status, back_reply.detail, back_reply.scores) == (
            status, "worker said why", None)
    raw[b"status"] = b"maybe"
    with pytest.raises(ValueError, match="unknown reply status 'maybe'"):
        Reply.from_fields(raw)
    del fields[b"shape"]
    with pytest.raises(KeyError):
        Job.from_fields(fields)
