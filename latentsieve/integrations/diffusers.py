"""Best-of-G text-to-image generation with a diffusers pipeline, ranked by LatentSieve.

For one prompt, G candidate seeds start from the noise diffusers draws for them; one scoring call
ranks the G candidates by ``log_density`` (docs/contract.md §1) at the point the strategy names,
and only
the best M are carried to the end and decoded:

    strategy    what is scored                                   denoiser evaluations
    noise       each seed's starting noise (the unscaled draw)   M*T
    prefix:K    the x0-prediction after K of the T steps         G*K + M*(T-K)
    preview:S   the final latent of a separate S-step run        G*S + M*T
    final       the final latent, before the VAE decode          G*T

One denoiser evaluation is one UNet forward over one candidate; with classifier-free guidance
(``guidance_scale > 1``) the unconditional and conditional halves of that candidate count as one.
``T``, ``K`` and ``S`` are loop steps, one evaluation each for first-order schedulers (DDIM,
DDPM, Euler, DPM-Solver++); a second-order scheduler (Heun) evaluates about twice per step and
the count says so.

How it runs: this module drives Stable Diffusion's denoising loop itself from the pipeline's
public parts (``encode_prompt``, ``scheduler.set_timesteps`` / ``init_noise_sigma`` /
``scale_model_input`` / ``step``, ``unet(sample, t, encoder_hidden_states=...).sample``,
``vae.decode``, ``image_processor.postprocess``), step for step as
``StableDiffusionPipeline.__call__`` does, so that every kept image is bit for bit the one
``pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=T,
guidance_scale=..., output_type=...)`` renders alone (``prefix``: without the interruption).
Each candidate keeps its own CPU generator, so schedulers that draw noise per step (DDPM, Euler
ancestral, DDIM with ``eta > 0``) draw what the plain run draws. Pipelines whose UNet takes
more than the prompt (SDXL's ``added_cond_kwargs``, LCM's guidance embedding) are refused.

Bit for bit needs each candidate computed alone: CPU kernels are not batch-invariant (the
images of a tiny Stable Diffusion's ``pipe(..., num_images_per_prompt=6)`` differ from the same
seeds rendered one at a time by up to 1e-6; the digits MLP's outputs change below 16 rows), so
``batch_size=1`` (the default) runs the UNet and the VAE once per candidate; scheduler steps,
which are elementwise, run on all live candidates at once. ``batch_size=None`` puts all live
candidates in one UNet call: faster on an accelerator, equal to the plain run within float
rounding instead of exactly.

Scoring goes through a :class:`LatentScorer`: any callable ``(latents (n, ...) float32) ->
log densities (n,)``. :class:`ServiceScorer` is the one over ``POST /score`` with the typed
client; an in-process engine can stand in for it. Ranking within a group of G uses no
calibration, so ``prefix`` and ``preview`` latents, which the index's percentiles were never
calibrated on, can be ranked all the same; a policy's accept/reject (``accepted_only=True``)
does use percentiles and means what it says only for latents like the calibration draws.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, cast, runtime_checkable

import httpx
import numpy as np
import torch

from latentsieve.redaction import redact
from latentsieve.service.client import LatentSieveClient, LatentSieveError, ModelInfo

StrategyKind = Literal["noise", "prefix", "preview", "final"]
STRATEGY_FORMS = "noise, prefix:K (1 <= K < T), preview:S (S >= 1) or final"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Schedulers whose state between steps is batch-independent (a step counter at most), so a
# batch that shrinks after step K continues each survivor exactly: prefix:K accepts these and
# their subclasses. Multistep (DPM-Solver, UniPC, DEIS, PNDM, LMS) and second-order (Heun,
# KDPM2) schedulers keep per-batch history between steps.
SHRINKABLE_SCHEDULERS = frozenset(
    {"DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"}
)
_PREDICTIONS = ("epsilon", "v_prediction", "sample")


# --- strategies --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Strategy:
    """Where the candidates are scored; ``steps`` is K of ``prefix:K`` or S of ``preview:S``."""

    kind: StrategyKind
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.kind in ("noise", "final"):
            if self.steps is not None:
                raise ValueError(
                    f"strategy {self.kind!r} takes no step count; use {STRATEGY_FORMS}"
                )
        elif self.kind in ("prefix", "preview"):
            if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
                letter = "K" if self.kind == "prefix" else "S"
                raise ValueError(
                    f"strategy {self.kind}:{letter} needs a whole number {letter} >= 1, got "
                    f"{self.steps!r}; use {STRATEGY_FORMS}"
                )
        else:
            raise ValueError(f"unknown strategy {self.kind!r}; use {STRATEGY_FORMS}")

    def __str__(self) -> str:
        return self.kind if self.steps is None else f"{self.kind}:{self.steps}"

    def check_steps(self, steps: int) -> None:
        """Refuse ``prefix:K`` with K >= T: there would be nothing left to save."""
        if self.kind == "prefix" and self.steps is not None and self.steps >= steps:
            raise ValueError(
                f"strategy {self}: K = {self.steps} must be below the T = {steps} inference steps "
                f"(scoring after all T steps is the strategy 'final')"
            )

    def evaluations(self, candidates: int, kept: int, steps: int) -> int:
        """Denoiser evaluations of one group: G = ``candidates``, M = ``kept``, T = ``steps``."""
        g, m, t = candidates, kept, steps
        if self.kind == "noise":
            return m * t
        if self.kind == "final":
            return g * t
        k = cast(int, self.steps)
        return g * k + m * (t - k) if self.kind == "prefix" else g * k + m * t


def parse_strategy(text: str) -> Strategy:
    """``"noise"``, ``"prefix:K"``, ``"preview:S"`` or ``"final"`` -> :class:`Strategy`; anything
    else raises one ``ValueError`` naming the forms allowed."""
    name, colon, count = str(text).strip().partition(":")
    if name not in ("noise", "prefix", "preview", "final"):
        raise ValueError(f"unknown strategy {text!r}; use {STRATEGY_FORMS}")
    if not colon:
        return Strategy(cast(StrategyKind, name))
    try:
        steps = int(count.strip())
    except ValueError:
        raise ValueError(
            f"strategy {text!r}: {count!r} is not a whole number; use {STRATEGY_FORMS}"
        ) from None
    return Strategy(cast(StrategyKind, name), steps)


# --- scoring -----------------------------------------------------------------------------------


class ScoringError(RuntimeError):
    """The scorer (the LatentSieve service, or an in-process one) failed or refused; the
    message says why, the client's own exception is the ``__cause__``."""


