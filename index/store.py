"""The store directory: one folder per model, one immutable folder per version inside it.

    STORE/
      digits-vae/
        20261123T121314123456Z-1a2b3c4d/   manifest.json, index.faiss, calibration.npy, ...
      .staging/                           builds in progress; renamed into place when complete

A version becomes visible only by an atomic rename of its finished folder, and the manifest (with
the sha256 of every other file) is the last file written, so a reader never sees half a version.

Names that choose a path are checked before they do: model and version names by their patterns
(index/manifest.py), so a name read from a job or a request never leaves the store, and a
manifest whose model or version is not its folder's is refused. ``load`` verifies every
checksum it can before anything is opened or imported: the files it maps, and the generator's
and mapping's sources (found without importing them) against their recorded sha256.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import json
import os
import shutil
import sys
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from pydantic import ValidationError

from latentsieve.index.checksums import sha256_file
from latentsieve.index.errors import StoreError
from latentsieve.index.kinds import opening, shard_files
from latentsieve.index.kinds.base import LoadedShard
from latentsieve.index.kinds.flat import INDEX_FILE
from latentsieve.index.manifest import (
    MANIFEST_NAME,
    VERSION_NAME_PATTERN,
    IndexManifest,
    ModuleReference,
    check_model_name,
    check_version_name,
)
from latentsieve.index.projection import project

__all__ = ["INDEX_FILE", "LatentStore", "LoadedShard", "LoadedVersion"]
STAGING = ".staging"


@dataclass
class LoadedVersion:
    """One verified version: manifest, calibration and projection, and the shards asked for
    (all of them unless the loader named some; none for a gateway that only routes)."""

    manifest: IndexManifest
    path: Path
    shards: tuple[LoadedShard, ...]
    calibration_scores: np.ndarray  # sorted float64 log densities at manifest.calibration.sigma
    calibration_indices: np.ndarray | None  # leave-one-out rows, else None
    # Sorted calibration values per descriptor (psi, nu, delta) when the model has a generator.
    descriptor_calibration: dict[str, np.ndarray] | None = None
    projection: tuple[np.ndarray, np.ndarray] | None = None  # mean (d,), components (d', d)
    # ``--calibration-latents``: the user's latents as sent (count, d), memory-mapped
    calibration_latents: np.ndarray | None = None

    @property
    def latents(self) -> np.ndarray:
        """All N training latents (N, d'): the one shard of an unsharded version."""
        return self._whole().latents

    @property
    def index(self) -> faiss.Index | None:
        """The FAISS index of an unsharded version (None for certified ivf)."""
        return self._whole().index

    def _whole(self) -> LoadedShard:
        if len(self.shards) != 1 or self.manifest.shards:
            raise StoreError(
                f"{self.manifest.model}/{self.manifest.version} is split into "
                f"{len(self.manifest.shard_layout())} shards; score it shard by shard"
            )
        return self.shards[0]

    def to_index_space(self, latents: np.ndarray) -> np.ndarray:
        """Latents as sent (n, d) -> the index's space (n, d'): its projection, if any."""
        if self.projection is None:
            return latents
        return project(latents, *self.projection)


class LatentStore:
    """Read and write versions under one root directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def models(self) -> list[str]:
        """Names of models with at least one complete version, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if entry.is_dir() and not entry.name.startswith(".") and self.versions(entry.name)
        )

    def versions(self, model: str) -> list[str]:
        """Complete versions of ``model``, oldest first (names sort by build time); a folder
        not named as ``index build`` names versions is none."""
        folder = self.root / check_model_name(model)
        if not folder.is_dir():
            return []
        return sorted(
            entry.name
            for entry in folder.iterdir()
            if VERSION_NAME_PATTERN.fullmatch(entry.name)
            and entry.is_dir()
            and (entry / MANIFEST_NAME).is_file()
        )

    def newest(self, model: str) -> str | None:
        versions = self.versions(model)
        return versions[-1] if versions else None

    def read_manifest(self, model: str, version: str) -> IndexManifest:
        """The manifest of ``model/version``; StoreError for a name that is not a model or
        version name, a missing or invalid manifest, or one that names another version."""
        path = self.root / check_model_name(model) / check_version_name(version) / MANIFEST_NAME
        try:
            manifest = IndexManifest.model_validate_json(path.read_bytes())
        except FileNotFoundError as exc:
            raise StoreError(f"{model}/{version}: no manifest at {path}") from exc
        except ValidationError as exc:
            first = exc.errors()[0]
            raise StoreError(
                f"{path}: invalid manifest ({'.'.join(map(str, first['loc']))}: {first['msg']})"
            ) from exc
        if (manifest.model, manifest.version) != (model, version):
            raise StoreError(
                f"{path}: the manifest is of {manifest.model}/{manifest.version}, not of its "
                "folder; versions are never moved or renamed"
            )
        return manifest

    def load(
        self,
        model: str,
        version: str | None = None,
        verify: bool = True,
        shards: Collection[int] | None = None,
    ) -> LoadedVersion:
        """Load ``version`` (default: newest) after checking the sha256 of every file it opens
        and of its generator's and mapping's sources (before anything imports them);
        ``shards`` names the shard numbers to open (default: all; empty: none)."""
        version = version or self.newest(model)
        if version is None:
            raise StoreError(f"model {model!r} has no index version in {self.root}")
        manifest = self.read_manifest(model, version)
        folder = self.root / model / version
        layout = manifest.shard_layout()
        wanted = range(len(layout)) if shards is None else sorted(set(shards))
        unknown = [number for number in wanted if not 0 <= number < len(layout)]
        if unknown:
            raise StoreError(
                f"{model}/{version} has shards 0..{len(layout) - 1}, not {unknown}"
            )
        skipped = set().union(*(
            shard_files(manifest, layout[number].file) for number in range(len(layout))
            if number not in wanted
        ))
        if verify:
            verify_files(folder, {k: v for k, v in manifest.files.items() if k not in skipped})
            for role, reference in (("generator", manifest.generator),
                                    ("mapping", manifest.mapping)):
                if reference is not None:
                    verify_module(folder, role, reference)
        opened = tuple(_open_shard(folder, manifest, number) for number in wanted)
        calibration = manifest.calibration
        scores = np.load(folder / calibration.scores_file, allow_pickle=False)
        indices = (
            np.load(folder / calibration.indices_file, allow_pickle=False)
            if calibration.indices_file
            else None
        )
        descriptors = None
        if manifest.descriptors is not None:
            with np.load(folder / manifest.descriptors.calibration_file) as stored:
                descriptors = {name: stored[name] for name in stored.files}
        projection = None
        if manifest.projection is not None:
            with np.load(folder / manifest.projection.file) as stored:
                projection = (stored["mean"], stored["components"])
        given = (
            np.load(folder / calibration.latents_file, mmap_mode="r", allow_pickle=False)
            if calibration.latents_file
            else None
        )
        return LoadedVersion(
            manifest, folder, opened, scores, indices, descriptors, projection, given
        )

    @contextlib.contextmanager
    def staging(self, model: str) -> Iterator[Path]:
        """A private folder for a build; removed on any error, so no partial version remains."""
        check_model_name(model)
        folder = self.root / STAGING / f"{model}-{uuid.uuid4().hex}"
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def publish(self, staged: Path, manifest: IndexManifest) -> Path:
        """Write the manifest last, then rename the staged folder to its version name."""
        target = self.root / manifest.model / manifest.version
        if target.exists():
            raise StoreError(f"{target} already exists; versions are immutable")
        payload = manifest.model_dump_json(indent=2)
        with open(staged / MANIFEST_NAME, "w", encoding="utf-8") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staged, target)
        return target

    def describe(self) -> list[dict[str, object]]:
        """One row per version for ``index list``: model, version, kind, N, d, sigma, ..."""
        rows: list[dict[str, object]] = []
        for model in self.models():
            for version in self.versions(model):
                manifest = self.read_manifest(model, version)
                rows.append(
                    {
                        "model": model,
                        "version": version,
                        "newest": version == self.newest(model),
                        "kind": manifest.kind,
                        "n": manifest.n,
                        "dim": manifest.dim,
                        "latent_shape": list(manifest.latent_shape),
                        "sigma": manifest.bandwidth.sigma,
                        "sigma_rule": manifest.bandwidth.rule,
                        "sampler": str(manifest.sampler) if manifest.sampler else None,
                        "calibration": manifest.calibration.source,
                        "created_at": manifest.created_at.isoformat(),
                    }
                )
        return rows


