"""An ingest stream's batches, written one at a time on a thread of their own while the
stream's next batch is read and validated.

The database's work (SQLite's inserts and fsync, PostgreSQL's COPY and commit in its own
process) runs without the interpreter lock, so the request thread validates the next
batch meanwhile. Batches still commit one after the other, in the stream's order: a batch
starts writing only once the one before it is durable, and the call answers only once
the last is. A batch's error is raised on the request thread, at its next `submit` or
`wait`.

The writer thread audits with its own copy of the call's AuditedCall (the request thread
goes on naming each record's patient on the original, for a refusal's event); whether
an event is recorded is copied back once the batch is done, as a write on the request
thread would have left it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from dmp.audit.calls import AuditedCall
from node.drafts import Draft

#: Writes one batch in one unit of work, audited with the AuditedCall it is given.
WriteBatch = Callable[[AuditedCall, Sequence[Draft]], int]


class BatchWriter:
    """At most one batch in flight, behind the stream that reads the next one."""

    def __init__(self, write: WriteBatch, audited: AuditedCall) -> None:
        self._write = write
        self._audited = audited
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-batch")
        self._pending: tuple[Future[int], AuditedCall] | None = None
        #: Records of the batches committed so far.
        self.stored = 0

    def submit(self, batch: Sequence[Draft]) -> None:
        """Write `batch` once the batch in flight is durable (its error raised here)."""
        self.wait()
        own = dataclasses.replace(self._audited)
        self._pending = (self._pool.submit(self._write, own, batch), own)

    def wait(self) -> int:
        """Wait until the batch in flight is durable (or raise its error); the records
        stored so far."""
        if self._pending is not None:
            future, own = self._pending
            self._pending = None
            try:
                self.stored += future.result()
            finally:
                self._audited.recorded = own.recorded
        return self.stored

    def close(self) -> None:
        """Wait for a batch still in flight (a stream that already failed otherwise: its
        error is the call's, this one's is dropped), then end the thread."""
        try:
            with contextlib.suppress(Exception):
                self.wait()
        finally:
            self._pool.shutdown(wait=True)
