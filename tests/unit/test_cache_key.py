"""``cache_key``: one key per distinct scoring input, stable under descriptor order."""

from __future__ import annotations

import re

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from latentsieve.service.cache import cache_key, cache_keys
from latentsieve.workers.transport import ScoreSpec

DESCRIPTORS = ("psi", "nu", "delta")
LATENT = np.arange(8, dtype="<f4").tobytes()
BASE = ("digits-vae", "v0001", 1.5, ("psi",), LATENT)


def key_of(
    model: str, version: str, sigma: float, descriptors: tuple[str, ...], latent: bytes,
    **more: object,
) -> str:
    """The cache key of one latent under the spec of these parts."""
    return cache_key(ScoreSpec(model, version, sigma, descriptors, **more), latent)  # type: ignore[arg-type]

names = st.text(min_size=0, max_size=12)
sigmas = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)
descriptor_sets = st.lists(st.sampled_from(DESCRIPTORS), unique=True).map(tuple)
latents = st.binary(min_size=0, max_size=64)
inputs = st.tuples(names, names, sigmas, descriptor_sets, latents)


def test_key_format_and_determinism() -> None:
    key = key_of(*BASE)
    assert re.fullmatch(r"ls:v1:[0-9a-f]{64}", key)
    assert key_of(*BASE) == key


def test_each_part_changes_the_key() -> None:
    base = key_of(*BASE)
    variants = [
        ("digits-vae2", "v0001", 1.5, ("psi",), LATENT),
        ("digits-vae", "v0002", 1.5, ("psi",), LATENT),
        ("digits-vae", "v0001", 1.25, ("psi",), LATENT),
        ("digits-vae", "v0001", 1.5, (), LATENT),
        ("digits-vae", "v0001", 1.5, ("psi", "nu"), LATENT),
        ("digits-vae", "v0001", 1.5, ("psi",), LATENT[:-1] + b"\x01"),
    ]
    keys = {key_of(*variant) for variant in variants}
    keys |= {key_of(*BASE, max_error=0.05), key_of(*BASE, max_error=0.01),
             key_of(*BASE, space="index")}
    assert base not in keys
    assert len(keys) == len(variants) + 3


def test_sigma_is_exact() -> None:
    one = key_of("m", "v", 1.0, (), LATENT)
    assert key_of("m", "v", 1.0000000001, (), LATENT) != one
    assert key_of("m", "v", float(np.nextafter(1.0, 2.0)), (), LATENT) != one
    assert key_of("m", "v", 1, (), LATENT) == one  # an int sigma is the same bandwidth


def test_parts_cannot_run_into_each_other() -> None:
    assert key_of("ab", "c", 1.0, (), b"") != key_of("a", "bc", 1.0, (), b"")
    assert key_of("m", "v", 1.0, ("psi",), b"") != key_of("m", "v", 1.0, (), b"psi")
    assert key_of("m", "v", 1.0, ("nu", "psi"), b"") != key_of("m", "v", 1.0, ("nupsi",), b"")


@given(descriptors=descriptor_sets, data=st.data())
def test_descriptor_order_and_repeats_do_not_matter(
    descriptors: tuple[str, ...], data: st.DataObject
) -> None:
    shuffled = tuple(data.draw(st.permutations(descriptors)))
    repeated = shuffled + shuffled[:1]
    key = key_of("m", "v", 2.0, descriptors, LATENT)
    assert key_of("m", "v", 2.0, shuffled, LATENT) == key
    assert key_of("m", "v", 2.0, repeated, LATENT) == key


@given(first=inputs, second=inputs)
def test_distinct_inputs_give_distinct_keys(
    first: tuple[str, str, float, tuple[str, ...], bytes],
    second: tuple[str, str, float, tuple[str, ...], bytes],
) -> None:
    def canonical(
        parts: tuple[str, str, float, tuple[str, ...], bytes],
    ) -> tuple[str, str, str, tuple[str, ...], bytes]:
        model, version, sigma, descriptors, latent = parts
        return model, version, sigma.hex(), tuple(sorted(descriptors)), latent

    same_input = canonical(first) == canonical(second)
    assert (key_of(*first) == key_of(*second)) == same_input


def test_array_rows_hash_like_their_bytes() -> None:
    """The (n, d) fast path slices each row exactly: its key is the key of that row's bytes,
    whatever its neighbours hold, and an empty batch has no keys."""
    rows = np.arange(24, dtype=np.float32).reshape(3, 8)
    changed = rows.copy()
    changed[1, 0] = -1.0  # only the next row's first value differs
    by_array = cache_keys(ScoreSpec("m", "v", 1.0), rows)
    assert by_array == cache_keys(ScoreSpec("m", "v", 1.0), [row.tobytes() for row in rows])
    assert cache_keys(ScoreSpec("m", "v", 1.0), changed)[0] == by_array[0]
    assert cache_keys(ScoreSpec("m", "v", 1.0), changed)[1] != by_array[1]
    assert cache_keys(ScoreSpec("m", "v", 1.0), rows[2:])[0] == by_array[2]
    assert cache_keys(ScoreSpec("m", "v", 1.0), np.empty((0, 8), np.float32)) == []
