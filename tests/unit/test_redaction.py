"""The one redaction of credentials in URLs (latentsieve/redaction.py)."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from latentsieve.logs import JsonFormatter
from latentsieve.redaction import redact
from latentsieve.service.errors import error_response


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://:secret@cache:6379/0", "redis://***@cache:6379/0"),
        ("redis://default:secret@cache:6379/0", "redis://***@cache:6379/0"),
        ("rediss://user:p@ss://word@cache:6380/1", "rediss://***@cache:6380/1"),
        ("redis://cache:6379/0?password=secret", "redis://cache:6379/0?password=***"),
        ("redis://cache/0?db=1&password=secret&x=1", "redis://cache/0?db=1&password=***&x=1"),
        ("redis://cache/0?username=u&PASSWORD=s", "redis://cache/0?username=***&PASSWORD=***"),
        ("Redis at redis://u:pw@h:1/0 (refused) and unix://x:y@/sock",
         "Redis at redis://***@h:1/0 (refused) and unix://***@/sock"),
        ("no url here", "no url here"),
        ("sigma=2.0", "sigma=2.0"),
    ],
)
def test_redact(text: str, shown: str) -> None:
    assert redact(text) == shown


PASSWORDS = st.text(
    alphabet=st.characters(codec="ascii", categories=("L", "N", "P", "S"),
                           exclude_characters="\"'<>"),
    min_size=1, max_size=24,
).map(lambda tail: f"S3CR3T{tail}")


@given(PASSWORDS, st.sampled_from(["redis", "rediss", "unix"]))
def test_no_password_survives(password: str, scheme: str) -> None:
    for text in (
        f"{scheme}://user:{password}@host:6379/0",
        f"{scheme}://:{password}@host:6379/0 then more text",
        f"{scheme}://host:6379/0?password={password.replace('&', '')}",
    ):
        assert "S3CR3T" not in redact(text), (text, redact(text))


def test_answers_and_log_lines_are_redacted() -> None:
    body = error_response(503, "Redis at redis://:hunter2@cache:6379/0 is unreachable").body
    assert b"hunter2" not in bytes(body) and b"redis://***@cache" in bytes(body)
    record = logging.makeLogRecord({
        "msg": "cannot reach %s", "args": ("redis://u:hunter2@cache/0",),
        "url": "redis://cache/0?password=hunter2",
    })
    line = JsonFormatter().format(record)
    assert "hunter2" not in line
    assert json.loads(line)["url"] == "redis://cache/0?password=***"
