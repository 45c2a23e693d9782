"""A Redis password in the configured URL never reaches a caller or a log line: the gateway in
front of a real, password-protected ``redis-server`` that then goes down (finding: ``/readyz``
needs no key and returned the URL whole)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as redis

from latentsieve.logs import JsonFormatter
from latentsieve.service.settings import Settings

pytestmark = pytest.mark.anyio
PASSWORD = "TopSecretPw-3f9a"
KEY = "a-client-key"

RedisFactory = Callable[[Path], contextlib.AbstractContextManager[
    tuple[str, subprocess.Popen[bytes]]
]]


async def test_the_redis_password_is_never_answered_or_logged(
    tmp_path: Path, store_root: Path, serve: object, private_redis: RedisFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with private_redis(tmp_path) as (plain_url, process):
        admin = redis.Redis.from_url(plain_url)
        await admin.config_set("requirepass", PASSWORD)
        await admin.aclose()
        host = plain_url.removeprefix("redis://")
        url = f"redis://default:{PASSWORD}@{host}"
        settings = Settings(  # type: ignore[call-arg]
            store=store_root, redis_url=url, compute="workers", api_keys=[KEY],
            reload_interval_s=60.0, cache_bytes=0,
        )
        async with serve(settings) as client:  # type: ignore[operator]
            up = await client.get("/readyz")  # Redis up, no worker: names the shards
            process.terminate()
            process.wait(timeout=10)
            bodies = [up.text]
            for _ in range(100):  # until the gateway has noticed that Redis is gone
                down = await client.get("/readyz")
                bodies.append(down.text)
                if "Redis" in down.text:
                    break
                await asyncio.sleep(0.1)
            score = await client.post(
                "/score", json={"model": "digits-vae", "seeds": [0]}, headers={"X-API-Key": KEY}
            )
            bodies.append(score.text)
    assert up.status_code == 503 and down.status_code == 503 and score.status_code == 503
    assert "Redis at redis://***@" in down.json()["detail"], down.text
    assert "Redis at redis://***@" in score.json()["detail"], score.text
    for body in bodies:
        assert PASSWORD not in body, body
    lines = [JsonFormatter().format(record) for record in caplog.records]
    assert any("redis" in line.lower() for line in lines)
    assert not [line for line in lines if PASSWORD in line]
