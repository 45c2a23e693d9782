"""The stored form of a certified IVF index: training latents grouped by list, as offsets from
each list's mean, with the per-list statistics that bound eq. (1) (see
:mod:`latentsieve.workers.certified`).

A list l keeps an origin o_l (its members' float64 mean) and its members' offsets from it in
float32 or float16 (``--storage``); the stored latent is o_l + offset, exact in float64, and it
is what the index certifies scores over. Rounding an offset moves a latent by at most half a
unit in the last place of the offset, so the error grows with the list's radius, not with the
latents' magnitude. On disk: ``ivf_offsets.npy`` (N, d), memory-mapped when served, and
``ivf_lists.npz`` with the row order, list boundaries, origins, row norms and statistics.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from latentsieve.index.manifest import IVF_LISTS_FILE, IVF_OFFSETS_FILE

STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}
OFFSETS_FILE = IVF_OFFSETS_FILE
LISTS_FILE = IVF_LISTS_FILE
ROW_BLOCK = 1 << 16  # rows per block when computing row norms and reconstructing


@dataclass(frozen=True)
class ListStats:
    """Per-list statistics of a partition, float64, one entry per list (L lists, d dims).

    With x a member's offset from its list's exact member mean ``means[l]``:
    ``radii`` max |x|, ``spreads`` mean |x|^2, ``sq_vars`` the variance of |x|^2, ``skews``
    (L, d) the mean of (|x|^2 - spread) x, ``axes`` (L, K, d) the K leading principal directions
    of the members' covariance, ``axis_vars`` (L, K) their variances, ``rest_vars`` (L,) the
    largest variance left in the other directions (0 when K = d); ``extents`` (L, K) max |v_k.x|
    along each axis, ``rest_radii`` max |x| outside the axes' span, ``min_sqs`` min |x|^2 (they
    bound q_c.x for any query far better than the radius when a list is flat). Empty lists are
    all zeros.
    """

    counts: np.ndarray
    means: np.ndarray
    radii: np.ndarray
    spreads: np.ndarray
    sq_vars: np.ndarray
    skews: np.ndarray
    axes: np.ndarray
    axis_vars: np.ndarray
    rest_vars: np.ndarray
    extents: np.ndarray
    rest_radii: np.ndarray
    min_sqs: np.ndarray

    @property
    def rank(self) -> int:
        """K, the number of principal directions kept per list."""
        return int(self.axes.shape[1])


def default_rank(dim: int) -> int:
    """Principal directions kept per list: all of them up to d = 8, then 8 + d / 32."""
    return dim if dim <= 8 else min(dim, 8 + dim // 32)


def _offsets(counts: np.ndarray) -> np.ndarray:
    """Start of each list in the grouped array, plus the total: (L + 1,) int64."""
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _member_stats(members: np.ndarray, rank: int) -> tuple[Any, ...]:
    """(mean, radius, spread, sq_var, skew, axes, axis_vars, rest_var, extents, rest_radius,
    min_sq) of one list's (n, d) float64 members; the mean gets one correction pass."""
    mean = members.mean(axis=0)
    mean += (members - mean).mean(axis=0)
    x = members - mean
    sq = np.einsum("ij,ij->i", x, x)
    spread = sq.mean()
    dev = sq - spread
    values, vectors = np.linalg.eigh(x.T @ x / x.shape[0])
    values, vectors = np.maximum(values[::-1], 0.0), vectors[:, ::-1]
    rest = values[rank] if rank < values.shape[0] else 0.0
    axes = vectors[:, :rank].T
    coords = x @ axes.T
    outside = np.maximum(sq - np.einsum("ik,ik->i", coords, coords), 0.0)
    return (mean, math.sqrt(sq.max()), spread, float((dev * dev).mean()), dev @ x / x.shape[0],
            axes, values[:rank], rest, np.abs(coords).max(axis=0), math.sqrt(outside.max()),
            sq.min())


