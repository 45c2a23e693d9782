"""The OpenAPI document tells the truth: schemathesis, from outside, runs every check against a
real ``latentsieve serve`` on loopback (positive and negative data, status codes, response
schemas, content types, headers, authentication) and finds nothing.

One setting is ours: the contract answers a batch over the configured limit with 413, which
schemathesis does not count as a rejection by default, so ``negative_data_rejection`` lists it
(the limits are in the spec as ``maxItems`` / ``maximum``; past them 413 is the documented
answer).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import running_server

from latentsieve.demo import ensure_demo_index

CONFIG = """\
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422",
                     "428", "429", "5xx"]
"""


# Small limits: the spec documents them, so schemathesis sends requests right at them.
LIMITS = {"LATENTSIEVE_MAX_BATCH": "256", "LATENTSIEVE_SELECT_MAX_COUNT": "2000"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    ensure_demo_index(root)
    return root


def schemathesis(url: str, config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).with_name("schemathesis")
    return subprocess.run(
        [str(binary), "--config-file", str(config), "run", f"{url}/openapi.json",
         "--checks", "all", "--max-examples", "60", "--seed", "1", "--no-color", *extra],
        capture_output=True, text=True, timeout=240,
    )


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "schemathesis.toml"
    path.write_text(CONFIG, encoding="utf-8")
    yield path


@pytest.mark.timeout(300)
def test_every_check_passes_against_the_running_service(
    store: Path, config: Path, tmp_path: Path
) -> None:
    with running_server(store, 60.0, tmp_path / "serve.log", env=LIMITS) as server:
        result = schemathesis(server.url, config)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout.split("SUMMARY")[-1]


@pytest.mark.timeout(300)
def test_with_api_keys_the_spec_declares_them_and_every_check_passes(
    store: Path, config: Path, tmp_path: Path
) -> None:
    env = {**LIMITS, "LATENTSIEVE_API_KEYS": "k-1,k-2"}
    with running_server(store, 60.0, tmp_path / "serve.log", env=env) as server:
        import httpx

        spec = httpx.get(f"{server.url}/openapi.json", headers={"X-API-Key": "k-1"}).json()
        assert set(spec["components"]["securitySchemes"]) == {"ApiKeyHeader", "BearerKey"}
        assert spec["paths"]["/healthz"]["get"]["security"] == []
        result = schemathesis(server.url, config, "--header", "X-API-Key: k-2")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
