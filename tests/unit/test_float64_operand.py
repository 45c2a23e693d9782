"""``--float64-operand-bytes``: an exact engine keeps a float64 copy of its centred operand when
the process's budget has room, made at the first float64 query; the same scores either way, and
the bytes come back when the engine goes."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import numpy as np
import pytest

from latentsieve.workers import density
from latentsieve.workers.density import (
    FLOAT64_OPERANDS,
    PRECISION_FLOAT64,
    DensityEngine,
    log_sum_reference,
)

N, DIM, SIGMA, SCALE = 400, 4096, 20.0, 3.0  # fresh Gaussian latents here take float64
OPERAND_BYTES = N * (DIM + 2) * 8


@pytest.fixture
def budget() -> Iterator[density.Float64Budget]:
    limit, used = FLOAT64_OPERANDS.limit, FLOAT64_OPERANDS.used
    yield FLOAT64_OPERANDS
    FLOAT64_OPERANDS.limit = limit
    gc.collect()
    assert FLOAT64_OPERANDS.used == used  # every engine made here gave its bytes back


def data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (SCALE * rng.standard_normal((N, DIM), dtype=np.float32),
            SCALE * rng.standard_normal((6, DIM), dtype=np.float32))


def test_kept_when_it_fits_with_the_same_scores(budget: density.Float64Budget) -> None:
    latents, queries = data(0)
    budget.limit = 0
    tiles = DensityEngine(latents)
    want = tiles.log_sum(queries, SIGMA)
    assert set(want.precision.tolist()) == {PRECISION_FLOAT64}
    assert tiles._operand64 is None and budget.used == 0

    budget.limit = OPERAND_BYTES
    kept = DensityEngine(latents)
    near = kept.log_sum(latents[:3] + np.float32(1e-3), SIGMA)  # no float64 GEMM: no copy
    assert PRECISION_FLOAT64 not in near.precision
    assert kept._operand64 is None and budget.used == 0
    got = kept.log_sum(queries, SIGMA)
    assert kept._operand64 is not None and budget.used == OPERAND_BYTES
    np.testing.assert_array_equal(got.precision, want.precision)
    np.testing.assert_allclose(got.log_sum, want.log_sum, rtol=0, atol=1e-12)
    reference = log_sum_reference(queries, latents, SIGMA)
    assert np.abs(got.log_sum - reference).max() <= 1e-4
    leave_one_out = kept.log_sum(latents[:4], SIGMA, exclude=np.arange(4))
    np.testing.assert_allclose(
        leave_one_out.log_sum, tiles.log_sum(latents[:4], SIGMA, exclude=np.arange(4)).log_sum,
        rtol=0, atol=1e-12)

    other = DensityEngine(latents)  # the budget is the process's: no room for a second copy
    other.log_sum(queries, SIGMA)
    assert other._operand64 is None and budget.used == OPERAND_BYTES
    del kept
    gc.collect()
    assert budget.used == 0  # freed with its engine (a reload frees the old version)


def test_a_budget_short_of_one_copy_keeps_the_tiles(budget: density.Float64Budget) -> None:
    latents, queries = data(1)
    budget.limit = OPERAND_BYTES - 1
    engine = DensityEngine(latents)
    engine.log_sum(queries, SIGMA)
    assert engine._operand64 is None and budget.used == 0
