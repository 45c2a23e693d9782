"""A worker's ``/metrics`` (docs/contract.md §6, distributed mode): the four families with their
labels,
every series of a served shard initialised, and the histograms the gateway also exports bucketed
and described exactly as the gateway's (the dashboard sums both targets' buckets)."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from latentsieve.service.metrics import ServiceMetrics
from latentsieve.workers.worker_metrics import OUTCOMES, WorkerMetrics

CONTRACT = {  # name: (type, labels)
    "latentsieve_batch_size": ("histogram", {"model"}),
    "latentsieve_compute_seconds": ("histogram", {"model", "device"}),
    "latentsieve_worker_jobs": ("counter", {"model", "outcome"}),
    "latentsieve_worker_up": ("gauge", {"model", "shard", "device"}),
}


def families(text: bytes) -> dict[str, Metric]:
    """Families by name; the ``_created`` timestamps the text parser reports apart are left out."""
    return {family.name: family for family in text_string_to_metric_families(text.decode())
            if not family.name.endswith("_created")}


def labels_of(family: Metric) -> set[str]:
    return {name for sample in family.samples for name in sample.labels if name != "le"}


def bucket_bounds(family: Metric) -> list[str]:
    first = family.samples[0].labels
    same_series = [sample for sample in family.samples if sample.name.endswith("_bucket")
                   and {k: v for k, v in sample.labels.items() if k != "le"}
                   == {k: v for k, v in first.items() if k != "le"}]
    return [sample.labels["le"] for sample in same_series]


def test_a_served_shard_has_every_series_at_start() -> None:
    metrics = WorkerMetrics()
    metrics.serving("digits", 2, "cuda:1")
    found = families(generate_latest(metrics.registry))

    assert {name: (family.type, labels_of(family)) for name, family in found.items()} == CONTRACT
    up = [(sample.labels, sample.value) for sample in found["latentsieve_worker_up"].samples]
    assert up == [({"model": "digits", "shard": "2", "device": "cuda:1"}, 1.0)]
    jobs = {sample.labels["outcome"]: sample.value
            for sample in found["latentsieve_worker_jobs"].samples
            if sample.name == "latentsieve_worker_jobs_total"}
    assert jobs == dict.fromkeys(("done", "expired", "reclaimed", "dead_letter", "error"), 0.0)
    assert set(OUTCOMES) == set(jobs)
    for name in ("latentsieve_batch_size", "latentsieve_compute_seconds"):
        counts = [sample for sample in found[name].samples if sample.name == f"{name}_count"]
        assert [sample.value for sample in counts] == [0.0]
    devices = {sample.labels.get("device")
               for sample in found["latentsieve_compute_seconds"].samples}
    assert devices == {"cuda:1"}


def test_shared_histograms_match_the_gateways() -> None:
    worker = WorkerMetrics()
    worker.serving("digits", 0, "cpu")
    worker.batch_size.labels(model="digits").observe(3)
    worker.compute_seconds.labels(model="digits", device="cpu").observe(0.02)
    gateway = ServiceMetrics([-10.0, 0.0])
    gateway.batch_size.labels(model="digits").observe(3)
    gateway.compute_seconds.labels(model="digits", device="cpu").observe(0.02)
    mine, theirs = families(generate_latest(worker.registry)), families(gateway.render())
    for name in ("latentsieve_batch_size", "latentsieve_compute_seconds"):
        assert mine[name].documentation == theirs[name].documentation
        assert mine[name].documentation.strip()
        assert bucket_bounds(mine[name]) == bucket_bounds(theirs[name])
        assert mine[name].samples == theirs[name].samples
    assert bucket_bounds(mine["latentsieve_batch_size"])[:3] == ["1.0", "2.0", "4.0"]


def test_two_workers_in_one_process_keep_separate_registries() -> None:
    first, second = WorkerMetrics(), WorkerMetrics()
    first.serving("a", 0, "cpu")
    second.serving("b", 1, "cpu")
    first.jobs.labels(model="a", outcome="done").inc(4)
    seen = families(generate_latest(second.registry))
    models = {sample.labels["model"] for sample in seen["latentsieve_worker_jobs"].samples}
    assert models == {"b"}
    assert all(sample.value == 0 for sample in seen["latentsieve_worker_jobs"].samples
               if sample.name == "latentsieve_worker_jobs_total")


def test_certified_rows_on_a_worker_are_the_gateways_gauge() -> None:
    """A worker exports the certified ivf decisions of the shards it scores under the gateway's
    name, help text and labels (``latentsieve_certified_rows``, read at scrape time)."""
    counts = {("digits-ivf", "dense"): 3, ("digits-ivf", "bounds"): 5}
    worker = WorkerMetrics()
    worker.watch_certified_paths(lambda: counts)
    gateway = ServiceMetrics([-10.0, 0.0])
    gateway.watch_certified_paths(lambda: counts)
    mine, theirs = families(generate_latest(worker.registry)), families(gateway.render())
    name = "latentsieve_certified_rows"
    assert mine[name].documentation == theirs[name].documentation
    assert mine[name].samples == theirs[name].samples
    assert {s.labels["path"]: s.value for s in mine[name].samples} == {"dense": 3, "bounds": 5}
    counts[("digits-ivf", "dense")] = 7  # read again at each scrape
    again = families(generate_latest(worker.registry))[name]
    assert {s.labels["path"]: s.value for s in again.samples} == {"dense": 7, "bounds": 5}
