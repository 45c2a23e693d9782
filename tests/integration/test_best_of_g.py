"""Best-of-G generation (``latentsieve.integrations.diffusers``) on two real diffusers pipelines,
scored by a real ``latentsieve serve`` through the typed client.

The pipelines: a tiny random-weight ``StableDiffusionPipeline`` built from configs
(test_diffusers_pipeline.py's) and the bundled ``digits-ldm`` as a diffusers pipeline. The store
holds one index for each, built with the CLI from the pipeline's own latents. For every strategy,
with classifier-free guidance off and on, the tests check that

* each kept image (and final latent) is bit for bit what the plain pipeline renders for its seed
  alone, ``pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), ...)``;
* a forward hook on the UNet counts the denoiser evaluations, and they equal both the result's
  count and the strategy's cost formula;
* what was scored is what the plain pipeline computes at that point (its starting noise as the
  service draws it for the seed, its x0-prediction at step K, the end of an S-step run, its
  final latent), and the kept seeds are the best M of those scores, best first;

and that every bad input raises its one error before the UNet runs or the scheduler changes.
No weights are downloaded; everything runs on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from conftest import free_port
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from servers import running_server
from test_diffusers_pipeline import IMAGE_SIZE, TRAINING_IMAGES, digit_images
from test_diffusers_pipeline import tiny_pipeline as build_tiny_pipeline

from latentsieve.cli import main as cli
from latentsieve.integrations.diffusers import (
    BestOfGResult,
    ScoringError,
    ServiceScorer,
    Strategy,
    best_of_g,
    parse_strategy,
)
from latentsieve.service.client import LatentSieveClient
from latentsieve.workers.demo_models.digits_ldm import (
    alphas_cumprod,
    ddim_sample,
    ddim_timesteps,
    load_denoiser,
)
from latentsieve.workers.demo_models.digits_ldm_pipeline import load_pipeline
from latentsieve.workers.demo_models.digits_vae import load_vae, training_latents

# diffusers' sigma schedulers call np.array on a tensor with copy=False (NumPy 2 deprecation).
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "diffusers_best_of_g.py"
PROMPT = "a photo of the digit seven"
SEEDS = [11, 3, 25, 7]  # G = 4, out of order: "best first" must not be "first given"
KEEP = 2  # M
GUIDED = 5.0


@dataclass(frozen=True)
class Setup:
    """One pipeline under test: its index, step counts (T, K, S) and size arguments."""

    model: str
    steps: int
    prefix: int
    preview: int
    size: dict[str, int] = field(default_factory=dict)

    def strategy(self, kind: str) -> Strategy:
        return parse_strategy({"prefix": f"prefix:{self.prefix}",
                               "preview": f"preview:{self.preview}"}.get(kind, kind))


SD = Setup("tiny-sd", steps=4, prefix=2, preview=2,
           size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
DIGITS = Setup("digits-ldm", steps=25, prefix=10, preview=10)  # the evidence study's step counts


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny: one thread is fastest on a shared machine (and deterministic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny Stable Diffusion, its VAE's scaling factor set as the index's latents need."""
    pipe = build_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tokenizer")
    with torch.no_grad():
        means = pipe.vae.encode(digit_images(TRAINING_IMAGES)).latent_dist.mean
    pipe.vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return pipe


@pytest.fixture
def sd(sd_pipe: Any) -> Iterator[Any]:
    """``sd_pipe`` with a fresh DDIM scheduler; whatever a test swaps in is undone after it."""
    original = sd_pipe.scheduler
    sd_pipe.scheduler = DDIMScheduler.from_config(original.config)
    yield sd_pipe
    sd_pipe.scheduler = original


