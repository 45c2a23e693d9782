"""Request and response bodies of the HTTP API (docs/contract.md §3), and the strict JSON reader.

The response types are what the routers answer with and what the OpenAPI document is generated
from: ``ModelsResponse`` (a model, built and validated per request), the ``/score`` and
``/select`` body (``latentsieve.workers.score_body``: typed dicts, built by the engine as they
are written) and ``ErrorResponse`` (``latentsieve.service.errors``).

Latents arrive as a nested list (first axis = batch, the rest flattened) or as base64 of a
little-endian array; both are turned into one ``(n, d)`` float32 array here, the precision of
the index, so that the cache key and the score see the same numbers.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from typing import Annotated, Any, Literal, NotRequired, TypeVar

import numpy as np
import orjson
import pybase64
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    StrictInt,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
    with_config,
)
from pydantic_core import CoreSchema
from pydantic_core.core_schema import plain_serializer_function_ser_schema
from typing_extensions import TypedDict

from latentsieve.index.manifest import DESCRIPTOR_NAMES, SIGMA_MAX, SIGMA_MIN, Policy
from latentsieve.service.errors import ServiceError, describe_validation_errors
from latentsieve.workers.samplers import MAX_SEED

DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "float64": np.dtype("<f8"),
}

BodyT = TypeVar("BodyT", bound=BaseModel)


EXACT_FLOAT_INTEGERS = 2**53  # past it a float no longer holds every integer exactly


def _integral(value: Any) -> Any:
    """JSON Schema's ``integer`` includes numbers like ``2.0``: take those as the integer they
    are while a float holds it exactly (|x| <= 2^53); refuse 1.5 and larger floats."""
    if isinstance(value, float) and value.is_integer():
        if abs(value) > EXACT_FLOAT_INTEGERS:
            raise ValueError(
                f"{value:.6g} is past 2^53 as a decimal number; write it as an integer literal"
            )
        return int(value)
    return value


def _seed_in_range(value: Any) -> Any:
    # The JSON reader (orjson) reads integer literals past 64 bits as floats: name the range,
    # not the type, for those. 1.5 is refused as not an integer; 2.0 is the integer 2.
    if isinstance(value, float) and not -(2**63) <= value <= MAX_SEED:
        raise ValueError(f"seeds are integers in [0, {MAX_SEED}]; {value:.6g} is out of range")
    return _integral(value)


Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED), BeforeValidator(_seed_in_range)]
Count = Annotated[StrictInt, Field(ge=1, le=EXACT_FLOAT_INTEGERS), BeforeValidator(_integral)]
def _sigma_in_range(value: float) -> float:
    if not SIGMA_MIN <= value <= SIGMA_MAX:
        raise ValueError(f"sigma must be in [1e-100, 1e100] (a bandwidth > 0), got {value!r}")
    return value


Sigma = Annotated[
    float,
    Field(
        allow_inf_nan=False, strict=True,
        json_schema_extra={"minimum": SIGMA_MIN, "maximum": SIGMA_MAX},  # what validation holds
    ),
    AfterValidator(_sigma_in_range),
]


MaxError = Annotated[
    float,
    Field(
        ge=0.0, allow_inf_nan=False, strict=True,
        description="nats: the largest error_bound this request accepts from a certified ivf "
                    "index (default: the index's); exact kinds meet any",
    ),
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EncodedLatents(_Body):
    """A base64 little-endian array: ``dtype``, ``shape`` ``[n, ...]`` and ``data``."""

    dtype: Literal["float32", "float16", "float64"]
    shape: list[Count] = Field(min_length=1, max_length=8)
    data: str


def _latents_form(value: Any) -> str | None:
    if isinstance(value, list):
        return "nested"
    if isinstance(value, dict):
        return "encoded"
    return None


LatentsField = Annotated[
    Annotated[list[Any], Tag("nested")] | Annotated[EncodedLatents, Tag("encoded")],
    Discriminator(
        _latents_form,
        custom_error_type="latents_form",
        custom_error_message=(
            "latents must be a nested list of numbers or "
            '{"dtype": "float32|float16|float64", "shape": [n, ...], "data": "<base64>"}'
        ),
    ),
]


def _has_bool(values: list[Any]) -> bool:
    """True if any element of a nested list is a JSON boolean (NumPy reads them as 0/1)."""
    kinds = set(map(type, values))
    if bool in kinds:
        return True
    return list in kinds and any(_has_bool(item) for item in values if type(item) is list)


def nested_latents(rows: list[Any]) -> np.ndarray:
    """A rectangular nested list of numbers -> (n, d) float32; first axis = batch."""
    if not rows:
        raise ValueError("latents: send at least one latent")
    try:
        array = np.asarray(rows)
    except ValueError as exc:
        raise ValueError(
            "latents: the nested list is ragged (rows of different lengths or depths); "
            "every latent must have the same shape"
        ) from exc
    if array.dtype.kind not in "iuf" or _has_bool(rows):
        raise ValueError(
            f"latents: expected numbers only, got {array.dtype.name} values "
            "(strings, booleans, nulls, objects or out-of-range integers)"
        )
    if array.ndim < 2 or array.shape[1] == 0:
        raise ValueError(
            f"latents: expected a list of latents (a list of lists of numbers), got shape "
            f"{list(array.shape)}"
        )
    return _finite_float32(array.reshape(array.shape[0], -1))


def encoded_latents(encoded: EncodedLatents) -> np.ndarray:
    """Base64 of a little-endian array of ``encoded.shape`` -> (n, d) float32."""
    dtype = DTYPES[encoded.dtype]
    try:
        raw = pybase64.b64decode(encoded.data, validate=True)  # SIMD; ~30x the stdlib's speed
    except (binascii.Error, ValueError):
        raise ValueError(
            f"latents.data: not valid base64 ({_base64_problem(encoded.data)})"
        ) from None
    expected = math.prod(encoded.shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"latents.data: decodes to {len(raw)} bytes, but shape {encoded.shape} of "
            f"{encoded.dtype} needs {expected}"
        )
    array = np.frombuffer(raw, dtype=dtype).reshape(encoded.shape[0], -1)
    return _finite_float32(array)


def _base64_problem(data: str) -> str:
    """Why ``data`` is not strict base64, in the standard library's words (error path only)."""
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        return str(exc)
    return "padding past the end of the data"  # the stdlib allows extra '='; we do not


