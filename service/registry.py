"""The models being served, and their hot reload from the store.

The registry maps a model name to the ``ServedModel`` of its newest loaded version. A reload
loads a newer version in a worker thread and swaps one dict reference, so a request that
already holds a version keeps scoring with it while new requests see the new version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from latentsieve.index.errors import StoreError
from latentsieve.index.store import LatentStore, LoadedVersion
from latentsieve.workers.scoring import ModelView
from latentsieve.workers.shard_scoring import ShardScorer, open_shards, sum_paths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """One served version: its view (manifest, sampler, calibrations) and, when this process
    computes (``--compute embedded``), a scorer per shard; none in front of workers."""

    view: ModelView
    shards: tuple[ShardScorer, ...]

    @property
    def version(self) -> str:
        return self.view.manifest.version

    def certified_paths(self) -> dict[str, int]:
        """Rows each certified ivf path scored, summed over this process's shards (empty for
        a flat index or in front of workers)."""
        return sum_paths(self.shards)


class ModelRegistry:
    """Name -> the newest successfully loaded version. ``load_shards`` False: load only the
    small parts (a gateway in front of workers); the workers load the training latents."""

    def __init__(
        self,
        store: LatentStore,
        device: str = "cpu",
        load_shards: bool = True,
    ) -> None:
        self.store = store
        self.device = device  # resolved (workers.devices.resolve_device): cpu or cuda:I
        self.load_shards = load_shards
        self._models: dict[str, ServedModel] = {}
        self._failed: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def get(self, name: str) -> ServedModel | None:
        """The version serving ``name`` now, or None (a dict lookup: never the filesystem)."""
        return self._models.get(name)

    def certified_paths(self) -> dict[tuple[str, str], int]:
        """(model, path) -> rows its certified ivf shards scored by that path (the metric)."""
        return {
            (name, path): count
            for name, served in self.snapshot().items()
            for path, count in served.certified_paths().items()
        }

    def snapshot(self) -> dict[str, ServedModel]:
        """Every served model, as of now."""
        return dict(self._models)

    def request_reload(self) -> None:
        """Ask the watch loop to check the store now (SIGHUP)."""
        self._wake.set()

    def _newest_versions(self) -> dict[str, str]:
        newest: dict[str, str] = {}
        for name in self.store.models():
            version = self.store.newest(name)
            if version is not None:
                newest[name] = version
        return newest

    def _load(self, name: str, version: str) -> ServedModel:
        return self._open(self.store.load(name, version,
                                          shards=None if self.load_shards else ()))

    def _open(self, loaded: LoadedVersion) -> ServedModel:
        shards = open_shards(loaded, self.device) if self.load_shards else ()
        return ServedModel(ModelView(loaded), shards)

    def serve(self, loaded: LoadedVersion) -> ServedModel:
        """Serve ``loaded`` for its model from now on, whatever the store holds (a version
        pinned by an offline caller, ``service.offline.SyncScorer``); returns it."""
        served = self._open(loaded)
        self._models = {**self._models, loaded.manifest.model: served}
        return served

    async def refresh(self) -> list[str]:
        """Load every model whose newest version is not the one served; returns
        ``model/version`` of each newly loaded version. A version that fails to load is
        logged once and skipped; the previous version keeps serving."""
        async with self._lock:
            try:
                newest = await asyncio.to_thread(self._newest_versions)
            except (OSError, StoreError) as exc:
                log.warning("cannot list the store", extra={"error": str(exc)})
                return []
            loaded: list[str] = []
            for name, version in newest.items():
                current = self._models.get(name)
                if current is not None and current.version == version:
                    continue
                if (name, version) in self._failed:
                    continue
                try:
                    scorer = await asyncio.to_thread(self._load, name, version)
                # Any failure (a generator factory can raise anything, an import path can
                # vanish) skips this version; the watch loop must outlive it.
                except Exception as exc:
                    self._failed.add((name, version))
                    log.error(
                        "cannot load index version",
                        extra={"model": name, "version": version, "error": str(exc)},
                    )
                    continue
                self._models = {**self._models, name: scorer}
                loaded.append(f"{name}/{version}")
                log.info("serving index version", extra={"model": name, "version": version})
            return loaded

    async def watch(self, interval_s: float) -> None:
        """Refresh every ``interval_s`` seconds or as soon as ``request_reload`` is called."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.refresh()
            except Exception:  # the loop is the only reloader: log and keep watching
                log.exception("store refresh failed; retrying at the next interval")
