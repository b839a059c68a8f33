"""Integrity of stored record metadata, checked as the content's SHA-256 is.

Each row of `records` keeps `row_hash`: the SHA-256 of every metadata column (title, type
code, kind, dates, author, status, confidentiality, the hidden and revealed state, what it
supersedes, the content's size and SHA-256...). The node computes it when it inserts a
row and again whenever it legitimately changes one (a new version marks the previous one
superseded, an author reveals a record), after checking the old one. Every read checks it:
a row whose metadata no longer matches is never served, the call answers DATA_LOSS naming
the record, and the operator's log says which record and what to do.

This detects damage (a flipped byte, a torn page, an edit that forgot the hash); a host
that rewrites both a row and its hash is what the audit trail and its witnessed
checkpoints are for.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from operator import attrgetter, itemgetter
from typing import Any

from dmp.errors import DataLoss

log = logging.getLogger("dmp.node.integrity")

#: Version tag of the hashed form: a change of columns or encoding gets a new tag (and a
#: migration that hashes the rows again).
HASH_TAG = "dmp-record-row-v1"

#: Every stored metadata column of a record, in hashed order (not `seq`, the row's place,
#: nor `row_hash` itself).
HASHED_COLUMNS: tuple[str, ...] = (
    "id",
    "patient_ins",
    "kind",
    "type_system",
    "type_code",
    "type_display",
    "title",
    "author_identity",
    "author_name",
    "author_profession",
    "organization",
    "created_us",
    "effective_us",
    "status",
    "version",
    "supersedes",
    "root_id",
    "confidentiality",
    "hidden_from_patient",
    "revealed_us",
    "content_type",
    "size",
    "sha256",
    "fingerprint",
)
#: Columns added later, hashed after those only when set: the rows that leave them empty
#: (every row stored before they existed) hash exactly as before, with no new tag.
#: `sealed` (bytes) is hashed as hex: the hash is over what is stored, ciphertext for a
#: sealed row; its plaintext is authenticated by AES-GCM and the content's by `sha256`.
OPTIONAL_COLUMNS: tuple[str, ...] = ("prescription_id", "sealed")
_BOOLEAN = 1 + HASHED_COLUMNS.index("hidden_from_patient")  # its place after the tag
_END = len(HASHED_COLUMNS) + len(OPTIONAL_COLUMNS)
_WITH_HASH = (*HASHED_COLUMNS, *OPTIONAL_COLUMNS, "row_hash")
_attributes = attrgetter(*_WITH_HASH)
#: Core rows by their fields: item access by position is ~20 times faster than by name.
_by_fields: dict[tuple[str, ...], Callable[[Any], tuple[Any, ...]]] = {}


def _digest(values: Sequence[Any]) -> str:
    """The hash of the HASHED_COLUMNS then OPTIONAL_COLUMNS values, in that order (more
    may follow, ignored)."""
    # JSON of a list: unambiguous whatever the strings hold, and its escapes are fixed by
    # the code points alone. The boolean is normalized (a driver may give 0/1).
    listed = [HASH_TAG, *values[: len(HASHED_COLUMNS)]]
    listed[_BOOLEAN] = bool(listed[_BOOLEAN])
    for value in values[len(HASHED_COLUMNS) : _END]:
        if value is not None:
            listed.append(value.hex() if isinstance(value, bytes) else value)
    return hashlib.sha256(_json(listed).encode("ascii")).hexdigest()


def _json_encoder() -> Callable[[list[Any]], str]:
    """`json.dumps` of a flat list, with json's defaults (ASCII, ", " between items), its C
    encoder made once instead of once a call (half the cost of a row's hash); json.dumps
    itself where the interpreter has no C encoder. tests/unit/test_row_hash_encoding.py checks
    they give the same text."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return json.dumps
    defaults = json.JSONEncoder()
    encode = make(
        None,  # no circular check: a flat list of strings, numbers, booleans and None
        defaults.default,
        json.encoder.encode_basestring_ascii,
        None,
        defaults.key_separator,
        defaults.item_separator,
        False,
        False,
        True,
    )
    return lambda values: "".join(encode(values, 0))


_json = _json_encoder()


def _getter(row: Any) -> Callable[[Any], tuple[Any, ...]]:
    """How to read HASHED_COLUMNS then row_hash from rows shaped like `row`."""
    fields = getattr(row, "_fields", None)
    if fields is None:
        return _attributes  # an ORM object
    getter = _by_fields.get(fields)
    if getter is None:
        getter = itemgetter(*(fields.index(name) for name in _WITH_HASH))
        _by_fields[fields] = getter
    return getter


_hashed_values = itemgetter(*HASHED_COLUMNS)


def hash_values(values: Mapping[str, Any]) -> str:
    """The row hash of a row given as column values (an INSERT's parameters)."""
    return _digest((*_hashed_values(values), *map(values.get, OPTIONAL_COLUMNS)))


def hash_row(row: Any, **changed: Any) -> str:
    """The row hash of a row (an ORM object or a Core row), with `changed` columns set."""
    values = _getter(row)(row)
    if not changed:
        return _digest(values)
    merged = dict(zip(_WITH_HASH, values, strict=True))
    merged.update(changed)
    return hash_values(merged)


def damaged(rows: Sequence[Any]) -> list[str]:
    """The ids of the rows whose stored metadata does not match their row hash (rows of
    one shape: ORM objects, or Core rows of one statement)."""
    if not rows:
        return []
    get = _getter(rows[0])
    bad = []
    for row in rows:
        values = get(row)
        if values[-1] != _digest(values):
            bad.append(values[0])  # id comes first
    return bad


def check(rows: Sequence[Any], region: str, *, name_them: bool = True) -> None:
    """Refuse to serve rows whose metadata was damaged: DATA_LOSS naming them (the log
    always does; the caller's message only with `name_them`, for rows it may read)."""
    bad = damaged(rows)
    if not bad:
        return
    named = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    log.error(
        "record(s) %s on node %s: stored metadata does not match its integrity hash; not"
        " served. Restore the node from its last verified backup",
        named,
        region,
    )
    if not name_them:
        raise DataLoss(
            f"a record of this patient on node {region} is damaged (its stored metadata does"
            " not match its integrity hash): nothing is served until the node's operator"
            " restores it from the last verified backup"
        )
    noun = "records" if len(bad) > 1 else "record"
    raise DataLoss(
        f"{noun} {named} on node {region}: stored metadata is damaged (it does not match its"
        " integrity hash) and is not served; the node's operator must restore it from the"
        " last verified backup"
    )
