"""Prometheus metrics of the gateway (CONTRACT §6), on a registry owned by one app."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

PERCENTILE_BUCKETS = tuple(step / 20 for step in range(1, 21))
BATCH_BUCKETS = tuple(float(2**power) for power in range(13))
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FALLBACK_LOG_DENSITY_BUCKETS = tuple(float(-(2**power)) for power in range(12, -1, -1))
LOG_DENSITY_BUCKET_COUNT = 20
# psi (nats), nu (an effective rank) and delta (a count) share one histogram: signed decades.
DESCRIPTOR_BUCKETS = tuple(
    sorted(
        {sign * scale * 10.0**power for sign in (-1, 1) for scale in (1, 3) for power in range(5)}
        | {0.0}
    )
)


def log_density_buckets(ranges: Sequence[tuple[float, float]]) -> tuple[float, ...]:
    """20 linear bucket bounds (nats) over the union of calibration ranges, widened 10%."""
    if not ranges:
        return FALLBACK_LOG_DENSITY_BUCKETS
    low = min(lo for lo, _ in ranges)
    high = max(hi for _, hi in ranges)
    margin = max(0.1 * (high - low), 1e-3)
    # Scores are log of a mean of terms <= 1, so nothing lies above 0 nats.
    low, high = low - margin, min(high + margin, 0.0)
    step = (high - low) / (LOG_DENSITY_BUCKET_COUNT - 1)
    return tuple(round(low + step * i, 6) for i in range(LOG_DENSITY_BUCKET_COUNT))


class _GaugeCallback(Collector):
    """A labelled gauge read from the app's state at scrape time."""

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


class _CounterCallback(Collector):
    """An unlabelled counter read from the app's state at scrape time."""

    def __init__(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self.name = name
        self.documentation = documentation
        self.read = read

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, value=float(self.read()))


