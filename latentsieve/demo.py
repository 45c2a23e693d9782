"""The bundled demo models, built into a store on first use.

- ``digits-vae``: the VAE's encoder means of the 1797 digits; seeds are N(0, I) latents scored in
  the VAE's active coordinates (the build's default ``--space active``).
- ``digits-ldm``: the latent diffusion model in miniature. A seed's starting noise is mapped by
  the DDIM sampler to the latent it will be decoded from (``--mapping``), and that latent is
  scored among the encoder means. docs/evidence.md shows why: the density of the starting noise
  itself, among the means or among their DDIM inversions, does not predict quality.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentsieve.index.build import BuildOptions, build_version
from latentsieve.index.manifest import IndexManifest, PercentileBounds, Policy
from latentsieve.index.module_refs import resolve_module_spec
from latentsieve.index.store import LatentStore
from latentsieve.workers.calibration import calibrate_build, draw_mapped_queries
from latentsieve.workers.demo_models.digits_vae import LATENT_DIM, training_latents

log = logging.getLogger(__name__)

DEMO_MODEL = "digits-vae"
DEMO_GENERATOR = "latentsieve.workers.demo_models.digits_vae:decoder"
LDM_MODEL = "digits-ldm"
LDM_MAPPING = "latentsieve.workers.demo_models.digits_ldm:sampler"
# noise -> pixels, the whole pipeline
LDM_GENERATOR = "latentsieve.workers.demo_models.digits_ldm:generator"
# Generators whose outputs are 8x8 digits: the report judges them with the digits classifier.
DIGITS_GENERATORS = frozenset({DEMO_GENERATOR, LDM_GENERATOR})


@dataclass(frozen=True)
class DemoRecipe:
    """How one demo model's index is built: its training latents and build options."""

    latents: Callable[[], np.ndarray]
    latent_set: str
    mapping: str | None = None


# Chosen by docs/evidence.md ("Candidate default policies"): the earlier min_percentile 0.05
# alone left digits-vae's mean quality where random rejection does; this pair rejects about a
# fifth of the seeds and raises mean quality on both demo models, its interval above 0.
DEMO_POLICY = Policy(min_percentile=0.1, psi=PercentileBounds(max_percentile=0.9))

DEMO_RECIPES: dict[str, DemoRecipe] = {
    DEMO_MODEL: DemoRecipe(training_latents, "encoder-means"),
    LDM_MODEL: DemoRecipe(training_latents, "encoder-means", mapping=LDM_MAPPING),
}


def ensure_demo_index(store_root: Path, model: str = DEMO_MODEL) -> str:
    """The newest version of demo ``model`` in ``store_root``, building one first if there is
    none or if the demo's modules changed since it was built."""
    store = LatentStore(store_root)
    existing = store.newest(model)
    recipe = DEMO_RECIPES[model]
    if existing is not None and _current(store.read_manifest(model, existing), recipe):
        return existing
    inputs = store_root / ".inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    latents_file = inputs / f"{model}-latents.npy"
    np.save(latents_file, recipe.latents())
    log.info("building the demo index", extra={"model": model, "store": str(store_root)})
    options = BuildOptions(
        model=model,
        latents_file=latents_file,
        sigma="auto",
        latent_set=recipe.latent_set,
        sampler=f"torch-cpu:float32:{LATENT_DIM}",
        generator=DEMO_GENERATOR,
        mapping=recipe.mapping,
        policy=DEMO_POLICY,
        progress=False,
    )
    return build_version(store, options, calibrate_build, draw_mapped_queries).name


def _current(manifest: IndexManifest, recipe: DemoRecipe) -> bool:
    """Whether a version records the demo's module paths as this release names them and their
    source is unchanged (otherwise the old version would refuse to load: build a new one)."""
    recorded = (
        manifest.generator.spec if manifest.generator else None,
        manifest.mapping.spec if manifest.mapping else None,
    )
    if recorded != (DEMO_GENERATOR, recipe.mapping):
        log.info("demo module paths changed; rebuilding", extra={"model": manifest.model})
        return False
    for reference in (manifest.generator, manifest.mapping):
        if reference is not None and reference.source == "import":
            if resolve_module_spec(reference.spec, "module").sha256 != reference.sha256:
                log.info("demo module changed; rebuilding", extra={"model": manifest.model})
                return False
    return True


def ensure_demo_indexes(store_root: Path) -> dict[str, str]:
    """Every demo model's newest version, building the missing ones: name -> version."""
    return {model: ensure_demo_index(store_root, model) for model in DEMO_RECIPES}