def _open_shard(folder: Path, manifest: IndexManifest, number: int) -> LoadedShard:
    """Shard ``number``, opened and checked by its kind (index/kinds/): a memory-mapped flat
    FAISS index and a zero-copy view of its vectors, or a certified ivf version's lists."""
    kind = opening(manifest)
    shard = manifest.shard_layout()[number]
    projected = manifest.projection
    expected = (shard.count, projected.dim if projected is not None else manifest.dim)
    return kind.open_shard(folder, manifest, number, shard, expected)


def verify_files(folder: Path, files: dict[str, str]) -> None:
    """Raise StoreError naming the first file whose sha256 differs from the manifest's."""
    for name, expected in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            raise StoreError(f"{path}: listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise StoreError(
                f"{path}: checksum mismatch (manifest {expected[:12]}..., file {actual[:12]}...); "
                "the version is corrupted, rebuild it"
            )


def verify_module(folder: Path, role: str, reference: ModuleReference) -> None:
    """Raise StoreError unless the recorded module matches its sha256: a TorchScript copy in
    ``folder``, or an import path's source file, found without importing the module or its
    packages (nothing runs before it is trusted; its weights are checked once it is built)."""
    if reference.source == "torchscript":
        if reference.file is None:
            raise StoreError(f"{folder}: the {role} {reference.spec!r} names no file")
        verify_files(folder, {reference.file: reference.sha256})
        return
    module_name = reference.spec.split(":", 1)[0]
    source = module_source(module_name)
    if source is None:
        raise StoreError(
            f"{folder}: the {role} {reference.spec!r}: no source file of module "
            f"{module_name!r} is installed"
        )
    if sha256_file(source) != reference.sha256:
        raise StoreError(
            f"{reference.spec}: the module source changed since the index was built "
            "(sha256 differs); rebuild the index"
        )