class ArrayHistogram(Collector):
    """A labelled Prometheus histogram fed a whole array per call.

    ``prometheus_client.Histogram`` takes one value per ``observe`` (a lock and a bucket scan
    each); a scored batch has one value per latent, so this counts them in one vectorised pass
    (``searchsorted`` into the bounds, ``bincount``) and renders the same exposition: cumulative
    ``_bucket{le=..}`` series ending at ``+Inf``, ``_count`` and ``_sum``. A value equal to a
    bound falls in that bound's bucket (``le`` is inclusive), as in ``Histogram``.
    """

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str],
        buckets: Sequence[float], registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.bounds = np.asarray(sorted(float(b) for b in buckets if b != float("inf")))
        self._les = [floatToGoString(bound) for bound in self.bounds] + ["+Inf"]
        self._counts: dict[tuple[str, ...], np.ndarray] = {}
        self._sums: dict[tuple[str, ...], float] = {}
        self._created: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, labels: Sequence[str], values: ArrayLike) -> None:
        """Count every value of ``values`` under the series ``labels`` (in ``labelnames``
        order)."""
        array = np.asarray(values, dtype=np.float64).ravel()
        key = tuple(labels)
        if len(key) != len(self.labelnames) or not all(isinstance(label, str) for label in key):
            raise ValueError(f"{self.name} takes string labels {self.labelnames}, got {key}")
        slots = np.bincount(self.bounds.searchsorted(array), minlength=len(self._les))
        total = float(array.sum())
        with self._lock:
            counts = self._counts.get(key)
            if counts is None:
                self._counts[key] = slots
                self._sums[key] = total
                self._created[key] = time.time()
            else:
                counts += slots
                self._sums[key] += total

    def describe(self) -> Iterable[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            series = [
                (key, counts.copy(), self._sums[key], self._created[key])
                for key, counts in self._counts.items()
            ]
        for key, counts, total, created in series:  # first-observed order, as Histogram
            cumulative = np.cumsum(counts).tolist()
            # Written as Histogram writes them: add_metric would drop _count along with _sum
            # when a bound is negative; Histogram drops only _sum (OpenMetrics allows a sum
            # only where no observation can be negative).
            family.add_metric(list(key), list(zip(self._les, cumulative, strict=True)), None)
            labels = dict(zip(self.labelnames, key, strict=True))
            family.samples.append(Sample(f"{self.name}_count", labels, float(cumulative[-1])))
            if self.bounds[0] >= 0:
                family.samples.append(Sample(f"{self.name}_sum", labels, total))
            # Histogram's switch (PROMETHEUS_DISABLE_CREATED_SERIES, disable_created_metrics()).
            if getattr(prometheus_metrics, "_use_created", True):
                family.samples.append(Sample(f"{self.name}_created", labels, created))
        yield family


class ServiceMetrics:
    """Every metric the gateway exports; ``render`` gives the text format."""

    def __init__(self, log_density_bounds: Sequence[float]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.log_density = ArrayHistogram(
            "latentsieve_score_log_density", "Log densities returned (nats).", ["model"],
            buckets=log_density_bounds, registry=self.registry,
        )
        self.percentile = ArrayHistogram(
            "latentsieve_score_percentile", "Calibration percentiles returned.", ["model"],
            buckets=PERCENTILE_BUCKETS, registry=self.registry,
        )
        self.decisions = Counter(
            "latentsieve_decisions", "Accept/reject verdicts; reason is empty for accepts.",
            ["model", "decision", "reason"], registry=self.registry,
        )
        self.request_duration = Histogram(
            "latentsieve_request_duration_seconds", "HTTP request latency (seconds).",
            ["route", "status"], buckets=DURATION_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "latentsieve_batch_size", "Latents per computed batch.", ["model"],
            buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.descriptor = ArrayHistogram(
            "latentsieve_descriptor", "Local-geometry descriptors returned.", ["model", "name"],
            buckets=DESCRIPTOR_BUCKETS, registry=self.registry,
        )
        self.cache_requests = Counter(
            "latentsieve_cache_requests", "Score cache lookups per latent.", ["result"],
            registry=self.registry,
        )
        self.cache_hits = self.cache_requests.labels(result="hit")
        self.cache_misses = self.cache_requests.labels(result="miss")

    def watch_queue_depth(self, read: Callable[[], Mapping[str, int]]) -> None:
        """``latentsieve_queue_depth{model}``: rows waiting in the batcher, read at scrape."""
        self.registry.register(
            _GaugeCallback(
                "latentsieve_queue_depth", "Latents waiting to be scored.", ["model"],
                lambda: {(model,): float(depth) for model, depth in read().items()},
            )
        )

    def watch_cache_errors(self, read: Callable[[], int]) -> None:
        """``latentsieve_cache_errors_total``: cache calls that could not reach the backend."""
        self.registry.register(_CounterCallback(
            "latentsieve_cache_errors", "Cache calls that failed (Redis down); answered by "
            "computing.", read,
        ))

    def watch_index_latents(self, read: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        """``latentsieve_index_latents{model, version}``: N of each served version."""
        self.registry.register(
            _GaugeCallback(
                "latentsieve_index_latents", "Training latents in each served index.",
                ["model", "version"],
                lambda: {key: float(n) for key, n in read().items()},
            )
        )

    def observe_results(
        self, model: str, log_density: ArrayLike, percentile: ArrayLike,
        reasons: Sequence[Sequence[str]],
    ) -> None:
        """Scores and verdicts of one answered batch."""
        self.log_density.observe_many((model,), log_density)
        self.percentile.observe_many((model,), percentile)
        # One count per latent: a rejection by several rules carries them all, comma-joined,
        # so sum by (decision) equals the number of latents decided.
        verdicts = collections.Counter(",".join(why) for why in reasons)
        for reason, count in verdicts.items():
            decision = "reject" if reason else "accept"
            self.decisions.labels(model=model, decision=decision, reason=reason).inc(count)

    def observe_descriptors(self, model: str, values: Mapping[str, ArrayLike]) -> None:
        """``latentsieve_descriptor{model, name}`` for each returned descriptor value."""
        for name, series in values.items():
            self.descriptor.observe_many((model, name), series)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