@pytest.fixture(scope="module")
def digits() -> Any:
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_index(root: Path, model: str, latents: np.ndarray) -> None:
    source = root.parent / f"{model}.npy"
    np.save(source, latents.astype(np.float32))
    shape = "x".join(map(str, latents.shape[1:]))
    assert cli([
        "index", "build", "--store", str(root), "--model", model, "--latents", str(source),
        "--sampler", f"torch-cpu:float32:{shape}", "--calibration-count", "500", "--no-progress",
    ]) == 0


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory, sd_pipe: Any) -> Iterator[str]:
    """``latentsieve serve`` over ``tiny-sd`` (the tiny VAE's scaled latents of 200 digits) and
    ``digits-ldm`` (the digits VAE's encoder means, the diffusion model's training latents)."""
    root = tmp_path_factory.mktemp("store") / "store"
    with torch.no_grad():
        means = sd_pipe.vae.encode(digit_images(TRAINING_IMAGES)).latent_dist.mean
    build_index(root, SD.model, (means * sd_pipe.vae.config.scaling_factor).numpy())
    build_index(root, DIGITS.model, training_latents().reshape(-1, 8, 1, 1))
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    with running_server(root, 60.0, log) as server:
        yield server.url


@pytest.fixture(scope="module")
def client(server_url: str) -> Iterator[LatentSieveClient]:
    with LatentSieveClient(server_url) as answering:
        yield answering


def setup_for(request: pytest.FixtureRequest, name: str) -> tuple[Setup, Any]:
    return (SD, request.getfixturevalue("sd")) if name == SD.model else (
        DIGITS, request.getfixturevalue("digits"))


# --- watching the pipeline ------------------------------------------------------------------


