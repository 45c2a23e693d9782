"""The report's files: ``report.json`` (every number) and ``index.html`` (one page of plots).

Plots are matplotlib figures written as inline SVG (text kept as text, ids from a fixed salt
and no date, so a page is byte-for-byte reproducible) and image grids are inline PNG written
by Pillow, so the page is one self-contained file. Both come with the ``report`` extra.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

from latentsieve.report_data import ReportData
from latentsieve.workers.evidence import REJECT_FRACTIONS

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

WIDTH, HEIGHT = 560, 260  # CSS pixels of a chart
PIXELS_PER_INCH = 96  # CSS pixels per inch: a chart is WIDTH x HEIGHT on the page
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#7f7f7f")
# No pyplot, so no GUI backend and no open figures: each chart is a bare Figure that matplotlib's
# SVG backend saves, under these settings (rc_context restores the caller's afterwards). Text
# stays <text> (no font is embedded or fetched; matplotlib measures with its bundled DejaVu Sans);
# the salt makes clip-path and marker ids content hashes, equal ids in two charts equal content.
STYLE: dict[RcKeyType, Any] = {
    "svg.fonttype": "none",
    "svg.hashsalt": "latentsieve",
    "font.family": "sans-serif",
    "font.size": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "legend.fontsize": 7.5,
}
# Nothing that changes from run to run: no date, no generator version.
SVG_METADATA: dict[str, str | None] = {"Date": None, "Creator": None, "Format": None,
                                       "Type": None}


def png_data_uri(image: np.ndarray, scale: int = 4) -> str:
    """A grey (H, W) or RGB (H, W, 3) image in [0, 1] as a ``data:image/png`` URI, each pixel
    drawn as a ``scale`` x ``scale`` block."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image, scale)).decode()


