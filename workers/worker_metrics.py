"""The Redis worker's metrics (docs/contract.md §6, distributed mode), and the definition of the
histogram families it shares with the gateway.

``latentsieve_batch_size`` and ``latentsieve_compute_seconds`` are exported by the gateway
(service/metrics.py, local batches) and by every worker (their batches); the dashboard adds the
two targets' buckets, so both build them from the one ``HistogramFamily`` here: one name, help
text, label set and set of buckets. ``latentsieve_certified_rows`` (``certified_rows``) is
exported by whichever process scores a certified ivf index: the gateway embedded, else each
worker. This module imports nothing of ``latentsieve.service``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

OUTCOMES = ("done", "expired", "reclaimed", "dead_letter", "error")
BATCH_BUCKETS = tuple(float(2**power) for power in range(13))
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class HistogramFamily:
    """One histogram family's definition: build it with ``histogram(registry)``."""

    name: str
    documentation: str
    labelnames: tuple[str, ...]
    buckets: tuple[float, ...]

    def histogram(self, registry: CollectorRegistry | None) -> Histogram:
        return Histogram(self.name, self.documentation, self.labelnames, buckets=self.buckets,
                         registry=registry)


BATCH_SIZE = HistogramFamily(
    "latentsieve_batch_size", "Latents per computed batch.", ("model",), BATCH_BUCKETS,
)
COMPUTE_SECONDS = HistogramFamily(
    "latentsieve_compute_seconds", "Seconds to compute one batch, by scoring device.",
    ("model", "device"), DURATION_BUCKETS,
)


class GaugeCallback(Collector):
    """A labelled gauge read from the process's state at scrape time."""

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str],
        read: Callable[[], Mapping[tuple[str, ...], float]],
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = list(labels)
        self.read = read

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
        for values, value in sorted(self.read().items()):
            family.add_metric(list(values), value)
        yield family


def certified_rows(read: Callable[[], Mapping[tuple[str, str], int]]) -> GaugeCallback:
    """``latentsieve_certified_rows{model, path}``: rows the certified ivf shards of this
    process scored by each path since they were loaded (``bounds``: the bounds alone,
    ``probed``, ``dense``: the cost model sent them to the dense GEMM, ``bailed``: dense after
    probing stopped paying). The fallback's decision, for an operator."""
    return GaugeCallback(
        "latentsieve_certified_rows",
        "Certified ivf rows scored by each path since load (bounds, probed, dense, bailed).",
        ["model", "path"],
        lambda: {key: float(n) for key, n in read().items()},
    )


class WorkerMetrics:
    """The worker's own ``/metrics`` (docs/contract.md §6, distributed mode)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.batch_size = BATCH_SIZE.histogram(self.registry)
        self.compute_seconds = COMPUTE_SECONDS.histogram(self.registry)
        self.jobs = Counter(
            "latentsieve_worker_jobs", "Jobs handled, by outcome.", ["model", "outcome"],
            registry=self.registry,
        )
        self.up = Gauge(
            "latentsieve_worker_up", "1 while this worker serves the model shard.",
            ["model", "shard", "device"], registry=self.registry,
        )

    def watch_certified_paths(self, read: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        """Export ``certified_rows`` of ``read`` (the worker's loaded shards) on this registry."""
        self.registry.register(certified_rows(read))

    def serving(self, model: str, shard: int, device: str) -> None:
        """Initialise every series of a newly served model shard (dashboards see zeros)."""
        self.up.labels(model=model, shard=str(shard), device=device).set(1)
        self.batch_size.labels(model=model)
        self.compute_seconds.labels(model=model, device=device)
        for outcome in OUTCOMES:
            self.jobs.labels(model=model, outcome=outcome)
