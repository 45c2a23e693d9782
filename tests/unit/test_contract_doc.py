"""docs/contract.md is the one public contract: every pointer to it names a section it has, no
pointer to the old shared file is left, and its metric names are the ones the service exports."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT / "docs" / "contract.md"
SOURCES = ("service", "workers", "index", "latentsieve", "tests", "docs", "benchmarks",
           "examples")


def texts() -> dict[Path, str]:
    found = {ROOT / "README.md": (ROOT / "README.md").read_text(encoding="utf-8")}
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md") and path.is_file():
                found[path.resolve()] = path.read_text(encoding="utf-8")
    return found


def sections() -> set[str]:
    return set(re.findall(r"^## (\d+)\. ", CONTRACT.read_text(encoding="utf-8"), re.MULTILINE))


def test_every_pointer_names_a_section_the_contract_has() -> None:
    known = sections()
    assert known == {"1", "2", "3", "4", "5", "6", "7"}
    pointers = 0
    for path, text in texts().items():
        for number in re.findall(r"docs/contract\.md`? §(\d+)", text):
            assert number in known, f"{path}: docs/contract.md §{number}"
            pointers += 1
        old = "CONTRACT"  # the team's shared file, which users do not have
        assert f"{old} §" not in text and f"shared/{old}" not in text, path
    assert pointers > 50  # the code points here, not to a file users do not have


def test_the_contract_lists_the_metric_names_the_service_exports() -> None:
    from latentsieve.service.metrics import ServiceMetrics

    text = CONTRACT.read_text(encoding="utf-8")
    section = text.split("## 6.", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\s+(latentsieve_\w+)\s", section, re.MULTILINE))
    listed |= set(re.findall(r"`(latentsieve_\w+) \{", section))
    metrics = ServiceMetrics([-10.0, 0.0])
    metrics.watch_queue_depth(lambda: {"m": 0})
    metrics.watch_live_workers(lambda: {("m", "0"): 1})
    metrics.watch_index_latents(lambda: {("m", "v"): 10})
    metrics.watch_certified_paths(lambda: {("m", "dense"): 1})
    exported = {metric.name.removesuffix("_total") for metric in metrics.registry.collect()}
    gateway = {name.removesuffix("_total") for name in listed} - {
        "latentsieve_compute_seconds", "latentsieve_worker_jobs", "latentsieve_worker_up"}
    assert gateway <= exported, gateway - exported
