"""The node's prescription repository: the prescriptions it holds, their progress and their
dispensings, in the caller's unit of work. It knows nothing of who may do what
(dmp/policy.py), of the rules (dmp/prescription_rules.py) or of audit.

A change of progress happens only on a row locked in the unit of work (`lock`: SELECT ...
FOR UPDATE on PostgreSQL; on SQLite the unit of work's BEGIN IMMEDIATE already holds the
database's write lock), and is written by an UPDATE conditional on the version read, which
it raises: whatever the isolation, no two dispensings can both apply to one version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from dmp.errors import Unavailable
from dmp.prescription_rules import Progress
from dmp.records import kind_name
from dmp.v1 import prescription_pb2, record_pb2
from node.models import DispensationRow, PrescriptionRow, RecordRow


class StaleProgress(Unavailable):
    """The row changed between its read and its update: never with the row locked."""


def progress_of(row: PrescriptionRow) -> Progress:
    return Progress(
        dispensed=row.dispensed,
        last_dispensed_us=row.last_dispensed_us,
        cancelled_us=row.cancelled_us,
        holder=row.holder,
        held_until_us=row.held_until_us,
    )


def payload_digest(signed: prescription_pb2.SignedPrescription) -> str:
    return hashlib.sha256(signed.prescription).hexdigest()


class PrescriptionStore:
    """The prescriptions of one region, over one database."""

    def __init__(self, engine: Engine, region: str) -> None:
        self._engine = engine
        self.region = region

    # -- reads outside a unit of work -------------------------------------------------------

    def find(self, prescription_id: str) -> PrescriptionRow | None:
        with Session(self._engine) as session:
            return session.get(PrescriptionRow, prescription_id)

    def with_dispensations(
        self, prescription_id: str
    ) -> tuple[PrescriptionRow | None, list[prescription_pb2.Dispensation]]:
        """A prescription and its dispensings, read in one transaction."""
        with Session(self._engine) as session:
            row = session.get(PrescriptionRow, prescription_id)
            if row is None:
                return None, []
            return row, self.dispensations(session, prescription_id)

    def for_patient(
        self, patient_ins: str
    ) -> list[tuple[PrescriptionRow, list[prescription_pb2.Dispensation]]]:
        """A patient's prescriptions, newest first, each with its dispensings."""
        with Session(self._engine) as session:
            rows = list(
                session.scalars(
                    select(PrescriptionRow)
                    .where(PrescriptionRow.patient_ins == patient_ins)
                    .order_by(PrescriptionRow.authored_us.desc(), PrescriptionRow.id.desc())
                )
            )
            given = self._dispensations_of(session, [r.id for r in rows])
            return [(row, given.get(row.id, [])) for row in rows]

    def record_ids(self, patient_ins: str, prescription_ids: Sequence[str]) -> dict[str, str]:
        """The id of the `prescription` record written for each of the patient's
        prescriptions (what a patient masks); by patient first, as records are indexed."""
        if not prescription_ids:
            return {}
        with Session(self._engine) as session:
            rows = session.execute(
                select(RecordRow.prescription_id, RecordRow.id).where(
                    RecordRow.patient_ins == patient_ins,
                    RecordRow.prescription_id.in_(list(prescription_ids)),
                    RecordRow.kind == kind_name(record_pb2.RECORD_KIND_PRESCRIPTION),
                )
            )
            return {rx: record_id for rx, record_id in rows if rx is not None}

    # -- in a unit of work ----------------------------------------------------------------

    def lock(self, session: Session, prescription_id: str) -> PrescriptionRow | None:
        """The row, locked until the unit of work ends (FOR UPDATE; SQLite's unit of work
        holds the write lock already)."""
        return session.scalar(
            select(PrescriptionRow)
            .where(PrescriptionRow.id == prescription_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )

    def insert(
        self,
        session: Session,
        prescription: prescription_pb2.Prescription,
        signed: prescription_pb2.SignedPrescription,
        now_us: int,
    ) -> PrescriptionRow:
        row = PrescriptionRow(
            id=prescription.id,
            patient_ins=prescription.patient_ins,
            prescriber_rpps=prescription.prescriber.rpps,
            authored_us=prescription.authored_time.seconds * 1_000_000
            + prescription.authored_time.nanos // 1000,
            signed=signed.SerializeToString(deterministic=True),
            payload_sha256=payload_digest(signed),
            created_us=now_us,
            version=1,
            dispensed=0,
        )
        session.add(row)
        session.flush()
        return row

    def save_progress(
        self,
        session: Session,
        row: PrescriptionRow,
        progress: Progress,
        *,
        pharmacy: str | None = None,
        cancel_reason: str | None = None,
    ) -> None:
        """Write the new progress of a locked row, conditional on the version read."""
        values: dict[str, object] = {
            "version": row.version + 1,
            "dispensed": progress.dispensed,
            "last_dispensed_us": progress.last_dispensed_us,
            "cancelled_us": progress.cancelled_us,
            "holder": progress.holder,
            "held_until_us": progress.held_until_us,
            "holder_pharmacy": pharmacy if progress.holder is not None else None,
        }
        if cancel_reason is not None:
            values["cancel_reason"] = cancel_reason
        result = session.execute(
            update(PrescriptionRow)
            .where(PrescriptionRow.id == row.id, PrescriptionRow.version == row.version)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise StaleProgress(
                f"prescription {row.id} changed during this call; nothing was recorded: retry"
            )
        session.refresh(row)

    def dispensation_by_key(
        self, session: Session, prescription_id: str, key: str
    ) -> prescription_pb2.Dispensation | None:
        message = session.scalar(
            select(DispensationRow.message).where(
                DispensationRow.prescription_id == prescription_id,
                DispensationRow.idempotency_key == key,
            )
        )
        return None if message is None else prescription_pb2.Dispensation.FromString(message)

    def add_dispensation(
        self,
        session: Session,
        dispensation: prescription_pb2.Dispensation,
        pharmacist_identity: str,
        now_us: int,
    ) -> None:
        session.add(
            DispensationRow(
                id=dispensation.id,
                prescription_id=dispensation.prescription_id,
                dispensing=dispensation.dispensing,
                idempotency_key=dispensation.idempotency_key,
                pharmacist_identity=pharmacist_identity,
                created_us=now_us,
                message=dispensation.SerializeToString(deterministic=True),
            )
        )
        session.flush()

    def dispensations(
        self, session: Session, prescription_id: str
    ) -> list[prescription_pb2.Dispensation]:
        """A prescription's dispensings, oldest first."""
        return self._dispensations_of(session, [prescription_id]).get(prescription_id, [])

    @staticmethod
    def _dispensations_of(
        session: Session, ids: Sequence[str]
    ) -> dict[str, list[prescription_pb2.Dispensation]]:
        out: dict[str, list[prescription_pb2.Dispensation]] = {}
        if not ids:
            return out
        rows = session.execute(
            select(DispensationRow.prescription_id, DispensationRow.message)
            .where(DispensationRow.prescription_id.in_(list(ids)))
            .order_by(DispensationRow.prescription_id, DispensationRow.dispensing)
        )
        for prescription_id, message in rows:
            out.setdefault(prescription_id, []).append(
                prescription_pb2.Dispensation.FromString(message)
            )
        return out
