"""A committing thread's connection, kept from one transaction to the next while they
follow each other closely.

A connection's check-out and check-in (the pool's reset) cost a small transaction about as
much as its statements. A group commit's writer (dmp/shared_commit.py for writes,
dmp/audit/log.py for reads' audit events) therefore keeps the connection it committed on,
and the next batch takes it back if it comes within `HOLD_SECONDS`; one idle for longer
goes back to the pool, and the next batch takes one checked as the pool checks it. A
connection whose transaction failed is never kept (`discard`: invalidated, so that it is
neither reused nor returned to the pool in whatever state the failure left it). `close`
(the service's stop) returns the one kept; after it every batch takes one from the pool
and gives it back.
"""

from __future__ import annotations

import threading
import time

from sqlalchemy import Engine
from sqlalchemy.engine import Connection

#: A connection kept after a transaction serves the next only if it comes within this many
#: seconds; else it goes back to the pool.
HOLD_SECONDS = 1.0


class KeptConnection:
    """The connection one committing thread keeps between its transactions."""

    def __init__(self, engine: Engine, hold_seconds: float = HOLD_SECONDS) -> None:
        self._engine = engine
        self._hold = hold_seconds
        self._held: Connection | None = None
        self._held_at = 0.0
        self._closed = False
        self._lock = threading.Lock()
        #: Connections taken from the pool, and kept ones taken again (tests count these).
        self.checked_out = 0
        self.reused = 0

    def take(self) -> Connection:
        """The connection kept from the last transaction if it is recent, else the pool's."""
        with self._lock:
            held, self._held = self._held, None
        if held is not None:
            if time.monotonic() - self._held_at <= self._hold and not held.invalidated:
                self.reused += 1
                return held
            held.close()
        self.checked_out += 1
        return self._engine.connect()

    def keep(self, connection: Connection) -> None:
        """Keep `connection` (its transaction committed or rolled back cleanly) for the next
        transaction; after `close`, or with one already kept, it goes back to the pool."""
        with self._lock:
            if not self._closed and self._held is None and not connection.invalidated:
                self._held, self._held_at = connection, time.monotonic()
                return
        connection.close()

    @staticmethod
    def discard(connection: Connection) -> None:
        """A connection whose transaction failed: closed without going back to the pool."""
        connection.invalidate()
        connection.close()

    def close(self) -> None:
        """Return the connection kept (the service's stop); later ones are not kept."""
        with self._lock:
            self._closed = True
            held, self._held = self._held, None
        if held is not None:
            held.close()
