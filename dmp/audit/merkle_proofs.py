"""RFC 6962 consistency proofs over an audit log's leaf hashes, and their verifier.

A consistency proof between tree sizes ``m < n`` (RFC 6962 §2.1.2) is the short list of
subtree hashes that shows the first ``m`` leaves of the tree of ``n`` leaves are exactly
the tree of ``m`` leaves: a log that only grew. A witness keeping the previous head of a
log checks each new head with it (:func:`verify_consistency`, the algorithm of RFC 9162
§2.1.4.2) without ever seeing the events.

Every hash a proof needs is the Merkle tree hash of an aligned range of leaves.
:class:`LeafSubtrees` computes them from the leaf hashes stored in ``audit_events``,
reading each block of :data:`BLOCK` leaves at most once and keeping the hashes of the
perfect subtrees of at least :data:`BLOCK` leaves (64 bytes per block): a proof after the
first costs a few small queries, never a pass over the log.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Final

from sqlalchemy import Engine, Table, select

from dmp.audit.merkle import EMPTY_ROOT, merkle_root, node_hash
from dmp.errors import DataLoss

__all__ = ["BLOCK", "LeafSubtrees", "consistency_proof", "verify_consistency"]

#: Leaves read in one query; perfect subtrees of at least this many leaves are kept.
BLOCK: Final = 256
#: Proofs kept for the next witness that asks the same.
_KEPT_PROOFS: Final = 64


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


class LeafSubtrees:
    """Merkle tree hashes of ranges of a log's leaves, read from its ``audit_events`` table.

    Leaf ``i`` (from 0) is the event of seq ``i + 1``. The events covered by a hash asked
    for must be committed (a signed checkpoint's size is). Raises DataLoss when an event
    is missing from the table.
    """

    def __init__(self, engine: Engine, events_table: Table) -> None:
        self._engine = engine
        self._events = events_table
        self._perfect: dict[tuple[int, int], bytes] = {}
        #: The latest proofs: a head goes to every witness, most of them asking for the same
        #: proof (the events a proof covers are committed: it never changes).
        self._proofs: dict[tuple[int, int], list[bytes]] = {}
        self._lock = threading.Lock()

    def _leaves(self, start: int, end: int) -> list[bytes]:
        t = self._events
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(t.c.seq, t.c.leaf_hash)
                .where(t.c.seq > start, t.c.seq <= end)
                .order_by(t.c.seq)
            ).all()
        leaves = []
        for expected, (seq, leaf) in enumerate(rows, start + 1):
            if seq != expected:
                raise DataLoss(f"the audit log has no event {expected} (next is {seq})")
            leaves.append(bytes(leaf))
        if len(leaves) != end - start:
            raise DataLoss(
                f"the audit log has no event {start + len(leaves) + 1}: it holds fewer than"
                f" the {end} events asked for"
            )
        return leaves

    def range_hash(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for a range of the RFC 6962 tree's shape: ``start`` is a
        multiple of the largest power of two not above ``end - start``."""
        with self._lock:
            return self._range(start, end)

    def _range(self, start: int, end: int) -> bytes:
        n = end - start
        if n <= 0:
            return EMPTY_ROOT
        if n <= BLOCK:
            return merkle_root(self._leaves(start, end))
        if n & (n - 1) == 0:  # a perfect subtree: computed once
            key = (start, n)
            found = self._perfect.get(key)
            if found is None:
                half = n // 2
                found = node_hash(self._range(start, start + half), self._range(start + half, end))
                self._perfect[key] = found
            return found
        k = _split(n)
        return node_hash(self._range(start, start + k), self._range(start + k, end))

    def root(self, size: int) -> bytes:
        """The root of the log's first ``size`` events."""
        return self.range_hash(0, size)

    def consistency(self, old_size: int, new_size: int) -> list[bytes]:
        """The consistency proof from ``old_size`` to ``new_size`` (RFC 6962 §2.1.2)."""
        with self._lock:
            found = self._proofs.get((old_size, new_size))
            if found is None:
                found = consistency_proof(old_size, new_size, self._range)
                if len(self._proofs) >= _KEPT_PROOFS:
                    self._proofs.clear()
                self._proofs[old_size, new_size] = found
            return list(found)


def consistency_proof(
    old_size: int, new_size: int, range_hash: Callable[[int, int], bytes]
) -> list[bytes]:
    """PROOF(m, D[n]) of RFC 6962 §2.1.2, with ``range_hash(start, end)`` = MTH(D[start:end]).
    Empty for ``m == n`` and for ``m == 0`` (nothing to prove)."""
    if not 0 <= old_size <= new_size:
        raise ValueError(f"no consistency proof from {old_size} to {new_size} events")
    if old_size in (0, new_size):
        return []
    proof: list[bytes] = []
    m, start, end, complete = old_size, 0, new_size, True
    # SUBPROOF(m, D[start:end], complete), unrolled: the recursion only ever descends.
    while True:
        n = end - start
        if m == n:
            if not complete:
                proof.append(range_hash(start, end))
            break
        k = _split(n)
        if m <= k:
            proof.append(range_hash(start + k, end))
            end = start + k
        else:
            proof.append(range_hash(start, start + k))
            m, start, complete = m - k, start + k, False
    proof.reverse()  # SUBPROOF appends the sibling after the deeper part of the proof
    return proof


def verify_consistency(
    old_size: int,
    new_size: int,
    old_root: bytes,
    new_root: bytes,
    proof: Sequence[bytes],
) -> bool:
    """Whether ``proof`` shows that the tree (``new_size``, ``new_root``) extends the tree
    (``old_size``, ``old_root``): RFC 9162 §2.1.4.2."""
    if not 0 <= old_size <= new_size or any(len(h) != 32 for h in proof):
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof  # the empty tree is a prefix of every tree
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    if not path:
        return False
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while True:
                    fn >>= 1
                    sn >>= 1
                    if fn & 1 or fn == 0:
                        break
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0
