"""Lay out a copy of this checkout for mutmut (``make mutation``).

mutmut names a mutant by its file's path and matches it against the running module's name, so
the mutated files must sit where their import names say: ``latentsieve/service/engine.py`` for
``latentsieve.service.engine``. In a checkout those folders are links to the top-level
``service/``, ``workers/`` and ``index/``; the copy made here holds real files instead.

    python tests/mutation/layout.py DIR     # then: cd DIR && mutmut run
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Everything the selected tests read, the top-level folders included (the Dockerfile test
# checks them); nothing imports them there.
COPIED = ("tests", "docs", "docker", "examples", "benchmarks", ".ci", "docker-compose.yml",
          "docker-compose.cpu.yml", ".env.example", ".dockerignore", "constraints.txt",
          "constraints-lowest.txt", "README.md", "Makefile", "pyproject.toml", "service",
          "workers", "index")
LINKED = ("service", "workers", "index")


def lay_out(target: Path) -> None:
    """A fresh copy of the checkout at ``target`` with ``latentsieve/`` made of real files."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".schemathesis", "mutants")
    shutil.copytree(ROOT / "latentsieve", target / "latentsieve", symlinks=True, ignore=ignore)
    for name in LINKED:
        (target / "latentsieve" / name).unlink()
        shutil.copytree(ROOT / name, target / "latentsieve" / name, ignore=ignore)
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, target / name)


if __name__ == "__main__":
    lay_out(Path(sys.argv[1]).resolve())
