"""``study.html``: the study's page, from the numbers of ``study.json``.

The frontier (mean delivered quality against denoiser evaluations per delivered image) is a
matplotlib chart drawn by the report page's ``chart_svg``; the gains use its interval chart and
its tables, so the page is one self-contained file (inline SVG and PNG).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.transforms import ScaledTranslation

from latentsieve.report_page import (
    COLOURS,
    _ci,
    _table,
    chart_svg,
    intervals_svg,
    png_data_uri,
)

BASELINE_COLOUR = "#7f7f7f"
DODGE = 5  # points between rows of equal cost on the frontier chart
SIGNIFICANCE = 0.05  # Holm-adjusted level a verdict calls "pays"


def _padded(values: Sequence[float], pad: float = 0.08) -> tuple[float, float]:
    finite = [v for v in values if np.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    margin = pad * (high - low or abs(high) or 1.0)
    return low - margin, high + margin


def frontier_svg(rows: Sequence[dict[str, Any]], frontier: Sequence[str]) -> str:
    """Each row at (evaluations per image, mean delivered quality) with its 95% interval;
    strategies in colour and named, baselines grey and hollow (named when on the frontier),
    the frontier as a dashed line through the rows' exact positions."""
    by_name = {r["strategy"]: r for r in rows}
    colour_of: dict[str, str] = {}
    for r in rows:
        if not r["baseline"]:
            colour_of[r["strategy"]] = COLOURS[len(colour_of) % len(COLOURS)]
    sharing: dict[float, list[str]] = {}  # rows at one cost are spread sideways to be seen
    for r in rows:
        sharing.setdefault(r["denoiser_evaluations_per_image"], []).append(r["strategy"])

    def draw(axes: Axes) -> None:
        axes.plot([by_name[name]["denoiser_evaluations_per_image"] for name in frontier],
                  [by_name[name]["quality_mean"] for name in frontier],
                  color="#bbbbbb", linestyle=(0, (4, 3)), linewidth=1)
        for r in rows:
            same = sharing[r["denoiser_evaluations_per_image"]]
            dodge = DODGE * (same.index(r["strategy"]) - (len(same) - 1) / 2)
            shifted = axes.transData + ScaledTranslation(dodge / 72, 0,  # points to inches
                                                         axes.figure.dpi_scale_trans)
            x, y = r["denoiser_evaluations_per_image"], r["quality_mean"]
            colour = colour_of.get(r["strategy"], BASELINE_COLOUR)
            axes.plot([x, x], [r["quality_ci"]["ci_low"], r["quality_ci"]["ci_high"]],
                      color=colour, linewidth=1.5, transform=shifted)
            axes.plot([x], [y], marker="o", markersize=6, color=colour, transform=shifted,
                      markerfacecolor="white" if r["baseline"] else colour)
            if not r["baseline"] or r["strategy"] in frontier:  # the table names the others
                axes.annotate(r["strategy"], (x, y), xycoords=shifted, xytext=(5, 4),
                              textcoords="offset points", fontsize=7, color=colour)
        # Set, not autoscaled: matplotlib leaves the dodged (shifted) artists out of autoscaling.
        axes.set_xlim(0.0, _padded([r["denoiser_evaluations_per_image"] for r in rows])[1])
        axes.set_ylim(*_padded([r["quality_ci"][end] for r in rows
                                for end in ("ci_low", "ci_high")]))
        axes.set_xlabel("denoiser evaluations per delivered image")
        axes.set_ylabel("mean delivered quality")

    return chart_svg(draw)


