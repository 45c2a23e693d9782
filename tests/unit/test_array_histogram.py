"""``ArrayHistogram`` (one vectorised pass per batch) writes exactly what
``prometheus_client.Histogram`` writes for the same observations, one at a time."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import (
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    enable_created_metrics,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from latentsieve.service import metrics
from latentsieve.service.metrics import DESCRIPTOR_BUCKETS, ArrayHistogram

BOUNDS = (-10.0, -2.5, -1.0, 0.0, 0.5, 1.0, 3.0)
CREATED = re.compile(rb"^.*_created.*$\n", re.MULTILINE)


def exposition(registry: CollectorRegistry) -> bytes:
    """The text format without ``_created`` lines (their values are clock readings)."""
    return CREATED.sub(b"", generate_latest(registry))


def both(buckets: tuple[float, ...]) -> tuple[CollectorRegistry, Histogram, CollectorRegistry,
                                               ArrayHistogram]:
    reference_registry, array_registry = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("h", "help", ["model", "name"], buckets=buckets,
                          registry=reference_registry)
    array = ArrayHistogram("h", "help", ["model", "name"], buckets=buckets,
                           registry=array_registry)
    return reference_registry, reference, array_registry, array


values = st.lists(
    st.one_of(
        st.sampled_from(BOUNDS),  # on a bound: le is inclusive
        st.floats(-20, 20, allow_nan=False),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(batches=st.lists(st.tuples(st.sampled_from(["a", "b"]), values), max_size=5))
def test_same_exposition_as_histogram(batches: list[tuple[str, list[float]]]) -> None:
    reference_registry, reference, array_registry, array = both(BOUNDS)
    for model, batch in batches:
        child = reference.labels(model=model, name="psi")  # a series exists once touched
        for value in batch:
            child.observe(value)
        array.observe_many((model, "psi"), np.asarray(batch))
    assert exposition(array_registry) == exposition(reference_registry)


def test_negative_bounds_keep_count_not_sum() -> None:
    _, _, registry, array = both(DESCRIPTOR_BUCKETS)
    array.observe_many(("m", "psi"), [-5.0, 2.0, 2.0])
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
        if not sample.name.endswith("_bucket")
    }
    assert samples["h_count"] == 3.0
    assert "h_sum" not in samples  # as Histogram: no sum where observations can be negative
    assert samples["h_created"] > 0


def test_non_negative_bounds_have_a_sum() -> None:
    _, _, registry, array = both((0.5, 1.0))
    array.observe_many(("m", "psi"), [0.25, 2.0])
    text = generate_latest(registry).decode()
    assert 'h_sum{model="m",name="psi"} 2.25' in text


def test_labels_are_checked() -> None:
    _, _, _, array = both(BOUNDS)
    with pytest.raises(ValueError, match="string labels"):
        array.observe_many(("only-one",), [1.0])
    with pytest.raises(ValueError, match="string labels"):
        array.observe_many(("m", 3), [1.0])  # type: ignore[arg-type]


@pytest.fixture
def created_series_off() -> Iterator[None]:
    """prometheus_client's public switch, turned back on after (its default)."""
    disable_created_metrics()
    try:
        yield
    finally:
        enable_created_metrics()


@pytest.mark.usefixtures("created_series_off")
def test_created_series_follow_the_client_switch() -> None:
    reference_registry, reference, array_registry, array = both(BOUNDS)
    reference.labels(model="m", name="psi").observe(1.0)
    array.observe_many(("m", "psi"), [1.0])
    assert b"_created" not in generate_latest(array_registry)
    assert generate_latest(array_registry) == generate_latest(reference_registry)


def test_metrics_use_only_public_prometheus_client_names() -> None:
    """service/metrics.py takes no private name of prometheus_client and builds no value class
    (issue 20), so no release of the client needs to be excluded."""
    tree = ast.parse(Path(metrics.__file__).read_text())
    imported = [(node.module, alias.name) for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prometheus")
                for alias in node.names]
    assert imported and not [name for _, name in imported if name.startswith("_")
                             or name in {"values", "metrics", "mmap_dict", "samples"}]
    assert {module for module, _ in imported} <= {
        "prometheus_client", "prometheus_client.core", "prometheus_client.multiprocess",
        "prometheus_client.registry",
    }
    assert not [node for node in ast.walk(tree) if isinstance(node, ast.Import)
                and any(alias.name.startswith("prometheus") for alias in node.names)]
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert not attributes & {"ValueClass", "_use_created", "_multiprocess", "values"}


@settings(max_examples=300, deadline=None)
@given(bound=st.one_of(
    st.floats(min_value=-1e300, max_value=9.99e9, allow_nan=False),
    st.sampled_from([1e6, 1e7, 1234567.0, 12345678.5, 999999999.5, 5e-324, -1e7, -1e21, 0.0]),
))
def test_le_label_is_histograms(bound: float) -> None:
    """``le_label`` writes a bound as ``Histogram`` labels its bucket (public ``collect``).
    Positive bounds from 1e10 up are left out: prometheus-client 0.20 (the floor, `make
    check-lowest`) writes their exponent ``e+010``, 0.26 and Go ``e+10``; no bound here is
    that large."""
    reference = Histogram("h", "help", buckets=(bound,), registry=None)
    written = [sample.labels["le"] for sample in next(iter(reference.collect())).samples
               if sample.name == "h_bucket"]
    assert written == [metrics.le_label(bound), "+Inf"]
