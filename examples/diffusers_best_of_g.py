"""Best-of-G generation with LatentSieve: denoise G candidate seeds, keep and finish the best M.

Each strategy scores the G candidates at a different point of the sampler
(``latentsieve.integrations.diffusers``; costs and measured value in docs/integrations.md):
``noise`` (the starting noise), ``prefix:K`` (the x0-prediction after K of the T steps),
``preview:S`` (a separate S-step run) and ``final`` (the finished latent, before decoding).
Every kept image is the one ``pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed))``
renders for its seed.

Real run (``pip install 'latentsieve[diffusers]' accelerate``; an index built from the
pipeline's own latents, docs/integrations.md):

    python examples/diffusers_best_of_g.py --url http://127.0.0.1:8000 --model sd15 \\
        --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt "a lighthouse at dusk" \\
        --strategy preview:10 --candidates 16 --keep 4 --steps 25 --out renders/

Dry run (no downloads, CPU, seconds): the bundled ``digits-ldm`` as a diffusers pipeline against
a running service with the demo store (``latentsieve demo --store store && latentsieve serve
--store store``); every strategy on the same candidate seeds, with the seeds each keeps, their
``log_density`` and what each cost:

    python examples/diffusers_best_of_g.py --dry-run --url http://127.0.0.1:8000

Exit status: 0 on success, 1 when the service is down or refuses, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from latentsieve.integrations.diffusers import (
    BestOfGResult,
    ScoringError,
    ServiceScorer,
    Strategy,
    best_of_g,
    parse_strategy,
)
from latentsieve.service.client import LatentSieveClient

DEMO_MODEL = "digits-ldm"
DEMO_STRATEGIES = ("noise", "prefix:10", "preview:10", "final")
DEMO_STEPS = 25  # the digits sampler's own step count (docs/evidence.md)


def print_result(result: BestOfGResult, steps: int) -> None:
    """One line per strategy: kept seeds with their log densities, and the cost."""
    g, m = len(result.candidate_seeds), len(result.seeds)
    formula = result.strategy.evaluations(g, m, steps)
    kept = ", ".join(f"{seed} ({score:.2f})" for seed, score in
                     zip(result.seeds, result.scores, strict=True))
    print(f"{str(result.strategy):>11}  {result.cost.denoiser_evaluations:>5} "
          f"(formula {formula:>5})  {result.cost.wall_s:>7.2f}  {kept or 'none kept'}")


def load_stable_diffusion(name: str) -> Any:
    """A Stable Diffusion pipeline with a DDIM scheduler (prefix:K needs one whose state does
    not depend on the batch; docs/integrations.md)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(name, torch_dtype=dtype).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=os.environ.get("LATENTSIEVE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("LATENTSIEVE_API_KEY"))
    parser.add_argument("--model", default=None, help=f"index name (dry run: {DEMO_MODEL})")
    parser.add_argument("--strategy", action="append", default=None,
                        help="noise, prefix:K, preview:S or final; repeat to compare "
                             f"(dry run: all of {', '.join(DEMO_STRATEGIES)})")
    parser.add_argument("--candidates", type=int, default=16, help="G: candidate seeds")
    parser.add_argument("--seed-start", type=int, default=0, help="first candidate seed")
    parser.add_argument("--keep", type=int, default=4, help="M: images kept")
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help="T: inference steps")
    parser.add_argument("--guidance", type=float, default=None,
                        help="guidance scale (default 7.5; dry run 1.0: digits-ldm reads no text)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="candidates per UNet call; 1 is bit-identical to single-seed runs, "
                             "0 puts all live candidates in one call")
    parser.add_argument("--dry-run", action="store_true",
                        help="digits-ldm on the CPU instead of a downloaded pipeline")
    parser.add_argument("--pipeline", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    parser.add_argument("--out", type=Path, default=Path("renders"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model = args.model or (DEMO_MODEL if args.dry_run else None)
    if model is None:
        print("--model is required (the index built for the pipeline's latents)", file=sys.stderr)
        return 2
    try:
        strategies: list[Strategy] = [
            parse_strategy(text) for text in args.strategy or (
                DEMO_STRATEGIES if args.dry_run else ("preview:10",))
        ]
        for strategy in strategies:
            strategy.check_steps(args.steps)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    guidance = args.guidance if args.guidance is not None else (1.0 if args.dry_run else 7.5)
    seeds = range(args.seed_start, args.seed_start + args.candidates)
    with LatentSieveClient(args.url, api_key=args.api_key) as client:
        try:
            scorer = ServiceScorer(client, model)
            if args.dry_run:
                from latentsieve.workers.demo_models.digits_ldm_pipeline import load_pipeline

                pipe, prompt, output_type = load_pipeline(), "", "np"
            else:
                pipe, prompt, output_type = load_stable_diffusion(args.pipeline), args.prompt, "pil"
            pipe.set_progress_bar_config(disable=True)
            print(f"model {model}: G = {args.candidates} seeds from {args.seed_start}, "
                  f"keep M = {args.keep}, T = {args.steps} steps, guidance {guidance:g}")
            print(f"{'strategy':>11}  {'denoiser evaluations':>20}  {'wall s':>7}  "
                  "kept seeds (log_density)")
            results = [
                best_of_g(pipe, prompt, scorer, strategy, seeds=seeds, keep=args.keep,
                          num_inference_steps=args.steps, guidance_scale=guidance,
                          output_type=output_type, batch_size=args.batch_size or None)
                for strategy in strategies
            ]
        except ScoringError as exc:
            print(f"scoring failed: {exc}", file=sys.stderr)
            return 1
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
    for result in results:
        print_result(result, args.steps)
    if not args.dry_run:
        args.out.mkdir(parents=True, exist_ok=True)
        for result in results:
            for seed, image in zip(result.seeds, result.images, strict=True):
                path = args.out / f"{str(result.strategy).replace(':', '-')}-seed-{seed}.png"
                image.save(path)
                print(f"{result.strategy} seed {seed}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
