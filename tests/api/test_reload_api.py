"""Hot reload in-process: a new version is served, a corrupted one is skipped and the
previous version keeps serving."""

from __future__ import annotations

import asyncio
import importlib
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from latentsieve.cli import main
from latentsieve.index.store import LatentStore
from latentsieve.service.settings import Settings

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


async def test_a_generator_that_no_longer_imports_is_skipped_and_reload_goes_on(
    store_root: Path,
    tmp_path: Path,
    serve: Callable[..., Any],
    new_nosampler_version: Callable[[Path, int], str],
) -> None:
    """A version whose import-path generator has vanished (ImportError at load) must not stop
    the watch loop: the old version keeps serving and a later good version is picked up."""
    root = tmp_path / "store"
    shutil.copytree(store_root, root)
    first = LatentStore(root).newest(NOSAMPLER)
    modules = tmp_path / "modules"
    modules.mkdir()
    name = f"vanishing_generator_{uuid.uuid4().hex}"
    (modules / f"{name}.py").write_text(
        "import torch\n\n\ndef factory() -> torch.nn.Module:\n"
        "    return torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.ReLU())\n"
    )
    sys.path.insert(0, str(modules))
    try:
        latents = tmp_path / "z.npy"
        np.save(latents, np.random.default_rng(3).standard_normal((200, 6)).astype(np.float32))
        scratch = tmp_path / "scratch"
        assert main(["index", "build", "--store", str(scratch), "--model", NOSAMPLER,
                     "--latents", str(latents), "--sigma", "1", "--generator", f"{name}:factory",
                     "--descriptor-calibration-count", "20", "--no-progress"]) == 0
    finally:
        sys.path.remove(str(modules))
        sys.modules.pop(name, None)
        importlib.invalidate_caches()
    (modules / f"{name}.py").unlink()
    broken = LatentStore(scratch).newest(NOSAMPLER)
    assert broken is not None
    async with serve(Settings(store=root, reload_interval_s=0.05)) as client:
        (scratch / NOSAMPLER / broken).rename(root / NOSAMPLER / broken)
        await asyncio.sleep(0.5)
        assert await served_version(client, NOSAMPLER) == first
        good = await asyncio.to_thread(new_nosampler_version, root, 4)
        assert await wait_for_version(client, NOSAMPLER, good)


async def test_a_request_in_flight_finishes_on_the_version_it_started_with(
    store_root: Path,
    tmp_path: Path,
    serve: Callable[..., Any],
    new_nosampler_version: Callable[[Path, int], str],
) -> None:
    """Scores checked against float64 eq. (1) over each version's own latents (not against
    the engine): a request queued before a reload is scored on the old latents."""
    from latentsieve.workers.density import log_density_reference

    root = tmp_path / "store"
    shutil.copytree(store_root, root)
    store = LatentStore(root)
    first = store.newest(NOSAMPLER)
    assert first is not None
    old = store.load(NOSAMPLER, first)
    query = [[2.0] * 6]  # far out, where two samples of N(0, I) differ most
    # A long batching window keeps the request queued while the new version is served.
    settings = Settings(store=root, reload_interval_s=0.05, max_wait_ms=4000.0, cache_bytes=0)
    async with serve(settings) as client:
        pending = asyncio.ensure_future(
            client.post("/score", json={"model": NOSAMPLER, "latents": query})
        )
        await asyncio.sleep(0.2)
        assert not pending.done()  # precondition: still queued in the batcher
        second = await asyncio.to_thread(new_nosampler_version, root, 7)
        assert await wait_for_version(client, NOSAMPLER, second)
        assert not pending.done()
        # A new request for the same latent joins the queue while the old one waits: each
        # must be computed on its own version, never batched onto the other's.
        response, fresh = await asyncio.gather(
            pending, client.post("/score", json={"model": NOSAMPLER, "latents": query})
        )
    new = LatentStore(root).load(NOSAMPLER, second)
    q = np.asarray(query, dtype=np.float64)
    on_old = log_density_reference(q, np.asarray(old.latents, np.float64), 1.0)[0]
    on_new = log_density_reference(q, np.asarray(new.latents, np.float64), 1.0)[0]
    assert abs(on_old - on_new) > 0.1  # the two versions tell apart
    body = response.json()
    assert body["index_version"] == first
    assert body["results"][0]["log_density"] == pytest.approx(on_old, abs=1e-4)
    assert fresh.json()["index_version"] == second
    assert fresh.json()["results"][0]["log_density"] == pytest.approx(on_new, abs=1e-4)
