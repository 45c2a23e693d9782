"""``cache_key``: one key per distinct scoring input, stable under descriptor order."""

from __future__ import annotations

import re

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from latentsieve.service.cache import cache_key, cache_keys

DESCRIPTORS = ("psi", "nu", "delta")
LATENT = np.arange(8, dtype="<f4").tobytes()
BASE = ("digits-vae", "v0001", 1.5, ("psi",), LATENT)

names = st.text(min_size=0, max_size=12)
sigmas = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)
descriptor_sets = st.lists(st.sampled_from(DESCRIPTORS), unique=True).map(tuple)
latents = st.binary(min_size=0, max_size=64)
inputs = st.tuples(names, names, sigmas, descriptor_sets, latents)


def test_key_format_and_determinism() -> None:
    key = cache_key(*BASE)
    assert re.fullmatch(r"ls:v1:[0-9a-f]{64}", key)
    assert cache_key(*BASE) == key


def test_each_part_changes_the_key() -> None:
    base = cache_key(*BASE)
    variants = [
        ("digits-vae2", "v0001", 1.5, ("psi",), LATENT),
        ("digits-vae", "v0002", 1.5, ("psi",), LATENT),
        ("digits-vae", "v0001", 1.25, ("psi",), LATENT),
        ("digits-vae", "v0001", 1.5, (), LATENT),
        ("digits-vae", "v0001", 1.5, ("psi", "nu"), LATENT),
        ("digits-vae", "v0001", 1.5, ("psi",), LATENT[:-1] + b"\x01"),
    ]
    keys = {cache_key(*variant) for variant in variants}
    assert base not in keys
    assert len(keys) == len(variants)


def test_sigma_is_exact() -> None:
    one = cache_key("m", "v", 1.0, (), LATENT)
    assert cache_key("m", "v", 1.0000000001, (), LATENT) != one
    assert cache_key("m", "v", float(np.nextafter(1.0, 2.0)), (), LATENT) != one
    assert cache_key("m", "v", 1, (), LATENT) == one  # an int sigma is the same bandwidth


def test_parts_cannot_run_into_each_other() -> None:
    assert cache_key("ab", "c", 1.0, (), b"") != cache_key("a", "bc", 1.0, (), b"")
    assert cache_key("m", "v", 1.0, ("psi",), b"") != cache_key("m", "v", 1.0, (), b"psi")
    assert cache_key("m", "v", 1.0, ("nu", "psi"), b"") != cache_key("m", "v", 1.0, ("nupsi",), b"")


@given(descriptors=descriptor_sets, data=st.data())
def test_descriptor_order_and_repeats_do_not_matter(
    descriptors: tuple[str, ...], data: st.DataObject
) -> None:
    shuffled = tuple(data.draw(st.permutations(descriptors)))
    repeated = shuffled + shuffled[:1]
    key = cache_key("m", "v", 2.0, descriptors, LATENT)
    assert cache_key("m", "v", 2.0, shuffled, LATENT) == key
    assert cache_key("m", "v", 2.0, repeated, LATENT) == key


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
    assert (cache_key(*first) == cache_key(*second)) == same_input


def test_array_rows_hash_like_their_bytes() -> None:
    """The (n, d) fast path slices each row exactly: its key is the key of that row's bytes,
    whatever its neighbours hold, and an empty batch has no keys."""
    rows = np.arange(24, dtype=np.float32).reshape(3, 8)
    changed = rows.copy()
    changed[1, 0] = -1.0  # only the next row's first value differs
    by_array = cache_keys("m", "v", 1.0, (), rows)
    assert by_array == cache_keys("m", "v", 1.0, (), [row.tobytes() for row in rows])
    assert cache_keys("m", "v", 1.0, (), changed)[0] == by_array[0]
    assert cache_keys("m", "v", 1.0, (), changed)[1] != by_array[1]
    assert cache_keys("m", "v", 1.0, (), rows[2:])[0] == by_array[2]
    assert cache_keys("m", "v", 1.0, (), np.empty((0, 8), np.float32)) == []
