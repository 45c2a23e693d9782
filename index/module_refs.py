"""Resolve --generator / --mapping specs to a TorchScript copy or a checksummed import path."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

from index.checksums import sha256_file
from index.errors import StoreError
from index.manifest import ModuleReference

IMPORT_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def resolve_module_spec(spec: str, role: str, version_dir: Path) -> ModuleReference:
    """A TorchScript file is copied into ``version_dir`` as ``{role}.pt``; an import path
    ``package.module:factory`` is recorded with the sha256 of the module's source file."""
    path = Path(spec)
    if path.is_file():
        target = version_dir / f"{role}.pt"
        shutil.copyfile(path, target)
        return ModuleReference(
            spec=spec, source="torchscript", file=target.name, sha256=sha256_file(target)
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
