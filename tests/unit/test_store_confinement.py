"""What a name read from a manifest, a job or a request may reach in the store (security audit,
issue 22): version names are never paths, manifest file names stay in their version folder, a
version is only ever read under its own name, and a recorded module is verified before anything
imports it. Each test builds a real version and then edits it as an attacker would."""

from __future__ import annotations

import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from latentsieve.index.build import BuildOptions, build_version
from latentsieve.index.checksums import sha256_file
from latentsieve.index.errors import StoreError
from latentsieve.index.manifest import MANIFEST_NAME, IndexManifest, ModuleReference
from latentsieve.index.store import LatentStore, module_source
from latentsieve.workers.calibration import calibrate_build

OLD_VERSION = "19990101T000000000000Z-0badc0de"  # a valid name, older than any build


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, str]:
    """A store with one version of ``m`` (200 x 4 latents): (root, version)."""
    root = tmp_path / "store"
    source = tmp_path / "z.npy"
    np.save(source, np.random.default_rng(0).standard_normal((200, 4)).astype(np.float32))
    version = build_version(LatentStore(root), BuildOptions(
        model="m", latents_file=source, sigma="1.0", space="raw", calibration_count=50,
        progress=False,
    ), calibrate_build).name
    return root, version


def rewrite(folder: Path, **update: object) -> None:
    """Replace fields of the manifest in ``folder`` (the checksums of the files stay right)."""
    path = folder / MANIFEST_NAME
    manifest = IndexManifest.model_validate_json(path.read_bytes())
    # model_copy skips validation: the edited manifest is written as an attacker would.
    path.write_text(manifest.model_copy(update=update).model_dump_json())


def outside_file(folder: Path) -> tuple[str, str]:
    """A readable file beside the version folder (in the model's folder): (path, sha256)."""
    target = folder.parent / "outside.npy"
    shutil.copyfile(folder / "calibration.npy", target)
    return str(target), sha256_file(target)


def escape_by_files_entry(folder: Path) -> None:
    _, sha = outside_file(folder)
    manifest = IndexManifest.model_validate_json((folder / MANIFEST_NAME).read_bytes())
    rewrite(folder, files={**manifest.files, "../outside.npy": sha})


def escape_by_absolute_files_entry(folder: Path) -> None:
    path, sha = outside_file(folder)
    manifest = IndexManifest.model_validate_json((folder / MANIFEST_NAME).read_bytes())
    rewrite(folder, files={**manifest.files, path: sha})


def escape_by_calibration_file(folder: Path) -> None:
    outside_file(folder)
    manifest = IndexManifest.model_validate_json((folder / MANIFEST_NAME).read_bytes())
    rewrite(folder, calibration=manifest.calibration.model_copy(
        update={"scores_file": "../outside.npy"}))


def escape_by_absolute_calibration_file(folder: Path) -> None:
    path, _ = outside_file(folder)
    manifest = IndexManifest.model_validate_json((folder / MANIFEST_NAME).read_bytes())
    rewrite(folder, calibration=manifest.calibration.model_copy(update={"scores_file": path}))


@pytest.mark.parametrize("escape", [
    escape_by_files_entry, escape_by_absolute_files_entry, escape_by_calibration_file,
    escape_by_absolute_calibration_file,
])
def test_a_manifest_naming_a_file_outside_its_version_is_refused(
    built: tuple[Path, str], escape: Callable[[Path], None]
) -> None:
    """``../x`` or an absolute path among a manifest's files (the target exists and its
    checksum is right, so only the name is wrong): StoreError on read and load."""
    root, version = built
    escape(root / "m" / version)
    store = LatentStore(root)
    with pytest.raises(StoreError, match="invalid manifest.*not one plain name"):
        store.read_manifest("m", version)
    with pytest.raises(StoreError, match="not one plain name"):
        store.load("m", version)


@pytest.mark.parametrize("name", [
    "../m/{version}", "{root}/m/{version}", "{version}/.", "..", "{version}/../{version}",
])
def test_a_version_name_is_never_a_path(built: tuple[Path, str], name: str) -> None:
    """Each name resolves to the real version folder, so only the name check refuses it."""
    root, version = built
    named = name.format(root=root, version=version)
    store = LatentStore(root)
    with pytest.raises(StoreError, match="invalid version name"):
        store.load("m", named)
    with pytest.raises(StoreError, match="invalid version name"):
        store.read_manifest("m", named)


def test_only_version_folders_under_their_own_name_are_versions(built: tuple[Path, str]) -> None:
    """A folder named otherwise is no version (it would sort after every build); a version
    copied under another version's name is refused: versions are never moved or renamed."""
    root, version = built
    shutil.copytree(root / "m" / version, root / "m" / "zzz")
    shutil.copytree(root / "m" / version, root / "m" / OLD_VERSION)
    store = LatentStore(root)
    assert store.versions("m") == [OLD_VERSION, version]
    assert store.newest("m") == version
    with pytest.raises(StoreError, match="manifest is of m/.*not of its folder"):
        store.load("m", OLD_VERSION)


def plant_module(folder: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A module on sys.path that records being imported: (name, source file)."""
    name = f"latentsieve_planted_{uuid.uuid4().hex[:10]}"
    source = folder / f"{name}.py"
    source.write_text('"""Planted by a test: importing it is the failure."""\n'
                      "def factory():\n    raise RuntimeError('planted factory called')\n")
    monkeypatch.syspath_prepend(str(folder))
    return name, source


@pytest.mark.parametrize("role", ["generator", "mapping"])
def test_a_recorded_module_is_verified_before_it_is_imported(
    built: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, role: str
) -> None:
    """A manifest naming an import path whose source does not match its recorded sha256: the
    load refuses it with the store's error, and the module was never imported."""
    root, version = built
    name, _ = plant_module(tmp_path, monkeypatch)
    rewrite(root / "m" / version, **{role: ModuleReference(
        spec=f"{name}:factory", source="import", sha256="0" * 64)})
    with pytest.raises(StoreError, match="source changed since the index was built"):
        LatentStore(root).load("m", version)
    assert name not in sys.modules


def test_a_module_source_is_found_without_running_it_or_its_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / f"planted_package_{uuid.uuid4().hex[:10]}"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('the package ran')\n")
    (package / "inner.py").write_text("raise RuntimeError('the module ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert module_source(f"{package.name}.inner") == package / "inner.py"
    assert package.name not in sys.modules
    assert module_source("os") is None  # frozen: no source file to verify
    assert module_source(f"{package.name}.missing") is None
    assert module_source("../etc") is None
