"""Hot reload in-process: a new version is served, a corrupted one is skipped and the
previous version keeps serving."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from index.store import LatentStore
from service.settings import Settings

pytestmark = pytest.mark.anyio
NOSAMPLER = "nosampler"


async def served_version(client: httpx.AsyncClient, model: str) -> str:
    models = (await client.get("/models")).json()["models"]
    return str({m["name"]: m for m in models}[model]["index_version"])


async def wait_for_version(client: httpx.AsyncClient, model: str, version: str) -> bool:
    for _ in range(100):
        if await served_version(client, model) == version:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_reload_serves_new_versions_and_skips_corrupt_ones(
    store_root: Path,
    tmp_path: Path,
    serve: Callable[..., Any],
    new_nosampler_version: Callable[[Path, int], str],
) -> None:
    root = tmp_path / "store"
    shutil.copytree(store_root, root)
    store = LatentStore(root)
    first = store.newest(NOSAMPLER)
    assert first is not None
    async with serve(Settings(store=root, reload_interval_s=0.05)) as client:
        assert await served_version(client, NOSAMPLER) == first
        before = await client.post("/score", json={"model": NOSAMPLER, "latents": [[0.0] * 6]})

        # Corrupted before it appears in the served store, so no poll can see it intact.
        scratch = tmp_path / "scratch" / "store"
        scratch.mkdir(parents=True)
        corrupt = await asyncio.to_thread(new_nosampler_version, scratch, 1)
        (scratch / NOSAMPLER / corrupt / "calibration.npy").write_bytes(b"not numpy")
        (scratch / NOSAMPLER / corrupt).rename(root / NOSAMPLER / corrupt)
        await asyncio.sleep(0.5)
        assert await served_version(client, NOSAMPLER) == first
        still = await client.post("/score", json={"model": NOSAMPLER, "latents": [[0.0] * 6]})
        assert still.status_code == 200
        assert still.json()["results"][0]["log_density"] == before.json()["results"][0][
            "log_density"
        ]

        good = await asyncio.to_thread(new_nosampler_version, root, 2)
        assert await wait_for_version(client, NOSAMPLER, good)
        after = await client.post("/score", json={"model": NOSAMPLER, "latents": [[0.0] * 6]})
        assert after.json()["index_version"] == good
        assert after.json()["results"][0]["cached"] is False
        metrics = (await client.get("/metrics")).text
        assert f'latentsieve_index_latents{{model="nosampler",version="{good}"}} 300.0' in metrics
