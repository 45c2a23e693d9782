"""Load generator and mapping modules recorded in a manifest (TorchScript copy or import path)."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import torch
from torch import nn

from latentsieve.index.checksums import sha256_file
from latentsieve.index.manifest import ModuleReference


class ModuleLoadError(RuntimeError):
    """A recorded generator/mapping cannot be loaded or no longer matches its checksum."""


def module_state_sha256(module: nn.Module) -> str:
    """sha256 over a module's state_dict: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def load_module(reference: ModuleReference, version_dir: Path) -> nn.Module:
    """The module, in eval mode on the CPU, after checking its sha256 (and, for import paths,
    the sha256 of its weights) against the manifest."""
    if reference.source == "torchscript":
        assert reference.file is not None
        path = version_dir / reference.file
        if sha256_file(path) != reference.sha256:
            raise ModuleLoadError(f"{path}: checksum differs from the manifest")
        module: nn.Module = torch.jit.load(str(path), map_location="cpu")
    else:
        module_name, factory_name = reference.spec.split(":", 1)
        python_module = importlib.import_module(module_name)
        origin = getattr(python_module, "__file__", None)
        if origin is None or sha256_file(origin) != reference.sha256:
            raise ModuleLoadError(
                f"{reference.spec}: the module source changed since the index was built "
                "(sha256 differs); rebuild the index"
            )
        module = getattr(python_module, factory_name)()
        if not isinstance(module, nn.Module):
            raise ModuleLoadError(f"{reference.spec} returned {type(module)}, not an nn.Module")
        if reference.state_sha256 is not None:
            if module_state_sha256(module) != reference.state_sha256:
                raise ModuleLoadError(
                    f"{reference.spec}: its weights changed since the index was built "
                    "(state sha256 differs); rebuild the index"
                )
    return module.eval()
