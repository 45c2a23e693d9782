"""The Redis worker's metrics (docs/contract.md §6, distributed mode), and the definition of the
histogram families it shares with the gateway.

``latentsieve_batch_size`` and ``latentsieve_compute_seconds`` are exported by the gateway
(service/metrics.py, local batches) and by every worker (their batches); the dashboard adds the
two targets' buckets, so both build them from the one ``HistogramFamily`` here: one name, help
text, label set and set of buckets. This module imports nothing of ``latentsieve.service``.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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

    def serving(self, model: str, shard: int, device: str) -> None:
        """Initialise every series of a newly served model shard (dashboards see zeros)."""
        self.up.labels(model=model, shard=str(shard), device=device).set(1)
        self.batch_size.labels(model=model)
        self.compute_seconds.labels(model=model, device=device)
        for outcome in OUTCOMES:
            self.jobs.labels(model=model, outcome=outcome)
