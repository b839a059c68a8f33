"""The node's prescription repository: the prescriptions it holds, their progress and their
dispensings, in the caller's unit of work. It knows nothing of who may do what
(dmp/policy.py), of the rules (dmp/prescription_rules.py) or of audit.

A change of progress happens only on a row locked in the unit of work (`lock`: SELECT ...
FOR UPDATE on PostgreSQL; on SQLite the unit of work's BEGIN IMMEDIATE already holds the
database's write lock), and is written by an UPDATE conditional on the version read, which
it raises: whatever the isolation, no two dispensings can both apply to one version.

With encryption at rest (node/keys.py) the signed act and each dispensing's message are
sealed with the patient's data key, bound to their id and column (a serialized message
never begins with the sealed format's byte, so old clear rows are told apart); the free
text of its progress (cancel reason, holder's pharmacy) in `sealed`, bound to the id and
the version it was written at, its clear columns then empty.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from dmp.clock import now_us as clock_now
from dmp.envelope import is_sealed, open_value, seal
from dmp.errors import DataLoss, FailedPrecondition, Unavailable
from dmp.prescription_rules import Progress
from dmp.records import kind_name
from dmp.v1 import prescription_pb2, record_pb2
from node.keys import Sealer, shredded_error
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


@dataclass(frozen=True, slots=True)
class FreeText:
    """A prescription's free text: why it was cancelled, which pharmacy holds it."""

    cancel_reason: str | None
    holder_pharmacy: str | None


def seal_free_text(
    key: bytes, prescription_id: str, version: int, reason: str | None, pharmacy: str | None
) -> dict[str, object]:
    """The stored form of a prescription's free text at `version`: sealed, columns empty."""
    plain = json.dumps({"cancel_reason": reason, "holder_pharmacy": pharmacy}).encode()
    return {
        "cancel_reason": None,
        "holder_pharmacy": None,
        "sealed": seal(key, plain, prescription_id, version, "free_text"),
    }


def payload_digest(signed: prescription_pb2.SignedPrescription) -> str:
    return hashlib.sha256(signed.prescription).hexdigest()


class PrescriptionStore:
    """The prescriptions of one region, over one database."""

    def __init__(self, engine: Engine, region: str, sealer: Sealer | None = None) -> None:
        self._engine = engine
        self.region = region
        self.sealer = sealer

    # -- encryption at rest ---------------------------------------------------------------

    def _seal(
        self, session: Session, ins: str, value: bytes, name: str, column: str, now: int
    ) -> bytes:
        if self.sealer is None:
            return value
        return seal(self.sealer.key_for_write(session, ins, now), value, name, 0, column)

    def _open(self, ins: str, value: bytes, name: str, column: str, version: int = 0) -> bytes:
        if not is_sealed(value):
            return value
        if self.sealer is None:
            raise FailedPrecondition(
                f"node {self.region} holds encrypted prescriptions but was started without"
                " its KEK: restart it with --kek-file"
            )
        with self._engine.connect() as connection:
            found = self.sealer.keys_for_read(connection, [ins]).get(ins)
        if found is None:
            raise DataLoss(
                f"prescription data {name}: its patient's data key is missing on node"
                f" {self.region}; the node's operator must restore it from the last verified"
                " backup"
            )
        if found.key is None:
            raise shredded_error(name, found.shredded_us or 0)
        return open_value(found.key, value, name, version, column)

    def free_text_of(self, row: PrescriptionRow) -> FreeText:
        """A row's cancel reason and holder's pharmacy, opened if sealed."""
        if row.sealed is None:
            return FreeText(row.cancel_reason, row.holder_pharmacy)
        plain = json.loads(
            self._open(row.patient_ins, row.sealed, row.id, "free_text", row.version)
        )
        return FreeText(plain["cancel_reason"], plain["holder_pharmacy"])

    def signed_of(self, row: PrescriptionRow) -> bytes:
        """The serialized SignedPrescription of a row, opened if sealed."""
        return self._open(row.patient_ins, row.signed, row.id, "signed")

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
            signed=self._seal(
                session,
                prescription.patient_ins,
                signed.SerializeToString(deterministic=True),
                prescription.id,
                "signed",
                now_us,
            ),
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
        if self.sealer is not None:
            if cancel_reason is None:
                values["cancel_reason"] = self.free_text_of(row).cancel_reason
            values.update(
                seal_free_text(
                    self.sealer.key_for_write(session, row.patient_ins, clock_now()),
                    row.id,
                    row.version + 1,
                    values["cancel_reason"],  # type: ignore[arg-type]
                    values["holder_pharmacy"],  # type: ignore[arg-type]
                )
            )
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
        found = session.execute(
            select(DispensationRow.id, DispensationRow.message, PrescriptionRow.patient_ins)
            .join(PrescriptionRow, PrescriptionRow.id == DispensationRow.prescription_id)
            .where(
                DispensationRow.prescription_id == prescription_id,
                DispensationRow.idempotency_key == key,
            )
        ).first()
        if found is None:
            return None
        dispensation_id, message, ins = found
        return prescription_pb2.Dispensation.FromString(
            self._open(ins, message, dispensation_id, "dispensation")
        )

    def add_dispensation(
        self,
        session: Session,
        dispensation: prescription_pb2.Dispensation,
        pharmacist_identity: str,
        now_us: int,
    ) -> None:
        ins = session.scalar(
            select(PrescriptionRow.patient_ins).where(
                PrescriptionRow.id == dispensation.prescription_id
            )
        )
        assert ins is not None  # the caller locked it
        session.add(
            DispensationRow(
                id=dispensation.id,
                prescription_id=dispensation.prescription_id,
                dispensing=dispensation.dispensing,
                idempotency_key=dispensation.idempotency_key,
                pharmacist_identity=pharmacist_identity,
                created_us=now_us,
                message=self._seal(
                    session,
                    ins,
                    dispensation.SerializeToString(deterministic=True),
                    dispensation.id,
                    "dispensation",
                    now_us,
                ),
            )
        )
        session.flush()

    def dispensations(
        self, session: Session, prescription_id: str
    ) -> list[prescription_pb2.Dispensation]:
        """A prescription's dispensings, oldest first."""
        return self._dispensations_of(session, [prescription_id]).get(prescription_id, [])

    def _dispensations_of(
        self, session: Session, ids: Sequence[str]
    ) -> dict[str, list[prescription_pb2.Dispensation]]:
        out: dict[str, list[prescription_pb2.Dispensation]] = {}
        if not ids:
            return out
        rows = session.execute(
            select(
                DispensationRow.prescription_id,
                DispensationRow.id,
                DispensationRow.message,
                PrescriptionRow.patient_ins,
            )
            .join(PrescriptionRow, PrescriptionRow.id == DispensationRow.prescription_id)
            .where(DispensationRow.prescription_id.in_(list(ids)))
            .order_by(DispensationRow.prescription_id, DispensationRow.dispensing)
        )
        for prescription_id, dispensation_id, message, ins in rows:
            out.setdefault(prescription_id, []).append(
                prescription_pb2.Dispensation.FromString(
                    self._open(ins, message, dispensation_id, "dispensation")
                )
            )
        return out
