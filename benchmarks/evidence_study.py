"""Which index settings make log_density predict sample quality? The earlier, in-sample study.

Superseded by ``benchmarks/preregistered.py`` (docs/evidence.md, "Pre-registration"): this script
chooses and reports on the same seeds 0-3999 and judges with one classifier. It is kept because
its diagnosis of the VAE (inactive coordinates, the bandwidth, the prior hole) still stands.

Builds every variant below with the product's own ``index build`` path into a temporary store,
scores the same seeds with each, and measures the Spearman correlation (bootstrap 95% interval)
of ``log_density`` with the digits classifier's quality proxies (``latentsieve report``'s
numbers, docs/evidence.md). Also measures candidate default policies of the demo models.

    python benchmarks/evidence_study.py [--seeds 4000] [--bootstrap 1000]

Writes the generated sections of ``docs/evidence.md`` and ``docs/evidence/study.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from report import write_section  # noqa: E402

from latentsieve.demo import DEMO_GENERATOR, LDM_GENERATOR, LDM_MAPPING  # noqa: E402
from latentsieve.index.build import BuildOptions, DescriptorOptions, build_version  # noqa: E402
from latentsieve.index.manifest import (  # noqa: E402
    PercentileBounds,
    Policy,
    SamplerRecipe,  # noqa: E402
)
from latentsieve.index.store import LatentStore  # noqa: E402
from latentsieve.report import QualityProxy, demo_quality_proxy, make_report  # noqa: E402
from latentsieve.service.offline import SyncScorer  # noqa: E402
from latentsieve.workers.calibration import calibrate_build, draw_mapped_queries  # noqa: E402
from latentsieve.workers.demo_models.digits_ldm import generator as ldm_pipeline  # noqa: E402
from latentsieve.workers.demo_models.digits_ldm import inverted_training_latents  # noqa: E402
from latentsieve.workers.demo_models.digits_vae import (  # noqa: E402
    LATENT_DIM,
    DigitsVAE,
    digits_pixels,
    posterior_samples,
    training_latents,
)
from latentsieve.workers.demo_models.train_digits_vae import train as train_digits_vae  # noqa: E402
from latentsieve.workers.evidence import mask_gain  # noqa: E402
from latentsieve.workers.policy import decide  # noqa: E402
from latentsieve.workers.samplers import draw_latents  # noqa: E402

PAGE = ROOT / "docs" / "evidence.md"
ORDER = ("study_vae", "study_heldout", "study_ldm", "policies")
PREVIEW_MAPPING = "latentsieve.workers.demo_models.digits_ldm:preview_sampler"


@dataclass(frozen=True)
class Variant:
    """One way to build an index for a demo model."""

    model: str  # digits-vae | digits-ldm
    label: str
    latents: Callable[[], np.ndarray]
    latent_set: str
    space: str = "active"
    neighbours: int = 1
    mapping: str | None = None


HELDOUT = "heldout-vae"
HELDOUT_EPOCHS = 200


def heldout_files(folder: Path) -> tuple[Path, Path]:
    """A VAE nobody tuned the defaults on: the demo architecture trained for 200 epochs, so the
    KL weight ends at 0.67 instead of 1 (a beta-VAE with different active coordinates). Writes
    its encoder means and its decoder as TorchScript once; returns (means.npy, decoder.pt)."""
    means, script = folder / "heldout-means.npy", folder / "heldout-decoder.pt"
    if not script.exists():
        model = DigitsVAE()
        model.load_state_dict(train_digits_vae(epochs=HELDOUT_EPOCHS))
        model.eval()
        with torch.no_grad():
            mu, _ = model.encode(torch.from_numpy(digits_pixels()))
        np.save(means, mu.numpy().astype(np.float32))
        torch.jit.save(torch.jit.script(model.decoder), str(script))
    return means, script


VARIANTS = (
    Variant("digits-vae", "encoder means, raw space, k = 10 (before)", training_latents,
            "encoder-means", "raw", 10),
    Variant("digits-vae", "encoder means, raw space, k = 1", training_latents, "encoder-means",
            "raw"),
    Variant("digits-vae", "encoder means, active space, k = 10", training_latents,
            "encoder-means", "active", 10),
    Variant("digits-vae", "encoder means, active space, k = 1 (default)", training_latents,
            "encoder-means"),
    Variant("digits-vae", "encoder means, standardized, k = 1", training_latents,
            "encoder-means", "standardized"),
    Variant("digits-vae", "posterior samples (1 per image), raw, k = 1", posterior_samples,
            "posterior-samples", "raw"),
    Variant("digits-vae", "posterior samples (4 per image), active, k = 1",
            lambda: posterior_samples(4), "posterior-samples"),
    Variant(HELDOUT, "encoder means, raw space, k = 10 (before)", training_latents,
            "encoder-means", "raw", 10),
    Variant(HELDOUT, "encoder means, raw space, k = 1", training_latents, "encoder-means", "raw"),
    Variant(HELDOUT, "encoder means, active space, k = 10", training_latents, "encoder-means",
            "active", 10),
    Variant(HELDOUT, "encoder means, active space, k = 1 (default)", training_latents,
            "encoder-means"),
    Variant(HELDOUT, "encoder means, standardized, k = 1", training_latents, "encoder-means",
            "standardized"),
    Variant("digits-ldm", "noise space: encoder means, raw, k = 1", training_latents,
            "encoder-means", "raw"),
    Variant("digits-ldm", "noise space: encoder means, active, k = 1", training_latents,
            "encoder-means"),
    Variant("digits-ldm", "noise space: DDIM inversions, raw, k = 1", inverted_training_latents,
            "ddim-inversions", "raw"),
    Variant("digits-ldm", "noise space: DDIM inversions, active, k = 1",
            inverted_training_latents, "ddim-inversions"),
    Variant("digits-ldm", "noise space: DDIM inversions, raw, k = 10",
            inverted_training_latents, "ddim-inversions", "raw", 10),
    Variant("digits-ldm", "sampled latent (25 DDIM steps), raw, k = 1", training_latents,
            "encoder-means", "raw", mapping=LDM_MAPPING),
    Variant("digits-ldm", "sampled latent (25 DDIM steps), active, k = 1 (default)",
            training_latents, "encoder-means", mapping=LDM_MAPPING),
    Variant("digits-ldm", "sampled latent (25 DDIM steps), active, k = 10", training_latents,
            "encoder-means", "active", 10, mapping=LDM_MAPPING),
    Variant("digits-ldm", "sampled latent (25 DDIM steps), standardized, k = 1",
            training_latents, "encoder-means", "standardized", mapping=LDM_MAPPING),
    Variant("digits-ldm", "preview latent (10 DDIM steps), active, k = 1", training_latents,
            "encoder-means", mapping=PREVIEW_MAPPING),
)
POLICIES: dict[str, Policy] = {
    "min_percentile 0.05 (before)": Policy(min_percentile=0.05),
    "min_percentile 0.25": Policy(min_percentile=0.25),
    "psi max_percentile 0.75": Policy(
        min_percentile=0.0, psi=PercentileBounds(max_percentile=0.75)
    ),
    "min_percentile 0.1 + psi max_percentile 0.9": Policy(
        min_percentile=0.1, psi=PercentileBounds(max_percentile=0.9)
    ),
    "min_percentile 0.25 + psi max_percentile 0.75": Policy(
        min_percentile=0.25, psi=PercentileBounds(max_percentile=0.75)
    ),
}


def build(store: LatentStore, folder: Path, variant: Variant, name: str) -> SyncScorer:
    """The variant's index through the product's build path, loaded for scoring."""
    source = folder / f"{name}.npy"
    generator = (
        LDM_GENERATOR if variant.model == "digits-ldm" and variant.mapping is None
        else DEMO_GENERATOR
    )
    if variant.model == HELDOUT:  # its own latents and decoder, not the demo's
        means, script = heldout_files(folder)
        source, generator = means, str(script)
    else:
        np.save(source, variant.latents())
    options = BuildOptions(
        model=name,
        latents_file=source,
        sigma="auto",
        space=variant.space,
        bandwidth_neighbours=variant.neighbours,
        latent_set=variant.latent_set,
        sampler=f"torch-cpu:float32:{LATENT_DIM}",
        # Noise-space variants score the starting noise: their generator is the whole pipeline.
        generator=generator,
        mapping=variant.mapping,
        calibration_count=2000,
        descriptors=DescriptorOptions(calibration_count=200),
        progress=False,
    )
    build_version(store, options, calibrate_build, draw_mapped_queries)
    return SyncScorer(store.load(name))


def _ci(interval: dict[str, float]) -> str:
    return f"{interval['value']:+.3f} [{interval['ci_low']:+.3f}, {interval['ci_high']:+.3f}]"


def study_table(rows: list[dict[str, object]], model: str, command: str) -> str:
    """Markdown: one row per variant, Spearman of log_density with each proxy, and baselines."""
    lines = [
        f"## {model}: index settings against quality",
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        "Spearman rho of `log_density` with each proxy over the same seeds, 95% bootstrap "
        "intervals in brackets; the gain is the change in mean confidence when the lowest 25% "
        "by score are rejected (random rejection: 0).",
        "",
        "| index | d' | sigma | rho, confidence | rho, realism | gain, confidence @25% |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if row["model"] != model:
            continue
        spearman = row["spearman"]
        assert isinstance(spearman, dict)
        lines.append(
            f"| {row['label']} | {row['dim']} | {row['sigma']:.3g} | "
            f"{_ci(spearman['confidence']['log_density'])} | "
            f"{_ci(spearman['realism']['log_density'])} | {_ci(row['gain_confidence_25'])} |"
        )
    first = next(row for row in rows if row["model"] == model)
    baselines = first["spearman"]
    assert isinstance(baselines, dict)
    lines += ["", "Baselines on the same seeds; the descriptors are those of the first row's "
              "generator (for digits-ldm the whole noise-to-image pipeline; the demo index's "
              "report has the decoder's at the sampled latent):", "",
              "| score | rho, confidence | rho, realism |", "| --- | --- | --- |"]
    names = ("prior_log_likelihood", "random", "psi", "nu", "delta")
    for name in (n for n in names if n in baselines["confidence"]):
        lines.append(
            f"| {name} | {_ci(baselines['confidence'][name])} | {_ci(baselines['realism'][name])} |"
        )
    return "\n".join(lines)


def policy_table(rows: list[dict[str, object]], command: str) -> str:
    lines = [
        "## Candidate default policies",
        "",
        f"Generated by `{command}`. Share of seeds each policy rejects and the change in mean "
        "quality of the accepted seeds against all seeds (95% bootstrap interval), on the "
        "default index of each demo model.",
        "",
        "| model | policy | rejected | gain, confidence | gain, realism |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['policy']} | {row['rejected']:.1%} | "
            f"{_ci(row['confidence'])} | {_ci(row['realism'])} |"  # type: ignore[arg-type]
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, default=4000)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--page", type=Path, default=PAGE)
    args = parser.parse_args(argv)
    command = "python benchmarks/evidence_study.py"
    if (args.seeds, args.bootstrap) != (4000, 1000):
        command += f" --seeds {args.seeds} --bootstrap {args.bootstrap}"
    proxy = demo_quality_proxy(DEMO_GENERATOR)
    assert proxy is not None
    seeds = range(args.seeds)
    rows: list[dict[str, object]] = []
    policies: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        store = LatentStore(folder / "store")
        for number, variant in enumerate(VARIANTS):
            started = time.perf_counter()
            with build(store, folder, variant, f"v{number}") as scorer:
                # Descriptors once per model (they do not depend on the index set).
                first = all(row["model"] != variant.model for row in rows)
                given, judge = None, proxy
                if variant.mapping == PREVIEW_MAPPING:
                    # Judge the images the pipeline renders (25 steps), not the preview's.
                    given, judge = final_ldm_quality(seeds, proxy), None
                data = make_report(scorer, seeds, given, judge, args.bootstrap, progress=False,
                                   sections=frozenset({"descriptors"} if first else ()))
                numbers = data.numbers
                projection = scorer.manifest.projection
                row = {
                    "model": variant.model,
                    "label": variant.label,
                    "dim": projection.dim if projection else scorer.manifest.dim,
                    "sigma": scorer.manifest.bandwidth.sigma,
                    "spearman": numbers["spearman"],
                    "gain_confidence_25": next(
                        r["gain"] for r in numbers["rejection"]["confidence"]
                        if r["reject_fraction"] == 0.25
                    ),
                }
                rows.append(row)
                print(f"{variant.model:10s} {variant.label:58s} "
                      f"{_ci(numbers['spearman']['confidence']['log_density'])}  "
                      f"{time.perf_counter() - started:.0f} s", flush=True)
                if variant.label.endswith("(default)"):
                    policies += evaluate_policies(scorer, seeds, proxy, variant.model,
                                                  args.bootstrap)
    (ROOT / "docs" / "evidence").mkdir(parents=True, exist_ok=True)
    (ROOT / "docs" / "evidence" / "study.json").write_text(
        json.dumps({"variants": rows, "policies": policies}, indent=2) + "\n", encoding="utf-8"
    )
    title = "# Evidence\n"
    write_section("study_vae", study_table(rows, "digits-vae", command), args.page, ORDER, title)
    write_section(
        "study_heldout", study_table(rows, HELDOUT, command), args.page, ORDER, title
    )
    write_section("study_ldm", study_table(rows, "digits-ldm", command), args.page, ORDER, title)
    write_section("policies", policy_table(policies, command), args.page, ORDER, title)
    return 0


def final_ldm_quality(seeds: range, proxy: QualityProxy) -> dict[str, np.ndarray]:
    """The proxies of digits-ldm's rendered images (25 DDIM steps, then the decoder)."""
    noise = draw_latents(SamplerRecipe(shape=(LATENT_DIM,)), seeds).float()
    with torch.no_grad():
        images = ldm_pipeline()(noise).numpy()
    return proxy.proxies(images)


def evaluate_policies(
    scorer: SyncScorer, seeds: range, proxy: QualityProxy, model: str, resamples: int
) -> list[dict[str, object]]:
    """Each candidate policy on the default index: share rejected, gain in mean quality."""
    assert scorer.descriptor_engine is not None
    latents = scorer.draw(seeds)
    batch = scorer.score(latents, None, {"psi"})
    with torch.no_grad():
        images = scorer.descriptor_engine.generator(torch.from_numpy(latents)).numpy()
    quality = proxy.proxies(images)
    rows: list[dict[str, object]] = []
    for label, policy in POLICIES.items():
        accepted = np.array([not why for why in decide(
            batch.percentile, policy, batch.descriptor_percentiles
        )])
        rows.append({
            "model": model,
            "policy": label,
            "rejected": float(1.0 - accepted.mean()),
            **{q: mask_gain(accepted, v, resamples).as_dict() for q, v in quality.items()},
        })
    return rows


if __name__ == "__main__":
    sys.exit(main())
