"""Generates the Grafana dashboard and the Prometheus alerting rules of LatentSieve.

Writes two files next to this one, both derived from ``panels()`` and ``alerts()`` below:

* ``grafana/dashboards/latentsieve.json``: the "LatentSieve" dashboard (uid ``latentsieve``);
* ``prometheus/alerts.yml``: the alerting rules of group ``latentsieve``.

Edit this module, never the generated files, then regenerate them::

    python docker/observability.py            # rewrite both files
    python docker/observability.py --check    # exit 1 if a committed file is out of date

The dashboard is built with Grafana's own SDK (``grafana-foundation-sdk``: typed builders for
panels, queries, variables and the grid layout, in the dev extra); the alerting rules are
Prometheus rule files, which that SDK does not model, so they are written here. Panel
expressions use Grafana's ``$model``, ``$__rate_interval`` and ``$__range``; alert queries use
fixed windows.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import (
    bargauge,
    common,
    heatmap,
    prometheus,
    stat,
    table,
    timeseries,
)
from grafana_foundation_sdk.builders import dashboard as boards
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_model
from grafana_foundation_sdk.models import dashboard as board_model
from grafana_foundation_sdk.models import heatmap as heatmap_model
from grafana_foundation_sdk.models import prometheus as prometheus_model

PanelBuilder = timeseries.Panel | heatmap.Panel | bargauge.Panel | stat.Panel | table.Panel

HERE = Path(__file__).resolve().parent
DASHBOARD = Path("grafana/dashboards/latentsieve.json")
ALERTS = Path("prometheus/alerts.yml")

DATASOURCE_UID = "latentsieve-prometheus"
DATASOURCE = board_model.DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
LATENCY_OBJECTIVE_S = 0.5  # p99 objective of /score and /select, seconds
SEVERITIES = ("page", "ticket")

MODEL = 'model=~"$model"'
RATE = "$__rate_interval"
WIDTH, HEIGHT = 12, 8  # Grafana's grid is 24 columns: two panels side by side


@dataclass(frozen=True)
class Panel:
    """One dashboard panel: ``exprs[i]`` is drawn with legend ``legends[i]``."""

    title: str
    kind: str  # timeseries | heatmap | bargauge | stat | table
    exprs: tuple[str, ...]
    unit: str = "short"
    legends: tuple[str, ...] = ()
    description: str = ""
    section: str = ""  # a row header is inserted wherever the section changes
    fmt: str = "time_series"  # or "heatmap", "table"
    instant: bool = False
    stacked: bool = False


@dataclass(frozen=True)
class Alert:
    """One alerting rule; the rule's ``expr`` is ``query`` followed by ``comparison``."""

    name: str
    query: str  # PromQL without the threshold
    comparison: str  # e.g. "> 0.2", "== 0"; empty for absent() rules
    for_: str
    severity: str  # "page" | "ticket"
    summary: str
    description: str
    absent: bool = False  # absent() rules return nothing while all is well

    @property
    def expr(self) -> str:
        if not self.comparison:
            return self.query
        # `or`, `and` and `unless` bind looser than comparisons: keep them on the left side.
        needs_parens = re.search(r"\b(or|and|unless)\b", _top_level(self.query)) is not None
        query = f"({self.query})" if needs_parens else self.query
        return f"{query} {self.comparison}"


def _top_level(query: str) -> str:
    """``query`` without anything inside brackets or quotes."""
    kept: list[str] = []
    depth, quote, escaped = 0, "", False
    for char in query:
        if quote:
            if char == quote and not escaped:
                quote = ""
            escaped = char == "\\" and not escaped
        elif char in "\"'`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0:
            kept.append(char)
    return "".join(kept)


def quantile(q: float, by: str, bucket_rate: str) -> str:
    return f"histogram_quantile({q}, sum by ({by}) ({bucket_rate}))"


