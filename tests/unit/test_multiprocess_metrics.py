"""Metrics of several worker processes: each real process writes its own mmap files, and one
``render`` shows their sums, equal to what a single process fed everything would show."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from latentsieve.service.metrics import MULTIPROC_ENV, ServiceMetrics, multiprocess_dir
from latentsieve.service.settings import Settings

BOUNDS = (-40.0, -30.0, -20.0, -10.0)
BATCHES = {
    "one": (np.array([-35.0, -25.0, -25.0, -5.0]), np.array([0.1, 0.5, 0.55, 0.99]),
            [["percentile_below_min"], [], [], []]),
    "two": (np.array([-45.0, -15.0, -10.0]), np.array([0.02, 0.7, 1.0]),
            [["percentile_below_min"], [], []]),
}


def _worker(folder: str, batch: str, queued: int, done: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """One worker process (spawned with ``PROMETHEUS_MULTIPROC_DIR`` set, as ``serve --workers``
    spawns them): observe its batch, report a queue depth, flush, exit."""
    assert multiprocess_dir() == folder
    metrics = ServiceMetrics(BOUNDS, multiprocess_dir=folder)
    log_density, percentile, reasons = BATCHES[batch]
    # Half, a flush (the periodic task), the rest: each flush writes the totals so far.
    metrics.observe_results("m", log_density[:2], percentile[:2], reasons[:2])
    metrics.flush()
    metrics.observe_results("m", log_density[2:], percentile[2:], reasons[2:])
    metrics.observe_descriptors("m", {"psi": log_density, "nu": percentile})
    metrics.observe_request("/score", 200, 0.003)
    metrics.cache_hits.inc(len(log_density))
    metrics.watch_queue_depth(lambda: {"m": queued})
    metrics.flush()
    metrics.flush()  # the periodic task, then a scrape: totals are written, never added twice
    done.put((batch, os.getpid()))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def run_workers(
    folder: Path, plan: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch
) -> dict[str, int]:
    """Run one spawned worker per (batch, queue depth); returns each batch's worker pid."""
    monkeypatch.setenv(MULTIPROC_ENV, str(folder))  # inherited by the spawned children
    context = multiprocessing.get_context("spawn")
    done = context.Queue()
    processes = [
        context.Process(target=_worker, args=(str(folder), batch, queued, done))
        for batch, queued in plan
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    monkeypatch.delenv(MULTIPROC_ENV)
    return dict(done.get(timeout=5) for _ in processes)


def test_render_sums_every_worker_like_one_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids = run_workers(tmp_path, [("one", 3), ("two", 4)], monkeypatch)
    assert len(set(pids.values())) == 2
    merged = samples(ServiceMetrics(BOUNDS, multiprocess_dir=str(tmp_path)).render().decode())

    single = ServiceMetrics(BOUNDS)
    for log_density, percentile, reasons in BATCHES.values():
        single.observe_results("m", log_density, percentile, reasons)
        single.observe_descriptors("m", {"psi": log_density, "nu": percentile})
        single.observe_request("/score", 200, 0.003)
        single.cache_hits.inc(len(log_density))
    expected = samples(single.render().decode())

    families = ("latentsieve_score_", "latentsieve_descriptor", "latentsieve_decisions",
                "latentsieve_request_duration", "latentsieve_cache_requests")
    shared = [key for key in expected if key[0].startswith(families)]
    assert len(shared) > 80
    # The same series, no more (the flushed gauges and the probe stay out of the exposition).
    assert {key for key in merged if key[0].startswith(families)} == set(shared)
    assert not [name for name, _ in merged if "probe" in name or "flushed" in name]
    for key in shared:
        assert merged.get(key) == pytest.approx(expected[key]), key
    # Negative log-density bounds: no _sum, in either mode; percentiles keep theirs.
    assert not any(name == "latentsieve_score_log_density_sum" for name, _ in merged)
    assert merged[("latentsieve_score_percentile_count", (("model", "m"),))] == 7
    # Queue depths add up over live workers; a dead worker's leaves the sum.
    assert merged[("latentsieve_queue_depth", (("model", "m"),))] == 7
    mark_process_dead(pids["two"], str(tmp_path))
    after = samples(ServiceMetrics(BOUNDS, multiprocess_dir=str(tmp_path)).render().decode())
    assert after[("latentsieve_queue_depth", (("model", "m"),))] == 3
    assert after[("latentsieve_score_percentile_count", (("model", "m"),))] == 7


def test_multiprocess_dir_refuses_a_late_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Set after prometheus_client chose its in-memory values: refuse rather than lose counts."""
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match="set it before the process starts"):
        multiprocess_dir()
    monkeypatch.delenv(MULTIPROC_ENV)
    assert multiprocess_dir() is None


def test_settings_survive_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``serve --processes`` hands each process rebuilds exactly the parent's settings."""
    original = Settings(
        store=Path("/srv/store"), port=9001, redis_url="redis://:pw@127.0.0.1:6390/2",
        api_keys=["alpha", "beta"], max_wait_ms=2.5, cache_ttl_s=0.125, processes=3,
        log_density_buckets=[-40.5, -30.0, -0.001, -1e-7],
    )
    for name in [key for key in os.environ if key.startswith("LATENTSIEVE_")]:
        monkeypatch.delenv(name)
    for name, value in original.environment().items():
        monkeypatch.setenv(name, value)
    assert Settings() == original  # type: ignore[call-arg]
    assert "LATENTSIEVE_REDIS_URL" not in Settings(store=Path("s"), redis_url=None).environment()
