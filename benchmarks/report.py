"""One results page, ``docs/performance.md``, with one generated section per benchmark.

Each benchmark replaces only its own section (between ``<!-- begin NAME -->`` and
``<!-- end NAME -->``), so running one leaves the others' numbers, and their dates, as they
were. Sections are kept in ``ORDER``; a missing page or section is created.
"""

from __future__ import annotations

import re
from pathlib import Path

PAGE = Path("docs/performance.md")
ORDER = ("density", "scale", "http", "cache", "distributed", "descriptors", "gpu", "sd")
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


def write_section(
    name: str,
    markdown: str,
    page: Path = PAGE,
    order: tuple[str, ...] = ORDER,
    title: str = TITLE,
) -> None:
    """Replace section ``name`` of ``page`` with ``markdown`` (headings ``##`` and below).

    The rest of the page, hand-written text between sections included, stays as it is. A new
    section goes before the first present section that follows it in ``order`` (else at the
    end); a missing page is created with ``title``."""
    if name not in order:
        raise ValueError(f"unknown section {name!r}; known: {', '.join(order)}")
    text = page.read_text(encoding="utf-8") if page.exists() else title
    block = f"{_marker(name, 'begin')}\n{markdown.rstrip(chr(10))}\n{_marker(name, 'end')}\n"
    pattern = re.compile(
        rf"{re.escape(_marker(name, 'begin'))}\n.*?{re.escape(_marker(name, 'end'))}\n?",
        re.DOTALL,
    )
    if pattern.search(text):
        text = pattern.sub(lambda _match: block, text, count=1)
    else:
        later = [text.index(_marker(k, "begin")) for k in order[order.index(name) + 1 :]
                 if _marker(k, "begin") in text]
        at = min(later) if later else len(text)
        before = text[:at].rstrip("\n") + "\n\n"
        text = before + block + ("\n" + text[at:] if at < len(text) else "")
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text, encoding="utf-8")