def module_source(name: str) -> Path | None:
    """The source file that ``import name`` would run, found by the import system's finders
    without executing the module or any package above it (``importlib.util.find_spec`` imports
    the parents); None for a module without one (built-in, frozen, missing)."""
    parts = name.split(".")
    if not all(part.isidentifier() for part in parts):
        return None
    path: list[str] | None = None
    spec = None
    for depth in range(1, len(parts) + 1):
        fullname = ".".join(parts[:depth])
        if depth > 1:
            parent = sys.modules.get(".".join(parts[: depth - 1]))
            parent_path = getattr(parent, "__path__", None)
            if parent_path is not None:
                path = list(parent_path)
            elif spec is None or spec.submodule_search_locations is None:
                return None  # a module, not a package: nothing below it
            else:
                path = list(spec.submodule_search_locations)
        spec = _find_spec(fullname, path)
        if spec is None:
            return None
    if spec is None or not spec.has_location or spec.origin is None:
        return None
    origin = Path(spec.origin)
    return origin if origin.is_absolute() and origin.is_file() else None


def _find_spec(fullname: str, path: list[str] | None) -> importlib.machinery.ModuleSpec | None:
    """Ask each finder of ``sys.meta_path`` in turn, as the import system does."""
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        spec = find(fullname, path, None)
        if spec is not None:
            return spec
    return None


def manifest_json(manifest: IndexManifest) -> dict[str, object]:
    """The manifest as plain JSON data."""
    return dict(json.loads(manifest.model_dump_json()))
