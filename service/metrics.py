"""Prometheus metrics of the gateway (docs/contract.md §6), on a registry owned by one app.

With several worker processes (``latentsieve serve --workers N``) every process writes its
counts to memory-mapped files in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's
multiprocess mode) and ``/metrics``, whichever worker answers it, sums them all.

Only prometheus_client's public API is used (metric classes, ``prometheus_client.core``'s metric
families and ``Sample``, ``Collector``, ``MultiProcessCollector``), so no release caps the
version. ``le_label`` writes a bucket bound as ``Histogram`` does (a test holds the two equal).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric, Sample
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from latentsieve.workers.worker_metrics import (
    BATCH_SIZE,
    COMPUTE_SECONDS,
    DURATION_BUCKETS,
    GaugeCallback,
    certified_rows,
)


def le_label(bound: float) -> str:
    """A bucket bound as ``Histogram``'s ``le`` label: Go's ``FormatFloat(x, 'g', -1, 64)``, the
    shortest round-trip digits with an exponent from 1e6 up (``1.0000005e+06``; ``repr``
    otherwise), and ``+Inf``/``-Inf``/``NaN``. The pinned prometheus_client (0.26) writes the
    same, and tests/unit/test_array_histogram.py holds the installed one to it below 1e10;
    0.20 writes ``e+010`` from 1e10 up, which no bound here reaches."""
    bound = float(bound)
    if math.isinf(bound):
        return "+Inf" if bound > 0 else "-Inf"
    if math.isnan(bound):
        return "NaN"
    text = repr(bound)
    dot = text.find(".")
    if bound > 0 and dot > 6:  # Go switches to an exponent sooner than Python
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


PERCENTILE_BUCKETS = tuple(step / 20 for step in range(1, 21))
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


# Metrics made only to ask prometheus_client something; render() never shows them.
CREATED_PROBE = "latentsieve_created_probe"
MULTIPROCESS_PROBE = "latentsieve_multiprocess_probe"


@functools.cache
def _created_probe() -> Counter:
    return Counter(CREATED_PROBE, "Asked whether _created series are on; never exported.",
                   registry=None)


def created_series_enabled() -> bool:
    """Whether prometheus_client writes ``_created`` series now: off with
    ``PROMETHEUS_DISABLE_CREATED_SERIES`` or after ``disable_created_metrics()``. The client
    has no public getter for that switch, so a Counter of its own (never registered) is asked:
    the switch ``Histogram`` follows too."""
    return any(sample.name.endswith("_created")
               for family in _created_probe().collect() for sample in family.samples)


SLOT = "slot"  # the flushed gauge's label: a bucket's ``le``, or SUM_SLOT
SUM_SLOT = "sum"


class ArrayHistogram(Collector):
    """A labelled Prometheus histogram fed a whole array per call.

    ``prometheus_client.Histogram`` takes one value per ``observe`` (a lock and a bucket scan
    each); a scored batch has one value per latent, so this counts them in one vectorised pass
    (``searchsorted`` into the bounds, ``bincount``) and renders the same exposition through the
    public custom-collector API (``HistogramMetricFamily``): cumulative ``_bucket{le=..}``
    series ending at ``+Inf``, ``_count``, ``_sum`` (only where no bound is negative, as
    ``Histogram``) and ``_created`` (when the client writes them). A value equal to a bound
    falls in that bound's bucket (``le`` is inclusive), as in ``Histogram``.

    Multiprocess mode: prometheus_client aggregates only its own metric classes across
    processes, not custom collectors. So ``flush`` writes this process's totals (per bucket,
    not cumulative, and the sum) to a public ``Gauge`` named ``flushed_name`` with
    ``multiprocess_mode="sum"`` and a ``slot`` label (a bucket's ``le``, or ``sum``);
    ``MultiProcessCollector`` adds them over every process, dead ones included, as it adds a
    ``Histogram``'s, and ``merged`` turns that sum back into this histogram at scrape time.
    """

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str],
        buckets: Sequence[float], registry: CollectorRegistry, multiprocess: bool = False,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        if SLOT in self.labelnames:
            raise ValueError(f"{name}: the label {SLOT!r} is the flushed gauge's own")
        self.bounds = np.asarray(sorted(float(b) for b in buckets if b != float("inf")))
        self._les = [le_label(bound) for bound in self.bounds] + ["+Inf"]
        self._slots = {le: index for index, le in enumerate(self._les)}
        # OpenMetrics allows a sum only where no observation can be negative (Histogram's rule).
        self._has_sum = bool(self.bounds[0] >= 0)
        self._counts: dict[tuple[str, ...], np.ndarray] = {}
        self._sums: dict[tuple[str, ...], float] = {}
        self._created: dict[tuple[str, ...], float] = {}
        self.multiprocess = multiprocess
        self.flushed_name = f"{name}_flushed"
        self._flushed: Gauge | None = None  # made by the first flush (multiprocess mode)
        self._flushed_series: dict[tuple[str, ...], list[Any]] = {}
        self._dirty: set[tuple[str, ...]] = set()  # observed since the last flush
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, labels: Sequence[str], values: ArrayLike) -> None:
        """Count every value of ``values`` under the series ``labels`` (in ``labelnames``
        order)."""
        array = np.asarray(values, dtype=np.float64).ravel()
        key = tuple(labels)
        if key not in self._counts and (
            len(key) != len(self.labelnames) or not all(isinstance(label, str) for label in key)
        ):
            raise ValueError(f"{self.name} takes string labels {self.labelnames}, got {key}")
        slots = np.bincount(self.bounds.searchsorted(array), minlength=len(self._les))
        total = float(array.sum()) if self._has_sum else 0.0
        with self._lock:
            counts = self._counts.get(key)
            if counts is None:
                self._counts[key] = slots
                self._sums[key] = total
                self._created[key] = time.time()
            else:
                counts += slots
                self._sums[key] += total
            if self.multiprocess:
                self._dirty.add(key)

    def flush(self) -> None:
        """Multiprocess mode: write the totals of every series observed since the last flush
        to this process's mmap file (the flushed gauge, see the class). Observing stays an
        in-memory ``bincount``: a file write per bucket per request (about 2 us each) would
        cost more than the rest of a cached request's metrics."""
        if not self.multiprocess:
            return
        with self._lock:
            series = [(key, self._counts[key].tolist(), self._sums[key]) for key in self._dirty]
            self._dirty.clear()
        if not series:
            return
        if self._flushed is None:
            self._flushed = Gauge(
                self.flushed_name,
                f"This process's bucket counts and sum of {self.name}; /metrics shows their "
                "sum over processes as the histogram.",
                [*self.labelnames, SLOT], multiprocess_mode="sum", registry=None,
            )
        for key, counts, total in series:
            children = self._flushed_series.get(key)
            if children is None:
                slots = [*self._les, SUM_SLOT] if self._has_sum else self._les
                children = [self._flushed.labels(*key, slot) for slot in slots]
                self._flushed_series[key] = children
            for child, value in zip(children, [*counts, total] if self._has_sum else counts,
                                    strict=True):
                child.set(value)

    def merged(self, flushed: Metric) -> Metric:
        """This histogram from ``flushed``: ``MultiProcessCollector``'s family of the flushed
        gauge, summed over processes. No ``_created``, as ``MultiProcessCollector`` writes
        none. A slot of other bounds (a folder kept across a change of buckets) is skipped."""
        names, slots, width = self.labelnames, self._slots, len(self._les)
        counts: dict[tuple[str, ...], list[float]] = {}
        sums: dict[tuple[str, ...], float] = {}
        for sample in flushed.samples:
            labels = sample.labels
            key = tuple([labels.get(name, "") for name in names])
            slot = labels.get(SLOT, "")
            if slot == SUM_SLOT:
                sums[key] = sums.get(key, 0.0) + sample.value
                continue
            index = slots.get(slot)
            if index is None:
                continue
            row = counts.get(key)
            if row is None:
                row = counts[key] = [0.0] * width
            row[index] += sample.value
        family = self._family()
        for key, row in counts.items():
            self._add_series(family, key, row, sums.get(key, 0.0), None)
        return family

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add_series(self, family: HistogramMetricFamily, key: tuple[str, ...],
                    counts: list[float], total: float, created: float | None) -> None:
        cumulative = list(itertools.accumulate(counts))
        labels = dict(zip(self.labelnames, key, strict=True))
        # Histogram's samples, in its order. Not add_metric: it drops _count along with _sum
        # where a bound is negative, and Histogram drops only _sum.
        bucket = f"{self.name}_bucket"
        family.samples.extend(
            Sample(bucket, {**labels, "le": le}, value)
            for le, value in zip(self._les, cumulative, strict=True)
        )
        family.samples.append(Sample(f"{self.name}_count", labels, cumulative[-1]))
        if self._has_sum:
            family.samples.append(Sample(f"{self.name}_sum", labels, total))
        if created is not None:
            family.samples.append(Sample(f"{self.name}_created", labels, created))

    def describe(self) -> Iterable[Metric]:
        yield self._family()

    def collect(self) -> Iterable[Metric]:
        """This process's counts (the registry of one process)."""
        with self._lock:
            series = [
                (key, counts.tolist(), self._sums[key], self._created[key])
                for key, counts in self._counts.items()
            ]
        # Histogram's switch; not asked in multiprocess mode, where its probe would be a file.
        created = not self.multiprocess and created_series_enabled()
        family = self._family()
        for key, counts, total, when in series:  # first-observed order, as Histogram
            self._add_series(family, key, counts, total, when if created else None)
        yield family


class _MergedFiles(Collector):
    """``MultiProcessCollector`` over ``folder``, with each ArrayHistogram's flushed gauge
    turned back into its histogram and the probes left out."""

    def __init__(self, folder: str, histograms: Iterable[ArrayHistogram]) -> None:
        self.files = MultiProcessCollector(None, path=folder)
        self.histograms = {histogram.flushed_name: histogram for histogram in histograms}

    def collect(self) -> Iterable[Metric]:
        for family in self.files.collect():
            histogram = self.histograms.get(family.name)
            if histogram is not None:
                yield histogram.merged(family)
            elif family.name not in (CREATED_PROBE, MULTIPROCESS_PROBE):
                yield family


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# How stale another worker's score histograms may be in a scrape (multiprocess mode).
FLUSH_INTERVAL_S = 1.0


def multiprocess_dir() -> str | None:
    """The multiprocess folder when this process runs in prometheus_client's multiprocess mode
    (``PROMETHEUS_MULTIPROC_DIR`` set before ``prometheus_client`` was imported), else None.

    prometheus_client picks in-memory or file-backed values once, when imported, and says
    which through no public name; so a live gauge of this process (never shown by ``render``,
    its file removed by ``mark_process_dead``) is set to a fresh random value, and the folder
    must show it under this process's pid."""
    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        return None
    token = float(secrets.randbelow(2**52) + 1)
    Gauge(MULTIPROCESS_PROBE, "Whether this process writes its metrics to the folder.",
          registry=None, multiprocess_mode="liveall").set(token)
    pid = str(os.getpid())
    try:
        families = list(MultiProcessCollector(None, path=folder).collect())
    except ValueError:  # not a folder
        families = []
    if not any(sample.labels.get("pid") == pid and sample.value == token
               for family in families if family.name == MULTIPROCESS_PROBE
               for sample in family.samples):
        raise RuntimeError(
            f"{MULTIPROC_ENV} was set after prometheus_client was imported, so this process "
            "keeps its metrics to itself; set it before the process starts"
        )
    return folder


class ServiceMetrics:
    """Every metric the gateway exports; ``render`` gives the text format.

    ``multiprocess_dir`` (see ``multiprocess_dir()``) switches to prometheus_client's
    multiprocess mode: counters and histograms live in that folder's mmap files (the score
    histograms are counted in memory and written by ``flush``, so a scrape sees another worker's
    scores up to ``FLUSH_INTERVAL_S`` late), the queue depth is written whenever it changes
    (``queue_changed``, summed over live workers), and ``render`` merges every process's files.
    ``latentsieve_index_latents`` stays a scrape-time reading of the answering process: every
    worker serves the same store.
    """

    def __init__(
        self, log_density_bounds: Sequence[float], multiprocess_dir: str | None = None
    ) -> None:
        self.multiprocess_dir = multiprocess_dir
        shared = multiprocess_dir is not None
        self.registry = CollectorRegistry(auto_describe=True)
        self._scrape_time: list[Collector] = []  # rendered in both modes
        self.log_density = ArrayHistogram(
            "latentsieve_score_log_density", "Log densities returned (nats).", ["model"],
            buckets=log_density_bounds, registry=self.registry, multiprocess=shared,
        )
        self.percentile = ArrayHistogram(
            "latentsieve_score_percentile", "Calibration percentiles returned.", ["model"],
            buckets=PERCENTILE_BUCKETS, registry=self.registry, multiprocess=shared,
        )
        self.decisions = Counter(
            "latentsieve_decisions", "Accept/reject verdicts; reason is empty for accepts.",
            ["model", "decision", "reason"], registry=self.registry,
        )
        self.request_duration = Histogram(
            "latentsieve_request_duration_seconds", "HTTP request latency (seconds).",
            ["route", "status"], buckets=DURATION_BUCKETS, registry=self.registry,
        )
        # Also exported by every Redis worker: one definition (workers/worker_metrics.py).
        self.batch_size = BATCH_SIZE.histogram(self.registry)
        self.compute_seconds = COMPUTE_SECONDS.histogram(self.registry)
        self.descriptor = ArrayHistogram(
            "latentsieve_descriptor", "Local-geometry descriptors returned.", ["model", "name"],
            buckets=DESCRIPTOR_BUCKETS, registry=self.registry, multiprocess=shared,
        )
        self.cache_requests = Counter(
            "latentsieve_cache_requests", "Score cache lookups per latent.", ["result"],
            registry=self.registry,
        )
        self.cache_hits = self.cache_requests.labels(result="hit")
        self.cache_misses = self.cache_requests.labels(result="miss")
        self.cache_errors = Counter(
            "latentsieve_cache_errors",
            "Cache calls that failed (Redis down); answered by computing.",
            registry=self.registry,
        )
        # Label children by their label values: ``labels()`` costs about 2 us a call.
        self._request_series: dict[tuple[str, int], Any] = {}
        self._decision_series: dict[tuple[str, str], Any] = {}
        self._queue_depth_read: Callable[[], Mapping[str, int]] | None = None
        self._queue_depth = (
            Gauge("latentsieve_queue_depth", "Latents waiting to be scored.", ["model"],
                  registry=None, multiprocess_mode="livesum")
            if shared else None
        )

    def watch_queue_depth(self, read: Callable[[], Mapping[str, int]]) -> None:
        """``latentsieve_queue_depth{model}``: rows waiting in the batcher. Read at scrape in
        one process; with several, each writes its own on ``queue_changed`` and they add up."""
        self._queue_depth_read = read
        if self._queue_depth is None:
            self._add_scrape_time(
                GaugeCallback(
                    "latentsieve_queue_depth", "Latents waiting to be scored.", ["model"],
                    lambda: {(model,): float(depth) for model, depth in read().items()},
                )
            )
        else:
            self.queue_changed()

    def watch_queue_limit(self, models: Callable[[], Iterable[str]], limit: int) -> None:
        """``latentsieve_queue_limit{model}``: latents one model may have queued in one process
        (``model_queue_limit``); past it, 429. Alerts compare the queue depth with it."""
        self._add_scrape_time(
            GaugeCallback(
                "latentsieve_queue_limit", "Latents one model may queue before 429.", ["model"],
                lambda: {(model,): float(limit) for model in models()},
            )
        )

    def queue_changed(self) -> None:
        """Publish this process's queue depth (multiprocess mode only; a no-op otherwise)."""
        if self._queue_depth is None or self._queue_depth_read is None:
            return
        for model, depth in self._queue_depth_read().items():
            self._queue_depth.labels(model=model).set(depth)

    def watch_live_workers(self, read: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        """``latentsieve_live_workers{model, shard}``: workers with a fresh heartbeat."""
        self._add_scrape_time(
            GaugeCallback(
                "latentsieve_live_workers", "Workers with a live heartbeat, per model shard.",
                ["model", "shard"],
                lambda: {key: float(count) for key, count in read().items()},
            )
        )

    def count_cache(self, hits: int, misses: int) -> None:
        """``latentsieve_cache_requests_total{result}`` for one lookup of many latents."""
        if hits:
            self.cache_hits.inc(hits)
        if misses:
            self.cache_misses.inc(misses)

    def watch_index_latents(self, read: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        """``latentsieve_index_latents{model, version}``: N of each served version."""
        self._add_scrape_time(
            GaugeCallback(
                "latentsieve_index_latents", "Training latents in each served index.",
                ["model", "version"],
                lambda: {key: float(n) for key, n in read().items()},
            )
        )

    def watch_certified_paths(self, read: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        """``latentsieve_certified_rows`` (workers.worker_metrics.certified_rows) of the
        certified ivf shards this process scores (embedded compute)."""
        self._add_scrape_time(certified_rows(read))

    def _add_scrape_time(self, collector: Collector) -> None:
        self._scrape_time.append(collector)
        self.registry.register(collector)

    def observe_results(
        self, model: str, log_density: ArrayLike, percentile: ArrayLike,
        reasons: Sequence[Sequence[str]],
    ) -> None:
        """Scores and verdicts of one answered batch."""
        self.log_density.observe_many((model,), log_density)
        self.percentile.observe_many((model,), percentile)
        # One count per latent: a rejection by several rules carries them all, comma-joined,
        # so sum by (decision) equals the number of latents decided.
        verdicts: dict[str, int] = {}
        for why in reasons:
            reason = ",".join(why) if why else ""
            verdicts[reason] = verdicts.get(reason, 0) + 1
        for reason, count in verdicts.items():
            series = self._decision_series.get((model, reason))
            if series is None:
                decision = "reject" if reason else "accept"
                series = self.decisions.labels(model=model, decision=decision, reason=reason)
                self._decision_series[(model, reason)] = series
            series.inc(count)

    def observe_batch(self, model: str, device: str, size: int, seconds: float) -> None:
        """One computed batch: its size (latents) and compute time on ``device``."""
        self.batch_size.labels(model=model).observe(size)
        self.compute_seconds.labels(model=model, device=device).observe(seconds)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """``latentsieve_request_duration_seconds{route, status}`` of one answered request."""
        series = self._request_series.get((route, status))
        if series is None:
            series = self.request_duration.labels(route=route, status=str(status))
            self._request_series[(route, status)] = series
        series.observe(seconds)

    def observe_descriptors(self, model: str, values: Mapping[str, ArrayLike]) -> None:
        """``latentsieve_descriptor{model, name}`` for each returned descriptor value."""
        for name, series in values.items():
            self.descriptor.observe_many((model, name), series)

    def flush(self) -> None:
        """Multiprocess mode: write the in-memory score histograms to this process's mmap file
        (the lifespan calls this every ``FLUSH_INTERVAL_S``, on shutdown and before a scrape
        renders; other metrics are written as they change)."""
        for histogram in (self.log_density, self.percentile, self.descriptor):
            histogram.flush()

    def render(self) -> bytes:
        """The Prometheus text exposition: this registry, or in multiprocess mode the merged
        files of every process plus the scrape-time readings."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        self.flush()
        self.queue_changed()  # a model loaded since the last change shows its 0 too
        merged = CollectorRegistry()
        merged.register(_MergedFiles(
            self.multiprocess_dir, (self.log_density, self.percentile, self.descriptor)
        ))
        for collector in self._scrape_time:
            merged.register(collector)
        return generate_latest(merged)
