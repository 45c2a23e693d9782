"""The ``flat`` kind, index side: exact scoring over a flat FAISS index (IndexFlatL2) of the
training latents, one per shard with ``--shards K``, each with the exact engine's GEMM operand
beside it (index/gemm_operand.py). It has no manifest block."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from latentsieve.index.errors import StoreError
from latentsieve.index.gemm_operand import gemm_operand, load_operand, operand_files, save_operand
from latentsieve.index.kinds.base import Kind, LoadedShard, Written, shard_bounds
from latentsieve.index.manifest import IndexManifest, IndexShard

if TYPE_CHECKING:
    import faiss

    from latentsieve.index.build import BuildOptions

INDEX_FILE = "index.faiss"
_ADD_BLOCK = 65_536


def check(options: BuildOptions) -> None:
    if options.storage != "float32":
        raise StoreError(
            f"--storage {options.storage} needs --kind ivf (a flat index is scored by a float32 "
            "GEMM over its stored latents)"
        )


def write(latents: np.ndarray, staged: Path, options: BuildOptions) -> Written:
    """One flat index of latents (N, d), or ``--shards K`` of contiguous row ranges."""
    if options.shards > 1:
        return write_shards(latents, staged, options.shards, options.progress), None
    write_index(latents, staged / INDEX_FILE, options.progress)
    return (), None


def write_shards(
    latents: np.ndarray, staged: Path, count: int, progress: bool
) -> tuple[IndexShard, ...]:
    """``count`` flat indexes of contiguous, near-equal row ranges of latents (N, d)."""
    bounds = shard_bounds(latents.shape[0], count)
    shards: list[IndexShard] = []
    for number, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        name = f"shard-{number}.faiss"
        write_index(latents[start:stop], staged / name, progress)
        shards.append(IndexShard(file=name, start=int(start), count=int(stop - start)))
    return tuple(shards)


def write_index(latents: np.ndarray, path: Path, progress: bool) -> None:
    """A flat FAISS index (IndexFlatL2) of float32 latents (N, d), added in blocks with a
    progress bar, and beside it the exact engine's GEMM operand (index/gemm_operand.py)."""
    import faiss
    from tqdm import tqdm

    index = faiss.IndexFlatL2(latents.shape[1])
    blocks = range(0, latents.shape[0], _ADD_BLOCK)
    for start in tqdm(blocks, desc="index", unit="block", disable=not progress):
        index.add(latents[start : start + _ADD_BLOCK])
    faiss.write_index(index, str(path))
    save_operand(gemm_operand(latents), path.parent, path.name)


def shard_files(index_file: str) -> set[str]:
    """A flat shard's FAISS file and its GEMM operand."""
    return {index_file, *operand_files(index_file)}


def open_shard(
    folder: Path, manifest: IndexManifest, number: int, shard: IndexShard,
    expected: tuple[int, int],
) -> LoadedShard:
    """A memory-mapped flat FAISS index, a zero-copy view of its vectors and its operand."""
    import faiss

    path = folder / shard.file
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
    except RuntimeError as exc:
        raise StoreError(f"{path}: unreadable FAISS index ({exc})") from exc
    inner: Any = faiss.downcast_index(index)  # the concrete SWIG class
    if not isinstance(inner, faiss.IndexFlatL2):
        raise StoreError(f"{path}: expected a flat index, got {type(inner).__name__}")
    if (inner.ntotal, inner.d) != expected:
        raise StoreError(
            f"{path}: index holds {inner.ntotal} x {inner.d}, manifest says "
            f"{expected[0]} x {expected[1]}"
        )
    operand = None
    if operand_files(shard.file)[0] in manifest.files:  # versions built before have none
        try:
            operand = load_operand(folder, shard.file, *expected)
        except (OSError, ValueError, KeyError) as exc:
            raise StoreError(f"{folder}: unreadable GEMM operand ({exc})") from exc
    return LoadedShard(number, shard.start, index, np.asarray(_FlatVectors(index, inner)),
                       operand=operand)


class _FlatVectors:
    """Exposes a flat index's vectors to NumPy without a copy, as the array's ``base``: the
    array then keeps ``owner`` (the object that frees the C++ index and its memory map) alive."""

    def __init__(self, owner: faiss.Index, flat: faiss.IndexFlat) -> None:
        import faiss

        self.owner = owner
        view = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d)
        self.__array_interface__ = {
            "shape": (int(flat.ntotal), int(flat.d)),
            "typestr": "<f4",
            "data": (view.__array_interface__["data"][0], True),  # read-only: a file mapping
            "version": 3,
        }


KIND = Kind(
    name="flat",
    help="flat is exact",
    exact=True,
    main_file=INDEX_FILE,
    block=None,
    write=write,
    open_shard=open_shard,
    shard_files=shard_files,
    check=check,
)