def _finite_float32(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.float32 and array.flags.c_contiguous:
        out = array  # nothing to convert (errstate alone costs a few us per request)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(out).all():
        raise ValueError(
            "latents: every value must be a finite number representable as float32 "
            "(no NaN, Infinity or overflowing values)"
        )
    return out


def decoded_latents(latents: Any) -> np.ndarray | None:
    """A ``latents`` field as (n, d) float32, decoded and checked (rectangular, finite, the
    base64 length matching the shape), or None when absent; ValueError says what is wrong.
    Called after the model is known, so an unknown model is a 404 whatever the latents."""
    if isinstance(latents, EncodedLatents):
        return encoded_latents(latents)
    return None if latents is None else nested_latents(latents)


def _not_nullable(schema: dict[str, Any], *names: str) -> None:
    """Fields that may be left out but not sent as null: their spec without the null branch."""
    for name in names:
        field = schema["properties"][name]
        branches = [branch for branch in field.pop("anyOf", []) if branch.get("type") != "null"]
        field.pop("default", None)
        if len(branches) == 1:
            field.update(branches[0])
        elif branches:
            field["anyOf"] = branches


def _nested_latents(schema: dict[str, Any]) -> None:
    """Nested latents: a batch of at least one latent, each a (possibly nested) list of
    numbers."""
    schema["properties"]["latents"]["oneOf"][0] = {
        "type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1},
    }


def _one_of_latents_or_seeds(schema: dict[str, Any]) -> None:
    """The spec says what validation enforces: exactly one of the two, neither null, at least
    one seed, and only the known descriptor names."""
    _not_nullable(schema, "latents", "seeds")
    schema["properties"]["seeds"]["minItems"] = 1
    descriptors = schema["properties"]["descriptors"]["anyOf"][0]
    descriptors["items"] = {"type": "string", "enum": list(DESCRIPTOR_NAMES)}
    _nested_latents(schema)
    schema["oneOf"] = [{"required": ["latents"]}, {"required": ["seeds"]}]


def _select_schema(schema: dict[str, Any]) -> None:
    """The spec says what validation enforces: a seed range or a posted batch, not both, and
    none of the three null."""
    _not_nullable(schema, "latents", "start", "count")
    _nested_latents(schema)
    schema["oneOf"] = [
        {"required": ["count"], "not": {"required": ["latents"]}},
        {"required": ["latents"], "not": {"anyOf": [{"required": ["count"]},
                                                     {"required": ["start"]}]}},
    ]


class ScoreRequest(_Body):
    """``POST /score``: exactly one of ``latents`` or ``seeds`` (neither may be null)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_of_latents_or_seeds)

    model: str = Field(min_length=1, max_length=256)
    latents: LatentsField | None = None
    seeds: list[Seed] | None = None
    sigma: Sigma | None = None
    descriptors: list[str] | None = None
    policy: Policy | None = None
    max_error: MaxError | None = None

    @field_validator("descriptors")
    @classmethod
    def _known_descriptors(cls, names: list[str] | None) -> list[str] | None:
        unknown = sorted(set(names or ()) - set(DESCRIPTOR_NAMES))
        if unknown:
            raise ValueError(
                f"unknown descriptor(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(DESCRIPTOR_NAMES)}"
            )
        return names

    @field_validator("latents", "seeds", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:  # only an explicit null reaches here: leave the field out instead
            raise ValueError("must not be null; send exactly one of 'latents' or 'seeds'")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ScoreRequest:
        if (self.latents is None) == (self.seeds is None):
            raise ValueError("send exactly one of 'latents' or 'seeds'")
        if self.seeds is not None and not self.seeds:
            raise ValueError("seeds: send at least one seed")
        return self

    def decode_latents(self) -> np.ndarray | None:
        """The latents (n, d) float32, or None for a seed request (``decoded_latents``)."""
        return decoded_latents(self.latents)


class SelectRequest(_Body):
    """``POST /select``: the ``keep`` best of seeds ``start .. start + count - 1``, or of a
    posted batch of ``latents`` (a back end ranking its own previews in one call)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_select_schema)

    model: str = Field(min_length=1, max_length=256)
    start: Seed | None = None
    count: Count | None = None
    latents: LatentsField | None = None
    keep: Count
    min_distance: Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)] | None = None
    sigma: Sigma | None = None
    policy: Policy | None = None
    max_error: MaxError | None = None

    @field_validator("latents", "start", "count", mode="before")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:  # only an explicit null reaches here: leave the field out instead
            raise ValueError("must not be null; send a seed range ('start', 'count') or "
                             "'latents'")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> SelectRequest:
        if self.latents is not None and (self.count is not None or self.start is not None):
            raise ValueError("send a seed range ('start', 'count') or 'latents', not both")
        if self.latents is None and self.count is None:
            raise ValueError("send 'count' (seeds start .. start + count - 1) or 'latents'")
        return self

    def range_problem(self) -> str | None:
        """What is wrong across fields (JSON Schema cannot say it), or None. Checked after
        the model is known, so an unknown model is a 404 whatever the range."""
        if self.count is None:
            return None  # a batch: ``keep`` against its length once it is decoded
        start = self.start or 0
        if self.keep > self.count:
            return f"keep ({self.keep}) must be <= count ({self.count})"
        if start + self.count - 1 > MAX_SEED:
            return "seeds start .. start + count - 1 must stay below 2^64"
        return None

    def decode_latents(self) -> np.ndarray | None:
        """The posted batch (n, d) float32, or None for a seed range (``decoded_latents``)."""
        return decoded_latents(self.latents)


