"""Pick the best starting seeds with LatentSieve, then render only those with diffusers.

A Stable Diffusion back end usually renders seeds ``start, start+1, ...`` and throws bad images
away afterwards. Here it asks the service first: ``POST /select`` scores ``--count`` candidate
seeds by the density of their starting latents under the model's training latents and returns
the ``--keep`` best (optionally at least ``--min-distance`` apart, so they do not all collapse
onto one mode). The back end then draws each kept seed's latent exactly as diffusers does,

    torch.randn((1, 4, 64, 64), generator=torch.Generator("cpu").manual_seed(seed), dtype=dtype)

and passes it as ``pipe(prompt, latents=...)``: the image rendered is the one that was scored.
The recipe (dtype, shape) is read from ``GET /models`` (the index's ``--sampler``), so the
back end and the service cannot disagree about it.

Real run (needs ``pip install diffusers transformers accelerate`` and an index built for the
pipeline's latents with ``--sampler torch-cpu:float16:4x64x64``):

    python examples/diffusers_seed_filter.py --url http://127.0.0.1:8000 --model sd15 \\
        --pipeline runwayml/stable-diffusion-v1-5 --prompt "a lighthouse at dusk" \\
        --count 1000 --keep 4 --min-distance 100 --out renders/

Dry run (the default when diffusers is not installed; no weights needed): against the demo
model on a running service (``latentsieve demo --store store && latentsieve serve --store
store``) it selects seeds, prints them with their scores, draws their latents with the demo
sampler recipe (``torch-cpu:float32:8``) and re-scores those latents through ``/score`` to show
that the hand-off reproduces the scored latents exactly:

    python examples/diffusers_seed_filter.py --dry-run --url http://127.0.0.1:8000

Exit status: 0 on success, 1 when the service answers with an error or the hand-off check
fails, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from latentsieve.service.client import LatentSieveClient, LatentSieveError, ModelInfo, ScoreResponse

DEMO_MODEL = "digits-vae"
_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Re-scoring float32 latents must reproduce /select's scores; allow only float rounding (nats).
HANDOFF_TOLERANCE_NATS = 1e-3


def sampler_recipe(info: ModelInfo) -> tuple[torch.dtype, tuple[int, ...]]:
    """``torch-cpu:DTYPE:SHAPE`` from ``GET /models`` -> (dtype, per-seed latent shape)."""
    if info.sampler is None:
        raise ValueError(f"model {info.name!r} has no sampler, so it cannot take seeds")
    device, dtype, shape = info.sampler.split(":")
    if device != "torch-cpu":
        raise ValueError(f"model {info.name!r}: unsupported sampler device {device!r}")
    return _DTYPES[dtype], tuple(int(size) for size in shape.split("x"))


def draw_latent(seed: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The latent diffusers draws for one image with a CPU generator: shape (1, *shape)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, *shape), generator=generator, dtype=dtype)


def kept_seeds(selection: ScoreResponse) -> list[int]:
    """The seeds ``/select`` kept, best first."""
    seeds = [result.seed for result in selection.results]
    if any(seed is None for seed in seeds):
        raise ValueError("the /select answer has a result without a seed")
    return [int(seed) for seed in seeds if seed is not None]


def print_selection(selection: ScoreResponse) -> None:
    print(
        f"model {selection.model} (index {selection.index_version}, sigma {selection.sigma:g}, "
        f"{'exact' if selection.exact else 'approximate'})"
    )
    print(f"{'seed':>12}  {'log_density (nats)':>20}  {'percentile':>10}  accept")
    for result in selection.results:
        print(
            f"{result.seed:>12}  {result.log_density:>20.4f}  {result.percentile:>10.3f}  "
            f"{'yes' if result.accept else 'no (' + ', '.join(result.reasons) + ')'}"
        )
    print("kept seeds:", " ".join(str(seed) for seed in kept_seeds(selection)))


def dry_run(client: LatentSieveClient, info: ModelInfo, selection: ScoreResponse) -> int:
    """Draw the kept seeds' latents as the back end would and check they score the same."""
    dtype, shape = sampler_recipe(info)
    latents = torch.cat([draw_latent(seed, dtype, shape) for seed in kept_seeds(selection)])
    print(f"drew latents {tuple(latents.shape)} {str(latents.dtype).removeprefix('torch.')} "
          f"with {info.sampler}; a pipeline would get pipe(prompt, latents=latent) per seed")
    rescored = client.score(info.name, latents=latents.float().numpy(), sigma=selection.sigma)
    drift = max(
        abs(again.log_density - kept.log_density)
        for again, kept in zip(rescored.results, selection.results, strict=True)
    )
    print(f"hand-off check: re-scored latents differ by at most {drift:.2e} nats")
    return 0 if drift <= HANDOFF_TOLERANCE_NATS else 1


def render(
    info: ModelInfo, selection: ScoreResponse, pipeline: str, prompt: str, out: Path
) -> int:
    """Render each kept seed with a diffusers Stable Diffusion pipeline into ``out``."""
    from diffusers import StableDiffusionPipeline

    dtype, shape = sampler_recipe(info)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = StableDiffusionPipeline.from_pretrained(pipeline, torch_dtype=dtype).to(device)
    out.mkdir(parents=True, exist_ok=True)
    for seed in kept_seeds(selection):
        latents = draw_latent(seed, dtype, shape).to(device)
        image = pipe(prompt, latents=latents).images[0]
        path = out / f"seed-{seed}.png"
        image.save(path)
        print(f"seed {seed}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=os.environ.get("LATENTSIEVE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("LATENTSIEVE_API_KEY"))
    parser.add_argument("--model", default=None, help=f"index name (dry run: {DEMO_MODEL})")
    parser.add_argument("--start", type=int, default=0, help="first candidate seed")
    parser.add_argument("--count", type=int, default=1000, help="candidate seeds to score")
    parser.add_argument("--keep", type=int, default=8, help="seeds to render")
    parser.add_argument("--min-distance", type=float, default=None,
                        help="minimum L2 distance between kept latents (diversity)")
    parser.add_argument("--dry-run", action="store_true",
                        help="select and draw latents without a pipeline (default without "
                             "diffusers)")
    parser.add_argument("--pipeline", default="runwayml/stable-diffusion-v1-5")
    parser.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    parser.add_argument("--out", type=Path, default=Path("renders"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dry = args.dry_run or importlib.util.find_spec("diffusers") is None
    if dry and not args.dry_run:
        print("diffusers is not installed: dry run (select and draw latents only)")
    model = args.model or (DEMO_MODEL if dry else None)
    if model is None:
        print("--model is required to render (the index built for the pipeline's latents)",
              file=sys.stderr)
        return 2
    with LatentSieveClient(args.url, api_key=args.api_key) as client:
        try:
            infos = {info.name: info for info in client.models()}
            if model not in infos:
                print(f"model {model!r} is not served at {args.url}; served: "
                      f"{', '.join(sorted(infos)) or 'none'}", file=sys.stderr)
                return 1
            selection = client.select(model, args.start, args.count, args.keep,
                                      min_distance=args.min_distance)
            print_selection(selection)
            if dry:
                return dry_run(client, infos[model], selection)
        except LatentSieveError as exc:
            print(f"the service refused the request: {exc}", file=sys.stderr)
            return 1
    return render(infos[model], selection, args.pipeline, args.prompt, args.out)


if __name__ == "__main__":
    sys.exit(main())