def _stats_of_lists(
    member_lists: Iterable[np.ndarray], counts: np.ndarray, dim: int, rank: int
) -> ListStats:
    """ListStats from each list's float64 members, in list order (empty lists give zeros)."""
    nlist = counts.shape[0]
    means, skews = np.zeros((nlist, dim)), np.zeros((nlist, dim))
    radii, spreads, sq_vars, rest_vars, rest_radii, min_sqs = (np.zeros(nlist) for _ in range(6))
    axes, axis_vars = np.zeros((nlist, rank, dim)), np.zeros((nlist, rank))
    extents = np.zeros((nlist, rank))
    for label, members in enumerate(member_lists):
        if members.shape[0]:
            (means[label], radii[label], spreads[label], sq_vars[label], skews[label],
             axes[label], axis_vars[label], rest_vars[label], extents[label], rest_radii[label],
             min_sqs[label]) = _member_stats(members, rank)
    return ListStats(counts.astype(np.int64), means, radii, spreads, sq_vars, skews, axes,
                     axis_vars, rest_vars, extents, rest_radii, min_sqs)


def _check_partition(latents: np.ndarray, labels: np.ndarray, nlist: int) -> np.ndarray:
    """Validated labels as int64 (N,) for (N, d) finite latents and nlist lists."""
    if latents.ndim != 2 or latents.shape[0] < 1 or latents.shape[1] < 1:
        raise ValueError(f"latents must have shape (N, d) with N, d >= 1, got {latents.shape}")
    if not np.all(np.isfinite(latents)):
        raise ValueError("latents contain NaN or Inf")
    if nlist < 1:
        raise ValueError(f"nlist must be >= 1, got {nlist}")
    lab = np.asarray(labels).reshape(-1)
    if lab.shape[0] != latents.shape[0] or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError("labels must be N integers")
    lab = lab.astype(np.int64)
    if lab.min() < 0 or lab.max() >= nlist:
        raise ValueError(f"labels must lie in [0, {nlist})")
    return lab


def list_stats(
    latents: np.ndarray, labels: np.ndarray, nlist: int, rank: int | None = None
) -> ListStats:
    """ListStats of ``nlist`` lists: ``latents`` (N, d), ``labels`` (N,) ints in [0, nlist);
    lists may be empty; ``rank`` principal directions per list (default_rank(d))."""
    x = np.asarray(latents)
    lab = _check_partition(x, labels, nlist)
    dim = x.shape[1]
    rank = default_rank(dim) if rank is None else min(max(rank, 0), dim)
    order = np.argsort(lab, kind="stable")
    counts = np.bincount(lab, minlength=nlist)
    offsets = _offsets(counts)
    members = (np.asarray(x[order[offsets[i] : offsets[i + 1]]], dtype=np.float64)
               for i in range(nlist))
    return _stats_of_lists(members, counts, dim, rank)


