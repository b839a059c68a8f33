"""The plaintext inside a sealed backup file: framed parts, rows, manifest, signature.

A sequence of frames, each a one-byte tag, a 4-byte big-endian length and its payload:

- ``H`` the header (JSON: format, region, started),
- per table, ``T`` its name and columns (JSON), ``R`` batches of rows, ``E`` its end,
- ``M`` the manifest (JSON: node region and certificate, time, schema revision, the last
  record and audit sequence, the audit log's last signed tree head, and per table its
  columns, row count and the SHA-256 of its ``T`` and ``R`` payloads),
- ``S`` the node's ECDSA P-256 signature of the manifest's bytes.

Rows are written table-wise with typed values (null, integer, text, bytes, boolean, float)
so that a backup of a SQLite node restores into PostgreSQL and the other way round.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO, Final

FORMAT: Final = "dmp-node-backup-1"

HEADER: Final = b"H"
TABLE: Final = b"T"
ROWS: Final = b"R"
END: Final = b"E"
MANIFEST: Final = b"M"
SIGNATURE: Final = b"S"
_TAGS: Final = frozenset({HEADER, TABLE, ROWS, END, MANIFEST, SIGNATURE})

_FRAME = struct.Struct(">cI")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_F64 = struct.Struct(">d")

_NULL, _INT, _TEXT, _BYTES, _TRUE, _FALSE, _FLOAT, _BIGINT = range(8)


class FormatError(Exception):
    """The decrypted stream is not a well-formed backup."""


def frame(tag: bytes, payload: bytes) -> bytes:
    return _FRAME.pack(tag, len(payload)) + payload


def encode_rows(rows: Sequence[Sequence[Any]]) -> bytes:
    """A batch of rows: the row count, then each value tagged with its type."""
    out = bytearray(_U32.pack(len(rows)))
    for row in rows:
        for value in row:
            if value is None:
                out.append(_NULL)
            elif value is True:
                out.append(_TRUE)
            elif value is False:
                out.append(_FALSE)
            elif isinstance(value, int):
                if -(1 << 63) <= value < (1 << 63):
                    out.append(_INT)
                    out += _I64.pack(value)
                else:
                    text = str(value).encode()
                    out.append(_BIGINT)
                    out += _U32.pack(len(text)) + text
            elif isinstance(value, str):
                data = value.encode()
                out.append(_TEXT)
                out += _U32.pack(len(data)) + data
            elif isinstance(value, bytes | bytearray | memoryview):
                data = bytes(value)
                out.append(_BYTES)
                out += _U32.pack(len(data)) + data
            elif isinstance(value, float):
                out.append(_FLOAT)
                out += _F64.pack(value)
            else:
                raise TypeError(f"a backup cannot hold a value of type {type(value).__name__}")
    return bytes(out)


def decode_rows(payload: bytes, width: int) -> list[tuple[Any, ...]]:
    """The rows of one ``R`` payload, `width` values each."""
    view = memoryview(payload)
    try:
        (count,) = _U32.unpack_from(view, 0)
        at = 4
        rows: list[tuple[Any, ...]] = []
        for _ in range(count):
            row: list[Any] = []
            for _ in range(width):
                tag = view[at]
                at += 1
                if tag == _NULL:
                    row.append(None)
                elif tag == _INT:
                    row.append(_I64.unpack_from(view, at)[0])
                    at += 8
                elif tag in (_TEXT, _BYTES, _BIGINT):
                    (size,) = _U32.unpack_from(view, at)
                    at += 4
                    data = bytes(view[at : at + size])
                    if len(data) != size:
                        raise FormatError("a row batch is cut short")
                    at += size
                    row.append(
                        data.decode() if tag == _TEXT else int(data) if tag == _BIGINT else data
                    )
                elif tag == _TRUE:
                    row.append(True)
                elif tag == _FALSE:
                    row.append(False)
                elif tag == _FLOAT:
                    row.append(_F64.unpack_from(view, at)[0])
                    at += 8
                else:
                    raise FormatError(f"unknown value tag {tag} in a row batch")
            rows.append(tuple(row))
    except (struct.error, IndexError, UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"a row batch is damaged ({exc})") from None
    if at != len(payload):
        raise FormatError("a row batch has trailing bytes")
    return rows


class FrameReader:
    """Frames out of a stream of plaintext chunks (as :func:`dmp.sealed.open_sealed` gives)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()
        self._done = False

    def _fill(self, size: int) -> bool:
        while len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                return False
            self._buffer += chunk
        return True

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        while True:
            if not self._fill(_FRAME.size):
                if self._buffer:
                    raise FormatError("the backup ends inside a frame")
                return
            tag, length = _FRAME.unpack_from(self._buffer, 0)
            if tag not in _TAGS:
                raise FormatError(f"unknown frame {tag!r}")
            if not self._fill(_FRAME.size + length):
                raise FormatError("the backup ends inside a frame")
            payload = bytes(self._buffer[_FRAME.size : _FRAME.size + length])
            del self._buffer[: _FRAME.size + length]
            yield tag, payload


def write_frame(out: BinaryIO, tag: bytes, payload: bytes) -> None:
    out.write(frame(tag, payload))