def panels() -> list[Panel]:
    decisions = f"rate(latentsieve_decisions_total{{{MODEL}}}[{RATE}])"
    accepts = f'rate(latentsieve_decisions_total{{{MODEL},decision="accept"}}[{RATE}])'
    rejects = f'rate(latentsieve_decisions_total{{{MODEL},decision="reject"}}[{RATE}])'
    latency = f"rate(latentsieve_request_duration_seconds_bucket[{RATE}])"
    descriptor = f"rate(latentsieve_descriptor_bucket{{{MODEL}}}[{RATE}])"
    cache = f'rate(latentsieve_cache_requests_total{{result="hit"}}[{RATE}])'
    return [
        Panel(
            "Log-density heatmap", "heatmap",
            (f"sum by (le) (increase(latentsieve_score_log_density_bucket{{{MODEL}}}[{RATE}]))",),
            legends=("{{le}}",), fmt="heatmap", section="Scores",
            description="Log densities (nats) returned for the selected models, per interval.",
        ),
        Panel(
            "Percentile histogram", "bargauge",
            (f"sum by (le) (increase(latentsieve_score_percentile_bucket{{{MODEL}}}[$__range]))",),
            legends=("{{le}}",), fmt="heatmap", instant=True, section="Scores",
            description="Calibration percentiles returned over the dashboard's time range; "
            "a well-calibrated model fills the bars evenly.",
        ),
        Panel(
            "Accept rate", "timeseries",
            (f"sum by (model) ({accepts}) / sum by (model) ({decisions})",),
            unit="percentunit", legends=("{{model}}",), section="Scores",
            description="Fraction of verdicts that accept, per model.",
        ),
        Panel(
            "Reject reasons", "timeseries", (f"sum by (reason) ({rejects})",),
            unit="ops", legends=("{{reason}}",), stacked=True, section="Scores",
            description="Rejections per second by reason (several reasons are comma-joined).",
        ),
        Panel(
            "Descriptor distributions", "timeseries",
            tuple(quantile(q, "le, name", descriptor) for q in (0.1, 0.5, 0.9)),
            legends=("{{name}} p10", "{{name}} p50", "{{name}} p90"), section="Scores",
            description="p10, p50 and p90 of the psi, nu and delta descriptors returned.",
        ),
        Panel(
            "Index sizes and versions", "table",
            (f"latentsieve_index_latents{{{MODEL}}}",),
            fmt="table", instant=True, section="Scores",
            description="Training latents in each served index version.",
        ),
        Panel(
            "Latency p50 and p99 by route", "timeseries",
            (quantile(0.5, "le, route", latency), quantile(0.99, "le, route", latency)),
            unit="s", legends=("{{route}} p50", "{{route}} p99"), section="Requests",
            description="HTTP request latency of the gateway, by route.",
        ),
        Panel(
            "Request rate by status", "timeseries",
            (f"sum by (status) (rate(latentsieve_request_duration_seconds_count[{RATE}]))",),
            unit="reqps", legends=("{{status}}",), stacked=True, section="Requests",
            description="HTTP requests per second answered by the gateway, by status code.",
        ),
        Panel(
            "Cache hit ratio", "timeseries",
            (f"sum({cache}) / sum(rate(latentsieve_cache_requests_total[{RATE}]))",),
            unit="percentunit", legends=("hit ratio",), section="Requests",
            description="Fraction of per-latent score cache lookups that hit.",
        ),
        Panel(
            "Cache errors", "timeseries",
            (f"sum(rate(latentsieve_cache_errors_total[{RATE}]))",),
            unit="ops", legends=("errors",), section="Requests",
            description="Failed score cache operations per second.",
        ),
        Panel(
            "Computed batch sizes", "heatmap",
            (f"sum by (le) (increase(latentsieve_batch_size_bucket{{{MODEL}}}[{RATE}]))",),
            legends=("{{le}}",), fmt="heatmap", section="Compute",
            description="Latents per computed batch (gateway or workers, whichever computes).",
        ),
        Panel(
            "Mean batch size", "timeseries",
            (f"sum(rate(latentsieve_batch_size_sum{{{MODEL}}}[{RATE}])) / "
             f"sum(rate(latentsieve_batch_size_count{{{MODEL}}}[{RATE}]))",),
            legends=("mean",), section="Compute",
            description="Mean latents per computed batch; empty before the first batch.",
        ),
        Panel(
            "Compute seconds by device", "timeseries",
            (f"sum by (device) (rate(latentsieve_compute_seconds_sum{{{MODEL}}}[{RATE}]))",),
            unit="s", legends=("{{device}}",), section="Compute",
            description="Compute seconds per second by device: the busy fraction of each.",
        ),
        Panel(
            "Queue depth vs cap", "timeseries",
            (f"sum by (model) (latentsieve_queue_depth{{{MODEL}}})",
             f"max by (model) (latentsieve_queue_limit{{{MODEL}}})"),
            legends=("{{model}} depth", "{{model}} cap"), section="Compute",
            description="Latents waiting to be scored, against the per-model queue cap.",
        ),
        Panel(
            "Live workers per shard", "timeseries",
            (f"sum by (model, shard) (latentsieve_live_workers{{{MODEL}}})",),
            legends=("{{model}} shard {{shard}}",), section="Compute",
            description="Workers with a fresh heartbeat per model shard, as the gateway sees "
            "them (only with --compute workers).",
        ),
        Panel(
            "Worker jobs by outcome", "timeseries",
            (f"sum by (outcome) (rate(latentsieve_worker_jobs_total{{{MODEL}}}[{RATE}]))",),
            unit="ops", legends=("{{outcome}}",), stacked=True, section="Compute",
            description="Jobs handled by the workers per second, by outcome.",
        ),
    ]


