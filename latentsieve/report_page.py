"""The report's files: ``report.json`` (every number) and ``index.html`` (one page of plots).

Plots are inline SVG and image grids inline PNG (written with ``zlib``), so the page is one
self-contained file with no plotting dependency.
"""

from __future__ import annotations

import base64
import html
import json
import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from latentsieve.workers.evidence import REJECT_FRACTIONS

if TYPE_CHECKING:
    from latentsieve.report import ReportData

WIDTH, HEIGHT = 560, 260
MARGIN = {"left": 60, "right": 16, "top": 16, "bottom": 42}
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#7f7f7f")


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
    """A grey (H, W) or RGB (H, W, 3) image in [0, 1] as PNG bytes (``scale`` x ``scale``
    pixel blocks), written with zlib alone."""
    pixels = np.clip(np.round(np.asarray(image, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
    pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    colour = 2 if pixels.ndim == 3 else 0
    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + pixels[row].tobytes() for row in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
    return png + chunk(b"IEND", b"")


def _scale(low: float, high: float, start: float, stop: float) -> Any:
    span = high - low if high > low else 1.0
    return lambda value: start + (value - low) / span * (stop - start)


def _frame(
    x_range: tuple[float, float], y_range: tuple[float, float], xlabel: str, ylabel: str
) -> tuple[list[str], Any, Any]:
    """SVG axes with 5 ticks each; returns the parts and the x, y pixel maps."""
    left, right = MARGIN["left"], WIDTH - MARGIN["right"]
    top, bottom = MARGIN["top"], HEIGHT - MARGIN["bottom"]
    fx = _scale(*x_range, left, right)
    fy = _scale(*y_range, bottom, top)
    parts = [
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#333"/>',
    ]
    for tick in np.linspace(*x_range, 5):
        parts.append(
            f'<text x="{fx(tick):.1f}" y="{bottom + 16}" font-size="11" '
            f'text-anchor="middle">{tick:.3g}</text>'
        )
    for tick in np.linspace(*y_range, 5):
        parts.append(
            f'<text x="{left - 6}" y="{fy(tick) + 4:.1f}" font-size="11" '
            f'text-anchor="end">{tick:.3g}</text>'
        )
    parts.append(
        f'<text x="{(left + right) / 2}" y="{HEIGHT - 6}" font-size="12" '
        f'text-anchor="middle">{html.escape(xlabel)}</text>'
    )
    parts.append(
        f'<text x="14" y="{(top + bottom) / 2}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {(top + bottom) / 2})">{html.escape(ylabel)}</text>'
    )
    return parts, fx, fy


def _svg(parts: Sequence[str], legend: Sequence[str] = ()) -> str:
    keys = [
        f'<rect x="{WIDTH - 190}" y="{18 + 16 * i}" width="10" height="10" '
        f'fill="{COLOURS[i % len(COLOURS)]}"/><text x="{WIDTH - 175}" y="{27 + 16 * i}" '
        f'font-size="11">{html.escape(label)}</text>'
        for i, label in enumerate(legend)
    ]
    body = "".join([*parts, *keys])
    return f'<svg width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg">{body}</svg>'


def histogram_svg(series: dict[str, np.ndarray], xlabel: str, bins: int = 40) -> str:
    """Overlaid normalised histograms (outlines) of each named (n,) array."""
    values = np.concatenate([np.asarray(v, dtype=np.float64) for v in series.values()])
    low, high = np.quantile(values, [0.001, 0.999])
    edges = np.linspace(low, high, bins + 1)
    counts = {
        name: np.histogram(np.clip(v, low, high), edges, density=True)[0]
        for name, v in series.items()
    }
    top = max(float(c.max()) for c in counts.values()) or 1.0
    parts, fx, fy = _frame((float(low), float(high)), (0.0, top), xlabel, "density")
    for i, (_name, count) in enumerate(counts.items()):
        points = " ".join(
            f"{fx(edges[j + step]):.1f},{fy(count[j]):.1f}" for j in range(bins) for step in (0, 1)
        )
        parts.append(
            f'<polyline points="{points}" fill="none" stroke="{COLOURS[i]}" stroke-width="1.5"/>'
        )
    return _svg(parts, list(series))


def line_svg(
    x: Sequence[float],
    series: dict[str, tuple[Sequence[float], Sequence[float] | None, Sequence[float] | None]],
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
) -> str:
    """Lines with optional 95% bands: {label: (y, low or None, high or None)} over ``x``."""
    xs = np.log10(np.asarray(x, dtype=np.float64)) if log_x else np.asarray(x, dtype=np.float64)
    ys = [
        np.asarray(v, dtype=np.float64)
        for y, lo, hi in series.values()
        for v in (y, lo, hi)
        if v is not None
    ]
    finite = np.concatenate(ys)
    finite = finite[np.isfinite(finite)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    pad = 0.05 * (high - low or 1.0)
    parts, fx, fy = _frame(
        (float(xs.min()), float(xs.max())),
        (low - pad, high + pad),
        f"log10 {xlabel}" if log_x else xlabel,
        ylabel,
    )
    for i, (y, lo, hi) in enumerate(series.values()):
        colour = COLOURS[i % len(COLOURS)]
        if lo is not None and hi is not None:
            upper = [f"{fx(a):.1f},{fy(b):.1f}" for a, b in zip(xs, hi, strict=True)]
            lower = [f"{fx(a):.1f},{fy(b):.1f}" for a, b in zip(xs, lo, strict=True)][::-1]
            parts.append(
                f'<polygon points="{" ".join(upper + lower)}" fill="{colour}" opacity="0.18"/>'
            )
        points = " ".join(f"{fx(a):.1f},{fy(b):.1f}" for a, b in zip(xs, y, strict=True))
        parts.append(
            f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>'
        )
    return _svg(parts, list(series))


def intervals_svg(rows: Sequence[tuple[str, float, float, float]], xlabel: str) -> str:
    """One row per (label, value, ci_low, ci_high): a dot with its 95% whiskers, a line at 0."""
    height = 24 * len(rows) + 50
    values = [v for row in rows for v in row[1:] if math.isfinite(v)] + [0.0]
    low, high = min(values), max(values)
    pad = 0.05 * (high - low or 1.0)
    left, right = 170, WIDTH - 20
    fx = _scale(low - pad, high + pad, left, right)
    parts = [
        f'<line x1="{fx(0):.1f}" y1="10" x2="{fx(0):.1f}" y2="{height - 34}" stroke="#999" '
        'stroke-dasharray="3,3"/>'
    ]
    for i, (label, value, ci_low, ci_high) in enumerate(rows):
        y = 22 + 24 * i
        parts.append(
            f'<text x="{left - 8}" y="{y + 4}" font-size="11" text-anchor="end">'
            f"{html.escape(label)}</text>"
        )
        if all(math.isfinite(v) for v in (value, ci_low, ci_high)):
            parts.append(
                f'<line x1="{fx(ci_low):.1f}" y1="{y}" x2="{fx(ci_high):.1f}" y2="{y}" '
                f'stroke="{COLOURS[0]}" stroke-width="2"/>'
                f'<circle cx="{fx(value):.1f}" cy="{y}" r="4" fill="{COLOURS[0]}"/>'
            )
    for tick in np.linspace(low - pad, high + pad, 5):
        parts.append(
            f'<text x="{fx(tick):.1f}" y="{height - 20}" font-size="11" '
            f'text-anchor="middle">{tick:.2g}</text>'
        )
    parts.append(
        f'<text x="{(left + right) / 2}" y="{height - 4}" font-size="12" '
        f'text-anchor="middle">{html.escape(xlabel)}</text>'
    )
    body = "".join(parts)
    return f'<svg width="{WIDTH}" height="{height}" xmlns="http://www.w3.org/2000/svg">{body}</svg>'


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
