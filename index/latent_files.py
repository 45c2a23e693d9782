"""Read training latents from .npy, .pt/.pth (weights_only) or .safetensors files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from latentsieve.index.errors import StoreError

SUPPORTED_SUFFIXES = (".npy", ".pt", ".pth", ".safetensors")


def _read_array(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix in (".pt", ".pth"):
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, torch.Tensor):
            raise StoreError(f"{path}: expected one tensor, found {type(obj).__name__}")
        return obj.detach().to(torch.float64 if obj.is_floating_point() else obj.dtype).numpy()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1:
            names = ", ".join(sorted(tensors)) or "none"
            raise StoreError(f"{path}: expected exactly one tensor, found {len(tensors)} ({names})")
        return next(iter(tensors.values()))
    raise StoreError(
        f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}"
    )


def load_latents(path: str | Path, min_count: int = 2) -> np.ndarray:
    """Latents of shape (N, ...) from ``path`` as float32, validated: N >= min_count, finite."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such file")
    try:
        array = _read_array(path)
    except StoreError:
        raise
    except Exception as exc:  # every reader has its own exception zoo; report one line
        raise StoreError(f"{path}: cannot read latents ({type(exc).__name__}: {exc})") from exc
    return validate_latents(array, str(path), min_count)


def validate_latents(array: np.ndarray, origin: str, min_count: int = 2) -> np.ndarray:
    """Check an (N, ...) numeric array and return it as C-contiguous float32."""
    if array.dtype.kind not in "fiu":
        raise StoreError(f"{origin}: latents must be numeric, got dtype {array.dtype}")
    if array.ndim < 2:
        raise StoreError(
            f"{origin}: latents must have shape (N, ...) with a latent shape after N, "
            f"got shape {tuple(array.shape)}"
        )
    if array.shape[0] < min_count:
        raise StoreError(f"{origin}: need at least {min_count} latents, got {array.shape[0]}")
    if any(size == 0 for size in array.shape[1:]):
        raise StoreError(f"{origin}: empty latent shape {tuple(array.shape[1:])}")
    as_float = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(as_float).all(axis=tuple(range(1, as_float.ndim)))
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise StoreError(
            f"{origin}: latents must be finite; row {bad} has NaN or Inf "
            f"(or a value outside float32), {int((~finite).sum())} bad rows in all"
        )
    return as_float
