"""Resolve --generator / --mapping specs to a TorchScript copy or a checksummed import path."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

from latentsieve.index.checksums import sha256_file
from latentsieve.index.errors import StoreError
from latentsieve.index.manifest import ModuleReference

IMPORT_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def resolve_module_spec(spec: str, role: str) -> ModuleReference:
    """Check ``spec`` without writing anything: a TorchScript file (to be copied into the version
    as ``{role}.pt`` by :func:`copy_module_file`) or an import path ``package.module:factory``
    recorded with the sha256 of the module's source file."""
    path = Path(spec)
    if path.is_file():
        return ModuleReference(
            spec=spec, source="torchscript", file=f"{role}.pt", sha256=sha256_file(path)
        )
    if IMPORT_SPEC.fullmatch(spec):
        module_name = spec.split(":", 1)[0]
        try:
            found = importlib.util.find_spec(module_name)
        except (ImportError, ValueError) as exc:
            raise StoreError(f"--{role} {spec!r}: cannot find module {module_name!r}") from exc
        if found is None or found.origin is None or not Path(found.origin).is_file():
            raise StoreError(f"--{role} {spec!r}: cannot find module {module_name!r}")
        return ModuleReference(spec=spec, source="import", sha256=sha256_file(found.origin))
    raise StoreError(
        f"--{role} {spec!r}: expected a TorchScript file or an import path package.module:factory"
    )


def copy_module_file(reference: ModuleReference, version_dir: Path) -> None:
    """Copy a TorchScript module into the version folder and check the copy's sha256."""
    if reference.source != "torchscript" or reference.file is None:
        return
    target = version_dir / reference.file
    shutil.copyfile(reference.spec, target)
    if sha256_file(target) != reference.sha256:
        raise StoreError(f"{reference.spec}: changed while it was being copied; build again")
