"""The numeric tests under more than one BLAS kernel.

OpenBLAS picks its kernels from the CPU, so a property that holds by accident of one kernel's
rounding (a GEMM row that does not depend on the other rows of its batch, say) passes on the
machine that wrote it and fails on the next CPU kind: CI once went red on a fresh clone for
exactly that. Here the numeric modules run again in subprocesses, each with
``OPENBLAS_CORETYPE`` forcing another kernel the CPU can run, and each run checks through
threadpoolctl that the kernel it asked for is the one loaded.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUMERIC = [
    "tests/unit/test_certified.py",
    "tests/unit/test_density.py",
    "tests/unit/test_gemm_operand.py",
    "tests/unit/test_shards.py",
    "tests/unit/test_approximate_kinds.py",
]


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def kernels() -> list[str]:
    """Two kernels of different generations that this CPU runs (named as OpenBLAS does)."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        flags = cpu_flags()
        modern = "Haswell" if {"avx2", "fma"} <= flags else "Sandybridge"
        return ["Prescott", modern]  # SSE3 and AVX2/FMA (or AVX): different GEMM kernels
    if machine in ("aarch64", "arm64"):
        return ["ARMV8", "NEOVERSEN1" if "asimddp" in cpu_flags() else "CORTEXA57"]
    pytest.fail(f"no OpenBLAS kernel list for {machine}: add one here")


ALIASES = {"Prescott": "Katmai"}  # how threadpoolctl names OpenBLAS's SSE3 kernel
PROBE = (
    "import json, numpy, threadpoolctl; "
    "print(json.dumps([i.get('architecture') for i in threadpoolctl.threadpool_info() "
    "if i.get('internal_api') == 'openblas']))"
)


@pytest.mark.parametrize("kernel", kernels())
def test_numeric_tests_pass_under_another_kernel(kernel: str) -> None:
    env = {**os.environ, "OPENBLAS_CORETYPE": kernel}
    env.pop("OPENBLAS_L2_SIZE", None)
    loaded = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                            text=True, check=True)
    assert [name.lower() for name in json.loads(loaded.stdout)] in (
        [kernel.lower()], [ALIASES.get(kernel, kernel).lower()]), (loaded.stdout, loaded.stderr)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *NUMERIC],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
