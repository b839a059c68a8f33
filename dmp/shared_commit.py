"""Group commit for writes: concurrent use cases share one transaction and one durable
commit, each in a savepoint of its own.

A write use case hands its item over (`SharedCommit.submit`) and waits. One thread takes
every write waiting at that moment (dmp/group_commit.py), opens ONE write transaction
(BEGIN IMMEDIATE on SQLite) and writes them all at once (`write_many`: one statement per
table for the whole batch), in a SAVEPOINT. If that is refused (one call's domain error, or
a key its insert broke), the savepoint rolls back and the batch is written again one call
at a time, each in a savepoint of its own: the refused call gets its own error, the others
go on. Then the calls' audit events are appended, all in one INSERT, and the transaction
commits once; only then does each caller get its outcome. A write's records
and its audit event commit together, as in a unit of work of its own (dmp/unit_of_work.py);
a commit that fails fails every call of the batch: nothing is acknowledged that is not
durable.

The events are appended after every call's work, not inside it: the audit log's seq lock
(an advisory lock on PostgreSQL) is then taken after the rows the calls lock, the order
every other write transaction takes them in, so a batch never deadlocks against one.

Each write sees the rows the ones before it in the batch wrote (one transaction), and
nothing of their ORM objects (the session's identity map is emptied between writes): it
reads the database as its own unit of work would.

The committing thread keeps its connection from one batch to the next while batches follow
each other (dmp/kept_connection.py): a connection's check-out and check-in (the pool's
reset) cost a batch of one about as much as its statements. `close` (the node's stop)
returns the one held.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Engine
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, SessionTransaction

from dmp.audit.calls import AuditedCall
from dmp.audit.events import AuditEvent
from dmp.audit.log import AuditLog
from dmp.db import writer
from dmp.errors import DmpError
from dmp.group_commit import GroupCommit
from dmp.kept_connection import KeptConnection

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("dmp.shared_commit")

#: Errors of one call that roll back its savepoint only: the call's own refusal, or (on
#: PostgreSQL) a key its insert broke, which the use case answers as a race it lost.
CALL_ERRORS = (DmpError, IntegrityError)

#: At most this many calls share one transaction.
MAX_BATCH = 256


class SharedCall(Generic[T]):
    """One call of a batch: its item, its audited call, and its audit events."""

    __slots__ = ("_detail", "audited", "events", "item")

    def __init__(self, audited: AuditedCall, item: T) -> None:
        self.audited = audited
        self.item = item
        self.events: list[AuditEvent] = []
        self._detail = audited.detail

    def audit(self, record_ids: Sequence[str] = (), patient_ins: str | None = None) -> None:
        """The call's allowed-access event (about `patient_ins` when given), appended with
        the batch's, in the same transaction as its writes."""
        if patient_ins is not None:
            self.audited.patient_ins = patient_ins
        if record_ids:
            self.audited.record_ids = record_ids
        self.events.append(self.audited.event())

    def _reset(self) -> None:
        """Forget what a rolled-back attempt wrote down."""
        self.events = []
        self.audited.detail = self._detail


#: Writes the items of these calls in the session's transaction, calling each call's
#: `audit`; one outcome per call, in order. Raises if any is refused.
WriteMany = Callable[[Session, Sequence[SharedCall[T]]], Sequence[R]]


@dataclass
class BatchStats:
    """What the shared commits did, counted (tests read these, never times)."""

    #: Transactions committed, calls they acknowledged or refused, the largest batch.
    batches: int = 0
    calls: int = 0
    largest: int = 0
    #: Batches written again one call at a time, because one call was refused.
    one_by_one: int = 0
    #: Calls in the transaction being written now (0 between transactions).
    writing: int = 0


