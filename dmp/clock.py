"""Time as the federation stores it: integer microseconds since the epoch, UTC."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp


def now_us() -> int:
    return int(datetime.now(UTC).timestamp() * 1_000_000)


def to_us(ts: Timestamp) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def from_us(us: int) -> Timestamp:
    ts = Timestamp()
    ts.seconds, micros = divmod(us, 1_000_000)
    ts.nanos = micros * 1000
    return ts
