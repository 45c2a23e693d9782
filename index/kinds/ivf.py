"""The ``ivf`` kind, index side: certified IVF lists (docs/contract.md §1), k-means lists of
offsets with their statistics, one set per shard with ``--shards K``; its manifest block is
``certified`` (:class:`CertifiedLists`), its bound measured at build."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from latentsieve.index.errors import StoreError
from latentsieve.index.kinds.base import Kind, LoadedShard, Written, shard_bounds
from latentsieve.index.manifest import (
    IVF_OFFSETS_FILE,
    CertifiedLists,
    IndexManifest,
    IndexShard,
)

if TYPE_CHECKING:
    from latentsieve.index.build import BuildOptions

log = logging.getLogger(__name__)


def write(latents: np.ndarray, staged: Path, options: BuildOptions) -> Written:
    """The lists of a certified ivf index (k-means, grouping, statistics) written into the
    staged folder, one set per shard with ``--shards K`` (each over its rows, the same list
    count); the shards and the settings for the manifest (measured after calibration)."""
    from latentsieve.index.ivf_lists import IvfLists, choose_nlist, default_rank, kmeans_labels

    n, dim = latents.shape
    bounds = shard_bounds(n, options.shards) if options.shards > 1 else np.array([0, n])
    smallest = int(np.diff(bounds).min())
    rank = default_rank(dim)
    nlist = min(options.nlist or choose_nlist(smallest, dim, rank), smallest)
    train_size = min(smallest, 64 * nlist)
    shards: list[IndexShard] = []
    for number, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        rows = latents[start:stop]
        log.info("building ivf lists",
                 extra={"n": int(stop - start), "dim": dim, "nlist": nlist, "shard": number})
        labels = kmeans_labels(rows, nlist, seed=0, train_size=train_size)
        try:
            lists = IvfLists.group(rows, labels, nlist, storage=options.storage, rank=rank,
                                   progress=options.progress)
        except ValueError as exc:
            raise StoreError(f"--kind ivf: {exc}") from exc
        name = f"shard-{number}.{IVF_OFFSETS_FILE}" if options.shards > 1 else IVF_OFFSETS_FILE
        lists.save(staged, name)
        shards.append(IndexShard(file=name, start=int(start), count=int(stop - start)))
    certified = CertifiedLists(nlist=nlist, train_size=train_size, rank=rank,
                               storage=options.storage,  # type: ignore[arg-type]
                               max_error=options.max_error)
    return (tuple(shards) if options.shards > 1 else ()), certified


def shard_files(index_file: str) -> set[str]:
    """A certified ivf shard's offsets and lists."""
    from latentsieve.index.ivf_lists import lists_file

    return {index_file, lists_file(index_file)}


def open_shard(
    folder: Path, manifest: IndexManifest, number: int, shard: IndexShard,
    expected: tuple[int, int],
) -> LoadedShard:
    """A certified ivf shard's lists (offsets memory-mapped), checked against the manifest."""
    from latentsieve.index.ivf_lists import IvfLists, StoredRows

    certified = manifest.certified
    assert certified is not None  # the registry opens none without its block
    try:
        lists = IvfLists.load(folder, shard.file)
    except (OSError, ValueError, KeyError) as exc:
        raise StoreError(f"{folder}: unreadable ivf lists ({exc})") from exc
    if (lists.n, lists.dim) != expected or lists.nlist != certified.nlist:
        raise StoreError(
            f"{folder}: ivf lists hold {lists.n} x {lists.dim} in {lists.nlist} lists, "
            f"manifest says {expected[0]} x {expected[1]} in {certified.nlist}"
        )
    rows: Any = StoredRows(lists)  # an (n, d) array-like: rows reconstructed on demand
    return LoadedShard(number, shard.start, None, rows, lists)


KIND = Kind(
    name="ivf",
    help="ivf is approximate with a certified bound on every score",
    exact=False,
    main_file=IVF_OFFSETS_FILE,
    block="certified",
    write=write,
    open_shard=open_shard,
    shard_files=shard_files,
)
