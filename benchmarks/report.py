"""One results page, ``docs/performance.md``, with one generated section per benchmark.

Each benchmark replaces only its own section (between ``<!-- begin NAME -->`` and
``<!-- end NAME -->``), so running one leaves the others' numbers, and their dates, as they
were. Sections are kept in ``ORDER``; a missing page or section is created.
"""

from __future__ import annotations

import re
from pathlib import Path

PAGE = Path("docs/performance.md")
ORDER = ("density", "http", "descriptors")
TITLE = (
    "# Performance\n\n"
    "Every section below is written by the benchmark it names (`make bench` runs them all); "
    "each says when and where it ran. These 2-core machines are noisy, so every speed is a "
    "ratio against a baseline timed in the same run.\n"
)


def _marker(name: str, edge: str) -> str:
    return f"<!-- {edge} {name} -->"


def sections(text: str) -> dict[str, str]:
    """The generated sections of a page, by name."""
    pattern = re.compile(r"<!-- begin (\w+) -->\n(.*?)<!-- end \1 -->", re.DOTALL)
    return {match.group(1): match.group(2) for match in pattern.finditer(text)}


def write_section(name: str, markdown: str, page: Path = PAGE) -> None:
    """Replace section ``name`` of ``page`` with ``markdown`` (headings ``##`` and below)."""
    if name not in ORDER:
        raise ValueError(f"unknown section {name!r}; known: {', '.join(ORDER)}")
    found = sections(page.read_text(encoding="utf-8")) if page.exists() else {}
    found[name] = markdown.rstrip("\n") + "\n"
    parts = [TITLE]
    for known in ORDER:
        if known in found:
            parts.append(f"{_marker(known, 'begin')}\n{found[known]}{_marker(known, 'end')}\n")
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(parts), encoding="utf-8")
