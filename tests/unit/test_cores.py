"""workers/cores.py: parts of one computation on every core with the BLAS held to one thread,
and the exact engine's passes split over the latents that way, scoring as one pass does."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

from latentsieve.workers import cores as cores_module
from latentsieve.workers.cores import cores, run_parts, split_ranges
from latentsieve.workers.density import DensityEngine, log_sum_reference

CONTRACT_TOLERANCE = 1e-4  # nats, docs/contract.md §1


@pytest.fixture
def two_blas_threads() -> Iterator[None]:
    """Two BLAS threads to take over, whatever this machine's CPU count."""
    with threadpool_limits(limits=2, user_api="blas"):
        assert cores() == 2
        yield


def test_parts_run_at_once_on_one_blas_thread_each(two_blas_threads: None) -> None:
    both_in = threading.Barrier(2, timeout=30)  # only passes if the two parts overlap

    def part(value: int) -> tuple[int, int, str]:
        both_in.wait()
        return value, cores(), threading.current_thread().name

    results = run_parts([lambda: part(1), lambda: part(2)])
    assert [value for value, _, _ in results] == [1, 2]
    assert [threads for _, threads, _ in results] == [1, 1]
    assert results[0][2] == threading.current_thread().name
    assert results[1][2].startswith("latentsieve-core")
    assert cores() == 2  # the limit is lifted afterwards


def test_one_blas_thread_runs_the_parts_in_turn_here() -> None:
    with threadpool_limits(limits=1, user_api="blas"):
        names = run_parts([lambda: threading.current_thread().name] * 3)
    assert names == [threading.current_thread().name] * 3


def test_a_raising_part_raises_after_the_others_finish(two_blas_threads: None) -> None:
    finished = threading.Event()

    def slow() -> int:
        finished.wait(0.2)
        finished.set()
        return 1

    def fails() -> int:
        raise ValueError("part failed")

    with pytest.raises(ValueError, match="part failed"):
        run_parts([fails, slow])
    assert finished.is_set()
    assert cores() == 2
    assert run_parts([lambda: 3, lambda: 4]) == [3, 4]  # the lock was released


def _child(queue: multiprocessing.Queue[list[int]]) -> None:
    with threadpool_limits(limits=2, user_api="blas"):
        queue.put(run_parts([lambda: 5, lambda: 6]))


def test_a_forked_child_gets_its_own_threads(two_blas_threads: None) -> None:
    """The parent's part threads do not exist in a forked child: its parts must still run."""
    assert run_parts([lambda: 1, lambda: 2]) == [1, 2]  # the parent's pool exists now
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[list[int]] = context.Queue()
    child = context.Process(target=_child, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=60) == [5, 6]
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(2, 400),
    d=st.integers(1, 64),
    q=st.integers(1, 10),
    scale=st.sampled_from([0.01, 1.0, 50.0]),
    log_sigma=st.floats(-3.0, 3.0),
    block=st.sampled_from([7, 64, None]),
    leave_one_out=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_split_passes_score_as_one_pass(
    two_blas_threads: None, monkeypatch: pytest.MonkeyPatch, n: int, d: int, q: int,
    scale: float, log_sigma: float, block: int | None, leave_one_out: bool, seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    latents = (scale * rng.standard_normal((n, d))).astype(np.float32)
    queries = (latents[rng.integers(0, n, q)]
               + scale * rng.standard_normal((q, d)).astype(np.float32))
    exclude = rng.integers(0, n, q) if leave_one_out and n >= 2 else None
    sigma = 10.0**log_sigma
    engine = DensityEngine(latents, latent_block=block)
    one = engine.log_sum(queries, sigma, exclude=exclude)
    monkeypatch.setattr(cores_module, "SPLIT_MIN_PRODUCTS", 0)
    split = engine.log_sum(queries, sigma, exclude=exclude)
    want = log_sum_reference(queries, latents, sigma, exclude)
    np.testing.assert_allclose(split.log_sum, want, rtol=0, atol=CONTRACT_TOLERANCE)
    same_path = split.precision == one.precision  # split ranges may overflow less often
    np.testing.assert_allclose(split.log_sum[same_path], one.log_sum[same_path],
                               rtol=0, atol=1e-6)


class Counting(DensityEngine):
    """Counts the engine's rescaling passes (a row whose later block overflowed the shift)."""

    rescaled = 0

    def _lse_rescaled(self, *args: Any) -> tuple[np.ndarray, np.ndarray]:
        self.rescaled += 1
        return super()._lse_rescaled(*args)


def test_each_range_has_its_own_shift(
    two_blas_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Far latents in the first range and near ones in the second: one pass's shift overflows
    on the second and the rows are rescaled in a second pass; split ranges need none."""
    rng = np.random.default_rng(4)
    far = rng.normal(30.0, 1.0, (64, 4))
    near = rng.normal(0.0, 0.1, (64, 4))
    latents = np.concatenate([far, near]).astype(np.float32)
    queries = near[:5].astype(np.float32) + 0.01
    want = log_sum_reference(queries, latents, 0.5)
    one = Counting(latents, latent_block=64)
    np.testing.assert_allclose(one.log_sum(queries, 0.5).log_sum, want,
                               atol=CONTRACT_TOLERANCE, rtol=0)
    assert one.rescaled == 1
    monkeypatch.setattr(cores_module, "SPLIT_MIN_PRODUCTS", 0)
    split = Counting(latents, latent_block=64)
    np.testing.assert_allclose(split.log_sum(queries, 0.5).log_sum, want,
                               atol=CONTRACT_TOLERANCE, rtol=0)
    assert split.rescaled == 0


@pytest.mark.parametrize(("n", "align"), [(1, 1), (2, 1), (7, 1), (60_000, 1), (10, 4),
                                          (5, 8), (16_385, 4096)])
def test_split_ranges_cover_every_row_once_on_block_boundaries(
    two_blas_threads: None, n: int, align: int
) -> None:
    small = split_ranges(n, cores_module.SPLIT_MIN_PRODUCTS - 1, align)
    assert small == [(0, n)]
    ranges = split_ranges(n, cores_module.SPLIT_MIN_PRODUCTS, align)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(hi == lo for (_, hi), (lo, _) in zip(ranges, ranges[1:], strict=False))
    assert all(lo < hi and lo % align == 0 for lo, hi in ranges)
    assert len(ranges) == (2 if n > align else 1)
