"""The RFC 6962 Merkle tree over the log's events: hashes and the incremental frontier."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
_sha256 = hashlib.sha256


def leaf_hash(entry: bytes) -> bytes:
    """RFC 6962 leaf hash: SHA-256(0x00 ‖ entry)."""
    return _sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: SHA-256(0x01 ‖ left ‖ right)."""
    return _sha256(b"\x01" + left + right).digest()


def event_leaf_hash(seq: int, canonical: bytes) -> bytes:
    """The leaf of event ``seq``: its position (8 bytes, big-endian) is part of the entry."""
    return _sha256(b"\x00" + seq.to_bytes(8, "big") + canonical).digest()


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962 §2.1 Merkle Tree Hash of a list of leaf hashes, by its recursive definition
    (the reference the incremental :class:`MerkleFrontier` is tested against)."""
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[0]
    k = 1 << ((n - 1).bit_length() - 1)  # the largest power of two smaller than n
    return node_hash(merkle_root(leaves[:k]), merkle_root(leaves[k:]))


class MerkleFrontier:
    """The roots of the perfect subtrees that make a tree of ``size`` leaves (the RFC 6962
    "compact range"), largest first: append is amortized one hash, the root at most
    log2(size) hashes, and memory is 32 bytes per bit of ``size``."""

    __slots__ = ("_stack", "size")

    def __init__(self) -> None:
        self._stack: list[bytes] = []
        self.size = 0

    def append(self, leaf: bytes) -> None:
        stack = self._stack
        h = leaf
        n = self.size
        while n & 1:
            h = _sha256(b"\x01" + stack.pop() + h).digest()
            n >>= 1
        stack.append(h)
        self.size += 1

    def root(self) -> bytes:
        stack = self._stack
        if not stack:
            return EMPTY_ROOT
        h = stack[-1]
        for left in reversed(stack[:-1]):
            h = _sha256(b"\x01" + left + h).digest()
        return h
