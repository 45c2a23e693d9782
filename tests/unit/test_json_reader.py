"""The gateway's strict JSON reader: the bracket count that guards the depth scan, and the
documents it refuses (RFC 8259 only, UTF-8 only, finite doubles, bounded depth)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from latentsieve.service.errors import ServiceError
from latentsieve.service.schemas import json_depth, opening_brackets, parse_json


@given(st.binary(max_size=2000))
def test_opening_brackets_counts_both_kinds(raw: bytes) -> None:
    assert opening_brackets(raw) == raw.count(b"[") + raw.count(b"{")


def test_only_the_two_brackets_map_to_the_probe() -> None:
    assert [byte for byte in range(256) if byte | 0x20 == 0x7B] == [0x5B, 0x7B]


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"", "empty"),
        (b" \n\t ", "empty"),
        (b'{"a": NaN}', "NaN (character 6)"),
        (b'{"a": -Infinity}', "Infinity (character 7)"),
        (b'{"a": 1e400}', "malformed JSON"),
        # orjson reports characters; multi-byte text before the error must not shift the probe.
        ('{"m": "üüüü", "a": [NaN]}'.encode(), "NaN (character 20)"),
        ('{"m": "éééé", "note": "NaN",}'.encode(), "malformed JSON"),
        (b'{"a": 1}{', "malformed JSON"),
        (b'\xff{"a": 1}', "malformed JSON"),
        ('{"a": 1}'.encode("utf-16"), "malformed JSON"),
        (b"[" * 33 + b"]" * 33, "33 levels deep"),
        (b'{"a": "' + b"[" * 40 + b'"}', None),  # brackets in strings do not nest
    ],
)
def test_refusals(raw: bytes, says: str | None) -> None:
    if says is None:
        assert parse_json(raw, 32) == {"a": "[" * 40}
        return
    with pytest.raises(ServiceError) as caught:
        parse_json(raw, 32)
    assert caught.value.status == 422 and says in caught.value.detail


def test_big_integers_are_numbers() -> None:
    # Integer literals past 64 bits arrive as floats (orjson), which is what a latent
    # coordinate is; seeds refuse them by range (tests/api/test_bad_inputs.py).
    assert parse_json(b'{"a": [18446744073709551616, 18446744073709551615]}', 32) == {
        "a": [float(2**64), 2**64 - 1]
    }


def test_depth_scan_agrees_with_the_limit() -> None:
    assert json_depth(b'{"a": [[1], {"b": [2]}]}') == 4


def reference_depth(raw: bytes) -> int:
    """The depth scan as a byte-by-byte state machine (the specification of ``json_depth``):
    a quote after an odd run of backslashes is escaped wherever it stands (in valid JSON
    backslashes stand only inside strings, where this is JSON's own rule)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if byte == 0x22 and not escaped:
            in_string = not in_string
        elif not in_string and byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif not in_string and byte in (0x5D, 0x7D):
            depth -= 1
        escaped = byte == 0x5C and not escaped
    return deepest


JSON_BYTES = st.lists(st.sampled_from(list(b'[]{}"\\ a,:1')), max_size=300).map(bytes)


@given(JSON_BYTES, st.sampled_from([1, 2, 3, 7, 64, 1 << 20]))
def test_depth_scan_matches_the_state_machine(raw: bytes, chunk: int) -> None:
    # Any byte string (valid JSON or not), scanned in chunks of any size: the carried quote
    # parity and backslash run make chunk boundaries invisible.
    import latentsieve.service.schemas as schemas

    saved = schemas._SCAN_CHUNK
    schemas._SCAN_CHUNK = chunk
    try:
        assert json_depth(raw) == reference_depth(raw)
    finally:
        schemas._SCAN_CHUNK = saved


@given(st.recursive(
    st.none() | st.integers(-1000, 1000) | st.text(alphabet='[]{}"\\ab'),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text('[]"\\k'), inner,
                                                                  max_size=3),
    max_leaves=30,
))
def test_depth_scan_of_real_documents(document: object) -> None:
    raw = orjson.dumps(document)
    assert json_depth(raw) == reference_depth(raw)


def test_an_unclosed_string_of_escapes_is_scanned_in_linear_time() -> None:
    # The audit's body: over 32 brackets, then an unclosed run of escaped quotes. The old regex
    # took 0.4/1.6/6.3 s at 8/16/32 KB. Counted, not timed: the scan does a fixed number of
    # vectorised passes per chunk, so 32x the body is 32x the chunks, never 32^2.
    import latentsieve.service.schemas as schemas

    calls = 0
    real = schemas._unescaped_quotes

    def counting(chunk: np.ndarray, run: int) -> tuple[np.ndarray, int]:
        nonlocal calls
        calls += 1
        return real(chunk, run)

    body = b"[" * 40 + b'"' + b'\\"' * (1 << 20)
    schemas._unescaped_quotes = counting  # type: ignore[assignment]
    try:
        assert json_depth(body) == 40
    finally:
        schemas._unescaped_quotes = real  # type: ignore[assignment]
    assert calls == -(-len(body) // schemas._SCAN_CHUNK)
    with pytest.raises(ServiceError) as caught:
        parse_json(body, 32)
    assert "40 levels deep" in caught.value.detail