class SharedCommit(Generic[T, R]):
    """The shared write transactions of one use case over one service's database."""

    def __init__(
        self,
        engine: Engine,
        audit_log: AuditLog,
        write_many: WriteMany[T, R],
        *,
        on_commit: Callable[[], None] | None = None,
        name: str = "write-commit",
        max_batch: int = MAX_BATCH,
    ) -> None:
        # Tagged with its name: which transactions are shared ones (a commit listener can tell).
        self._engine = writer(engine).execution_options(dmp_commit=name)
        self._log = audit_log
        self._write_many = write_many
        self._on_commit = on_commit
        self.stats = BatchStats()
        #: The committing thread's connection between batches.
        self._kept = KeptConnection(self._engine)
        self._commits: GroupCommit[SharedCall[T], R] = GroupCommit(
            name, self._write_batch, _as_failure, max_batch=max_batch
        )

    def submit(self, audited: AuditedCall, item: T) -> R:
        """Write `item` in the next shared transaction; its outcome once that committed, or
        raise its own error (or the commit's). `audited.recorded` then says whether the
        call's allowed-access event was committed."""
        return self._commits.submit(SharedCall(audited, item))

    def waiting(self) -> int:
        """How many calls wait for the next shared transaction."""
        return self._commits.waiting()

    def close(self) -> None:
        """Return the connection kept between batches (after the last call: the node's
        stop); a batch after this takes one from the pool and gives it back."""
        self._kept.close()

    def _write_batch(self, calls: Sequence[SharedCall[T]]) -> list[R | BaseException]:
        self.stats.writing = len(calls)
        try:
            connection = self._kept.take()
            outcomes, healthy = self._write(connection, calls)
            if healthy:
                self._kept.keep(connection)
            else:
                connection.close()  # invalidated by _write: never back to the pool
            return outcomes
        finally:
            self.stats.writing = 0

    def _write(
        self, connection: Connection, calls: Sequence[SharedCall[T]]
    ) -> tuple[list[R | BaseException], bool]:
        """The batch's outcomes, and whether the connection may serve the next one."""
        # Bound to the connection: the session begins (BEGIN IMMEDIATE on SQLite), commits
        # and ends its transaction on it, and leaves the connection open.
        session = Session(bind=connection, expire_on_commit=False)
        try:
            session.begin()
            outcomes = self._together(session, calls)
            if outcomes is None:
                self.stats.one_by_one += len(calls) > 1
                outcomes = [self._alone(session, call, len(calls) == 1) for call in calls]
            done = [c for c, o in zip(calls, outcomes, strict=True) if _ok(o)]
            if not done:
                session.rollback()
                return outcomes, True
            self._log.append_many(session, [e for c in done for e in c.events])
            session.commit()
            # Committed: every event of the batch is durable with its writes.
            for call in done:
                call.audited.recorded = True
        except Exception as exc:
            for call in calls:
                call.audited.recorded = False  # its failure is audited by the call (calls.py)
            # Never back to the pool (nor to the next batch) in whatever state a failed
            # COMMIT left it (its transaction may still be open): closed, which rolls back
            # what it holds.
            connection.invalidate()
            return [exc] * len(calls), False
        finally:
            session.close()
        self.stats.batches += 1
        self.stats.calls += len(calls)
        self.stats.largest = max(self.stats.largest, len(calls))
        if self._on_commit is not None:
            try:
                self._on_commit()
            except Exception:  # the writes are durable: only the wake-up is lost
                log.exception("after a shared commit")
        return outcomes, True

    def _together(
        self, session: Session, calls: Sequence[SharedCall[T]]
    ) -> list[R | BaseException] | None:
        """Every call's write at once, in one savepoint; None if one was refused."""
        if len(calls) == 1:
            return None  # on its own: its error is its own
        try:
            with session.begin_nested():
                outcomes = list(self._write_many(session, calls))
                session.flush()
        except CALL_ERRORS:
            for call in calls:
                call._reset()
            return None
        finally:
            session.expunge_all()
        return list(outcomes)

    def _alone(self, session: Session, call: SharedCall[T], alone: bool) -> R | BaseException:
        """One call's write in a savepoint of its own (none when it is the batch)."""
        savepoint: AbstractContextManager[SessionTransaction | None] = (
            nullcontext() if alone else session.begin_nested()
        )
        try:
            with savepoint:
                (outcome,) = self._write_many(session, [call])
                session.flush()  # its ORM changes, before the identity map is emptied
        except CALL_ERRORS as exc:
            call._reset()
            return exc
        finally:
            session.expunge_all()
        return outcome


def _ok(outcome: Any) -> bool:
    return not isinstance(outcome, BaseException)


def _as_failure(exc: Exception) -> BaseException:
    return exc
