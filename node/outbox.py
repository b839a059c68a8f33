"""The locator outbox: which patients' fragments the directory must hear about.

A write adds one row per patient in its own transaction; delivery reads a batch, reports
each patient's absolute count, and then forgets exactly the rows it read. Never "every row
up to the highest seq read": on PostgreSQL a row takes its seq when it is inserted, before
the lock that orders commits, so a row with a lower seq can commit after the read, and
deleting by range would drop it unreported (its patient then missing from every view until
written again in this region).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy import Engine, Table, delete, func, select
from sqlalchemy.orm import Session

from dmp.db import writer
from dmp.patients import Traits
from node.bulk import insert_rows
from node.keys import PatientKey, Sealer, open_traits
from node.models import OutboxRow, PatientRow, RecordRow

#: The Core table (a batch insert needs no ORM object per row).
OUTBOX: Table = OutboxRow.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class FragmentSummary:
    """What the directory's locator learns about a patient on this node."""

    traits: Traits
    count: int
    last_update_us: int


class Pending(NamedTuple):
    """A batch read from the outbox: the rows' seqs and a summary per patient."""

    seqs: tuple[int, ...]
    summaries: list[FragmentSummary]


def announce(session: Session, patients: Iterable[str], now_us: int) -> None:
    """Add one outbox row per patient, in the transaction of the write that stores them."""
    rows = [{"patient_ins": ins, "created_us": now_us} for ins in sorted(set(patients))]
    if rows:
        insert_rows(session, OUTBOX, rows)  # straight to the driver: it is every write's


class LocatorOutbox:
    """The outbox of one node's database."""

    def __init__(self, engine: Engine, sealer: Sealer | None = None) -> None:
        self._engine = engine
        self._sealer = sealer
        self._writer = writer(engine)

    def pending(self, limit: int = 500) -> Pending:
        """The oldest rows to deliver (seqs as read) and each of their patients' counts.

        Counts are read after the rows: a record committed in between is counted now and
        its own row, not read here, is delivered again later (a report is absolute)."""
        with Session(self._engine) as session:
            rows = session.execute(
                select(OutboxRow.seq, OutboxRow.patient_ins).order_by(OutboxRow.seq).limit(limit)
            ).all()
            if not rows:
                return Pending((), [])
            patients = sorted({ins for _, ins in rows})
            counts = session.execute(
                select(RecordRow.patient_ins, func.count(), func.max(RecordRow.created_us))
                .where(RecordRow.patient_ins.in_(patients))
                .group_by(RecordRow.patient_ins)
            ).all()
            known = {
                row.ins: row
                for row in session.scalars(select(PatientRow).where(PatientRow.ins.in_(patients)))
            }
            sealed = [ins for ins, row in known.items() if row.sealed is not None]
            keys = {}
            if sealed and self._sealer is not None:
                keys = self._sealer.keys_for_read(session.connection(), sealed)
        summaries = [
            FragmentSummary(self._traits(known.get(ins), keys, ins), count, last)
            for ins, count, last in counts
        ]
        return Pending(tuple(seq for seq, _ in rows), summaries)

    @staticmethod
    def _traits(row: PatientRow | None, keys: Mapping[str, PatientKey], ins: str) -> Traits:
        """What a report says of a patient: their traits, opened if sealed; those kept in
        clear only when their key is gone (shredded)."""
        if row is None:
            return Traits(ins)
        found = keys.get(ins)
        return open_traits(None if found is None else found.key, row)

    def acknowledge(self, seqs: Sequence[int]) -> None:
        """Forget the rows that were read and delivered: those, and no other."""
        if not seqs:
            return
        with Session(self._writer) as session, session.begin():
            session.execute(delete(OutboxRow).where(OutboxRow.seq.in_(list(seqs))))
