"""One use case's transaction: what it writes and the audit event of the call commit
together, or nothing does (cosmicpython's unit of work).

A use case opens a unit of work on the service's database, has its repositories write in
`uow.session`, records the call's audit event with `uow.audit(...)`, then `uow.commit()`.
Leaving the block without committing rolls everything back: an error raised half-way
leaves nothing half-written. Repositories take the session; they know nothing of access
or audit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from dmp.audit.calls import AuditedCall
from dmp.db import writer


class UnitOfWork:
    """A write transaction (BEGIN IMMEDIATE on SQLite) for one audited call."""

    def __init__(
        self,
        engine: Engine,
        audited: AuditedCall,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self._engine = writer(engine)
        self._audited = audited
        self._on_commit = on_commit
        # Rows read or written stay readable once committed: the answer is packed after.
        self.session = Session(self._engine, expire_on_commit=False)
        self.committed = False

    def __enter__(self) -> UnitOfWork:
        self.session.begin()
        return self

    def audit(self, record_ids: Sequence[str] = (), patient_ins: str | None = None) -> None:
        """Append the call's allowed-access event (about `patient_ins` when given) in this
        transaction."""
        if patient_ins is not None:
            self._audited.patient_ins = patient_ins
        self._audited.append(self.session, record_ids)

    def commit(self) -> None:
        self.session.commit()
        self.committed = True
        self._audited.nonce = None  # inserted with the event (AuditedCall.append)
        if self._on_commit is not None:
            self._on_commit()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if not self.committed:
                self.session.rollback()
                # The event appended went with the rollback: the call's failure is audited
                # instead (dmp/audit/calls.py Auditor.call).
                self._audited.recorded = False
        finally:
            self.session.close()