@dataclass
class UNetCalls:
    """Rows of every UNet forward; a guided candidate is two rows and one evaluation."""

    guided: bool
    batches: list[int] = field(default_factory=list)

    @property
    def evaluations(self) -> int:
        return sum(rows // (2 if self.guided else 1) for rows in self.batches)


@contextlib.contextmanager
def counting(pipe: Any, guided: bool) -> Iterator[UNetCalls]:
    calls = UNetCalls(guided)

    def count(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.batches.append(int((kwargs["sample"] if "sample" in kwargs else args[0]).shape[0]))

    handle = pipe.unet.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@dataclass(frozen=True)
class PlainRun:
    """What ``pipe(prompt, generator=one seed's generator, ...)`` computed: the image, the
    scheduler's x0-prediction after each step and the final latent."""

    image: np.ndarray
    x0: list[torch.Tensor]
    final: torch.Tensor


def plain(pipe: Any, setup: Setup, seed: int, guidance: float, steps: int) -> PlainRun:
    """The plain pipeline for one seed, with ``scheduler.step``'s outputs recorded."""
    original, x0, prev = pipe.scheduler.step, [], []

    @functools.wraps(original)  # the pipeline inspects step()'s parameters: keep them visible
    def recording(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if isinstance(out, tuple):  # (prev_sample,) or (prev_sample, pred_original_sample)
            sample, predicted = out[0], (out[1] if len(out) > 1 else None)
        else:
            sample, predicted = out.prev_sample, getattr(out, "pred_original_sample", None)
        prev.append(sample.clone())
        x0.append(None if predicted is None else predicted.clone())
        return out

    pipe.scheduler.step = recording
    try:
        image = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed),
                     num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                     **setup.size).images
    finally:
        del pipe.scheduler.step
    return PlainRun(np.asarray(image)[0], x0, prev[-1][0])


def densities(client: LatentSieveClient, model: str, latents: list[torch.Tensor]) -> np.ndarray:
    answer = client.score(model, latents=torch.stack(latents).float().numpy())
    return np.array([result.log_density for result in answer.results])


def best_positions(scores: np.ndarray, keep: int) -> list[int]:
    """The best ``keep`` positions, best first; ties to the earlier candidate."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:keep]


def generate(pipe: Any, setup: Setup, scorer: Any, strategy: str | Strategy,
             guidance: float = GUIDED, **overrides: Any) -> BestOfGResult:
    arguments: dict[str, Any] = {
        "seeds": SEEDS, "keep": KEEP, "num_inference_steps": setup.steps,
        "guidance_scale": guidance, "output_type": "np", **setup.size, **overrides,
    }
    return best_of_g(pipe, PROMPT, scorer, strategy, **arguments)


# --- digits-ldm is the shipped sampler --------------------------------------------------------


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def test_digits_pipeline_is_the_shipped_ddim_sampler(digits: Any) -> None:
    seeds = list(range(6))
    noise = torch.stack([torch.randn((8,), generator=generator) for generator in generators(seeds)])
    denoiser, decoder = load_denoiser(), load_vae().decoder
    for steps in (25, 10):  # the renders' and the preview mapping's step counts
        with torch.no_grad():
            expected = ddim_sample(denoiser, noise, steps)
            pixels = decoder(expected)
        latents = digits("", generator=generators(seeds), num_images_per_prompt=6,
                         num_inference_steps=steps, output_type="latent").images
        assert digits.scheduler.timesteps.tolist() == ddim_timesteps(steps)
        assert latents.shape == (6, 8, 1, 1)
        # The scheduler computes in float32 what ddim_step computes in float64.
        np.testing.assert_allclose(latents.reshape(6, 8), expected, rtol=0, atol=1e-5)
        images = digits("", generator=generators(seeds), num_images_per_prompt=6,
                        num_inference_steps=steps, output_type="np").images
        assert images.shape == (6, 8, 8, 1)
        np.testing.assert_allclose(images.reshape(6, 64), pixels, rtol=0, atol=1e-5)
    assert digits.scheduler.init_noise_sigma == 1.0
    np.testing.assert_allclose(digits.scheduler.alphas_cumprod, alphas_cumprod(), rtol=1e-5)
    # Unconditional: the prompt does not matter, and neither does guidance.
    one = digits("", generator=torch.Generator("cpu").manual_seed(3), output_type="np").images
    other = digits("a seven", generator=torch.Generator("cpu").manual_seed(3),
                   output_type="np").images
    guided = digits("a seven", generator=torch.Generator("cpu").manual_seed(3),
                    guidance_scale=GUIDED, output_type="np").images
    np.testing.assert_array_equal(one, other)
    np.testing.assert_allclose(guided, one, rtol=0, atol=1e-6)
    pil = digits("", generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert (pil.size, pil.mode) == ((8, 8), "L")


# --- every strategy, guided and not, on both pipelines -----------------------------------------


@pytest.mark.parametrize("guidance", [1.0, GUIDED], ids=["cfg-off", "cfg-on"])
@pytest.mark.parametrize("kind", ["noise", "prefix", "preview", "final"])
@pytest.mark.parametrize("model", [SD.model, DIGITS.model])
def test_kept_images_are_the_plain_pipelines_and_cost_the_formula(
    request: pytest.FixtureRequest, client: LatentSieveClient, model: str, kind: str,
    guidance: float,
) -> None:
    setup, pipe = setup_for(request, model)
    strategy = setup.strategy(kind)
    scorer = ServiceScorer(client, setup.model)
    with counting(pipe, guided=guidance > 1) as calls:
        result = generate(pipe, setup, scorer, strategy, guidance)

    # Cost: the hook's count, the result's count and the formula agree; one candidate a call.
    g, m, t = len(SEEDS), KEEP, setup.steps
    assert calls.evaluations == result.cost.denoiser_evaluations == strategy.evaluations(g, m, t)
    assert set(calls.batches) == {2 if guidance > 1 else 1}
    assert result.cost.denoiser_calls == len(calls.batches)
    assert result.cost.decoded == m and result.cost.wall_s > result.cost.scoring_s > 0

    # What was scored is what the plain pipeline has at that point, for every candidate.
    full = {seed: plain(pipe, setup, seed, guidance, t) for seed in SEEDS}
    if kind == "noise":  # the service draws each seed's noise with the index's sampler recipe
        answer = client.score(setup.model, seeds=SEEDS)
        expected = np.array([r.log_density for r in answer.results])
    elif kind == "prefix":
        expected = densities(client, setup.model, [full[s].x0[setup.prefix - 1][0] for s in SEEDS])
    elif kind == "preview":
        short = [plain(pipe, setup, seed, guidance, setup.preview).final for seed in SEEDS]
        expected = densities(client, setup.model, short)
    else:
        expected = densities(client, setup.model, [full[seed].final for seed in SEEDS])
    assert result.candidate_seeds == SEEDS
    np.testing.assert_allclose(result.candidate_scores, expected, rtol=0, atol=1e-6)

    # The best M, best first, and each one exactly the plain pipeline's image for its seed.
    picks = best_positions(result.candidate_scores, KEEP)
    assert result.seeds == [SEEDS[i] for i in picks]
    np.testing.assert_array_equal(result.scores, result.candidate_scores[picks])
    assert result.candidate_accepted is None
    assert len(result.images) == KEEP
    for seed, image, latent in zip(result.seeds, result.images, result.latents, strict=True):
        np.testing.assert_array_equal(image, full[seed].image)
        assert torch.equal(latent, full[seed].final)


def test_latent_output_is_the_plain_pipelines_latent(
    sd: Any, client: LatentSieveClient
) -> None:
    result = generate(sd, SD, ServiceScorer(client, SD.model), "final", output_type="latent")
    for seed, latent in zip(result.seeds, result.images, strict=True):
        alone = sd(PROMPT, generator=torch.Generator("cpu").manual_seed(seed),
                   num_inference_steps=SD.steps, guidance_scale=GUIDED, output_type="latent",
                   **SD.size).images
        assert torch.equal(latent, alone[0])
    assert result.images is result.latents or torch.equal(result.images, result.latents)


def test_one_batch_shrinks_to_the_survivors(
    sd: Any, digits: Any, client: LatentSieveClient
) -> None:
    """``batch_size=None``: one UNet call per step over every live candidate, guided halves
    included; the batch drops from 2G to 2M rows after step K. Batched kernels round differently
    from single-candidate ones, so the images agree within float rounding, not bit for bit."""
    for setup, pipe in ((SD, sd), (DIGITS, digits)):
        strategy = setup.strategy("prefix")
        with counting(pipe, guided=True) as calls:
            result = generate(pipe, setup, ServiceScorer(client, setup.model), strategy,
                              batch_size=None)
        k, t = setup.prefix, setup.steps
        assert calls.batches == [2 * len(SEEDS)] * k + [2 * KEEP] * (t - k)
        assert result.cost.denoiser_calls == t
        assert result.cost.denoiser_evaluations == strategy.evaluations(len(SEEDS), KEEP, t)
        for seed, image in zip(result.seeds, result.images, strict=True):
            alone = plain(pipe, setup, seed, GUIDED, t).image
            np.testing.assert_allclose(image, alone, rtol=0, atol=1e-5)


# --- schedulers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", [
    EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DDPMScheduler,
], ids=lambda cls: cls.__name__)
def test_prefix_with_stateful_and_stochastic_schedulers(
    sd: Any, client: LatentSieveClient, scheduler: type
) -> None:
    """Euler keeps a step counter and scales the noise by sigmas; Euler ancestral and DDPM draw
    fresh noise every step from each candidate's own generator: survivors still finish exactly
    as they would alone."""
    sd.scheduler = scheduler.from_config(sd.scheduler.config)
    strategy = SD.strategy("prefix")
    with counting(sd, guided=True) as calls:
        result = generate(sd, SD, ServiceScorer(client, SD.model), strategy)
    assert calls.evaluations == strategy.evaluations(len(SEEDS), KEEP, SD.steps)
    for seed, image in zip(result.seeds, result.images, strict=True):
        np.testing.assert_array_equal(image, plain(sd, SD, seed, GUIDED, SD.steps).image)


def test_multistep_scheduler_runs_final_and_refuses_prefix(
    sd: Any, client: LatentSieveClient
) -> None:
    sd.scheduler = DPMSolverMultistepScheduler.from_config(sd.scheduler.config)
    scorer = ServiceScorer(client, SD.model)
    result = generate(sd, SD, scorer, "final")
    for seed, image in zip(result.seeds, result.images, strict=True):
        np.testing.assert_array_equal(image, plain(sd, SD, seed, GUIDED, SD.steps).image)
    with counting(sd, guided=True) as calls, pytest.raises(ValueError) as refused:
        generate(sd, SD, scorer, "prefix:2")
    assert "DPMSolverMultistepScheduler" in str(refused.value)
    assert "per-batch state" in str(refused.value) and "preview:S or final" in str(refused.value)
    assert calls.batches == []


class DDIMWithoutX0(DDIMScheduler):
    """DDIM whose step() returns the next sample only, as multistep schedulers' do."""

    def step(self, *args: Any, **kwargs: Any) -> Any:
        out = super().step(*args, **{**kwargs, "return_dict": True})
        return SchedulerOutput(prev_sample=out.prev_sample) if kwargs.get(
            "return_dict", True) else (out.prev_sample,)


def test_prefix_computes_x0_from_alphas_when_step_gives_none(
    sd: Any, client: LatentSieveClient
) -> None:
    scorer = ServiceScorer(client, SD.model)
    with_x0 = generate(sd, SD, scorer, "prefix:2")
    sd.scheduler = DDIMWithoutX0.from_config(sd.scheduler.config)
    computed = generate(sd, SD, scorer, "prefix:2")
    # The same formula DDIM uses for pred_original_sample, so the same latents and scores.
    np.testing.assert_array_equal(computed.candidate_scores, with_x0.candidate_scores)
    assert computed.seeds == with_x0.seeds
    for seed, image in zip(computed.seeds, computed.images, strict=True):
        np.testing.assert_array_equal(image, plain(sd, SD, seed, GUIDED, SD.steps).image)


# --- bad input: one error, nothing run, nothing changed ------------------------------------------


class OpaqueScheduler:
    """A scheduler with neither pred_original_sample nor alphas_cumprod (wraps DDIM's steps)."""

    order = 1

    def __init__(self, config: Any) -> None:
        self._inner = DDIMScheduler.from_config(config)
        self.config: dict[str, Any] = {}

    @property
    def timesteps(self) -> torch.Tensor:
        return self._inner.timesteps

    @property
    def num_inference_steps(self) -> int | None:
        return self._inner.num_inference_steps

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def set_timesteps(self, steps: int, device: Any = None) -> None:
        self._inner.set_timesteps(steps, device=device)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor) -> Any:
        return SchedulerOutput(prev_sample=self._inner.step(model_output, timestep, sample)
                               .prev_sample)


