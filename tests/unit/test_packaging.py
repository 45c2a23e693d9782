"""What a user installs: a small client by default, one of two exclusive server extras, and one
constraints file (torch==2.13.0 among its pins) that CI, the Makefile and the images use."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
HEAVY = {"torch", "faiss-cpu", "faiss-gpu-cu12", "fastapi", "uvicorn", "redis", "scikit-learn"}


def pins() -> dict[str, Version]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"constraints.txt: {line!r} is not an exact pin"
            found[name.lower().replace("_", "-")] = Version(pinned)
    return found


def requirements(extra: str | None = None) -> list[Requirement]:
    listed = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return [Requirement(text) for text in listed]


def test_the_base_install_is_the_client() -> None:
    names = {req.name for req in requirements()}
    assert names == {"numpy", "httpx", "pydantic"}
    assert not names & HEAVY


def test_cpu_and_gpu_differ_only_in_the_faiss_build() -> None:
    cpu, gpu = ({req.name for req in requirements(extra)} for extra in ("cpu", "gpu"))
    assert cpu - gpu == {"faiss-cpu"} and gpu - cpu == {"faiss-gpu-cu12"}
    server = {req.name for req in requirements("server")}
    assert "torch" in server and not any(name.startswith("faiss") for name in server)
    assert "scikit-learn" not in server  # only the demo build reads load_digits
    assert {req.name for req in requirements("demo")} == {"scikit-learn"}
    conflicts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"]["conflicts"]
    assert [{"extra": "cpu"}, {"extra": "gpu"}] in conflicts


def test_pins_satisfy_the_declared_ranges_and_torch_is_pinned() -> None:
    pinned = pins()
    assert pinned["torch"] == Version("2.13.0")
    server = [req for req in requirements("server") if not req.name.startswith("latentsieve")]
    for req in [*requirements(), *server, *requirements("demo"), *requirements("report")]:
        assert req.name.lower() in pinned, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pinned[req.name.lower()], prereleases=True), (
            f"constraints.txt pins {req.name}=={pinned[req.name.lower()]}, outside {req}")
    # The pyproject keeps ranges, not pins.
    assert not any(str(req.specifier).startswith("==") for req in server)


def test_every_installer_uses_the_constraints_file() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in makefile
    assert re.search(r"^test: .*install-dev", makefile, flags=re.MULTILINE)
    for dockerfile in sorted((ROOT / "docker").glob("*.Dockerfile")):
        text = dockerfile.read_text()
        installs = [line for line in text.splitlines() if "pip install" in line]
        assert installs, dockerfile
        assert all("-c constraints.txt" in line or "--upgrade pip" in line for line in installs), (
            dockerfile, installs)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_pip_resolves_the_client_install_without_torch_or_faiss(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
         "--report", str(report), str(ROOT)],
        capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "latentsieve" in names and "numpy" in names
    assert not names & HEAVY, names & HEAVY
    assert not any(name.startswith(("nvidia", "faiss")) for name in names)


def test_the_lowest_constraints_are_the_declared_lower_bounds() -> None:
    """constraints-lowest.txt (``make check-lowest``) pins each direct dependency at the lower
    bound pyproject.toml declares, so that check tests the bounds users are promised."""
    lowest = {}
    for line in (ROOT / "constraints-lowest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            lowest[name.lower()] = Version(pinned)
    declared = [*requirements(), *requirements("server"), *requirements("cpu"),
                *requirements("demo"), *requirements("report")]
    for req in declared:
        if req.name == "latentsieve":
            continue
        floors = [Version(spec.version) for spec in req.specifier if spec.operator == ">="]
        assert floors, f"{req} has no lower bound"
        if req.name == "torch":  # older CPU builds are not on the index: the pin is tested
            assert lowest["torch"] == pins()["torch"]
            continue
        assert lowest[req.name.lower()] == floors[0], (req, lowest.get(req.name.lower()))