def _p(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def _number(value: float | None, digits: str = ".4g") -> str:
    return "" if value is None else format(value, digits)


def verdicts(numbers: dict[str, Any]) -> list[str]:
    """One sentence per strategy: what it delivers, at what cost, and whether it beats random
    (interval above 0 and Holm-adjusted p below ``SIGNIFICANCE``)."""
    lines = []
    for r in numbers["strategies"]:
        if r["baseline"]:
            continue
        gain = r["gain_vs_random"]
        if gain["ci_low"] > 0 and (r["p_holm"] or 1.0) < SIGNIFICANCE:
            verdict = "beats random selection"
        elif gain["ci_high"] < 0:
            verdict = "does worse than random selection"
        else:
            verdict = "is not shown to beat random selection"
        equal = "; ".join(f"vs {name} at the same cost {_ci(value)}"
                          for name, value in r["gain_vs_equal_cost"].items())
        lines.append(
            f"{r['strategy']} delivers mean quality {r['quality_mean']:.4g} at "
            f"{r['denoiser_evaluations_per_image']:.4g} denoiser evaluations per image: gain "
            f"over random {_ci(gain)}, Holm p = {_p(r['p_holm'])}; it {verdict}"
            + (f" ({equal})" if equal else "")
            + ("; on the frontier." if r["on_frontier"] else "; not on the frontier.")
        )
    return lines


def candidates_html(numbers: dict[str, Any], thumbnails: np.ndarray | None) -> str:
    """The first group's candidates (seed, quality when known) and the rows that kept each."""
    if thumbnails is None:
        return ""
    cells = []
    kept_by: dict[int, list[str]] = {}
    for r in numbers["strategies"]:
        for seed in (r["kept_seeds"] or [[]])[0]:
            kept_by.setdefault(seed, []).append(r["strategy"])
    first = numbers["seeds"]["first"]
    for j, image in enumerate(thumbnails):
        seed = first + j
        who = ", ".join(kept_by.get(seed, [])) or "none"
        scale = max(1, 48 // image.shape[0])
        cells.append(
            f'<figure><img src="{png_data_uri(image, scale)}" alt="seed {seed}">'
            f"<figcaption>{seed}<br>kept by: {html.escape(who)}</figcaption></figure>"
        )
    return ("<h2>The first group's candidates</h2><p>Each candidate's final image, and the "
            "rows that keep it.</p>" f'<div class="grid">{"".join(cells)}</div>')


def page_html(numbers: dict[str, Any], thumbnails: np.ndarray | None = None) -> str:
    """The whole study page."""
    n = numbers
    rows = n["strategies"]
    head = (
        f"<h1>LatentSieve study: {html.escape(n['pipeline'])} scored by "
        f"{html.escape(n['model'])}</h1>"
        f"<p>{n['groups']} groups of G = {n['group_size']} candidates, M = {n['keep']} kept, "
        f"T = {n['steps']} steps, guidance {n['guidance_scale']:g}, seeds "
        f"{n['seeds']['first']}..{n['seeds']['last']}, {n['prompts']['count']} prompt(s); "
        f"quality: {html.escape(n['quality']['source'])}; index version "
        f"{html.escape(str(n['index_version']))}, {html.escape(n['scorer'])}. Generated "
        f"{n['generated_at']}. Every number is in <a href=\"study.json\">study.json</a>, every "
        'candidate in <a href="candidates.csv">candidates.csv</a>; brackets are 95% paired '
        f"bootstrap intervals over groups ({n['bootstrap']['resamples']} resamples).</p>"
    )
    sections = [
        head,
        "<h2>Verdict</h2>" + "".join(f"<p>{html.escape(v)}</p>" for v in verdicts(n)),
        "<h2>The frontier</h2><p>Mean quality of the delivered images against what each "
        "delivered image cost in denoiser evaluations (one UNet forward of one candidate). "
        "Points up and to the left are better; the dashed line joins the rows no other row "
        "beats on both (rows of equal cost are drawn a few pixels apart). Grey hollow points "
        "are baselines that do not use the index (named in the table): random choice, and "
        "the prior norm, the projection on the mean training latent and the 1-NN distance, "
        "each on the starting noise (the cost of <code>noise</code>) and on the final latents "
        "(the cost of <code>final</code>).</p>",
        frontier_svg(rows, n["frontier"]),
        _table(
            ["row", "scored on", "rule", "evaluations / image", "mean quality",
             "gain vs random", "p (one-sided)", "p (Holm)", "frontier", "label entropy (nats)",
             "pairwise latent distance"],
            [[r["strategy"], r["scored_on"], r["rule"],
              f"{r['denoiser_evaluations_per_image']:.4g}",
              f"{r['quality_mean']:.4g} [{r['quality_ci']['ci_low']:.4g}, "
              f"{r['quality_ci']['ci_high']:.4g}]",
              _ci(r["gain_vs_random"]), _p(r["p_value"]), _p(r["p_holm"]),
              "yes" if r["on_frontier"] else "",
              _number(r["diversity"]["label_entropy"], ".3f"),
              _number(r["diversity"]["mean_pairwise_latent_distance"])] for r in rows],
        ),
        "<h2>Gain over random selection</h2>",
        intervals_svg(
            [(r["strategy"], r["gain_vs_random"]["value"], r["gain_vs_random"]["ci_low"],
              r["gain_vs_random"]["ci_high"]) for r in rows if r["strategy"] != "random"],
            "mean delivered quality minus the group mean (95% interval)",
        ),
    ]
    matched = [(r["strategy"], name, value) for r in rows
               for name, value in r["gain_vs_equal_cost"].items()]
    if matched:
        sections.append("<h2>At equal cost per delivered image</h2><p>Each comparison here "
                        "is between rows that cost the same per delivered image; the difference "
                        "in mean delivered quality is paired per group.</p>")
        sections.append(_table(["strategy", "baseline at the same cost", "gain"],
                               [[a, b, _ci(value)] for a, b, value in matched]))
    if n["omitted_baselines"]:
        sections.append("<p>Not measured: " + html.escape(", ".join(
            f"{name} ({why})" for name, why in n["omitted_baselines"].items())) + ".</p>")
    sections.append(candidates_html(n, thumbnails))
    sections.append(
        "<h2>How it was measured</h2><p>Every candidate was rendered once to the end; each "
        "strategy's kept seeds are those best_of_g keeps for it, and its cost is its formula "
        "(per group: noise M*T, prefix:K G*K + M*(T-K), preview:S G*S + M*T, final G*T). "
        "Gains are paired per group against the group's mean quality (random selection's "
        "expectation). p-values are one-sided bootstrap p-values for a gain above 0, "
        "Holm-adjusted over "
        + html.escape(", ".join(n["bootstrap"]["holm_family"])) + ".</p>"
    )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "font-size:13px}.grid{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;"
        "text-align:center;font-size:11px;max-width:110px}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>LatentSieve study "
        f"{html.escape(n['pipeline'])}</title><style>{style}</style></head><body>"
        + "\n".join(section for section in sections if section)
        + "</body></html>\n"
    )