def alerts() -> list[Alert]:
    def reject_fraction(window: str) -> str:
        return (
            f'(sum by (model) (rate(latentsieve_decisions_total{{decision="reject"}}[{window}]))'
            f" / sum by (model) (rate(latentsieve_decisions_total[{window}])))"
        )

    requests = "rate(latentsieve_request_duration_seconds_count[5m])"
    errors = 'rate(latentsieve_request_duration_seconds_count{status=~"5.."}[5m])'
    objective = f"{LATENCY_OBJECTIVE_S:g}"
    return [
        Alert(
            "LatentSieveRejectRateJump",
            f"{reject_fraction('10m')} - {reject_fraction('6h')}", "> 0.2", "10m", "ticket",
            "Reject rate of {{ $labels.model }} jumped",
            "The reject fraction of {{ $labels.model }} over 10m is "
            "{{ $value | humanizePercentage }} above its 6h level.",
        ),
        Alert(
            "LatentSieveShardWithoutWorker",
            "min by (model, shard) (latentsieve_live_workers)", "== 0", "1m", "page",
            "Shard {{ $labels.shard }} of {{ $labels.model }} has no live worker",
            "The gateway has seen no worker heartbeat for shard {{ $labels.shard }} of "
            "{{ $labels.model }} for 1m; its requests cannot be computed.",
        ),
        Alert(
            "LatentSieveWorkersAbsent",
            'absent(up{job="latentsieve-worker"} == 1)', "", "5m", "page",
            "No latentsieve worker is up",
            "Prometheus has scraped no healthy latentsieve-worker target for 5m.",
            absent=True,
        ),
        Alert(
            "LatentSieveQueueNearCap",
            "max by (model) (latentsieve_queue_depth) / max by (model) (latentsieve_queue_limit)",
            "> 0.8", "2m", "ticket",
            "Queue of {{ $labels.model }} is near its cap",
            "The queue of {{ $labels.model }} is at {{ $value | humanizePercentage }} of its "
            "cap; new requests are refused once it is full.",
        ),
        Alert(
            "LatentSieveLatencyOverObjective",
            quantile(0.99, "le, route", 'rate(latentsieve_request_duration_seconds_bucket'
                     '{route=~"/score|/select"}[5m])'),
            f"> {objective}", "10m", "ticket",
            "p99 latency of {{ $labels.route }} is over " + objective + "s",
            "The p99 latency of {{ $labels.route }} is {{ $value | humanizeDuration }} over "
            "5m, above the " + objective + "s objective.",
        ),
        Alert(
            "LatentSieveDeadLetters",
            'sum by (model) (increase(latentsieve_worker_jobs_total{outcome="dead_letter"}[10m]))',
            "> 0", "0m", "page",
            "Jobs of {{ $labels.model }} were dead-lettered",
            "{{ $value | humanize }} jobs of {{ $labels.model }} were given up on and "
            "dead-lettered in the last 10m.",
        ),
        Alert(
            "LatentSieveCacheErrors",
            "sum(rate(latentsieve_cache_errors_total[5m]))", "> 0", "5m", "ticket",
            "The score cache is failing",
            "Score cache operations have failed at {{ $value | humanize }} per second for 5m.",
        ),
        Alert(
            "LatentSieveServerErrors",
            f"(sum({errors}) or vector(0)) / sum({requests})",
            "> 0.01", "5m", "page",
            "Over 1% of gateway requests fail with 5xx",
            "{{ $value | humanizePercentage }} of gateway requests answered 5xx over 5m.",
        ),
        Alert(
            "LatentSieveTargetDown",
            'up{job=~"latentsieve-.*"}', "== 0", "2m", "page",
            "{{ $labels.job }} target {{ $labels.instance }} is down",
            "Prometheus has failed to scrape {{ $labels.instance }} ({{ $labels.job }}) for 2m.",
        ),
    ]