@with_config(ConfigDict(extra="forbid"))
class ShardWorkers(TypedDict):
    """One shard of a model in front of workers: its live workers and their devices."""

    shard: int
    live_workers: int
    devices: list[str]


@with_config(ConfigDict(extra="forbid"))
class ComputeInfo(TypedDict):
    """Where a model's scores are computed: in the gateway process (``embedded``, on
    ``device``: ``cpu`` or ``cuda:I`` from ``--device``) or by Redis workers (``workers``,
    with the live workers of each shard). Each mode has only its own key."""

    mode: Literal["embedded", "workers"]
    device: NotRequired[str]
    shards: NotRequired[list[ShardWorkers]]


COMPUTE_INFO: TypeAdapter[ComputeInfo] = TypeAdapter(ComputeInfo)


class CalibrationInfo(BaseModel):
    """The set the model's percentiles are calibrated on: ``sampler`` draws (seeds from
    ``seed_start``), ``leave_one_out`` training latents, or ``latents`` the user supplied at
    build (``--calibration-latents``, named by ``latents_source`` and its sha256)."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["sampler", "leave_one_out", "latents"]
    count: int
    sigma: float
    seed_start: int | None
    latents_source: str | None
    latents_source_sha256: str | None


class _SetRules:
    """A policy as ``GET /models`` writes it: the rules it sets, its null fields left out (as
    docs/contract.md §7 writes policies), under ``Policy``'s own schema (whose fields may all
    be left out)."""

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[Policy], handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return {**handler(source), "serialization": plain_serializer_function_ser_schema(
            lambda policy: policy.model_dump(mode="json", exclude_none=True)
        )}


class ModelInfo(BaseModel):
    """One served model as ``GET /models`` lists it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    index_version: str
    d: int
    N: int
    latent_shape: list[int]
    sigma: float
    kind: str
    exact: bool
    sampler: str | None
    descriptors: bool
    generator: bool
    policy: Annotated[Policy, _SetRules]
    shards: int
    compute: ComputeInfo
    calibration: CalibrationInfo


