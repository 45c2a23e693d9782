"""The gateway's strict JSON reader: the bracket count that guards the depth scan, and the
documents it refuses (RFC 8259 only, UTF-8 only, finite doubles, bounded depth)."""

from __future__ import annotations

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
