"""The ``latentsieve`` command line (docs/contract.md §4).

Every option falls back to an environment variable ``LATENTSIEVE_<OPTION>`` (``--store`` ->
``LATENTSIEVE_STORE``), which its ``--help`` names. ``serve`` and ``worker`` take their options
from the settings models the processes read (workers/settings.py): the model gives each
option's name, help, default, choices and variable, and validates the values. Errors print one
line on stderr and exit with status 2; nothing is written to the store on error.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import (
    TYPE_CHECKING,
    Any,
    Literal,
    Protocol,
    TypeVar,
    Union,
    get_args,
    get_origin,
)

import numpy as np

from latentsieve.index.errors import StoreError
from latentsieve.index.kinds import BUILD_KINDS, KINDS, RETIRED
from latentsieve.index.manifest import check_sigma

if TYPE_CHECKING:
    from pydantic import ValidationError

    from latentsieve.index.build import DescriptorOptions
    from latentsieve.index.manifest import Policy
    from latentsieve.workers.settings import ProcessSettings

log = logging.getLogger("latentsieve")

# Imported by the server commands and not by the client install (pyproject's cpu/gpu/demo/report
# extras), with the extra that brings each one when it is not ``cpu``.
SERVER_MODULES = frozenset({
    "torch", "faiss", "fastapi", "starlette", "uvicorn", "redis", "prometheus_client", "orjson",
    "pybase64", "safetensors", "tqdm", "pydantic_settings", "sklearn", "matplotlib", "PIL",
})
EXTRA_OF_MODULE = {"sklearn": "demo", "matplotlib": "report", "PIL": "report"}
# Distributions that each install the module ``faiss``: one at a time.
FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12")
MAX_CLI_SEEDS = 10_000_000
_Process = TypeVar("_Process", bound="ProcessSettings")


class CliError(Exception):
    """A user error reported as one line."""


class Options(Protocol):
    """Where an option goes: a parser or one of its mutually exclusive groups."""

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action: ...


def _env_name(option: str) -> str:
    return "LATENTSIEVE_" + option.upper().replace("-", "_")


def _env(option: str, names: Sequence[str] = ()) -> str | None:
    """The value of the first of ``names`` (default: the option's LATENTSIEVE_<OPTION>) that
    is set."""
    names = names or (_env_name(option),)
    return next((os.environ[name] for name in names if name in os.environ), None)


def _add(
    parser: Options,
    option: str,
    help: str = "",
    *,
    env: Sequence[str] = (),
    shown: str | None = None,
    listed: Sequence[str] = (),
    **kwargs: object,
) -> None:
    """An option whose default comes from its variable (``env``: the names read, the first
    one set winning; default LATENTSIEVE_<OPTION>); its help says its default (``shown`` when
    the real one is decided later, e.g. by the build), its variable and its choices (argparse's
    ``choices``, or ``listed`` for values the command checks itself, so that a wrong one gets
    the command's own one-line error)."""
    value = _env(option, env)
    required = bool(kwargs.get("required"))
    if kwargs.get("action") == "store_true":
        kwargs["default"] = (value or "").lower() in ("1", "true", "yes")
    elif value is not None:
        kwargs["default"] = value
        kwargs.pop("required", None)
    notes = []
    choices = listed or kwargs.get("choices") or ()
    if choices:
        notes.append("choices: " + ", ".join(map(str, choices)))  # type: ignore[call-overload]
    if required:
        notes.append("required")
    else:
        default = kwargs.get("default")
        if value is None and shown is not None:
            default = shown
        elif isinstance(default, bool):
            default = "on" if default else "off"
        notes.append(f"default: {'none' if default is None else default}")
    notes.append(f"env: {env[0] if env else _env_name(option)}")
    text = f"{help} [{'; '.join(notes)}]" if help else f"[{'; '.join(notes)}]"
    parser.add_argument(f"--{option}", help=text, **kwargs)


class _DeprecatedFlag(argparse.Action):
    """An option's old name: sets the option and leaves a note that ``main`` logs once
    logging is set up (docs/contract.md, migration notes)."""

    def __init__(self, option_strings: list[str], dest: str, instead: str,
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.instead = instead

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.deprecated = [*getattr(namespace, "deprecated", []),
                                (option_string, self.instead)]


def _settings_options(parser: argparse.ArgumentParser, model: type[ProcessSettings]) -> None:
    """The options of ``serve`` or ``worker``: one per field of ``model`` marked ``Option``,
    with the field's description, default, choices and variables (workers/settings.py)."""
    from latentsieve.workers.settings import option_of, variables

    for name, field in model.model_fields.items():
        option = option_of(field)
        if option is None:
            continue
        kind = field.annotation
        if get_origin(kind) in (Union, UnionType):  # X | None: an X
            kind = next(arg for arg in get_args(kind) if arg is not type(None))
        kwargs: dict[str, Any] = (
            {"required": True} if field.is_required() else {"default": field.get_default()}
        )
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(kind) is Literal:
            kwargs["choices"] = get_args(kind)
        elif kind in (int, float):
            kwargs["type"] = kind
        flag = option.flag_of(name)
        _add(parser, flag[2:], field.description or "", env=variables(model, name),
             shown=option.shown, **kwargs)
        value = {key: kwargs[key] for key in ("type", "choices") if key in kwargs}
        for old in option.deprecated:
            parser.add_argument(f"--{old}", dest=_dest(flag), action=_DeprecatedFlag,
                                instead=flag, help=argparse.SUPPRESS, **value)


def _dest(flag: str) -> str:
    """argparse's attribute for ``--flag``."""
    return flag.removeprefix("--").replace("-", "_")


def _settings(model: type[_Process], args: argparse.Namespace) -> _Process:
    """``serve``'s or ``worker``'s settings: each option's value (its flag, else its variable,
    else its default) over the rest of the environment; values the model refuses are one line
    naming each option and its variable."""
    from pydantic import ValidationError

    from latentsieve.workers.settings import option_of

    values = {}
    for name, field in model.model_fields.items():
        option = option_of(field)
        if option is not None:
            values[name] = getattr(args, _dest(option.flag_of(name)))
    try:
        return model(**values)
    except ValidationError as exc:
        raise CliError(_refused(model, exc)) from exc


def _refused(model: type[ProcessSettings], exc: ValidationError) -> str:
    """A settings model's ValidationError as one line, e.g. ``--port (LATENTSIEVE_PORT): input
    should be less than or equal to 65535, got 70000``."""
    from latentsieve.redaction import redact
    from latentsieve.workers.settings import option_of, variables

    problems = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        name = str(error["loc"][0]) if error["loc"] else ""
        if name not in model.model_fields:  # a rule over several fields
            problems.append(message)
            continue
        option = option_of(model.model_fields[name])
        where = variables(model, name)[0]
        if option is not None:
            where = f"{option.flag_of(name)} ({where})"
        got = "" if error["type"] == "missing" else f", got {error['input']!r}"
        problems.append(f"{where}: {message[:1].lower()}{message[1:]}{got}")
    return redact("; ".join(problems))


def faiss_conflict(installed: Iterable[str]) -> str | None:
    """A one-line refusal when several FAISS builds are installed (they overwrite each other's
    ``faiss`` module, so which one loads is an accident); None when at most one is."""
    names = {name.lower().replace("_", "-") for name in installed}
    builds = sorted(names & set(FAISS_DISTRIBUTIONS))
    if len(builds) < 2:
        return None
    return (f"several FAISS builds are installed ({', '.join(builds)}); they share the module "
            "'faiss'. Keep one: pip uninstall the others, then reinstall it "
            "(latentsieve[cpu] or latentsieve[gpu], never both)")


def check_faiss_install() -> None:
    from importlib.metadata import distributions

    problem = faiss_conflict(dist.metadata["Name"] or "" for dist in distributions())
    if problem:
        raise CliError(problem)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("latentsieve")
    except PackageNotFoundError:  # a checkout on sys.path without an install
        from latentsieve import __version__

        return __version__


def parse_seed_range(text: str) -> range:
    """``A-B`` (inclusive) or a single seed ``A``; seeds lie in [0, 2^64)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not match:
        raise CliError(f"--seeds must look like A-B (e.g. 0-99), got {text!r}")
    start = int(match.group(1))
    stop = int(match.group(2)) if match.group(2) is not None else start
    if stop < start:
        raise CliError(f"--seeds {text!r}: the end {stop} is before the start {start}")
    if stop >= 2**64:
        raise CliError(f"--seeds {text!r}: seeds must be < 2^64")
    return range(start, stop + 1)


def parse_descriptor_names(text: str | None, policy: Policy) -> set[str]:
    """``psi,nu`` -> the names asked for, plus those the policy has bounds on."""
    from latentsieve.index.manifest import DESCRIPTOR_NAMES

    names = {name.strip() for name in (text or "").split(",") if name.strip()}
    unknown = names - set(DESCRIPTOR_NAMES)
    if unknown:
        raise CliError(
            f"unknown descriptor(s) {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(DESCRIPTOR_NAMES)}"
        )
    return names | set(policy.needed_descriptors())


DEVICES = "auto (CUDA when PyTorch sees it, else the CPU), cpu, cuda or cuda:I"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentsieve", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _add(parser, "log-level", default="warning",
         choices=("debug", "info", "warning", "error", "critical"),
         help="JSON log lines on stderr at this level and above")
    commands = parser.add_subparsers(dest="command", required=True)

    index = commands.add_parser("index", help="build and list index versions")
    index_commands = index.add_subparsers(dest="index_command", required=True)
    build = index_commands.add_parser("build", help="build a new immutable index version")
    _add(build, "store", required=True, help="the store folder")
    _add(build, "model", required=True, help="the model's name")
    _add(build, "latents", required=True, help=".npy, .pt/.pth or .safetensors, shape (N, ...)")
    _add(build, "sigma", default="auto", help="a bandwidth > 0, or 'auto' (kNN median)")
    _add(build, "kind", default="flat", listed=BUILD_KINDS,
         help="; ".join(kind.help for kind in KINDS.values())
              + "".join(f" ({name} is retired)" for name in RETIRED))
    _add(build, "pca", type=int, default=None, help="project onto the top DIM principal axes")
    _add(build, "space", default=None, listed=("raw", "active", "standardized"),
         shown="active",
         help="active drops coordinates the training latents barely vary in; standardized "
              "also scales each to unit sd; see docs/evidence.md")
    _add(build, "active-threshold", type=float, default=None, shown="0.1",
         help="a coordinate is active when its variance is >= this x the reference")
    _add(build, "latent-set", default=None,
         help="what the latents are (e.g. encoder-means, ddim-inversions), recorded")
    _add(build, "bandwidth-neighbours", type=int, default=None, shown="1",
         help="k of --sigma auto: median distance to the k-th nearest training latent")
    _add(build, "storage", default="float32", listed=("float32", "float16"),
         help="ivf: precision of the stored latents (as offsets from their list's mean)")
    _add(build, "max-error", type=float, default=None, shown="0.01",
         help="ivf: nats, the bound of a score whose request names none")
    _add(build, "nlist", type=int, default=None, shown="auto",
         help="ivf: lists (auto: a power of two near 2 sqrt(N), within a memory budget)")
    _add(build, "shards", type=int, default=1,
         help="split a flat index into K row-disjoint shards (workers serve them apart)")
    _add(build, "sampler", default=None,
         help="torch-cpu[:DTYPE][:SHAPE]: lets the model take seeds")
    _add(build, "generator", default=None, help="TorchScript file or package.module:factory")
    _add(build, "mapping", default=None, shown="identity",
         help="seed latent -> index space: TorchScript file or package.module:factory")
    _add(build, "calibration-count", type=int, default=None, shown="10000",
         help="sampler draws that calibrate percentiles")
    _add(build, "calibration-latents", default=None, shown="none",
         help="FILE of latents as your pipeline sends them (e.g. x0-predictions at step K): "
              "percentiles are calibrated on these instead of sampler draws")
    _add(build, "min-percentile", type=float, default=None, shown="0.05",
         help="the default policy's lowest accepted percentile")
    _add(build, "policy", default=None,
         help='the whole default policy as JSON, e.g. \'{"min_percentile": 0.05, '
              '"psi": {"max_percentile": 0.9}}\'')
    _add(build, "descriptor-calibration-count", type=int, default=None, shown="1000",
         help="latents whose psi/nu/delta calibrate descriptor percentiles")
    _add(build, "projection-rows", type=int, default=None, shown="120", help="m of P")
    _add(build, "projection-seed", type=int, default=None, shown="0",
         help="seed of P and of the delta directions")
    _add(build, "delta-directions", type=int, default=None, shown="8", help="P of delta")
    _add(build, "delta-radius", type=float, default=None, shown="0.1 sqrt(E)", help="r of delta")
    _add(build, "no-progress", action="store_true", help="no progress bar")

    listing = index_commands.add_parser("list", help="list models and versions")
    _add(listing, "store", required=True, help="the store folder")

    score = commands.add_parser("score", help="offline batch scoring, same results as /score")
    _add(score, "store", required=True, help="the store folder")
    _add(score, "model", required=True, help="the model's name")
    from_env = _env("latents") is not None or _env("seeds") is not None
    source = score.add_mutually_exclusive_group(required=not from_env)
    _add(source, "latents", default=None, help="FILE (.npy, .pt/.pth, .safetensors); or --seeds")
    _add(source, "seeds", default=None, help="A-B, inclusive; or --latents")
    _add(score, "sigma", type=float, default=None, shown="the index's",
         help="bandwidth (percentiles are recalibrated at it)")
    _add(score, "max-error", type=float, default=None, shown="the index's",
         help="ivf: nats, the largest error_bound accepted (exact kinds meet any)")
    _add(score, "out", default=None, shown="JSON on stdout", help="FILE.json or FILE.npy")
    _add(score, "descriptors", default=None, help="comma-separated: psi,nu,delta")
    _add(score, "device", default="auto", help=DEVICES)

    process_help = {
        "serve": "run the HTTP gateway",
        "worker": "a scoring worker: computes the gateways' jobs from Redis Streams",
    }
    try:
        from latentsieve.service.settings import Settings
        from latentsieve.workers.settings import WorkerOptions
    except ModuleNotFoundError as missing:  # the client install: main says what to install
        for name, text in process_help.items():
            # "+" as the only prefix: every word after the command is an argument, none unknown
            command = commands.add_parser(name, help=text, prefix_chars="+")
            command.add_argument("given", nargs="*")
            command.set_defaults(missing=missing)
    else:
        _settings_options(commands.add_parser("serve", help=process_help["serve"]), Settings)
        _settings_options(commands.add_parser("worker", help=process_help["worker"]),
                          WorkerOptions)

    report = commands.add_parser(
        "report", help="evidence page: does rejecting low scores keep better samples?"
    )
    _add(report, "store", required=True, help="the store folder")
    _add(report, "model", required=True, help="the model's name")
    _add(report, "out", required=True, help="folder for index.html and report.json")
    _add(report, "seeds", default=None, shown="0-1999", help="A-B, inclusive")
    _add(report, "quality", default=None, help="CSV 'seed,quality': your own per-seed quality")
    _add(report, "bootstrap", type=int, default=1000, help="bootstrap resamples")
    _add(report, "no-progress", action="store_true", help="no progress bar")

    study = commands.add_parser(
        "study", help="what each best-of-G strategy buys on your own diffusers pipeline"
    )
    scored_by = study.add_mutually_exclusive_group(
        required=_env("store") is None and _env("url") is None
    )
    _add(scored_by, "store", default=None, help="score in process over this store; or --url")
    _add(scored_by, "url", default=None, help="score through a running service; or --store")
    _add(study, "api-key", default=None, help="--url: the service's API key")
    _add(study, "model", default=None, shown="digits-ldm for --pipeline digits-ldm",
         help="the index built from the pipeline's latents (required for your own pipeline)")
    _add(study, "pipeline", default="digits-ldm",
         help="digits-ldm (the bundled model) or package.module:factory returning a diffusers "
              "pipeline")
    _add(study, "prompts", default=None, shown="one empty prompt",
         help="FILE, one prompt per line (blank lines skipped); group g renders prompt g mod P")
    _add(study, "groups", type=int, default=50, help="N groups of candidates")
    _add(study, "group-size", type=int, default=16, help="G candidates per group")
    _add(study, "keep", type=int, default=4, help="M kept per group")
    _add(study, "seeds", default=None, shown="100000 onward, N x G seeds",
         help="A-B, inclusive: group g uses the G seeds from A + g*G")
    _add(study, "strategies", default="noise,prefix:10,preview:10,final",
         help="comma-separated: noise, prefix:K, preview:S, final")
    _add(study, "steps", type=int, default=25, help="T inference steps")
    _add(study, "guidance-scale", type=float, default=None,
         shown="1.0 for digits-ldm, else 7.5", help="classifier-free guidance")
    _add(study, "quality", default=None, shown="digits-ldm: the digits classifier's confidence",
         help="package.module:fn (fn(images, prompts) -> scores or (scores, labels)) or a CSV "
              "'seed,quality' covering every candidate seed")
    _add(study, "training-latents", default=None, shown="the store's index",
         help="FILE of the index's training latents for the baselines (needed with --url)")
    _add(study, "out", required=True, help="folder for study.json, study.html, candidates.csv")
    _add(study, "bootstrap", type=int, default=1000, help="bootstrap resamples over groups")
    _add(study, "bootstrap-seed", type=int, default=0, help="seed of the bootstrap resamples")
    _add(study, "device", default="auto", help=f"--store: where scores compute; {DEVICES}")
    _add(study, "no-progress", action="store_true", help="no progress bar")

    demo = commands.add_parser(
        "demo", help="build the bundled demo indexes (digits-vae, digits-ldm) if missing"
    )
    _add(demo, "store", default="store", help="the store folder")
    _add(demo, "seeds", default="0-7", help="seeds to score once it is built")
    return parser


def _build(args: argparse.Namespace) -> int:
    from latentsieve.index.bandwidth import AUTO_K
    from latentsieve.index.build import (
        DEFAULT_CALIBRATION_COUNT,
        BuildOptions,
        build_version,
    )
    from latentsieve.index.manifest import DEFAULT_MAX_ERROR, Policy
    from latentsieve.index.projection import ACTIVE_THRESHOLD
    from latentsieve.index.store import LatentStore
    from latentsieve.workers.calibration import calibrate_build, draw_mapped_queries

    options = BuildOptions(
        model=args.model,
        latents_file=Path(args.latents),
        sigma=args.sigma,
        kind=args.kind,
        pca=int(args.pca) if args.pca is not None else None,
        space=args.space,
        active_threshold=float(
            args.active_threshold if args.active_threshold is not None else ACTIVE_THRESHOLD
        ),
        latent_set=args.latent_set,
        bandwidth_neighbours=_whole(args.bandwidth_neighbours, AUTO_K),
        sampler=args.sampler,
        generator=args.generator,
        mapping=args.mapping,
        calibration_count=int(args.calibration_count or DEFAULT_CALIBRATION_COUNT),
        calibration_latents=(
            Path(args.calibration_latents) if args.calibration_latents else None
        ),
        min_percentile=float(
            args.min_percentile
            if args.min_percentile is not None
            else Policy().min_percentile
        ),
        policy=_policy(args.policy, args.min_percentile),
        descriptors=_descriptor_options(args),
        shards=_whole(args.shards, 1),
        storage=args.storage,
        max_error=float(args.max_error if args.max_error is not None else DEFAULT_MAX_ERROR),
        nlist=int(args.nlist) if args.nlist is not None else None,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    folder = build_version(
        LatentStore(args.store), options, calibrate_build, draw_mapped_queries
    )
    print(json.dumps({"model": options.model, "version": folder.name, "path": str(folder)}))
    return 0


def _policy(text: str | None, min_percentile: float | None) -> Policy | None:
    """``--policy JSON`` as a Policy (None when not given); refused with --min-percentile."""
    from pydantic import ValidationError

    from latentsieve.index.manifest import Policy

    if text is None:
        return None
    if min_percentile is not None:
        raise CliError("--policy and --min-percentile both set the policy; give one")
    try:
        return Policy.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'policy'}: {error['msg']}"
            for error in exc.errors()
        )
        raise CliError(f"--policy {text!r}: {problems}") from exc


def _whole(value: str | int | None, default: int) -> int:
    return default if value is None else int(value)


def _descriptor_options(args: argparse.Namespace) -> DescriptorOptions:
    """The --descriptor-* and --projection-* options over the documented defaults."""
    from latentsieve.index.build import DescriptorOptions

    base = DescriptorOptions()
    return DescriptorOptions(
        calibration_count=_whole(args.descriptor_calibration_count, base.calibration_count),
        projection_rows=_whole(args.projection_rows, base.projection_rows),
        projection_seed=_whole(args.projection_seed, base.projection_seed),
        delta_directions=_whole(args.delta_directions, base.delta_directions),
        delta_radius=None if args.delta_radius is None else float(args.delta_radius),
    )


def _list(args: argparse.Namespace) -> int:
    from latentsieve.index.store import LatentStore

    print(json.dumps(LatentStore(args.store).describe(), indent=2))
    return 0


def _score(args: argparse.Namespace) -> int:
    """Offline scoring through the service's own engine (embedded compute, no HTTP)."""
    import asyncio

    from latentsieve.index.latent_files import load_latents
    from latentsieve.index.store import LatentStore
    from latentsieve.service.engine import ScoreJob
    from latentsieve.service.errors import ServiceError
    from latentsieve.service.offline import offline_engine

    store = LatentStore(args.store)
    if args.model not in store.models():
        raise CliError(f"unknown model {args.model!r} in {args.store}; see 'index list'")
    manifest = store.read_manifest(args.model, store.newest(args.model) or "")
    seeds: range | None = None
    latents: np.ndarray | None = None
    if args.seeds is not None:
        seeds = parse_seed_range(args.seeds)
        if len(seeds) > MAX_CLI_SEEDS:
            raise CliError(f"--seeds: at most {MAX_CLI_SEEDS:,} seeds per run")
    else:
        raw = load_latents(args.latents, min_count=1)
        if tuple(raw.shape[1:]) != manifest.latent_shape and raw[0].size != manifest.dim:
            raise CliError(
                f"{args.latents}: latents of shape {tuple(raw.shape[1:])} do not match the "
                f"model's latent shape {manifest.latent_shape} ({manifest.dim} numbers)"
            )
        latents = raw.reshape(raw.shape[0], -1)
    sigma = None if args.sigma is None else check_sigma(args.sigma)
    names = sorted(parse_descriptor_names(args.descriptors, manifest.policy))
    max_error = None if args.max_error is None else float(args.max_error)
    if max_error is not None and not (math.isfinite(max_error) and max_error >= 0):
        raise CliError(f"--max-error must be a finite number >= 0 nats, got {args.max_error}")
    job = ScoreJob(model=args.model, latents=latents, seeds=seeds, sigma=sigma,
                   descriptors=names or None, max_error=max_error)

    async def run() -> Mapping[str, object]:
        async with offline_engine(Path(args.store), args.device, MAX_CLI_SEEDS) as engine:
            return await engine.score(job)

    try:
        report = asyncio.run(run())
    except ServiceError as exc:
        raise CliError(exc.detail) from exc
    results = report["results"]
    assert isinstance(results, list)
    _write_report(
        report,
        np.array([row["log_density"] for row in results], dtype=np.float64),
        np.array([row["percentile"] for row in results], dtype=np.float64),
        seeds, args.out,
    )
    return 0


def _write_report(
    report: Mapping[str, object],
    log_density: np.ndarray,
    percentile: np.ndarray,
    seeds: Sequence[int] | None,
    out: str | None,
) -> None:
    if out is None:
        print(json.dumps(report, indent=2))
        return
    path = Path(out)
    if path.suffix == ".json":
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    elif path.suffix == ".npy":
        results = report["results"]
        assert isinstance(results, list)
        table = np.zeros(
            len(results),
            dtype=[("seed", "u8"), ("log_density", "f8"), ("percentile", "f8"), ("accept", "?")],
        )
        table["seed"] = list(seeds) if seeds is not None else np.arange(len(results))
        table["log_density"] = log_density
        table["percentile"] = percentile
        table["accept"] = [bool(result["accept"]) for result in results]
        np.save(path, table)
    else:
        raise CliError(f"--out must end in .json or .npy, got {out!r}")


def _serve(args: argparse.Namespace) -> int:
    from latentsieve.service.main import run_server
    from latentsieve.service.settings import Settings

    run_server(_settings(Settings, args), log_level=args.log_level)
    return 0


def _worker(args: argparse.Namespace) -> int:
    import asyncio

    from latentsieve.workers import stream_worker
    from latentsieve.workers.settings import WorkerOptions

    options = _settings(WorkerOptions, args)
    asyncio.run(stream_worker.run_worker(
        options, options.metrics_port, metrics_host=options.metrics_host
    ))
    return 0


def _report(args: argparse.Namespace) -> int:
    from latentsieve.report import ReportError, run_report

    seeds = parse_seed_range(args.seeds) if args.seeds is not None else None
    if seeds is not None and len(seeds) > 100_000:
        raise CliError("--seeds: at most 100,000 seeds per report")
    resamples = int(args.bootstrap)
    if not 10 <= resamples <= 100_000:
        raise CliError(f"--bootstrap must be between 10 and 100000, got {resamples}")
    try:
        numbers = run_report(
            Path(args.store), args.model, Path(args.out), seeds,
            Path(args.quality) if args.quality else None, resamples,
            progress=not args.no_progress,
        )
    except ReportError as exc:
        raise CliError(str(exc)) from exc
    print(json.dumps({"model": numbers["model"], "out": str(args.out),
                      "page": str(Path(args.out) / "index.html")}))
    return 0


def _study(args: argparse.Namespace) -> int:
    from latentsieve.study import StudyError, StudyOptions, run_study, write_study

    options = StudyOptions(
        pipeline=args.pipeline, out=Path(args.out),
        store=Path(args.store) if args.store else None, url=args.url or None,
        api_key=args.api_key, model=args.model,
        prompts_file=Path(args.prompts) if args.prompts else None,
        groups=int(args.groups), group_size=int(args.group_size), keep=int(args.keep),
        seeds=parse_seed_range(args.seeds) if args.seeds is not None else None,
        strategies=args.strategies, steps=int(args.steps),
        guidance_scale=None if args.guidance_scale is None else float(args.guidance_scale),
        quality=args.quality,
        training_latents=Path(args.training_latents) if args.training_latents else None,
        resamples=int(args.bootstrap), bootstrap_seed=int(args.bootstrap_seed),
        device=args.device, progress=not args.no_progress,
    )
    try:
        result = run_study(options)
    except StudyError as exc:
        raise CliError(str(exc)) from exc
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in ("diffusers", "transformers"):
            raise
        raise CliError(f"'study' needs {exc.name}, which this install lacks: pip install "
                       "'latentsieve[diffusers]'") from exc
    write_study(result, options.out)
    print(json.dumps({"pipeline": options.pipeline, "out": str(options.out),
                      "page": str(options.out / "study.html"),
                      "frontier": result.numbers["frontier"]}))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from latentsieve.demo import ensure_demo_indexes

    versions = ensure_demo_indexes(Path(args.store))
    print(json.dumps({"models": versions, "store": str(args.store)}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from latentsieve.logs import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    for old, instead in getattr(args, "deprecated", []):
        log.warning("deprecated option", extra={"option": old, "instead": instead})
    try:
        if getattr(args, "missing", None) is not None:
            raise args.missing
        check_faiss_install()
        if args.command == "index":
            return _build(args) if args.index_command == "build" else _list(args)
        if args.command == "score":
            return _score(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "report":
            return _report(args)
        if args.command == "study":
            return _study(args)
        return _worker(args)
    except ModuleNotFoundError as exc:
        module = (exc.name or "").partition(".")[0]
        if module not in SERVER_MODULES:
            raise
        extra = EXTRA_OF_MODULE.get(module, "cpu")
        print(f"latentsieve: error: '{args.command}' needs {exc.name}, which this install "
              f"lacks: pip install 'latentsieve[{extra}]'"
              + (" (or [gpu] on a CUDA host)" if extra == "cpu" else ""), file=sys.stderr)
        return 2
    except Exception as exc:
        from latentsieve.workers.modules import ModuleLoadError  # imported late: it brings in torch

        if not isinstance(exc, CliError | StoreError | ValueError | OSError | ModuleLoadError):
            raise
        print(f"latentsieve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