class ReadyResponse(BaseModel):
    """``GET /readyz`` when ready: the served models, sorted by name."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["ready"]
    models: list[str]


class ModelsResponse(BaseModel):
    """``GET /models``."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelInfo]


_SCAN_CHUNK = 1 << 20  # bytes per step of the depth scan: its memory is a few times this


def _unescaped_quotes(chunk: np.ndarray, run: int) -> tuple[np.ndarray, int]:
    """Positions of the quotes in ``chunk`` that no odd run of backslashes escapes, and the
    backslash run that ends the chunk. ``run``: the one that ended the chunk before it.

    Sparse: the work is in the backslashes and quotes, O(len(chunk)) at worst.
    """
    quotes = np.flatnonzero(chunk == 0x22)
    slashes = np.flatnonzero(chunk == 0x5C)
    if not slashes.size:
        return (quotes[1:] if run % 2 and quotes.size and quotes[0] == 0 else quotes), 0
    # Each backslash's run start (a carried run starts before the chunk, at -run).
    starts = np.ones(slashes.size, dtype=bool)
    starts[1:] = slashes[1:] != slashes[:-1] + 1
    first = np.where(starts, slashes, np.iinfo(np.int64).min)
    if slashes[0] == 0:
        first[0] = -run
    run_start = np.maximum.accumulate(first)
    ends = chunk.size - run_start[-1] if slashes[-1] == chunk.size - 1 else 0
    # The run right before each quote: the backslash at p - 1, if any, and its run's start.
    before = np.searchsorted(slashes, quotes) - 1
    adjacent = (before >= 0) & (slashes[np.maximum(before, 0)] == quotes - 1)
    lengths = np.where(adjacent, quotes - run_start[np.maximum(before, 0)], 0)
    if quotes.size and quotes[0] == 0:
        lengths[0] = run
    return quotes[lengths % 2 == 0], int(ends)


