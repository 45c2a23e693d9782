"""What every index kind provides on the index side (:class:`Kind`), and what its modules
share: the shard a store opens (:class:`LoadedShard`) and the row ranges of ``--shards K``.

Kept light to import (the CLI lists the kinds): FAISS, tqdm and the ivf lists are imported by
the functions that use them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel

from latentsieve.index.errors import StoreError
from latentsieve.index.manifest import IndexManifest, IndexShard

if TYPE_CHECKING:
    import faiss

    from latentsieve.index.build import BuildOptions
    from latentsieve.index.gemm_operand import GemmOperand
    from latentsieve.index.ivf_lists import IvfLists

# What a kind's ``write`` leaves in the staged folder, for the manifest: its shards (empty:
# one shard, the kind's ``main_file``) and its manifest block (None for a kind without one).
Written = tuple[tuple[IndexShard, ...], BaseModel | None]


@dataclass(frozen=True)
class LoadedShard:
    """One opened shard: rows ``start .. start + len(latents) - 1`` of the version. For flat,
    ``latents`` is a zero-copy (n, d) float32 view of the memory-mapped FAISS ``index``, valid
    while it lives; for a certified ivf version, ``lists`` (offsets memory-mapped) and
    ``latents`` its rows reconstructed on demand (:class:`StoredRows`), ``index`` None."""

    number: int
    start: int
    index: faiss.Index | None
    latents: np.ndarray
    lists: IvfLists | None = None
    operand: GemmOperand | None = None  # flat: the stored GEMM operand (older versions: None)


def _no_check(options: BuildOptions) -> None:
    """A kind without options of its own accepts every build."""


@dataclass(frozen=True)
class Kind:
    """One index kind, index side: how ``index build --kind NAME`` writes it, how a store
    opens and checks its shards, and what its manifest records. Its scorer is the workers'
    side (``latentsieve.workers.kinds``).

    ``exact``: its scores are exact (no bound); otherwise each carries a certified bound, the
    block's ``max_error`` by default, and the build fills the block's ``measured``."""

    name: str
    help: str  # one line for ``index build --help``
    exact: bool
    main_file: str  # the file of an unsharded version's one shard
    block: str | None  # the manifest field holding its settings (None: it has none)
    write: Callable[[np.ndarray, Path, BuildOptions], Written]
    # (version folder, manifest, shard number, its entry, expected (rows, dim)) -> opened
    open_shard: Callable[[Path, IndexManifest, int, IndexShard, tuple[int, int]], LoadedShard]
    shard_files: Callable[[str], set[str]]  # a shard's main file -> every file of that shard
    check: Callable[[BuildOptions], None] = _no_check  # refuse options this kind cannot take

    def settings(self, manifest: IndexManifest) -> Any:
        """This kind's manifest block of ``manifest`` (None: none, or built before it had one)."""
        return getattr(manifest, self.block) if self.block is not None else None

    def default_bound(self, manifest: IndexManifest) -> float | None:
        """The bound a request that names none gets (nats); None for an exact kind, whose
        scores meet any."""
        settings = self.settings(manifest)
        if self.exact or settings is None:
            return None
        return float(settings.max_error)


def shard_bounds(n: int, count: int) -> np.ndarray:
    """Row boundaries (count + 1,) of ``count`` contiguous, near-equal ranges of N rows; each
    holds at least 2 rows, so leave-one-out sums stay defined on every shard."""
    if n < 2 * count:
        raise StoreError(f"--shards {count} needs at least {2 * count} latents, got {n}")
    return np.linspace(0, n, count + 1).round().astype(np.int64)