@dataclass(frozen=True)
class IvfLists:
    """N stored latents grouped into L lists (see the module docstring).

    Grouped row k is input row ``order[k]``; list l holds grouped rows
    ``bounds[l]:bounds[l + 1]``; ``row_sq`` is |offset|^2 per grouped row (float64, exact from
    the stored offset) and ``row_radius`` its largest value's root per list.
    """

    order: np.ndarray
    bounds: np.ndarray
    origins: np.ndarray
    offsets: np.ndarray
    row_sq: np.ndarray
    row_radius: np.ndarray
    stats: ListStats

    @property
    def n(self) -> int:
        return int(self.offsets.shape[0])

    @property
    def dim(self) -> int:
        return int(self.offsets.shape[1])

    @property
    def nlist(self) -> int:
        return int(self.bounds.shape[0] - 1)

    @property
    def storage(self) -> str:
        return str(np.dtype(self.offsets.dtype))

    @classmethod
    def group(
        cls,
        latents: np.ndarray,
        labels: np.ndarray,
        nlist: int,
        storage: str = "float32",
        rank: int | None = None,
        progress: bool = False,
    ) -> IvfLists:
        """Group (N, d) ``latents`` by ``labels`` (N,) ints in [0, nlist) and compute stats."""
        if storage not in STORAGE_DTYPES:
            raise ValueError(f"storage must be one of {sorted(STORAGE_DTYPES)}, got {storage!r}")
        x = np.asarray(latents)
        lab = _check_partition(x, labels, nlist)
        n, dim = x.shape
        order = np.argsort(lab, kind="stable")
        counts = np.bincount(lab, minlength=nlist)
        bounds = _offsets(counts)
        origins = np.zeros((nlist, dim))
        offsets = np.empty((n, dim), dtype=STORAGE_DTYPES[storage])
        limit = float(np.finfo(offsets.dtype).max)
        for label in np.flatnonzero(counts):
            rows = slice(bounds[label], bounds[label + 1])
            members = np.asarray(x[order[rows]], dtype=np.float64)
            origins[label] = members.mean(axis=0)
            offset = members - origins[label]
            if np.abs(offset).max() > limit:
                raise ValueError(
                    f"list {label} has offsets up to {np.abs(offset).max():.3g}, beyond "
                    f"{storage}'s range ({limit:.3g}); store them as float32"
                )
            offsets[rows] = offset
        row_sq = np.empty(n)
        for start in range(0, n, ROW_BLOCK):
            chunk = offsets[start : start + ROW_BLOCK].astype(np.float64)
            row_sq[start : start + chunk.shape[0]] = np.einsum("ij,ij->i", chunk, chunk)
        row_radius = np.zeros(nlist)
        full = np.flatnonzero(counts)
        row_radius[full] = np.sqrt(np.maximum.reduceat(row_sq, bounds[full]))
        rank = default_rank(dim) if rank is None else min(max(rank, 0), dim)
        labels_iter: Iterable[int] = range(nlist)
        if progress:
            labels_iter = tqdm(labels_iter, desc="list statistics", unit="list")
        stored = (_stored_members(origins, offsets, bounds, label) for label in labels_iter)
        stats = _stats_of_lists(stored, counts, dim, rank)
        return cls(order, bounds, origins, offsets, row_sq, row_radius, stats)

    def members(self, label: int) -> np.ndarray:
        """The stored latents of list ``label``, float64 (n_l, d)."""
        return _stored_members(self.origins, self.offsets, self.bounds, label)

    def labels_of(self, grouped: np.ndarray) -> np.ndarray:
        """The list of each grouped row index."""
        return np.asarray(np.searchsorted(self.bounds, grouped, side="right") - 1)

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Stored latents of input rows ``indices`` as float32 (len, d)."""
        wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
        grouped = self.position[wanted]
        out = self.origins[self.labels_of(grouped)] + self.offsets[grouped].astype(np.float64)
        return np.asarray(out, dtype=np.float32)

    @functools.cached_property
    def position(self) -> np.ndarray:
        """Grouped index of every input row (the inverse of ``order``), computed once."""
        inverse = np.empty_like(self.order)
        inverse[self.order] = np.arange(self.order.shape[0], dtype=self.order.dtype)
        return inverse

    def reconstruct(self) -> np.ndarray:
        """The stored latents, float64 (N, d), in input order."""
        out = np.empty((self.n, self.dim))
        for label in range(self.nlist):
            out[self.order[self.bounds[label] : self.bounds[label + 1]]] = self.members(label)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of every array, the offsets included."""
        arrays = [self.order, self.bounds, self.origins, self.offsets, self.row_sq,
                  self.row_radius, *vars(self.stats).values()]
        return int(sum(np.asarray(a).nbytes for a in arrays))

    def save(self, folder: Path, offsets_file: str = OFFSETS_FILE) -> None:
        """Write ``offsets_file`` (``ivf_offsets.npy``, ``shard-K.ivf_offsets.npy`` for shard
        K of a sharded version) and its :func:`lists_file` into ``folder``."""
        np.save(folder / offsets_file, self.offsets)
        np.savez(
            folder / lists_file(offsets_file), order=self.order, bounds=self.bounds,
            origins=self.origins, row_sq=self.row_sq, row_radius=self.row_radius,
            **{f"stats_{name}": value for name, value in vars(self.stats).items()},
        )

    @classmethod
    def load(cls, folder: Path, offsets_file: str = OFFSETS_FILE, mmap: bool = True) -> IvfLists:
        """Read what :meth:`save` wrote; the offsets memory-mapped (read-only) by default."""
        offsets = np.load(folder / offsets_file, mmap_mode="r" if mmap else None)
        with np.load(folder / lists_file(offsets_file)) as arrays:
            parts = {name: arrays[name] for name in arrays.files}
        stats = ListStats(**{name[6:]: parts.pop(name) for name in list(parts)
                             if name.startswith("stats_")})
        lists = cls(offsets=offsets, stats=stats, **parts)
        lists.check()
        return lists

    def check(self) -> None:
        """Raise ValueError when the arrays do not describe one consistent partition."""
        n, nlist = self.n, self.nlist
        problems = []
        if self.order.shape != (n,) or self.row_sq.shape != (n,):
            problems.append("row order or norms do not have one entry per offset row")
        if self.bounds[0] != 0 or self.bounds[-1] != n or np.any(np.diff(self.bounds) < 0):
            problems.append("list boundaries do not cover the rows in order")
        if self.origins.shape != (nlist, self.dim) or self.stats.counts.shape != (nlist,):
            problems.append("origins or statistics do not have one entry per list")
        elif not np.array_equal(self.stats.counts, np.diff(self.bounds)):
            problems.append("list sizes differ from the boundaries")
        if self.offsets.dtype.name not in STORAGE_DTYPES:
            problems.append(f"offsets are {self.offsets.dtype}, not float32 or float16")
        if problems:
            raise ValueError("; ".join(problems))


