"""Every line ``latentsieve serve`` writes is JSON, uvicorn's own included, and every response
carries a request id that its access-log line names (issue 11)."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from servers import running_server

from latentsieve.demo import ensure_demo_index

MODEL = "digits-vae"


@pytest.fixture(scope="module")
def log_lines(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    store = tmp_path_factory.mktemp("access-store") / "store"
    ensure_demo_index(store)
    log = tmp_path_factory.mktemp("access-logs") / "serve.log"
    answers = {}
    with running_server(store, 60.0, log, processes=2,
                        env={"LATENTSIEVE_LOG_LEVEL": "info"}) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            answers["given"] = client.post(
                "/score", json={"model": MODEL, "seeds": [1, 2]},
                headers={"X-Request-ID": "trace-0001.a:b"})
            answers["bad body"] = client.post("/score", content=b"{not json",
                                              headers={"content-type": "application/json"})
            answers["odd id"] = client.get("/healthz", headers={"X-Request-ID": "two words!"})
            answers["unknown"] = client.get("/nowhere")
    assert answers["given"].status_code == 200
    assert answers["given"].headers["x-request-id"] == "trace-0001.a:b"
    assert answers["bad body"].status_code == 422
    for name in ("bad body", "odd id", "unknown"):  # made up here: 16 hex digits
        assert re.fullmatch(r"[0-9a-f]{16}", answers[name].headers["x-request-id"]), name
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON log line: {line!r}")
    parsed.append({"answers": {k: v.headers["x-request-id"] for k, v in answers.items()}})
    return parsed


def test_uvicorn_logs_in_the_same_json_format(log_lines: list[dict[str, object]]) -> None:
    uvicorn = [line for line in log_lines if str(line.get("logger", "")).startswith("uvicorn")]
    assert uvicorn, "no uvicorn line at --log-level info"
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in uvicorn)
    # The parent and each of the two worker processes report their start.
    assert sum("Started" in str(line["msg"]) for line in uvicorn) >= 2


def test_each_request_has_one_access_line_with_its_id(log_lines: list[dict[str, object]]) -> None:
    ids = log_lines[-1]["answers"]
    assert isinstance(ids, dict)
    access = {line["request_id"]: line for line in log_lines[:-1]
              if line.get("logger") == "latentsieve.access"}
    given = access[ids["given"]]
    assert (given["method"], given["path"], given["status"]) == ("POST", "/score", 200)
    assert isinstance(given["duration_ms"], float) and given["duration_ms"] > 0
    assert str(given["client"]).startswith("127.0.0.1:")
    assert access[ids["bad body"]]["status"] == 422
    assert access[ids["odd id"]]["path"] == "/healthz"
    assert access[ids["unknown"]]["status"] == 404