class LatentScorer(Protocol):
    """``latents (n, *latent_shape) float32 -> log_density (n,)`` in nats, one call per group.

    A scorer may also carry ``dimension`` (the number of values per latent its index takes); the
    generator then refuses a pipeline whose latents have another size before any denoising.
    """

    def __call__(self, latents: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class PolicyScorer(Protocol):
    """A scorer that also applies an accept/reject policy (needed by ``accepted_only``)."""

    def __call__(self, latents: np.ndarray) -> np.ndarray: ...

    def verdicts(self, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``latents (n, ...)`` -> (``log_density (n,)`` float64, ``accept (n,)`` bool)."""
        ...


_Answer = TypeVar("_Answer")


def _ask(what: str, call: Callable[[], _Answer]) -> _Answer:
    """``call()``, with the client's failures turned into one ``ScoringError``."""
    try:
        return call()
    except LatentSieveError as exc:
        raise ScoringError(
            f"the LatentSieve service refused {what}: HTTP {exc.status}: {redact(str(exc.detail))}"
        ) from exc
    except httpx.HTTPError as exc:
        raise ScoringError(
            f"the LatentSieve service did not answer {what} ({type(exc).__name__}: "
            f"{redact(str(exc)) or 'no detail'}); is `latentsieve serve` running at the "
            f"client's address?"
        ) from exc


class ServiceScorer:
    """Scores through ``POST /score`` of a running service: one request per group of G.

    Built from a typed client and a served model's name; construction asks ``GET /models``, so
    a service that is down or does not serve ``model`` fails here, before any denoising, with a
    :class:`ScoringError`. ``sigma`` and ``policy`` override the index's defaults (docs/contract.md
    §3).
    """

    def __init__(
        self,
        client: LatentSieveClient,
        model: str,
        *,
        sigma: float | None = None,
        policy: Mapping[str, Any] | None = None,
    ) -> None:
        self.client = client
        self.model = model
        self.sigma = sigma
        self.policy = dict(policy) if policy is not None else None
        served = {info.name: info for info in _ask("GET /models", client.models)}
        if model not in served:
            raise ScoringError(
                f"model {model!r} is not served; served: {', '.join(sorted(served)) or 'none'}"
            )
        self.info: ModelInfo = served[model]
        shape = self.info.latent_shape
        self.dimension: int | None = math.prod(shape) if shape else None

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        """``latents (n, ...)`` -> ``log_density (n,)`` float64, nats."""
        return self.verdicts(latents)[0]

    def verdicts(self, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``latents (n, ...)`` -> (``log_density (n,)``, ``accept (n,)`` by the policy)."""
        answer = _ask(
            f"POST /score for model {self.model!r}",
            lambda: self.client.score(
                self.model, latents=latents, sigma=self.sigma, policy=self.policy
            ),
        )
        density = np.array([result.log_density for result in answer.results], dtype=np.float64)
        accept = np.array([result.accept for result in answer.results], dtype=bool)
        return density, accept


# --- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationCost:
    """What one group cost: ``denoiser_evaluations`` as counted (one per candidate per UNet
    forward, a guided pair counting one), the UNet forward calls they took, the images decoded,
    and wall seconds in all and in the scoring call."""

    denoiser_evaluations: int
    denoiser_calls: int
    decoded: int
    wall_s: float
    scoring_s: float


@dataclass(frozen=True)
class BestOfGResult:
    """One prompt's best-of-G generation.

    ``images`` is what ``pipe(..., output_type=output_type).images`` gives for the kept seeds,
    best first (a list of PIL images, an ``(M, H, W, C)`` array, an ``(M, C, H, W)`` tensor, or
    the final latents for ``"latent"``; an empty list when nothing was kept). ``latents`` are
    the kept final latents ``(M, *latent_shape)``. ``scores`` are the kept seeds'
    ``log_density`` (nats) as scored by the strategy; ``candidate_scores`` those of all G
    candidates in ``candidate_seeds`` order, and ``candidate_accepted`` the policy's verdicts
    when ``accepted_only`` asked for them.
    """

    prompt: str
    strategy: Strategy
    seeds: list[int]
    scores: np.ndarray
    images: Any
    latents: torch.Tensor
    candidate_seeds: list[int]
    candidate_scores: np.ndarray
    candidate_accepted: np.ndarray | None
    nsfw_content_detected: list[bool] | None
    cost: GenerationCost


# --- the denoising loop ------------------------------------------------------------------------


@dataclass
class _Candidates:
    """The live candidates: their seeds, CPU generators (which carry on into per-step noise, as
    in the plain pipeline) and current latents ``(n, *latent_shape)``."""

    seeds: list[int]
    generators: list[torch.Generator]
    latents: torch.Tensor

    def take(self, picks: Sequence[int]) -> _Candidates:
        """The candidates at positions ``picks`` (in that order), state and all."""
        index = torch.tensor(list(picks), dtype=torch.long, device=self.latents.device)
        return _Candidates(
            [self.seeds[i] for i in picks],
            [self.generators[i] for i in picks],
            self.latents.index_select(0, index),
        )


def _generator_argument(generators: list[torch.Generator]) -> Any:
    """One generator as the plain single-seed run passes it, several as a per-row list."""
    return generators[0] if len(generators) == 1 else generators


@dataclass
class DenoisingLoop:
    """Stable Diffusion's denoising loop over candidates of one prompt, counting the work."""

    pipe: Any
    guidance_scale: float
    eta: float
    batch_size: int | None
    latent_shape: tuple[int, ...]
    embeds: torch.Tensor  # (1, tokens, features), the prompt's
    negative: torch.Tensor | None  # the same for the negative prompt, when guided
    x0_from_step: bool = True  # False: compute it with _x0_from_alphas
    evaluations: int = 0
    calls: int = 0
    decoded: int = 0
    _conditioning: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def guided(self) -> bool:
        return self.negative is not None

    def chunks(self, count: int) -> Iterator[slice]:
        """Rows ``0..count-1`` in UNet/VAE calls of at most ``batch_size`` candidates."""
        size = count if self.batch_size is None else self.batch_size
        for start in range(0, count, max(size, 1)):
            yield slice(start, min(start + size, count))

    def conditioning(self, count: int) -> torch.Tensor:
        """``encoder_hidden_states`` for ``count`` candidates: ``[uncond x count, cond x count]``
        when guided, as the pipeline concatenates them."""
        if count not in self._conditioning:
            rows = self.embeds.repeat(count, 1, 1)
            if self.negative is not None:
                rows = torch.cat([self.negative.repeat(count, 1, 1), rows])
            self._conditioning[count] = rows
        return self._conditioning[count]

    def start(self, seeds: Sequence[int]) -> tuple[_Candidates, torch.Tensor]:
        """Each seed's starting noise as diffusers draws it (``randn_tensor`` with one CPU
        generator per seed, the pipeline's latent shape and dtype): the candidates (times the
        scheduler's ``init_noise_sigma``, set by ``set_timesteps``) and the unscaled draws."""
        from diffusers.utils.torch_utils import randn_tensor

        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        draws = randn_tensor(
            (len(seeds), *self.latent_shape), generator=_generator_argument(generators),
            device=self.pipe.device, dtype=self.embeds.dtype,
        )
        latents = draws * self.pipe.scheduler.init_noise_sigma
        return _Candidates(list(seeds), generators, latents), draws

    def denoise(
        self, live: _Candidates, timesteps: torch.Tensor, want_x0: bool = False
    ) -> torch.Tensor | None:
        """Run ``timesteps`` on ``live`` (its latents move on); with ``want_x0`` the
        x0-prediction of the last step ``(n, *latent_shape)``, else None."""
        scheduler, x0 = self.pipe.scheduler, None
        accepted = inspect.signature(scheduler.step).parameters
        for index, t in enumerate(timesteps):
            noise = torch.cat([self._predict(live.latents[rows], t) for rows in
                               self.chunks(len(live.seeds))])
            extra: dict[str, Any] = {}
            if "eta" in accepted:
                extra["eta"] = self.eta
            if "generator" in accepted:
                extra["generator"] = _generator_argument(live.generators)
            out = scheduler.step(noise, t, live.latents, **extra)
            if want_x0 and index == len(timesteps) - 1:
                x0 = out.pred_original_sample if self.x0_from_step else _x0_from_alphas(
                    scheduler, noise, t, live.latents
                )
            live.latents = out.prev_sample
            self.evaluations += len(live.seeds)
        return x0

    def _predict(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The guided noise prediction for a chunk of candidates, as the pipeline forms it."""
        model_input = torch.cat([latents] * 2) if self.guided else latents
        model_input = self.pipe.scheduler.scale_model_input(model_input, t)
        noise = self.pipe.unet(
            model_input, t, encoder_hidden_states=self.conditioning(latents.shape[0])
        ).sample
        self.calls += 1
        if self.guided:
            uncond, cond = noise.chunk(2)
            noise = uncond + self.guidance_scale * (cond - uncond)
        return cast(torch.Tensor, noise)

    def decode(self, live: _Candidates, output_type: str) -> tuple[Any, list[bool] | None]:
        """``vae.decode``, the safety checker when the pipeline has one, then
        ``image_processor.postprocess``, per chunk as the plain run does per image."""
        if output_type == "latent":
            return live.latents, None
        pipe = self.pipe
        images: list[torch.Tensor] = []
        flagged: list[bool] | None = None  # stays None without a safety checker, as in pipe()
        checker = getattr(pipe, "run_safety_checker", None)
        for rows in self.chunks(len(live.seeds)):
            chunk = live.latents[rows] / pipe.vae.config.scaling_factor
            image = pipe.vae.decode(
                chunk, return_dict=False, generator=_generator_argument(live.generators[rows])
            )[0]
            if checker is not None:
                image, nsfw = checker(image, pipe.device, self.embeds.dtype)
                if nsfw is not None:
                    flagged = [*(flagged or []), *(bool(flag) for flag in nsfw)]
            images.append(image)
            self.decoded += image.shape[0]
        denormalize = [True] * len(live.seeds) if flagged is None else [not f for f in flagged]
        result = pipe.image_processor.postprocess(
            torch.cat(images), output_type=output_type, do_denormalize=denormalize
        )
        return result, flagged


def _x0_from_alphas(
    scheduler: Any, model_output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor
) -> torch.Tensor:
    """x0 from the scheduler's own ``alphas_cumprod`` (``a = alpha_bar_t``): epsilon
    ``(x - sqrt(1 - a) eps) / sqrt(a)``, v ``sqrt(a) x - sqrt(1 - a) v``, sample as given; as
    DDIM computes ``pred_original_sample``."""
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction == "sample":
        return model_output
    alpha = scheduler.alphas_cumprod[int(t)].to(sample.device)
    beta = 1 - alpha
    if prediction == "epsilon":
        return cast(torch.Tensor, (sample - beta ** (0.5) * model_output) / alpha ** (0.5))
    return cast(torch.Tensor, alpha**0.5 * sample - beta**0.5 * model_output)


# --- checks before any work --------------------------------------------------------------------


def pipeline_latent_shape(pipe: Any, height: int | None, width: int | None) -> tuple[int, ...]:
    """``(channels, height / f, width / f)`` as ``StableDiffusionPipeline`` derives it."""
    missing = [name for name in ("unet", "scheduler", "vae", "encode_prompt", "vae_scale_factor",
                                 "image_processor") if not hasattr(pipe, name)]
    if missing:
        raise ValueError(
            f"{type(pipe).__name__} is not a Stable Diffusion-like pipeline: it has no "
            f"{', '.join(missing)}"
        )
    config = pipe.unet.config
    extra = [name for name in ("time_cond_proj_dim", "addition_embed_type")
             if getattr(config, name, None) is not None]
    if extra:
        raise ValueError(
            f"{type(pipe).__name__}'s UNet takes more than the prompt ({', '.join(extra)}: "
            f"SDXL's added conditions or LCM's guidance embedding); this integration reproduces "
            f"Stable Diffusion 1.x/2.x's denoising loop only"
        )
    size = config.sample_size
    rows, cols = (size, size) if isinstance(size, int) else (size[0], size[1])
    factor = int(pipe.vae_scale_factor)
    height = height or rows * factor
    width = width or cols * factor
    if height % factor or width % factor:
        raise ValueError(
            f"height and width must be multiples of the VAE's scale factor {factor}, got "
            f"{height} x {width}"
        )
    return (int(config.in_channels), height // factor, width // factor)


def scheduler_gives_x0(scheduler: Any, steps: int, latent_shape: tuple[int, ...]) -> bool:
    """Whether ``scheduler.step`` returns ``pred_original_sample`` (probed on a copy, so the
    pipeline's scheduler is untouched); False when the ``alphas_cumprod`` formula will stand in
    for it; a ``ValueError`` when neither is available."""
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(steps)
    t = probe.timesteps[0]
    sample = probe.scale_model_input(torch.zeros((1, *latent_shape)), t)
    extra: dict[str, Any] = {}
    if "generator" in inspect.signature(probe.step).parameters:
        extra["generator"] = torch.Generator("cpu").manual_seed(0)
    out = probe.step(torch.zeros_like(sample), t, sample, **extra)
    if getattr(out, "pred_original_sample", None) is not None:
        return True
    name = type(scheduler).__name__
    prediction = dict(getattr(scheduler, "config", {})).get("prediction_type", "epsilon")
    if getattr(scheduler, "alphas_cumprod", None) is None or prediction not in _PREDICTIONS:
        raise ValueError(
            f"prefix:K needs the x0-prediction at step K, and {name} gives none: its step() "
            f"returns no pred_original_sample and it has no alphas_cumprod (with an epsilon, "
            f"v_prediction or sample prediction type) to compute it from"
        )
    if float(scheduler.init_noise_sigma) != 1.0:
        raise ValueError(
            f"prefix:K needs the x0-prediction at step K, and {name} gives none: its step() "
            f"returns no pred_original_sample and its latents are scaled by sigmas "
            f"(init_noise_sigma {float(scheduler.init_noise_sigma):g}), not by alphas_cumprod"
        )
    return False


def check_shrinkable(scheduler: Any, strategy: Strategy) -> None:
    names = {cls.__name__ for cls in type(scheduler).__mro__}
    if not names & SHRINKABLE_SCHEDULERS:
        raise ValueError(
            f"strategy {strategy} cannot continue a shrunken batch with {type(scheduler).__name__}:"
            f" it keeps per-batch state between steps (a multistep history or a second-order half"
            f" step) that would not follow the survivors; use preview:S or final with it, or one"
            f" of {', '.join(sorted(SHRINKABLE_SCHEDULERS))} for prefix:K"
        )


def check_request(
    strategy: Strategy, seeds: list[int], keep: int, steps: int, batch_size: int | None,
    output_type: str,
) -> None:
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep (M) must be a whole number >= 1, got {keep!r}")
    if len(seeds) < keep:
        raise ValueError(
            f"keep (M = {keep}) must not exceed the number of candidate seeds (G = {len(seeds)})"
        )
    if len(set(seeds)) != len(seeds):
        raise ValueError("candidate seeds must be distinct (a repeated seed is the same image)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps (T) must be a whole number >= 1, got {steps!r}")
    strategy.check_steps(steps)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or a whole number >= 1, got {batch_size!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got "
                         f"{output_type!r}")


# --- best of G ---------------------------------------------------------------------------------


def score_group(
    scorer: LatentScorer, latents: torch.Tensor, accepted_only: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """One scoring call for the group: (log densities (G,), accept (G,) or None)."""
    batch = np.ascontiguousarray(latents.detach().to("cpu", torch.float32).numpy())
    try:
        if accepted_only:
            density, accept = cast(PolicyScorer, scorer).verdicts(batch)
        else:
            density, accept = scorer(batch), None
    except ScoringError:
        raise
    except Exception as exc:  # an in-process scorer may raise anything: one error type out
        raise ScoringError(
            f"scoring {len(batch)} candidate latents failed: {type(exc).__name__}: "
            f"{redact(str(exc))}"
        ) from exc
    density = np.asarray(density, dtype=np.float64).reshape(-1)
    if density.shape != (len(batch),) or (accept is not None and np.shape(accept) != density.shape):
        raise ScoringError(
            f"the scorer answered {density.shape[0]} scores for {len(batch)} candidate latents"
        )
    return density, (None if accept is None else np.asarray(accept, dtype=bool))


def ranked(density: np.ndarray, accept: np.ndarray | None, keep: int) -> list[int]:
    """Positions of the best ``keep`` candidates, best first (ties: the earlier seed); only
    accepted ones when ``accept`` is given."""
    order = np.lexsort((np.arange(len(density)), -np.nan_to_num(density, nan=-np.inf)))
    if accept is not None:
        order = order[accept[order]]
    return [int(i) for i in order[:keep]]


def best_of_g(
    pipe: Any,
    prompt: str,
    scorer: LatentScorer,
    strategy: str | Strategy,
    *,
    seeds: Sequence[int],
    keep: int,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    eta: float = 0.0,
    output_type: str = "pil",
    accepted_only: bool = False,
    batch_size: int | None = 1,
) -> BestOfGResult:
    """Generate ``prompt`` from the G candidate ``seeds`` and keep the best ``keep`` (M).

    ``pipe`` is a Stable Diffusion-like diffusers pipeline (module docstring); the remaining
    settings mean what they mean to ``pipe(...)``, and each kept image equals
    ``pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), ...)`` with them. The
    candidates are scored once, in one call of ``scorer``, where ``strategy`` says; the best M
    by ``log_density`` (only policy-accepted ones with ``accepted_only``, which needs a
    :class:`PolicyScorer`; then fewer than M may be kept) are finished and decoded.
    ``batch_size``: candidates per UNet/VAE call; 1 is bit-identical to single-seed runs, None
    puts all live candidates in one call (module docstring).

    Bad input raises one ``ValueError`` before anything runs; a scorer that fails raises
    :class:`ScoringError`. The pipeline is left as ``pipe(...)`` leaves it.
    """
    started = time.perf_counter()
    plan = parse_strategy(strategy) if isinstance(strategy, str) else strategy
    if not isinstance(plan, Strategy):
        raise ValueError(f"strategy must be a string or a Strategy, got {strategy!r}")
    candidates = [int(seed) for seed in seeds]
    check_request(plan, candidates, keep, num_inference_steps, batch_size, output_type)
    latent_shape = pipeline_latent_shape(pipe, height, width)
    x0_from_step = True
    if plan.kind == "prefix":
        x0_from_step = scheduler_gives_x0(pipe.scheduler, num_inference_steps, latent_shape)
        check_shrinkable(pipe.scheduler, plan)
    if accepted_only and not isinstance(scorer, PolicyScorer):
        raise ValueError(
            "accepted_only needs a scorer that applies a policy (one with verdicts(), such as "
            f"ServiceScorer); {type(scorer).__name__} only gives log densities"
        )
    dimension = getattr(scorer, "dimension", None)
    if dimension is not None and dimension != math.prod(latent_shape):
        raise ValueError(
            f"the scorer's index takes latents of {dimension} values, the pipeline makes "
            f"{'x'.join(map(str, latent_shape))} = {math.prod(latent_shape)} at this height "
            f"and width: build the index from this pipeline's latents"
        )

    with torch.no_grad():
        device = pipe.device
        guided = guidance_scale > 1.0
        embeds, negative = pipe.encode_prompt(prompt, device, 1, guided, negative_prompt)
        loop = DenoisingLoop(pipe, guidance_scale, eta, batch_size, latent_shape, embeds,
                     negative if guided else None, x0_from_step)
        scheduler = pipe.scheduler
        if plan.kind == "preview":
            scheduler.set_timesteps(cast(int, plan.steps), device=device)
        else:
            scheduler.set_timesteps(num_inference_steps, device=device)
        group, draws = loop.start(candidates)

        if plan.kind == "noise":
            scored = draws
        elif plan.kind == "prefix":
            prefix = scheduler.timesteps[: plan.steps]
            scored = cast(torch.Tensor, loop.denoise(group, prefix, want_x0=True))
        else:
            loop.denoise(group, scheduler.timesteps)
            scored = group.latents
        scoring_started = time.perf_counter()
        density, accept = score_group(scorer, scored, accepted_only)
        scoring_s = time.perf_counter() - scoring_started
        picks = ranked(density, accept, keep)

        if plan.kind == "preview":
            scheduler.set_timesteps(num_inference_steps, device=device)
            survivors, _ = loop.start([candidates[i] for i in picks])
        else:
            survivors = group.take(picks)
        if picks and plan.kind in ("noise", "preview"):
            loop.denoise(survivors, scheduler.timesteps)
        elif picks and plan.kind == "prefix":
            loop.denoise(survivors, scheduler.timesteps[plan.steps:])
        images, nsfw = loop.decode(survivors, output_type) if picks else ([], None)

    cost = GenerationCost(
        denoiser_evaluations=loop.evaluations, denoiser_calls=loop.calls, decoded=loop.decoded,
        wall_s=time.perf_counter() - started, scoring_s=scoring_s,
    )
    return BestOfGResult(
        prompt=prompt, strategy=plan, seeds=survivors.seeds, scores=density[picks],
        images=images, latents=survivors.latents, candidate_seeds=candidates,
        candidate_scores=density, candidate_accepted=accept, nsfw_content_detected=nsfw,
        cost=cost,
    )