def json_depth(raw: bytes) -> int:
    """Deepest bracket nesting of a JSON text, strings excluded: a vectorised scan, not a
    parse, in O(len(raw)) time and O(1 MiB) memory whatever the input (a regex over strings
    backtracks quadratically on an unclosed one, and holds the GIL while it does).

    A quote opens or closes a string unless an odd run of backslashes stands before it; in a
    valid document every other quote is escaped, so the parity of the unescaped quotes before a
    byte says whether it lies inside a string. On an invalid document the number is only a
    bound that the parser's own error then supersedes. The scan runs in chunks that carry the
    depth, the quote parity and the backslash run across their boundaries.
    """
    codes = np.frombuffer(raw, dtype=np.uint8)
    depth = deepest = 0
    in_string = 0  # unescaped quotes so far, mod 2
    run = 0  # backslashes that end the previous chunk
    for start in range(0, codes.size, _SCAN_CHUNK):
        chunk = codes[start:start + _SCAN_CHUNK]
        folded = chunk | 0x20  # [ -> {, ] -> }: no other byte folds onto either
        steps = (folded == 0x7B).view(np.int8) - (folded == 0x7D).view(np.int8)
        quotes, run = _unescaped_quotes(chunk, run)
        if quotes.size or in_string:
            # A byte is inside a string when an odd number of quotes (and the string carried
            # in, if any) stand at or before it; the quotes themselves are cleared below.
            marks = np.zeros(chunk.size, dtype=np.int8)
            marks[0] = in_string
            marks[quotes] ^= 1
            inside = np.bitwise_xor.accumulate(marks) != 0
            steps[inside] = 0
            steps[quotes] = 0
            in_string = (in_string + quotes.size) % 2
        moves = steps[steps != 0]
        if moves.size:
            path = np.cumsum(moves, dtype=np.int64) + depth
            deepest = max(deepest, int(path.max()))
            depth = int(path[-1])
    return deepest


_NON_FINITE = re.compile(r"NaN|Infinity")


def opening_brackets(raw: bytes) -> int:
    """``[`` and ``{`` bytes in ``raw``, strings included (one vectorised pass: ``[`` is 0x5B,
    ``{`` is 0x7B, and no other byte becomes 0x7B when bit 0x20 is set)."""
    codes = np.frombuffer(raw, dtype=np.uint8)
    return int(np.count_nonzero((codes | 0x20) == 0x7B))


def parse_json(raw: bytes, max_depth: int) -> Any:
    """Strict UTF-8 JSON (RFC 8259: no NaN/Infinity, numbers that fit a double), nesting at
    most ``max_depth``; anything else is a 422 that says where."""
    if not raw or raw.isspace():
        raise ServiceError(422, "the request body is empty; send a JSON object")
    # Fewer opening brackets than the limit cannot nest past it (brackets inside strings only
    # over-count): the common case skips the full scan.
    depth = json_depth(raw) if opening_brackets(raw) > max_depth else 0
    if depth > max_depth:
        raise ServiceError(
            422, f"the JSON nests {depth} levels deep; at most {max_depth} are allowed"
        )
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson counts characters, not bytes: match in the decoded text (error path only).
        constant = _NON_FINITE.match(raw.decode("utf-8", "replace"), exc.pos)
        if constant:
            raise ServiceError(
                422, f"{constant.group()} (character {exc.pos}) is not a JSON number; "
                "send finite numbers only",
            ) from exc
        raise ServiceError(422, f"malformed JSON body: {exc}") from exc


def validate_body(schema: type[BodyT], data: Any) -> BodyT:
    """Validate parsed JSON against ``schema``; errors -> 422 naming the field."""
    if not isinstance(data, dict):
        raise ServiceError(422, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ServiceError(
            422, describe_validation_errors(exc.errors(), list(schema.model_fields))
        ) from exc