def tile(images: np.ndarray, columns: int = 8, gap: int = 1) -> np.ndarray:
    """(k, H, W[, 3]) images in [0, 1] -> one image of ``columns`` per row, white gaps."""
    k, height, width = images.shape[:3]
    rows = -(-k // columns)
    shape = (rows * (height + gap) - gap, columns * (width + gap) - gap, *images.shape[3:])
    out = np.ones(shape)
    for i, image in enumerate(images):
        top, left = (i // columns) * (height + gap), (i % columns) * (width + gap)
        out[top : top + height, left : left + width] = image
    return out


def png_bytes(image: np.ndarray, scale: int = 4) -> bytes:
    """A grey (H, W) or RGB (H, W, 3) image in [0, 1] as PNG bytes (mode L or RGB), each pixel
    a ``scale`` x ``scale`` block."""
    pixels = np.clip(np.round(np.asarray(image, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
    picture = Image.fromarray(pixels)
    picture = picture.resize((picture.width * scale, picture.height * scale),
                             Image.Resampling.NEAREST)
    sink = io.BytesIO()
    picture.save(sink, format="PNG")
    return sink.getvalue()


def chart_svg(draw: Callable[[Axes], None], height: int = HEIGHT) -> str:
    """One chart, ``WIDTH`` x ``height`` CSS pixels, drawn by ``draw(axes)``, as an inline
    ``<svg>`` element."""
    with matplotlib.rc_context(STYLE):
        figure = Figure(figsize=(WIDTH / PIXELS_PER_INCH, height / PIXELS_PER_INCH),
                        layout="constrained")
        draw(figure.add_subplot())
        sink = io.StringIO()
        figure.savefig(sink, format="svg", metadata=SVG_METADATA)
    text = sink.getvalue()
    return text[text.index("<svg") :]  # no XML declaration or DOCTYPE inside HTML


def histogram_svg(series: dict[str, np.ndarray], xlabel: str, bins: int = 40) -> str:
    """Overlaid normalised histograms (outlines) of each named (n,) array, over the 0.1% to
    99.9% quantiles of them all (values outside are counted in the edge bins)."""
    values = np.concatenate([np.asarray(v, dtype=np.float64) for v in series.values()])
    low, high = np.quantile(values, [0.001, 0.999])
    edges = np.linspace(low, high, bins + 1)

    def draw(axes: Axes) -> None:
        for i, (name, v) in enumerate(series.items()):
            axes.hist(np.clip(np.asarray(v, dtype=np.float64), low, high), edges.tolist(),
                      density=True, histtype="step", linewidth=1.5, label=name,
                      color=COLOURS[i % len(COLOURS)])
        axes.set_xlabel(xlabel)
        axes.set_ylabel("density")
        axes.legend(loc="upper left")

    return chart_svg(draw)


def line_svg(
    x: Sequence[float],
    series: dict[str, tuple[Sequence[float], Sequence[float] | None, Sequence[float] | None]],
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
) -> str:
    """Lines with optional 95% bands: {label: (y, low or None, high or None)} over ``x``;
    ``log_x`` draws x on a log scale. Non-finite values leave gaps."""
    xs = np.asarray(x, dtype=np.float64)

    def draw(axes: Axes) -> None:
        for i, (label, (y, lo, hi)) in enumerate(series.items()):
            colour = COLOURS[i % len(COLOURS)]
            if lo is not None and hi is not None:
                axes.fill_between(xs, np.asarray(lo, dtype=np.float64),
                                  np.asarray(hi, dtype=np.float64), color=colour, alpha=0.18,
                                  linewidth=0)
            axes.plot(xs, np.asarray(y, dtype=np.float64), color=colour, linewidth=2,
                      label=label)
        if log_x:
            axes.set_xscale("log")
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.legend(loc="best")

    return chart_svg(draw)


def intervals_svg(rows: Sequence[tuple[str, float, float, float]], xlabel: str) -> str:
    """One row per (label, value, ci_low, ci_high), top to bottom: a dot with its 95%
    whiskers (none where a number is not finite), and a dashed line at 0."""

    def draw(axes: Axes) -> None:
        axes.axvline(0.0, color="#999999", linestyle=(0, (3, 3)), linewidth=1)
        for i, (_label, value, ci_low, ci_high) in enumerate(rows):
            if all(math.isfinite(v) for v in (value, ci_low, ci_high)):
                axes.errorbar([value], [i], xerr=[[value - ci_low], [ci_high - value]], fmt="o",
                              color=COLOURS[0], markersize=5, linewidth=2)
        axes.set_yticks(range(len(rows)), [row[0] for row in rows])
        axes.set_ylim(len(rows) - 0.5, -0.5)  # the first row on top
        axes.set_xlabel(xlabel)
        axes.spines["left"].set_visible(False)
        axes.tick_params(axis="y", length=0)

    return chart_svg(draw, height=24 * len(rows) + 50)


def grid_html(images: np.ndarray, seeds: Sequence[int], scores: Sequence[float]) -> str:
    """Images with their seed and log_density under each."""
    cells = [
        f'<figure><img src="{png_data_uri(image, max(1, 48 // image.shape[0]))}" alt="seed {seed}">'
        f"<figcaption>{seed}<br>{score:.2f}</figcaption></figure>"
        for image, seed, score in zip(images, seeds, scores, strict=True)
    ]
    return f'<div class="grid">{"".join(cells)}</div>'


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _ci(interval: dict[str, float]) -> str:
    return f"{interval['value']:+.3f} [{interval['ci_low']:+.3f}, {interval['ci_high']:+.3f}]"


def _verdicts(numbers: dict[str, Any]) -> list[str]:
    """One sentence per quality: does rejecting the lowest quarter pay, by its interval?"""
    lines = []
    for name, table in numbers["rejection"].items():
        row = next((r for r in table if r["reject_fraction"] == 0.25), table[0])
        gain = row["gain"]
        if gain["ci_low"] > 0:
            verdict = "pays: the whole 95% interval of the gain is above 0"
        elif gain["ci_high"] < 0:
            verdict = "hurts: the whole 95% interval of the gain is below 0"
        else:
            verdict = "is not shown to pay: the 95% interval of the gain includes 0"
        lines.append(
            f"Rejecting the lowest {row['reject_fraction']:.0%} by log_density moves mean "
            f"{name} from {row['kept_at_random']['value']:.4g} (random rejection) to "
            f"{row['kept_by_score']:.4g}: gain {_ci(gain)}. Filtering {verdict}."
        )
    return lines


def page_html(data: ReportData) -> str:
    """The whole report page."""
    n: dict[str, Any] = data.numbers
    sections: list[str] = [
        f"<h1>LatentSieve report: {html.escape(n['model'])}</h1>",
        f"<p>Index version {html.escape(n['index_version'])}, sigma {n['sigma']:.4g} "
        f"({html.escape(n['bandwidth']['rule'])}), space {html.escape(n['space']['method'])}, "
        f"{n['seeds']['count']} seeds ({n['seeds']['first']}..{n['seeds']['last']}), "
        f"{n['bootstrap_resamples']} bootstrap resamples; generated {n['generated_at']}. "
        'Every number is in <a href="report.json">report.json</a>; brackets are 95% intervals.</p>',
    ]
    if data.quality:
        sections.append(
            "<h2>Verdict</h2>" + "".join(f"<p>{html.escape(v)}</p>" for v in _verdicts(n))
        )
        sections.append(
            "<ul>"
            + "".join(
                f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>"
                for k, v in n["quality_sources"].items()
            )
            + "</ul>"
        )
    else:
        sections.append(
            "<p>No quality measure: give <code>--quality FILE.csv</code> (header "
            "<code>seed,quality</code>) to learn whether filtering pays on this model.</p>"
        )
    sections.append("<h2>Score distributions</h2>")
    sections.append(
        histogram_svg(
            {"seeds scored": data.log_density, "calibration": data.calibration},
            "log_density (nats)",
        )
    )
    levels = np.linspace(0.0, 1.0, 101)
    sections.append("<h2>Calibration: log_density to percentile</h2>")
    sections.append(
        line_svg(
            np.quantile(data.calibration, levels),
            {"percentile": (levels.tolist(), None, None)},
            "log_density (nats)",
            "percentile",
        )
    )
    if data.images is not None:
        top, bottom = data.grid_rows()
        for title, rows in (("Highest log_density", top), ("Lowest log_density", bottom)):
            sections.append(f"<h2>{title} (seed, log_density)</h2>")
            sections.append(
                grid_html(
                    data.images[rows],
                    [data.seeds[r] for r in rows],
                    data.log_density[rows].tolist(),
                )
            )
    for quality, scores in n["spearman"].items():
        sections.append(f"<h2>Spearman correlation with {html.escape(quality)}</h2>")
        intervals = [(name, i["value"], i["ci_low"], i["ci_high"]) for name, i in scores.items()]
        sections.append(intervals_svg(intervals, "Spearman rho (95% interval)"))
    for quality, curve in n["keep_curve"].items():
        keep = [1.0 - row["reject_fraction"] for row in curve]
        by_score = [row["kept_by_score"] for row in curve]
        random_mean = [row["kept_at_random"]["value"] for row in curve]
        sections.append(f"<h2>Keep rate against mean {html.escape(quality)}</h2>")
        sections.append(
            line_svg(
                keep,
                {
                    "kept by log_density": (
                        by_score,
                        [
                            v + row["gain"]["ci_low"] - row["gain"]["value"]
                            for v, row in zip(by_score, curve, strict=True)
                        ],
                        [
                            v + row["gain"]["ci_high"] - row["gain"]["value"]
                            for v, row in zip(by_score, curve, strict=True)
                        ],
                    ),
                    "kept at random": (
                        random_mean,
                        [r["kept_at_random"]["ci_low"] for r in curve],
                        [r["kept_at_random"]["ci_high"] for r in curve],
                    ),
                },
                "share of seeds kept",
                f"mean {quality}",
            )
        )
        sections.append(
            _table(
                ["rejected", "kept", "mean kept by score", "mean kept at random", "gain [95%]"],
                [
                    [
                        f"{r['reject_fraction']:.0%}",
                        r["kept"],
                        f"{r['kept_by_score']:.4g}",
                        _ci(r["kept_at_random"]),
                        _ci(r["gain"]),
                    ]
                    for r in n["rejection"][quality]
                ],
            )
        )
    if n["rejection_by_score"] and data.quality:
        sections.append("<h2>Rejecting by other scores: gain in mean quality [95%]</h2>")
        qualities = list(data.quality)
        sections.append(
            _table(
                [
                    "score",
                    *[f"{q}, {f:.0%} rejected" for q in qualities for f in REJECT_FRACTIONS],
                ],
                [
                    [name, *[_ci(row["gain"]) for q in qualities for row in tables[q]]]
                    for name, tables in n["rejection_by_score"].items()
                ],
            )
        )
    if n["bandwidth_sweep"] and data.quality:
        sections.append("<h2>Bandwidth sweep</h2>")
        sweep = n["bandwidth_sweep"]
        sections.append(
            line_svg(
                [r["sigma"] for r in sweep],
                {
                    q: (
                        [r["spearman"][q]["value"] for r in sweep],
                        [r["spearman"][q]["ci_low"] for r in sweep],
                        [r["spearman"][q]["ci_high"] for r in sweep],
                    )
                    for q in data.quality
                },
                "sigma",
                "Spearman rho",
                log_x=True,
            )
        )
        sections.append(
            _table(
                ["sigma", "rule", *[f"rho with {q}" for q in data.quality]],
                [
                    [f"{r['sigma']:.4g}", r["rule"], *[_ci(r["spearman"][q]) for q in data.quality]]
                    for r in sweep
                ],
            )
        )
    sections.append("<h2>Truncation analogue (draws scaled by t)</h2>")
    truncation = n["truncation"]
    qualities = sorted({q for r in truncation for q in r.get("quality", {})})
    sections.append(
        _table(
            ["t", "mean log_density", *[f"mean {q}" for q in qualities]],
            [
                [r["scale"], _ci(r["log_density"]), *[_ci(r["quality"][q]) for q in qualities]]
                for r in truncation
            ],
        )
    )
    if n["precision_recall"]:
        sections.append("<h2>Precision and recall of the kept samples</h2>")
        sections.append(
            _table(
                ["rejected", "kept", "precision", "random precision", "recall", "random recall"],
                [
                    [
                        f"{r['reject_fraction']:.0%}",
                        r["kept"],
                        _ci(r["precision"]),
                        _ci(r["random_precision"]),
                        _ci(r["recall"]),
                        _ci(r["random_recall"]),
                    ]
                    for r in n["precision_recall"]
                ],
            )
        )
    style = (
        "body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "font-size:13px}.grid{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;"
        "text-align:center;font-size:11px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>LatentSieve report "
        f"{html.escape(n['model'])}</title><style>{style}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>\n"
    )


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(item) for item in value]
    return value


def write_page(data: ReportData, out: Path) -> None:
    """Write ``report.json``, ``index.html`` and, with images, ``grid_highest.png`` and
    ``grid_lowest.png`` (16 samples each, best or worst first) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(
        json.dumps(finite_json(data.numbers), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    (out / "index.html").write_text(page_html(data), encoding="utf-8")
    if data.images is not None:
        for name, rows in zip(("highest", "lowest"), data.grid_rows(), strict=True):
            (out / f"grid_{name}.png").write_bytes(png_bytes(tile(data.images[rows]), 4))
