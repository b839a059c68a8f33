"""Limits on what callers send, checked before anything reaches a database.

Every text field the federation stores or queries has a documented length limit and may
not hold control characters or the bidirectional controls that make a title display other
than what it stores (CVE-2021-42574, "Trojan Source"). Timestamps must lie in a range a
record can mean. Refusals are InvalidArgument and name the field.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from dmp.errors import InvalidArgument

#: Bidirectional embeddings, overrides and isolates (marks LRM/RLM stay allowed).
_BIDI_CONTROLS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
#: What a text may not hold: the control characters (Unicode category Cc, exactly
#: U+0000..U+001F and U+007F..U+009F, a set Unicode never changes) and the bidirectional
#: controls. One regular expression scans a text in C, not a character at a time.
_FORBIDDEN = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI_CONTROLS}]")
#: The range of a timestamp a record, a filter or a report may carry.
EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)
_EARLIEST_S = int(EARLIEST.timestamp())
_LATEST_S = int(LATEST.timestamp())


def check_text(value: str, field: str, max_length: int) -> str:
    """Refuse a text longer than `max_length` characters or holding a control character."""
    if len(value) > max_length:
        raise InvalidArgument(
            f"{field} is {len(value)} characters long: at most {max_length} are accepted"
        )
    found = _FORBIDDEN.search(value)
    if found is not None:
        raise InvalidArgument(
            f"{field} holds the control character U+{ord(found.group()):04X} at position"
            f" {found.start()}: remove control and bidirectional override characters"
        )
    return value


def is_clean(text: str) -> bool:
    """Whether `text` holds no control or bidirectional control character (the test of
    `check_text`, for a caller that checks several texts at once and names the field only
    on a refusal)."""
    return _FORBIDDEN.search(text) is None


def check_time(ts: Timestamp, field: str) -> Timestamp:
    """Refuse a timestamp outside 1900-01-01..2200-01-01 or with invalid nanoseconds."""
    if not _EARLIEST_S <= ts.seconds < _LATEST_S or not 0 <= ts.nanos < 1_000_000_000:
        raise InvalidArgument(
            f"{field} (seconds={ts.seconds}, nanos={ts.nanos}) is out of range: a time between"
            f" {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d} UTC is expected"
        )
    return ts


def check_count(value: int, field: str, maximum: int = 1_000_000_000) -> int:
    """Refuse a negative or absurd count."""
    if not 0 <= value <= maximum:
        raise InvalidArgument(f"{field} {value} is out of range: 0 to {maximum} is expected")
    return value
