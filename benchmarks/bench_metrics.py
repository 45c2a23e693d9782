"""The score histograms' bulk observe (``ArrayHistogram.observe_many``) and their rendering,
before and after service/metrics.py moved to prometheus_client's public API (issue 20, item 6),
timed in one process on the same arrays.

    python benchmarks/bench_metrics.py                        # 10,000 calls of 500 values
    python benchmarks/bench_metrics.py --calls 2000 --size 16  # a 16-latent request's size

Rows:

- ``observe_many``: one call per array, the arrays cycling over 8 model series (64 distinct
  float64 arrays of ``--size`` values drawn once, shared by both); old and new alternate every
  500 calls, time per call over ``--calls`` calls each, best of ``--repeats``.
- ``render``: ``generate_latest`` of a registry holding one histogram of 20 buckets with the 8
  series filled (one process; what a scrape pays for it).
- ``flush`` and ``render (multiprocess)``: in a child process started with
  ``PROMETHEUS_MULTIPROC_DIR`` set (prometheus_client reads it when imported), a fresh folder
  and child per run, old and new interleaved, best of ``--repeats``: ``flush`` after one
  observe on each of the 8 series (the periodic task, once a second in the service), and the
  merged scrape of the folder (the baseline through ``MultiProcessCollector``, the new one
  through ``ServiceMetrics.render``'s collector).

The baseline is ``BaselineArrayHistogram`` below: service/metrics.py's ``ArrayHistogram`` as of
commit 3a60e62, copied verbatim (only renamed), private-API reads included. It is kept here for
this comparison alone; a prometheus-client release that drops those internals breaks the
baseline rows, not the service.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import version
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import metrics as prometheus_metrics
from prometheus_client import values as prometheus_values
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from latentsieve.service import metrics as service_metrics
from latentsieve.service.metrics import ArrayHistogram

SERIES = 8
CHUNK = 500  # observe_many calls timed in a row before switching implementation
DISTINCT_ARRAYS = 64
BOUNDS = tuple(round(-60.0 + 3.0 * i, 6) for i in range(20))  # 20 log-density-like bounds
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


# --- BASELINE: service/metrics.py's ArrayHistogram at 3a60e62 (before issue 20, item 6) ---

class BaselineArrayHistogram(Collector):
    """A labelled Prometheus histogram fed a whole array per call.

    ``prometheus_client.Histogram`` takes one value per ``observe`` (a lock and a bucket scan
    each); a scored batch has one value per latent, so this counts them in one vectorised pass
    (``searchsorted`` into the bounds, ``bincount``) and renders the same exposition: cumulative
    ``_bucket{le=..}`` series ending at ``+Inf``, ``_count`` and ``_sum``. A value equal to a
    bound falls in that bound's bucket (``le`` is inclusive), as in ``Histogram``.
    """

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str],
        buckets: Sequence[float], registry: CollectorRegistry, multiprocess: bool = False,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.bounds = np.asarray(sorted(float(b) for b in buckets if b != float("inf")))
        self._les = [floatToGoString(bound) for bound in self.bounds] + ["+Inf"]
        self._counts: dict[tuple[str, ...], np.ndarray] = {}
        self._sums: dict[tuple[str, ...], float] = {}
        self._created: dict[tuple[str, ...], float] = {}
        # Multiprocess mode: ``flush`` copies the counts into one file-backed value per bucket
        # and one for the sum (None when a bound is negative), as Histogram lays them out.
        self.multiprocess = multiprocess
        self._shared: dict[tuple[str, ...], tuple[list[Any], Any]] = {}
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

    def flush(self) -> None:
        """Multiprocess mode: write this process's counts (per bucket, not cumulative) and sums
        to its mmap file, where ``MultiProcessCollector`` adds them to the other processes'.
        Observing stays an in-memory ``bincount``: a file write per bucket per request (about
        2 us each) would cost more than the rest of a cached request's metrics."""
        if not self.multiprocess:
            return
        with self._lock:
            series = [(key, counts.copy(), self._sums[key]) for key, counts in self._counts.items()]
        for key, counts, total in series:
            shared = self._shared.get(key)
            if shared is None:
                shared = self._shared[key] = self._shared_series(key)
            buckets, total_value = shared
            for value, count in zip(buckets, counts.tolist(), strict=True):
                value.set(float(count))
            if total_value is not None:
                total_value.set(total)

    def _shared_series(self, key: tuple[str, ...]) -> tuple[list[Any], Any]:
        value_class = prometheus_values.ValueClass  # chosen by prometheus_client at import
        bucket_labels = [*self.labelnames, "le"]
        buckets = [
            value_class("histogram", self.name, f"{self.name}_bucket", bucket_labels,
                        [*key, le], self.documentation)
            for le in self._les
        ]
        total = (
            value_class("histogram", self.name, f"{self.name}_sum", self.labelnames, list(key),
                        self.documentation)
            if self.bounds[0] >= 0 else None
        )
        return buckets, total

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

# --- end of the baseline ---


def arrays(size: int) -> list[np.ndarray]:
    """Score-like arrays: log densities spread over the bounds and past both ends."""
    rng = np.random.default_rng(20)
    return [rng.normal(-30.0, 20.0, size) for _ in range(DISTINCT_ARRAYS)]


