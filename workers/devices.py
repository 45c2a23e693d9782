"""``--device auto|cpu|cuda[:I]``: which device scores, resolved once against this machine."""

from __future__ import annotations

import re

import torch

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$", re.IGNORECASE)


def resolve_device(spec: str, cuda_devices: int | None = None) -> str:
    """``auto`` -> ``cuda:0`` when PyTorch sees a CUDA device, else ``cpu``; ``cpu``;
    ``cuda`` -> ``cuda:0``; ``cuda:I`` -> itself. ``cuda_devices`` (default: what
    ``torch.cuda`` reports) is how many CUDA devices exist; asking for one that does not
    raises ValueError naming what this machine has."""
    text = spec.strip().lower()
    if not DEVICE_PATTERN.fullmatch(text):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:I, got {spec!r}")
    count = cuda_devices
    if count is None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if text == "auto":
        return "cuda:0" if count > 0 else "cpu"
    if text == "cpu":
        return "cpu"
    index = int(text.split(":", 1)[1]) if ":" in text else 0
    if index >= count:
        have = "no CUDA device" if count == 0 else f"CUDA devices 0..{count - 1}"
        raise ValueError(f"--device {spec}: this machine has {have} (PyTorch {torch.__version__})")
    return f"cuda:{index}"