def query(expr: str, legend: str, ref: str, panel: Panel) -> prometheus.Dataquery:
    """One PromQL target of ``panel``: instant or range, in the panel's format."""
    target = (
        prometheus.Dataquery().datasource(DATASOURCE).ref_id(ref).expr(expr)
        .editor_mode(prometheus_model.QueryEditorMode.CODE)
        .format(prometheus_model.PromQueryFormat(panel.fmt)).legend_format(legend)
    )
    return target.instant() if panel.instant else target.range()


def panel_builder(panel: Panel) -> PanelBuilder:
    """The SDK builder of one panel kind, with that kind's options."""
    last_value = common.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False)
    if panel.kind == "timeseries":
        stacking = common_model.StackingMode("normal" if panel.stacked else "none")
        return (
            timeseries.Panel()
            .legend(common.VizLegendOptions().display_mode(common_model.LegendDisplayMode.LIST)
                    .placement(common_model.LegendPlacement.BOTTOM).show_legend(True))
            .tooltip(common.VizTooltipOptions().mode(common_model.TooltipDisplayMode.MULTI)
                     .sort(common_model.SortOrder.DESCENDING))
            .fill_opacity(30 if panel.stacked else 10)
            .stacking(common.StackingConfig().group("A").mode(stacking))
        )
    if panel.kind == "heatmap":
        return (
            heatmap.Panel().calculate(False).cell_gap(1)
            .color(heatmap.HeatmapColorOptions().mode(heatmap_model.HeatmapColorMode.SCHEME)
                   .scheme("Oranges").exponent(0.5).steps(64))
            .rows_frame(heatmap.RowsHeatmapOptions().layout(common_model.HeatmapCellLayout.AUTO))
            .mode(common_model.TooltipDisplayMode.SINGLE).show_y_histogram()
            .y_axis(heatmap.YAxisConfig().unit(panel.unit))
        )
    if panel.kind == "bargauge":
        return (
            bargauge.Panel().display_mode(common_model.BarGaugeDisplayMode.GRADIENT)
            .orientation(common_model.VizOrientation.VERTICAL).reduce_options(last_value)
            .show_unfilled(True)
        )
    if panel.kind == "stat":
        return (
            stat.Panel().color_mode(common_model.BigValueColorMode.VALUE)
            .graph_mode(common_model.BigValueGraphMode.AREA).reduce_options(last_value)
        )
    if panel.kind == "table":
        hidden = {"Time": True, "__name__": True}
        return table.Panel().show_header(True).with_transformation(
            board_model.DataTransformerConfig(id_val="organize", options={"excludeByName": hidden}))
    raise ValueError(f"unknown panel kind {panel.kind!r}")


