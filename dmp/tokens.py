"""Opaque page tokens: a small message, bound to the query it pages, base64url-encoded.

A token never grants access: the server checks the caller again on every page, and a
token is refused for any other query than the one that produced it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from dmp.errors import InvalidArgument

C = TypeVar("C", bound=Message)


def query_fingerprint(request: Message) -> bytes:
    """8 bytes naming a list request's filters (its paging fields cleared)."""
    query = type(request)()
    query.CopyFrom(request)
    query.ClearField("page_token")
    query.ClearField("page_size")
    return hashlib.sha256(query.SerializeToString(deterministic=True)).digest()[:8]


def page_size(requested: int, default: int, maximum: int) -> int:
    """The size of one page: `default` when unset, at most `maximum`; negative refused."""
    if requested < 0:
        raise InvalidArgument("page_size must not be negative")
    return min(requested or default, maximum)


def encode(cursor: Message) -> str:
    return base64.urlsafe_b64encode(cursor.SerializeToString()).decode().rstrip("=")


def decode(token: str, cursor_type: type[C], query_print: bytes) -> C:
    """The cursor in a token produced for the same query; InvalidArgument otherwise."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        cursor = cursor_type.FromString(raw)
    except (binascii.Error, DecodeError, ValueError):
        raise InvalidArgument(
            "page_token is malformed: pass the next_page_token unchanged"
        ) from None
    if getattr(cursor, "query_fingerprint", b"") != query_print:
        raise InvalidArgument(
            "page_token does not belong to this query: keep the same filters while paging"
        )
    return cursor