class EulerWithoutX0(EulerDiscreteScheduler):
    """Euler (latents scaled by sigmas) whose step() hides pred_original_sample."""

    def step(self, *args: Any, **kwargs: Any) -> Any:
        return SchedulerOutput(prev_sample=super().step(*args, **kwargs).prev_sample)


def log_densities_only(latents: np.ndarray) -> np.ndarray:
    return -np.square(latents.reshape(len(latents), -1)).sum(axis=1)


BAD_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown strategy", {"strategy": "best"}, "unknown strategy 'best'"),
    ("K equal to T", {"strategy": "prefix:4"}, "K = 4 must be below the T = 4 inference steps"),
    ("K above T", {"strategy": "prefix:9"}, "K = 9 must be below the T = 4"),
    ("K zero", {"strategy": "prefix:0"}, "whole number K >= 1"),
    ("S zero", {"strategy": "preview:0"}, "whole number S >= 1"),
    ("S not a number", {"strategy": "preview:ten"}, "'ten' is not a whole number"),
    ("step count on final", {"strategy": "final:3"}, "'final' takes no step count"),
    ("M above G", {"keep": 5}, r"keep \(M = 5\) must not exceed .* \(G = 4\)"),
    ("M zero", {"keep": 0}, r"keep \(M\) must be a whole number >= 1"),
    ("repeated seed", {"seeds": [1, 1, 2, 3]}, "must be distinct"),
    ("T zero", {"num_inference_steps": 0}, r"num_inference_steps \(T\) must be"),
    ("output type", {"output_type": "jpeg"}, "output_type must be one of"),
    ("batch size", {"batch_size": 0}, "batch_size must be None or"),
    ("size", {"height": 15}, "multiples of the VAE's scale factor"),
    ("no x0, no alphas", {"scheduler": OpaqueScheduler},
     "OpaqueScheduler gives none: .* no alphas_cumprod"),
    ("no x0, sigma-scaled", {"scheduler": EulerWithoutX0},
     "EulerWithoutX0 gives none: .* scaled by sigmas"),
    ("multistep under prefix", {"scheduler": DPMSolverMultistepScheduler},
     "cannot continue a shrunken batch with DPMSolverMultistepScheduler"),
    ("accepted_only without a policy", {"accepted_only": True, "scorer": log_densities_only},
     "accepted_only needs a scorer that applies a policy"),
    ("index of another pipeline", {"scorer": "digits-ldm"},
     "index takes latents of 8 values, the pipeline makes 4x8x8 = 256"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_error_before_any_work(
    sd: Any, client: LatentSieveClient, case: tuple[str, dict[str, Any], str]
) -> None:
    _, change, message = case
    arguments = dict(change)
    if "scheduler" in arguments:
        made = arguments.pop("scheduler")
        sd.scheduler = made(sd.scheduler.config) if made is OpaqueScheduler else (
            made.from_config(sd.scheduler.config))
    scorer = arguments.pop("scorer", SD.model)
    scorer = ServiceScorer(client, scorer) if isinstance(scorer, str) else scorer
    strategy = arguments.pop("strategy", "prefix:2")
    sd.scheduler.set_timesteps(7)
    before = sd.scheduler.timesteps.clone()
    with counting(sd, guided=True) as calls, pytest.raises(ValueError, match=message):
        generate(sd, SD, scorer, strategy, **arguments)
    assert calls.batches == []
    assert sd.scheduler.num_inference_steps == 7 and torch.equal(sd.scheduler.timesteps, before)


def test_a_pipeline_unlike_stable_diffusion_is_refused(client: LatentSieveClient) -> None:
    scorer = ServiceScorer(client, SD.model)
    with pytest.raises(ValueError, match="is not a Stable Diffusion-like pipeline: it has no unet"):
        best_of_g(SimpleNamespace(), PROMPT, scorer, "final", seeds=SEEDS, keep=KEEP)
    sdxl_like = SimpleNamespace(
        unet=SimpleNamespace(config=SimpleNamespace(
            in_channels=4, sample_size=8, time_cond_proj_dim=None, addition_embed_type="text_time",
        )),
        scheduler=None, vae=None, encode_prompt=None, vae_scale_factor=2, image_processor=None,
    )
    with pytest.raises(ValueError, match=r"takes more than the prompt \(addition_embed_type"):
        best_of_g(sdxl_like, PROMPT, scorer, "final", seeds=SEEDS, keep=KEEP)


def test_a_service_that_is_down_or_refuses_is_one_scoring_error(
    sd: Any, client: LatentSieveClient
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with LatentSieveClient(dead, timeout=2.0) as nobody:
        with pytest.raises(ScoringError, match="did not answer GET /models") as down:
            ServiceScorer(nobody, SD.model)
        assert isinstance(down.value.__cause__, httpx.ConnectError)
        with pytest.raises(ScoringError, match="model 'nope' is not served; served: "
                                               "digits-ldm, tiny-sd"):
            ServiceScorer(client, "nope")
        # Down in the middle of a run: the denoising is lost, the error says why.
        scorer = ServiceScorer(client, SD.model)
        scorer.client = nobody
        with pytest.raises(ScoringError, match="did not answer POST /score"):
            generate(sd, SD, scorer, "prefix:2")
    refusing = ServiceScorer(client, SD.model, sigma=-1.0)
    with pytest.raises(ScoringError, match="refused POST /score .*: HTTP 422"):
        generate(sd, SD, refusing, "noise")

    def broken(latents: np.ndarray) -> np.ndarray:
        raise RuntimeError("the in-process index is closed")

    with pytest.raises(ScoringError, match="scoring 4 candidate latents failed: RuntimeError: "
                                           "the in-process index is closed"):
        generate(sd, SD, broken, "noise")
    with pytest.raises(ScoringError, match="answered 3 scores for 4 candidate latents"):
        generate(sd, SD, lambda latents: np.zeros(3), "noise")


# --- the policy ---------------------------------------------------------------------------------


def test_accepted_only_keeps_what_the_policy_accepts(
    digits: Any, client: LatentSieveClient
) -> None:
    seeds = list(range(40, 48))
    everyone = ServiceScorer(client, DIGITS.model, policy={"min_percentile": 0.0})
    open_door = generate(digits, DIGITS, everyone, "noise", seeds=seeds, keep=4,
                         accepted_only=True)
    plain_rank = generate(digits, DIGITS, everyone, "noise", seeds=seeds, keep=4)
    assert open_door.candidate_accepted is not None and open_door.candidate_accepted.all()
    assert open_door.seeds == plain_rank.seeds

    policy = {"min_percentile": 0.8}
    strict = ServiceScorer(client, DIGITS.model, policy=policy)
    with counting(digits, guided=False) as calls:
        kept = generate(digits, DIGITS, strict, "noise", seeds=seeds, keep=4, guidance=1.0,
                        accepted_only=True)
    answer = client.score(DIGITS.model, seeds=seeds, policy=policy)
    accepted = [seed for seed, result in zip(seeds, answer.results, strict=True) if result.accept]
    assert kept.candidate_accepted is not None
    assert [seeds[i] for i in np.flatnonzero(kept.candidate_accepted)] == accepted
    assert len(accepted) < len(seeds)
    assert set(kept.seeds) <= set(accepted) and len(kept.seeds) == min(4, len(accepted))
    assert calls.evaluations == kept.cost.denoiser_evaluations == len(kept.seeds) * DIGITS.steps
    assert len(kept.images) == len(kept.seeds) == kept.latents.shape[0]


# --- the example --------------------------------------------------------------------------------


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("diffusers_best_of_g", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_dry_run(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    example: Callable[[list[str]], int] = load_example().main
    assert example(["--dry-run", "--url", server_url, "--candidates", "6", "--keep", "2"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\s*(\S+)\s+(\d+) \(formula\s+(\d+)\)", out, flags=re.MULTILINE)
    assert [row[0] for row in rows] == ["noise", "prefix:10", "preview:10", "final"]
    assert all(counted == formula for _, counted, formula in rows)
    assert [int(row[1]) for row in rows] == [2 * 25, 6 * 10 + 2 * 15, 6 * 10 + 2 * 25, 6 * 25]
    assert example(["--dry-run", "--url", server_url, "--strategy", "prefix:25"]) == 2
    assert "must be below the T = 25" in capsys.readouterr().err
    assert example(["--dry-run", "--url", f"http://127.0.0.1:{free_port()}"]) == 1
    assert "did not answer" in capsys.readouterr().err

