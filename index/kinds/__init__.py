"""The index kinds: the one list of them. Each kind is one module here (how it is written,
opened and recorded: :class:`~latentsieve.index.kinds.base.Kind`) and one in
``latentsieve.workers.kinds`` (how it is scored); ``index build --kind`` offers exactly
``BUILD_KINDS``, and ``IndexManifest.kind`` accepts these and the retired ones."""

from __future__ import annotations

from latentsieve.index.errors import StoreError
from latentsieve.index.kinds import flat, ivf
from latentsieve.index.kinds.base import Kind
from latentsieve.index.manifest import IndexManifest

KINDS: dict[str, Kind] = {kind.name: kind for kind in (flat.KIND, ivf.KIND)}
BUILD_KINDS: tuple[str, ...] = tuple(KINDS)
# Kinds no longer built, and why; versions built before still load and answer error_bound null.
RETIRED: dict[str, str] = {
    "hnsw": "a graph search cannot bound the kernel mass it skips, so its scores cannot be "
            "certified (docs/contract.md §1); build --kind ivf",
}


def build_kind(name: str) -> Kind:
    """The kind ``index build --kind NAME`` makes; StoreError for a retired or unknown one."""
    if name in RETIRED:
        raise StoreError(f"--kind {name} is retired: {RETIRED[name]}")
    if name not in KINDS:
        raise StoreError(f"unknown --kind {name!r}; choose one of {', '.join(BUILD_KINDS)}")
    return KINDS[name]


def _usable(manifest: IndexManifest) -> Kind | None:
    """The kind that opens ``manifest``'s shards; None for a retired kind, or a version built
    before its kind had its manifest block."""
    kind = KINDS.get(manifest.kind)
    if kind is None or (kind.block is not None and kind.settings(manifest) is None):
        return None
    return kind


def opening(manifest: IndexManifest) -> Kind:
    """The kind that opens ``manifest``'s shards; StoreError saying to rebuild otherwise."""
    kind = _usable(manifest)
    if kind is None:
        raise StoreError(
            f"{manifest.model}/{manifest.version} is a {manifest.kind} index built before "
            "scores were certified; rebuild it with `latentsieve index build --kind ivf` "
            "(docs/scoring.md, migration)"
        )
    return kind


def main_file(manifest: IndexManifest) -> str:
    """The file of an unsharded version's one shard."""
    return (_usable(manifest) or flat.KIND).main_file


def shard_files(manifest: IndexManifest, index_file: str) -> set[str]:
    """Every file of the shard of ``manifest`` whose main file is ``index_file``."""
    return (_usable(manifest) or flat.KIND).shard_files(index_file)


def default_bound(manifest: IndexManifest) -> float | None:
    """The bound (nats) a request naming none gets from ``manifest``'s version; None when its
    scores are exact (they meet any bound) or it cannot be scored with one."""
    kind = KINDS.get(manifest.kind)
    return kind.default_bound(manifest) if kind is not None else None


__all__ = ["BUILD_KINDS", "KINDS", "RETIRED", "Kind", "build_kind", "default_bound",
           "main_file", "opening", "shard_files"]