def built_panel(panel: Panel, panel_id: int) -> PanelBuilder:
    """``panel`` as the SDK builds it: kind, options, size, unit and one target per expression."""
    legends = panel.legends or ("",) * len(panel.exprs)
    if len(legends) != len(panel.exprs):
        raise ValueError(f"{panel.title}: one legend per expression")
    built = (
        panel_builder(panel).id(panel_id).title(panel.title).description(panel.description)
        .datasource(DATASOURCE).span(WIDTH).height(HEIGHT).unit(panel.unit)
    )
    for i, (expr, legend) in enumerate(zip(panel.exprs, legends, strict=True)):
        built = built.with_target(query(expr, legend, chr(ord("A") + i), panel))
    return built


def dashboard_model() -> board_model.Dashboard:
    """The dashboard: panels two to a row (the SDK's grid layout), a row header wherever the
    section changes, ids from 1 in order."""
    variable = (
        boards.QueryVariable("model").label("Model").datasource(DATASOURCE)
        .query("label_values(latentsieve_index_latents, model)")
        .include_all(True).multi(True).all_value(".*")
        .current(board_model.VariableOption(selected=True, text=["All"], value=["$__all"]))
        .refresh(board_model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(board_model.VariableSort.ALPHABETICAL_ASC)
    )
    board = (
        boards.Dashboard("LatentSieve").uid("latentsieve")
        .description("Generated by docker/observability.py; edit that file, not this one.")
        .tags(["latentsieve"]).readonly()
        .tooltip(board_model.DashboardCursorSync.CROSSHAIR)
        .version(1).refresh("30s").time("now-1h", "now").timezone("browser")
        .with_variable(variable)
    )
    section, panel_id = None, 0
    for panel in panels():
        if panel.section != section:
            section = panel.section
            if section:
                panel_id += 1
                board = board.with_row(boards.Row(section).id(panel_id).collapsed(False))
        panel_id += 1
        board = board.with_panel(built_panel(panel, panel_id))
    return board.build()


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (what the provisioned file holds)."""
    encoded: dict[str, Any] = json.loads(json.dumps(dashboard_model(), cls=JSONEncoder))
    return encoded


def _quote(text: str) -> str:
    """A single-quoted YAML scalar: only ``'`` needs escaping (doubled)."""
    if "\n" in text:
        raise ValueError(f"multi-line YAML value: {text!r}")
    return "'" + text.replace("'", "''") + "'"


def alerts_yaml(rules: Sequence[Alert]) -> str:
    lines = [
        "# Generated by docker/observability.py; edit that file, not this one, and run",
        "# `python docker/observability.py` to regenerate.",
        "groups:",
        "  - name: latentsieve",
        "    rules:",
    ]
    for rule in rules:
        if rule.severity not in SEVERITIES:
            raise ValueError(f"{rule.name}: severity {rule.severity!r}")
        lines += [
            f"      - alert: {rule.name}",
            f"        expr: {_quote(rule.expr)}",
            f"        for: {rule.for_}",
            "        labels:",
            f"          severity: {rule.severity}",
            "        annotations:",
            f"          summary: {_quote(rule.summary)}",
            f"          description: {_quote(rule.description)}",
        ]
    return "\n".join(lines) + "\n"


def generated() -> dict[Path, str]:
    """Each generated file's path (relative to ``docker/``) and its contents."""
    return {
        DASHBOARD: json.dumps(dashboard(), indent=2) + "\n",
        ALERTS: alerts_yaml(alerts()),
    }


def main(argv: Sequence[str] | None = None, root: Path = HERE) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a committed file differs from what this code generates")
    args = parser.parse_args(argv)
    stale = 0
    for relative, text in generated().items():
        path = root / relative
        if args.check:
            if not path.is_file() or path.read_text() != text:
                print(f"{path} is out of date: run python docker/observability.py",
                      file=sys.stderr)
                stale = 1
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return stale


if __name__ == "__main__":
    sys.exit(main())
