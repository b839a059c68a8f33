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
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from sqlalchemy import BigInteger, Column, Engine, Index, LargeBinary, MetaData, Table, delete
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from dmp.clock import now_us
from dmp.db import writer
from dmp.errors import Unavailable

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


_Waiter = tuple[bytes, int, threading.Event, list[bool | BaseException]]


class StoredNonces:
    """Nonces in the service's database: a replay is refused across restarts and replicas."""

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
        dialect = engine.dialect.name
        self._insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        self._queue: list[_Waiter] = []
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None

    def first_time(self, nonce: bytes, keep_until_us: int, now: int) -> bool:
        """Raises Unavailable when the database cannot say (the call must then fail)."""
        waiter: _Waiter = (nonce, keep_until_us, threading.Event(), [])
        with self._ready:
            self._queue.append(waiter)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nonce-commit", daemon=True)
                self._thread.start()
            self._ready.notify()
        waiter[2].wait()
        outcome = waiter[3][0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                batch, self._queue = self._queue[:_BATCH], self._queue[_BATCH:]
            try:
                outcomes: list[bool | BaseException] = list(self._insert_batch(batch))
            except SQLAlchemyError as exc:
                log.error("recording assertion nonces failed: %s", type(exc).__name__)
                failure = Unavailable(
                    "cannot record the access assertion's nonce (the service's database does"
                    " not answer): retry shortly with a new assertion"
                )
                outcomes = [failure] * len(batch)
            for (_, _, done, result), outcome in zip(batch, outcomes, strict=True):
                result.append(outcome)
                done.set()

    def _insert_batch(self, batch: list[_Waiter]) -> list[bool]:
        rows: dict[bytes, int] = {}
        for nonce, keep_until, _, _ in batch:
            rows.setdefault(nonce, keep_until)
        stmt = (
            self._insert(self._table)
            .values([{"nonce": n, "keep_until_us": k} for n, k in rows.items()])
            .on_conflict_do_nothing(index_elements=["nonce"])
            .returning(self._table.c.nonce)
        )
        now = self._clock()
        with self._writer.begin() as conn:
            if now >= self._next_purge:
                conn.execute(delete(self._table).where(self._table.c.keep_until_us < now))
                self._next_purge = now + self._purge_every_us
            inserted = {bytes(n) for n in conn.execute(stmt).scalars()}
        # Within one batch the first waiter of a nonce gets it; any other is a replay.
        outcomes = []
        for nonce, _, _, _ in batch:
            outcomes.append(nonce in inserted)
            inserted.discard(nonce)
        return outcomes
