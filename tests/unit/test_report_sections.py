"""``benchmarks/report.py``: each benchmark rewrites only its own section of the results page."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sections_are_replaced_alone_and_kept_in_order(tmp_path: Path) -> None:
    report = load_report()
    page = tmp_path / "performance.md"
    report.write_section("descriptors", "## D\n\nold d", page)
    report.write_section("density", "## W1\n\nfirst", page)
    report.write_section("http", "## HTTP\n\nh", page)
    report.write_section("density", "## W1\n\nsecond", page)
    text = page.read_text()
    assert report.sections(text) == {
        "density": "## W1\n\nsecond\n", "http": "## HTTP\n\nh\n", "descriptors": "## D\n\nold d\n",
    }
    assert text.index("second") < text.index("## HTTP") < text.index("old d")
    assert text.startswith("# Performance")


def test_unknown_section_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown section"):
        load_report().write_section("tpu", "x", tmp_path / "p.md")


def test_the_shipped_page_has_every_section() -> None:
    report = load_report()
    assert set(report.sections((ROOT / "docs" / "performance.md").read_text())) == set(
        report.ORDER
    )


def test_hand_written_text_between_sections_survives(tmp_path: Path) -> None:
    report = load_report()
    page = tmp_path / "evidence.md"
    order = ("a", "b", "c")
    page.write_text("# Evidence\n\nIntro.\n")
    report.write_section("c", "## C\n\nold c", page, order)
    report.write_section("a", "## A\n\nfirst", page, order)
    page.write_text(page.read_text().replace("<!-- end a -->\n", "<!-- end a -->\nBetween.\n"))
    report.write_section("a", "## A\n\nsecond", page, order)
    report.write_section("b", "## B\n\nb", page, order)
    text = page.read_text()
    assert report.sections(text)["a"] == "## A\n\nsecond\n"
    assert text.startswith("# Evidence\n\nIntro.\n")
    assert "<!-- end a -->\nBetween.\n" in text and "first" not in text
    assert text.index("second") < text.index("## B") < text.index("old c")
