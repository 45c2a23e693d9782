"""The bundled demo model ``digits-vae``: build its index on first use."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from index.build import BuildOptions, build_version
from index.store import LatentStore
from workers.calibration import calibrate_build
from workers.demo_models.digits_vae import LATENT_DIM, training_latents

log = logging.getLogger(__name__)

DEMO_MODEL = "digits-vae"
DEMO_GENERATOR = "workers.demo_models.digits_vae:decoder"


def ensure_demo_index(store_root: Path) -> str:
    """The newest digits-vae version in ``store_root``, building one first if there is none."""
    store = LatentStore(store_root)
    existing = store.newest(DEMO_MODEL)
    if existing is not None:
        return existing
    inputs = store_root / ".inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    latents_file = inputs / "digits-vae-latents.npy"
    np.save(latents_file, training_latents())
    log.info("building the demo index", extra={"model": DEMO_MODEL, "store": str(store_root)})
    options = BuildOptions(
        model=DEMO_MODEL,
        latents_file=latents_file,
        sigma="auto",
        sampler=f"torch-cpu:float32:{LATENT_DIM}",
        generator=DEMO_GENERATOR,
        progress=False,
    )
    return build_version(store, options, calibrate_build).name
