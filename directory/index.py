"""The national patient index and fragment locator: identities, where fragments live."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from sqlalchemy import Engine, bindparam, select
from sqlalchemy.orm import Session

from directory.models import FragmentRow, IdentityConflictRow, PatientRow
from dmp.clock import now_us
from dmp.db import writer
from dmp.errors import NotFound
from dmp.ins import normalize_ins
from dmp.patients import Traits
from dmp.prepared import prepare

_PATIENT = select(
    PatientRow.birth_family_name,
    PatientRow.given_names,
    PatientRow.birth_date,
    PatientRow.sex,
    PatientRow.birthplace_code,
).where(PatientRow.ins == bindparam("ins"))
_FRAGMENTS = (
    select(FragmentRow.region, FragmentRow.record_count, FragmentRow.last_update_us)
    .where(FragmentRow.ins == bindparam("ins"), FragmentRow.record_count > 0)
    .order_by(FragmentRow.region)
)


@dataclass(frozen=True, slots=True)
class Fragment:
    region: str
    record_count: int
    last_update_us: int


@dataclass(frozen=True, slots=True)
class FragmentUpdate:
    traits: Traits
    record_count: int
    last_update_us: int


@dataclass(frozen=True, slots=True)
class Conflict:
    seq: int
    ins: str
    stored: Traits
    proposed: Traits
    reported_by: str
    created_us: int


class PatientIndex:
    def __init__(self, engine: Engine, clock: Callable[[], int] = now_us) -> None:
        self._engine = engine
        self._writer = writer(engine)
        self._clock = clock
        self._fragments = prepare(_FRAGMENTS, engine.dialect)

    def merge(
        self, session: Session, traits: Traits, reported_by: str
    ) -> tuple[Traits, bool] | list[str]:
        """Store or confirm an identity in the session's transaction: the identity and
        whether it is new, or the traits that contradict the stored ones (the proposal is
        kept for review)."""
        row = session.get(PatientRow, traits.ins)
        if row is None:
            session.add(
                PatientRow(ins=traits.ins, created_us=self._clock(), **PatientRow.values(traits))
            )
            return traits, True
        stored = row.traits()
        conflicts = stored.contradicts(traits)
        if conflicts:
            session.add(
                IdentityConflictRow(
                    ins=traits.ins,
                    proposed=json.dumps(asdict(traits)),
                    reported_by=reported_by,
                    created_us=self._clock(),
                )
            )
            return conflicts
        row.fill(traits)
        return row.traits(), False

    def get(self, ins: str) -> tuple[Traits, list[Fragment]]:
        ins = normalize_ins(ins)
        # Core statements built once, on a plain connection: no ORM session per lookup.
        with self._engine.connect() as connection:
            row = connection.execute(_PATIENT, {"ins": ins}).first()
            fragments = [Fragment(*f) for f in connection.execute(_FRAGMENTS, {"ins": ins})]
        if row is None and not fragments:
            raise NotFound(f"no patient with INS {ins} in the directory")
        return (Traits(ins, *row) if row is not None else Traits(ins)), fragments

    def fragments(self, ins: str) -> list[Fragment]:
        # Once a view: the compiled query on the driver's cursor, one statement, no BEGIN.
        with self._engine.connect() as connection:
            return [Fragment(*f) for f in self._fragments.fetch(connection, {"ins": ins})]

    def report(self, region: str, updates: Sequence[FragmentUpdate], reported_by: str) -> list[str]:
        """Record a node's fragment counts; return the INS whose traits conflict."""
        conflicting: list[str] = []
        with Session(self._writer) as session, session.begin():
            for update in updates:
                if not update.traits.empty:
                    outcome = self._merge_reported(session, update.traits, reported_by)
                    if outcome:
                        conflicting.append(update.traits.ins)
                        continue
                row = session.get(FragmentRow, (update.traits.ins, region))
                if row is None:
                    session.add(
                        FragmentRow(
                            ins=update.traits.ins,
                            region=region,
                            record_count=update.record_count,
                            last_update_us=update.last_update_us,
                        )
                    )
                else:
                    row.record_count = update.record_count
                    row.last_update_us = max(row.last_update_us, update.last_update_us)
        return conflicting

    def _merge_reported(self, session: Session, traits: Traits, reported_by: str) -> list[str]:
        """A node's traits complete a registered identity (or are kept as a conflict); they
        never create one: identities enter the index through RegisterPatient, audited, so
        that no node can squat an INS before the patient's real registration."""
        row = session.get(PatientRow, traits.ins)
        if row is None:
            return []
        outcome = self.merge(session, traits, reported_by)
        return outcome if isinstance(outcome, list) else []

    def conflicts(self, after_seq: int, limit: int) -> list[Conflict]:
        with Session(self._engine) as session:
            rows = session.scalars(
                select(IdentityConflictRow)
                .where(IdentityConflictRow.seq > after_seq)
                .order_by(IdentityConflictRow.seq)
                .limit(limit)
            ).all()
            stored = {
                row.ins: row.traits()
                for row in session.scalars(
                    select(PatientRow).where(PatientRow.ins.in_({r.ins for r in rows}))
                )
            }
        return [
            Conflict(
                seq=row.seq,
                ins=row.ins,
                stored=stored.get(row.ins, Traits(row.ins)),
                proposed=Traits(**json.loads(row.proposed)),
                reported_by=row.reported_by,
                created_us=row.created_us,
            )
            for row in rows
        ]
