"""The row hash's JSON (node/integrity.py) is json.dumps's, byte for byte: stored hashes
must keep matching whatever encoder computes them."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from node import integrity

TRICKY: list[Any] = [
    integrity.HASH_TAG,
    "",
    'quote " backslash \\ slash / tab \t newline \n nul \x00 del \x7f',
    "é ü 漢字 \u202e \U0001f600 \ud7ff",
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    1_700_000_000_000_000,
]


def test_the_hash_json_is_json_dumps() -> None:
    assert integrity._json(TRICKY) == json.dumps(TRICKY)
    assert integrity._json([]) == json.dumps([])


def test_a_row_hash_is_the_documented_digest() -> None:
    values: dict[str, Any] = {name: f'{name} é\t"x"' for name in integrity.HASHED_COLUMNS}
    values.update(created_us=1, effective_us=-2, version=3, size=4, hidden_from_patient=1)
    values.update(supersedes=None, revealed_us=None, prescription_id="rx", sealed=b"\x00\xff")
    listed = [integrity.HASH_TAG, *(values[name] for name in integrity.HASHED_COLUMNS)]
    listed[1 + integrity.HASHED_COLUMNS.index("hidden_from_patient")] = True
    listed += ["rx", "00ff"]
    expected = hashlib.sha256(json.dumps(listed).encode("ascii")).hexdigest()
    assert integrity.hash_values(values) == expected
