"""Seen assertion nonces, kept in the service's database until their assertion expires.

An access assertion is single-use. Remembering its nonce in memory only would make every
assertion still within its lifetime valid again after a restart; the nonce is therefore
inserted, unique, in the table ``seen_nonces`` before the call it allows goes on, and a
second insert of the same nonce (after a restart, or at another directory replica sharing
the database) tells a replay.

The check is on the path of every read, so concurrent callers share one transaction
(group commit, as the audit log does): one thread inserts every nonce waiting at that
moment in one statement (``INSERT ... ON CONFLICT DO NOTHING RETURNING nonce``) and learns
from what came back which were new. Expired nonces are deleted by that same thread now and
then.

A read pays one durable commit, not two: its nonce can instead be *reserved* (refused at
once if this process saw it already) and inserted in the very transaction that commits the
read's audit event (dmp/audit/log.py), which refuses the call if the insert finds it there
(another process, or before a restart). Either way no data is answered before the nonce is
durable.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

from sqlalchemy import BigInteger, Column, Engine, Index, LargeBinary, MetaData, Table, delete
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from dmp.clock import now_us
from dmp.db import rows_insert_sql, writer
from dmp.errors import Unavailable
from dmp.group_commit import GroupCommit

log = logging.getLogger("dmp.nonces")

#: Longest nonce accepted (and stored); assertions made by our clients carry 16 bytes.
MAX_NONCE_BYTES = 64
#: At most this many nonces per statement (SQLite's limit on bound variables is far above).
_BATCH = 500
#: Seconds between two deletions of expired nonces.
PURGE_INTERVAL_S = 60.0


class NonceLedger(Protocol):
    def first_time(self, nonce: bytes, keep_until_us: int, now: int) -> bool:
        """True the first time `nonce` is seen; it is then remembered until keep_until_us."""
        ...


def nonce_table(metadata: MetaData) -> Table:
    """The table of seen nonces, in a service's own metadata (node or directory)."""
    return Table(
        "seen_nonces",
        metadata,
        Column("nonce", LargeBinary(MAX_NONCE_BYTES), primary_key=True),
        # Until when the nonce must be remembered (its assertion's expiry plus the clock
        # skew tolerated), in microseconds since the epoch.
        Column("keep_until_us", BigInteger, nullable=False),
        Index("ix_seen_nonces_keep_until_us", "keep_until_us"),
    )


class MemoryNonces:
    """Nonces seen by this process only (tests and tools; services use StoredNonces)."""

    def __init__(self) -> None:
        self._seen: dict[bytes, int] = {}
        self._lock = threading.Lock()
        self._next_purge = 0

    def first_time(self, nonce: bytes, keep_until_us: int, now: int) -> bool:
        with self._lock:
            if now >= self._next_purge:
                self._seen = {n: e for n, e in self._seen.items() if e > now}
                self._next_purge = now + 10_000_000
            if nonce in self._seen:
                return False
            self._seen[nonce] = keep_until_us
            return True


class StoredNonces:
    """Nonces in the service's database: a replay is refused across restarts and replicas.
    Those seen lately are also kept in memory, to refuse a replay at once."""

    def __init__(
        self,
        engine: Engine,
        table: Table,
        *,
        clock: Callable[[], int] = now_us,
        purge_interval_s: float = PURGE_INTERVAL_S,
    ) -> None:
        self._writer = writer(engine)
        self._table = table
        self._clock = clock
        self._purge_every_us = int(purge_interval_s * 1_000_000)
        self._next_purge = 0
        self._commits: GroupCommit[tuple[bytes, int], bool] = GroupCommit(
            "nonce-commit", self._insert_batch, _unavailable, max_batch=_BATCH
        )
        self._recent = MemoryNonces()
        self._sql: dict[int, str] = {}
        self._purge_lock = threading.Lock()

    def first_time(self, nonce: bytes, keep_until_us: int, now: int) -> bool:
        """Raises Unavailable when the database cannot say (the call must then fail)."""
        return self._commits.submit((nonce, keep_until_us))

    def reserve(self, nonce: bytes, keep_until_us: int, now: int) -> bool:
        """False if this process saw `nonce` lately; else it is held in memory, and the
        caller must insert it durably (`insert_in` in the call's audit commit, or
        `first_time`) before answering anything."""
        return self._recent.first_time(nonce, keep_until_us, now)

    def insert_in(self, conn: Connection, items: Sequence[tuple[bytes, int]]) -> set[bytes]:
        """Insert nonces in the caller's transaction; those of them that were new."""
        rows: dict[bytes, int] = {}
        for nonce, keep_until in items:
            rows.setdefault(nonce, keep_until)
        if not rows:
            return set()
        now = self._clock()
        with self._purge_lock:
            purge, self._next_purge = (
                (True, now + self._purge_every_us)
                if now >= self._next_purge
                else (False, self._next_purge)
            )
        if purge:
            conn.execute(delete(self._table).where(self._table.c.keep_until_us < now))
        pairs = list(rows.items())
        inserted: set[bytes] = set()
        for start in range(0, len(pairs), _BATCH):
            chunk = pairs[start : start + _BATCH]
            params = [value for pair in chunk for value in pair]
            found = conn.exec_driver_sql(self._insert_sql(conn, len(chunk)), tuple(params))
            inserted.update(bytes(n) for n in found.scalars())
        return inserted

    def _insert_sql(self, conn: Connection, count: int) -> str:
        """`INSERT ... ON CONFLICT DO NOTHING RETURNING nonce` of `count` rows, in the
        driver's own parameter style, made once a count: it runs on every read, and
        SQLAlchemy's compilation of a many-row INSERT costs more than the insert."""
        sql = self._sql.get(count)
        if sql is None:
            sql = self._sql[count] = rows_insert_sql(
                conn,
                self._table.name,
                ("nonce", "keep_until_us"),
                count,
                "ON CONFLICT (nonce) DO NOTHING RETURNING nonce",
            )
        return sql

    def _insert_batch(self, batch: Sequence[tuple[bytes, int]]) -> list[bool | BaseException]:
        with self._writer.begin() as conn:
            inserted = self.insert_in(conn, batch)
        # Within one batch the first waiter of a nonce gets it; any other is a replay.
        outcomes: list[bool | BaseException] = []
        for nonce, _ in batch:
            outcomes.append(nonce in inserted)
            inserted.discard(nonce)
        return outcomes


def _unavailable(exc: Exception) -> BaseException:
    if not isinstance(exc, SQLAlchemyError):
        return exc
    log.error("recording assertion nonces failed: %s", type(exc).__name__)
    return Unavailable(
        "cannot record the access assertion's nonce (the service's database does"
        " not answer): retry shortly with a new assertion"
    )
