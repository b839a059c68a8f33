"""Group commit for writes: concurrent use cases share one transaction and one durable
commit, each in a savepoint of its own.

A write use case hands its work over (`SharedCommit.submit`) and waits. One thread takes
every write waiting at that moment (dmp/group_commit.py), opens ONE write transaction
(BEGIN IMMEDIATE on SQLite) and runs each call's work in a SAVEPOINT: a call refused half-way
(a domain error, or a key its insert broke) rolls back only its own part and gets its own
error, the others go on. Then the calls' audit events are appended, all in one INSERT, and
the transaction commits once; only then does each caller get its outcome. A write's records
and its audit event commit together, as in a unit of work of its own (dmp/unit_of_work.py);
a commit that fails fails every call of the batch: nothing is acknowledged that is not
durable.

The events are appended after every call's work, not inside it: the audit log's seq lock
(an advisory lock on PostgreSQL) is then taken after the rows the calls lock, the order
every other write transaction takes them in, so a batch never deadlocks against one.

Each call's work sees the rows the calls before it in the batch wrote (one transaction), and
nothing of their ORM objects (the session's identity map is emptied between calls): a
call reads the database as its own unit of work would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, SessionTransaction

from dmp.audit.calls import AuditedCall
from dmp.audit.events import AuditEvent
from dmp.audit.log import AuditLog
from dmp.db import writer
from dmp.errors import DmpError
from dmp.group_commit import GroupCommit

R = TypeVar("R")

log = logging.getLogger("dmp.shared_commit")

#: Errors of one call that roll back its savepoint only: the call's own refusal, or (on
#: PostgreSQL) a key its insert broke, which the use case answers as a race it lost.
CALL_ERRORS = (DmpError, IntegrityError)

#: At most this many calls share one transaction.
MAX_BATCH = 256


class SharedUnit:
    """What one call's work sees: the batch's session, and where its audit event goes (the
    same interface as a UnitOfWork's `session` and `audit`)."""

    __slots__ = ("_audited", "events", "session")

    def __init__(self, session: Session, audited: AuditedCall) -> None:
        self.session = session
        self._audited = audited
        self.events: list[AuditEvent] = []

    def audit(self, record_ids: Sequence[str] = (), patient_ins: str | None = None) -> None:
        """The call's allowed-access event (about `patient_ins` when given), appended with
        the batch's, in the same transaction as its writes."""
        if patient_ins is not None:
            self._audited.patient_ins = patient_ins
        if record_ids:
            self._audited.record_ids = record_ids
        self.events.append(self._audited.event())


#: One call's work in the shared transaction; what it returns is the call's outcome.
Work = Callable[[SharedUnit], R]


@dataclass
class _Call(Generic[R]):
    audited: AuditedCall
    work: Work[R]
    events: list[AuditEvent] = field(default_factory=list)


@dataclass
class BatchStats:
    """What the shared commits did, counted (tests read these, never times)."""

    batches: int = 0
    calls: int = 0
    largest: int = 0


class SharedCommit(Generic[R]):
    """The shared write transactions of one service's database."""

    def __init__(
        self,
        engine: Engine,
        audit_log: AuditLog,
        *,
        on_commit: Callable[[], None] | None = None,
        name: str = "write-commit",
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._engine = writer(engine)
        self._log = audit_log
        self._on_commit = on_commit
        self.stats = BatchStats()
        self._commits: GroupCommit[_Call[R], R] = GroupCommit(
            name, self._write_batch, _as_failure, max_batch=max_batch
        )

    def submit(self, audited: AuditedCall, work: Work[R]) -> R:
        """Run `work` in the next shared transaction; its outcome once that committed, or
        raise its own error (or the commit's). `audited.recorded` then says whether the
        call's allowed-access event was committed."""
        return self._commits.submit(_Call(audited, work))

    def _write_batch(self, calls: Sequence[_Call[R]]) -> list[R | BaseException]:
        outcomes: list[R | BaseException] = []
        alone = len(calls) == 1  # no savepoint needed: the transaction is the call's own
        session = Session(self._engine, expire_on_commit=False)
        try:
            session.begin()
            for call in calls:
                outcomes.append(self._run(session, call, alone))
            done = [c for c, o in zip(calls, outcomes, strict=True) if _ok(o)]
            if not done:
                return outcomes  # rolled back on close
            self._log.append_many(session, [e for c in done for e in c.events])
            session.commit()
            # Committed: every event of the batch is durable with its writes.
            for call in done:
                call.audited.recorded = True
        except Exception as exc:
            for call in calls:
                call.audited.recorded = False  # its failure is audited by the call (calls.py)
            return [exc] * len(calls)
        finally:
            session.close()
        self.stats.batches += 1
        self.stats.calls += len(calls)
        self.stats.largest = max(self.stats.largest, len(calls))
        if self._on_commit is not None:
            try:
                self._on_commit()
            except Exception:  # the writes are durable: a wake-up lost is caught up later
                log.exception("after a shared commit")
        return outcomes

    def _run(self, session: Session, call: _Call[R], alone: bool) -> R | BaseException:
        unit = SharedUnit(session, call.audited)
        savepoint: AbstractContextManager[SessionTransaction | None] = (
            nullcontext() if alone else session.begin_nested()
        )
        try:
            with savepoint:
                outcome = call.work(unit)
                session.flush()  # its ORM changes, before the identity map is emptied
        except CALL_ERRORS as exc:
            return exc
        finally:
            session.expunge_all()
        call.events = unit.events
        return outcome


def _ok(outcome: Any) -> bool:
    return not isinstance(outcome, BaseException)


def _as_failure(exc: Exception) -> BaseException:
    return exc