def make(kind: str, registry: CollectorRegistry, multiprocess: bool = False) -> Any:
    cls = BaselineArrayHistogram if kind == "old" else ArrayHistogram
    return cls(f"bench_{kind}", "Benchmark histogram.", ["model"], buckets=BOUNDS,
               registry=registry, multiprocess=multiprocess)


def time_observe(histogram: Any, data: list[np.ndarray], calls: int) -> float:
    """Seconds per ``observe_many`` call over ``calls`` calls."""
    labels = [(f"model-{index}",) for index in range(SERIES)]
    observe = histogram.observe_many
    start = time.perf_counter()
    for call in range(calls):
        observe(labels[call % SERIES], data[call % DISTINCT_ARRAYS])
    return (time.perf_counter() - start) / calls


def best(run: Callable[[], float], repeats: int) -> float:
    return min(run() for _ in range(repeats))


def filled(kind: str, data: list[np.ndarray], multiprocess: bool = False) -> tuple[Any, Any]:
    registry = CollectorRegistry()
    histogram = make(kind, registry, multiprocess)
    time_observe(histogram, data, SERIES * 4)
    return registry, histogram


def time_render(registry: CollectorRegistry, rounds: int = 200) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        generate_latest(registry)
    return (time.perf_counter() - start) / rounds


def multiprocess_child(kind: str, size: int, repeats: int) -> None:
    """Run with PROMETHEUS_MULTIPROC_DIR set: print flush and merged-render seconds."""
    from prometheus_client.multiprocess import MultiProcessCollector

    folder = os.environ[MULTIPROC_ENV]
    data = arrays(size)
    _, histogram = filled(kind, data, multiprocess=True)
    labels = [(f"model-{index}",) for index in range(SERIES)]

    def flush_round(rounds: int = 200) -> float:
        spent = 0.0
        for round_ in range(rounds):
            for index, label in enumerate(labels):
                histogram.observe_many(label, data[(round_ + index) % DISTINCT_ARRAYS])
            start = time.perf_counter()
            histogram.flush()
            spent += time.perf_counter() - start
        return spent / rounds

    flush = best(flush_round, repeats)
    merged = CollectorRegistry()
    if kind == "old":
        MultiProcessCollector(merged, path=folder)
    else:
        merged.register(service_metrics._MergedFiles(folder, [histogram]))
    render = best(lambda: time_render(merged), repeats)
    print(f"{flush!r} {render!r}")


def in_child(kind: str, size: int, repeats: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as folder:
        out = subprocess.run(
            [sys.executable, __file__, "--child", kind, "--size", str(size),
             "--repeats", str(repeats)],
            env={**os.environ, MULTIPROC_ENV: folder}, check=True, capture_output=True,
            text=True,
        ).stdout.split()
    return float(out[0]), float(out[1])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=500, help="values per array")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", choices=["old", "new"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        multiprocess_child(args.child, args.size, args.repeats)
        return

    data = arrays(args.size)
    histograms = {kind: make(kind, CollectorRegistry()) for kind in ("old", "new")}
    observe: dict[str, list[float]] = {"old": [], "new": []}
    chunk = min(CHUNK, args.calls)
    for _ in range(args.repeats):
        # Old and new alternate every CHUNK calls: a burst of other load hits both alike.
        spent = dict.fromkeys(histograms, 0.0)
        for _ in range(max(1, args.calls // chunk)):
            for kind, histogram in histograms.items():
                spent[kind] += time_observe(histogram, data, chunk) * chunk
        for kind, seconds in spent.items():
            observe[kind].append(seconds / (max(1, args.calls // chunk) * chunk))
    # Same counts from the same calls: the two expositions agree but for _created.
    texts = [generate_latest(registry).decode() for registry, _ in
             (filled(kind, data) for kind in ("old", "new"))]
    same = [[line.replace("bench_old", "bench_new") for line in text.splitlines()
             if "_created" not in line] for text in texts]
    assert same[0] == same[1], "old and new expositions differ"

    registries = {kind: filled(kind, data)[0] for kind in ("old", "new")}
    renders: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(args.repeats):
        for kind, registry in registries.items():
            renders[kind].append(time_render(registry))
    render = {kind: min(times) for kind, times in renders.items()}
    runs: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
    for _ in range(args.repeats):  # a fresh child (and folder) per run, old and new interleaved
        for kind in runs:
            runs[kind].append(in_child(kind, args.size, 1))
    child = {kind: (min(run[0] for run in found), min(run[1] for run in found))
             for kind, found in runs.items()}

    print(f"prometheus-client {version('prometheus-client')}, NumPy {np.__version__}, "
          f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"{args.calls:,} observe_many calls of {args.size} values over {SERIES} series, "
          f"best of {args.repeats} (median in brackets)")
    rows = [
        ("observe_many", min(observe["old"]), min(observe["new"]),
         f" [{statistics.median(observe['old']) * 1e6:.2f} / "
         f"{statistics.median(observe['new']) * 1e6:.2f} us]"),
        ("render (one process)", render["old"], render["new"], ""),
        ("flush, 8 series (multiprocess)", child["old"][0], child["new"][0], ""),
        ("render (multiprocess)", child["old"][1], child["new"][1], ""),
    ]
    print(f"{'':34} {'old us':>10} {'new us':>10} {'new/old':>8}")
    for name, old, new, note in rows:
        print(f"{name:34} {old * 1e6:10.2f} {new * 1e6:10.2f} {new / old:8.3f}{note}")


if __name__ == "__main__":
    main()