def kmeans_labels(
    latents: np.ndarray, nlist: int, seed: int = 0, train_size: int | None = None
) -> np.ndarray:
    """List of every row: k-means (faiss.Kmeans, 20 iterations; on a GPU where the FAISS build
    has GPU indexes) on a fixed-seed sample of ``train_size`` rows (default min(N, 64 L)), then
    each row's nearest centroid."""
    x32 = np.ascontiguousarray(latents, dtype=np.float32)
    n = x32.shape[0]
    if not 1 <= nlist <= n:
        raise ValueError(f"nlist must lie in [1, N={n}], got {nlist}")
    size = min(n, train_size if train_size is not None else 64 * nlist)
    if size < nlist:
        raise ValueError(f"train_size must be >= nlist ({nlist}), got {size}")
    rng = np.random.default_rng(seed)
    sample = x32 if size == n else x32[np.sort(rng.choice(n, size, replace=False))]
    kmeans = faiss.Kmeans(
        x32.shape[1], nlist, niter=20, seed=seed, verbose=False, min_points_per_centroid=1,
        gpu=faiss_has_gpu(),
    )
    kmeans.train(sample)
    _, labels = kmeans.index.search(x32, 1)
    return np.asarray(labels[:, 0], dtype=np.int64)


def choose_nlist(n: int, dim: int, rank: int | None = None, budget: float = 0.1) -> int:
    """Lists for N latents of d numbers: a power of two near 2 sqrt(N) (each list ~ sqrt(N) / 2
    rows), fewer when the per-list statistics would pass ``budget`` of the float32 latents'
    bytes, and at most N / 8 (lists of 8 rows or more)."""
    k = default_rank(dim) if rank is None else rank
    per_list = 8.0 * ((k + 3) * dim + 2 * k + 8)
    target = 2 ** round(math.log2(max(2.0 * math.sqrt(n), 1.0)))
    cap = max(1.0, budget * 4.0 * n * dim / per_list)
    return int(max(1, min(target, 2 ** math.floor(math.log2(cap)), max(1, n // 8))))


def faiss_has_gpu() -> bool:
    """Whether the installed FAISS build has GPU indexes and sees a GPU (faiss-gpu, the gpu
    extra)."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return bool(hasattr(faiss, "StandardGpuResources") and get_num_gpus and get_num_gpus() > 0)


def lists_file(offsets_file: str) -> str:
    """The lists file stored beside ``offsets_file`` (``shard-1.ivf_offsets.npy`` ->
    ``shard-1.ivf_lists.npz``)."""
    return offsets_file.removesuffix(OFFSETS_FILE) + LISTS_FILE


def _stored_members(
    origins: np.ndarray, offsets: np.ndarray, bounds: np.ndarray, label: int
) -> np.ndarray:
    """List ``label``'s stored latents, origin + offset in float64 (n_l, d)."""
    rows = slice(bounds[label], bounds[label + 1])
    return np.asarray(origins[label] + offsets[rows].astype(np.float64))


class StoredRows:
    """The stored latents of :class:`IvfLists` as an (N, d) float32 array-like by input row,
    reconstructed on demand: indexing returns only the rows asked for (no second copy)."""

    def __init__(self, lists: IvfLists) -> None:
        self.lists = lists
        self.shape = (lists.n, lists.dim)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        rows = np.arange(self.shape[0])[key]
        if np.ndim(rows) == 0:
            return self.lists.rows(np.asarray([rows]))[0]
        return self.lists.rows(np.asarray(rows))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self.lists.reconstruct().astype(np.float32)
        return whole if dtype is None else whole.astype(dtype)
