"""The row hash of a record (node/integrity.py) is the SHA-256 of json.dumps of its values:
its encoder, built once, must write exactly what json.dumps writes, or every row stored
before would read as damaged."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from node.integrity import (
    HASH_TAG,
    HASHED_COLUMNS,
    OPTIONAL_COLUMNS,
    _digest,
    _json,
    hash_values,
)

ODD_STRINGS = [
    "",
    "plain",
    'quote " and backslash \\',
    "accents éèà and ß",
    "emoji \U0001f489 and CJK 漢字",
    "controls \x00\x1f\x7f\n\t",
    "lone surrogate \ud800",
    "\u2028\u2029",
]


def _values(text: str, **changed: Any) -> dict[str, Any]:
    values: dict[str, Any] = {name: text for name in HASHED_COLUMNS}
    values.update(
        created_us=1_700_000_000_000_000,
        effective_us=-5,
        version=2**63 - 1,
        size=0,
        hidden_from_patient=True,
        revealed_us=None,
        supersedes=None,
        prescription_id=None,
        sealed=None,
    )
    values.update(changed)
    return values


def _reference(values: dict[str, Any]) -> str:
    listed: list[Any] = [HASH_TAG, *(values[name] for name in HASHED_COLUMNS)]
    listed[1 + HASHED_COLUMNS.index("hidden_from_patient")] = bool(values["hidden_from_patient"])
    for name in OPTIONAL_COLUMNS:
        value = values.get(name)
        if value is not None:
            listed.append(value.hex() if isinstance(value, bytes) else value)
    return hashlib.sha256(json.dumps(listed).encode("ascii")).hexdigest()


@pytest.mark.parametrize("text", ODD_STRINGS)
def test_the_row_hash_is_that_of_json_dumps(text: str) -> None:
    for values in (
        _values(text),
        _values(text, hidden_from_patient=0, sealed=b"\x00\xff", prescription_id=text),
        _values(text, revealed_us=1, supersedes=text, hidden_from_patient=False),
    ):
        assert hash_values(values) == _reference(values)


def test_a_changed_value_changes_the_hash() -> None:
    values = _values("x")
    assert _digest([values[n] for n in HASHED_COLUMNS]) != _digest(
        [values[n] for n in HASHED_COLUMNS[:-1]] + ["y"]
    )


def test_the_encoder_writes_json_dumps_on_every_kind_of_value() -> None:
    tricky: list[Any] = [HASH_TAG, "", *ODD_STRINGS, None, True, False, 0, -1, 2**63 - 1, -(2**63)]
    assert _json(tricky) == json.dumps(tricky)
    assert _json([]) == json.dumps([])
