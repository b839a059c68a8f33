"""The operator's key tasks on a node's database: encrypt its clear records in place,
rotate its KEK, crypto-shred a patient. Each works in batches, each batch one committed
transaction, so that it runs while the node serves and a rerun after a crash continues
where the last committed batch ended (what a batch did is visible in its rows: a sealed
record has `sealed`, a rewrapped key names its new KEK).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Engine, func, select, text, update
from sqlalchemy.orm import Session

from dmp.audit.events import AuditEvent, EventType
from dmp.audit.log import AuditLog
from dmp.clock import now_us
from dmp.db import writer
from dmp.envelope import FORMAT, KeyEncryptionKey, seal
from dmp.errors import FailedPrecondition
from node import integrity
from node.keys import SEALED_COLUMNS, Sealer, foreign_keys, seal_traits
from node.models import (
    DataKeyRow,
    DispensationRow,
    NodeBase,
    PatientRow,
    PrescriptionRow,
    RecordContentRow,
    RecordRow,
    audit_checkpoints,
    audit_events,
)
from node.prescription_store import seal_free_text

log = logging.getLogger("dmp.node.keys")

BATCH = 200


@dataclass(frozen=True)
class Progress:
    done: int
    remaining: int


def encrypt_in_place(
    engine: Engine,
    kek: KeyEncryptionKey,
    *,
    batch: int = BATCH,
    limit: int | None = None,
    on_batch: Callable[[Progress], None] | None = None,
) -> int:
    """Seal every record still in clear, `batch` records per committed transaction;
    `limit` stops after that many (a test's crash). The number sealed by this run."""
    others = _foreign(engine, kek)
    if others:
        raise FailedPrecondition(
            f"{others} data key(s) of this database are wrapped by another KEK than"
            f" {kek.key_id}: give the node's current --kek-file"
        )
    sealer = Sealer(kek)
    sqlite = engine.dialect.name == "sqlite"
    done = 0
    while limit is None or done < limit:
        size = batch if limit is None else min(batch, limit - done)
        with Session(writer(engine)) as session, session.begin():
            if sqlite:
                # The clear values this overwrites are zeroed in the file, not left free.
                session.execute(text("PRAGMA secure_delete=ON"))
            rows = list(
                session.scalars(
                    select(RecordRow)
                    .where(RecordRow.sealed.is_(None))
                    .order_by(RecordRow.seq)
                    .limit(size)
                    .with_for_update()  # a supersede or reveal re-hashes under the same lock
                )
            )
            if not rows:
                break
            integrity.check(rows, "local")  # never re-hash a damaged row
            now = now_us()
            for row in rows:
                key = sealer.key_for_write(session, row.patient_ins, now)
                content = session.get(RecordContentRow, row.id)
                blob = b"" if content is None else content.content
                values = {c.key: getattr(row, c.key) for c in RecordRow.__table__.columns}
                stored, sealed_content = sealer.seal_row(key, values, blob)
                changed = {name: stored[name] for name in (*SEALED_COLUMNS, "sealed")}
                session.execute(
                    update(RecordRow)
                    .where(RecordRow.id == row.id, RecordRow.sealed.is_(None))
                    .values(**changed, row_hash=stored["row_hash"])
                    .execution_options(synchronize_session=False)
                )
                if content is not None:
                    content.content = sealed_content
            done += len(rows)
        if on_batch is not None:
            on_batch(Progress(done, _count(engine, RecordRow, RecordRow.sealed.is_(None))))
    if limit is None:
        done += _seal_prescriptions(engine, sealer, batch, sqlite)
        done += _seal_patients(engine, sealer, batch, sqlite)
    if sqlite and done:
        # Old pages in the -wal would still hold clear values: copy it back and empty it.
        with engine.connect() as connection:
            connection.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    return done


def _clear(column: Any) -> ColumnElement[bool]:
    """A serialized message in clear: it never begins with the sealed format's byte."""
    return func.substr(column, 1, 1) != FORMAT


def _seal_patients(engine: Engine, sealer: Sealer, batch: int, sqlite: bool) -> int:
    """Seal the identity traits still in clear (node/store.py seals them so), in committed
    batches; a write merging traits holds the same row lock."""
    done = 0
    while True:
        with Session(writer(engine)) as session, session.begin():
            if sqlite:
                session.execute(text("PRAGMA secure_delete=ON"))
            now = now_us()
            rows = list(
                session.scalars(
                    select(PatientRow)
                    .where(PatientRow.sealed.is_(None))
                    .order_by(PatientRow.ins)
                    .limit(batch)
                    .with_for_update()
                )
            )
            if not rows:
                return done
            for row in rows:
                key = sealer.key_for_write(session, row.ins, now)
                for name, value in seal_traits(key, row.traits()).items():
                    setattr(row, name, value)
            done += len(rows)


def _clear_free_text() -> ColumnElement[bool]:
    """A prescription whose free text (cancel reason, holder's pharmacy) is in clear."""
    return PrescriptionRow.sealed.is_(None) & (
        PrescriptionRow.cancel_reason.is_not(None) | PrescriptionRow.holder_pharmacy.is_not(None)
    )


def _seal_prescriptions(engine: Engine, sealer: Sealer, batch: int, sqlite: bool) -> int:
    """Seal the signed acts and dispensing messages still in clear (node/prescription_store.py
    seals them so), in committed batches."""
    done = 0
    while True:
        with Session(writer(engine)) as session, session.begin():
            if sqlite:
                session.execute(text("PRAGMA secure_delete=ON"))
            now = now_us()
            acts = list(
                session.scalars(
                    select(PrescriptionRow)
                    .where(_clear(PrescriptionRow.signed))
                    .limit(batch)
                    .with_for_update()
                )
            )
            for act in acts:
                key = sealer.key_for_write(session, act.patient_ins, now)
                act.signed = seal(key, act.signed, act.id, 0, "signed")
            given = list(
                session.execute(
                    select(DispensationRow, PrescriptionRow.patient_ins)
                    .join(PrescriptionRow, PrescriptionRow.id == DispensationRow.prescription_id)
                    .where(_clear(DispensationRow.message))
                    .limit(batch)
                    .with_for_update()
                ).all()
            )
            for dispensation, ins in given:
                key = sealer.key_for_write(session, ins, now)
                dispensation.message = seal(
                    key, dispensation.message, dispensation.id, 0, "dispensation"
                )
            texts = list(
                session.scalars(
                    select(PrescriptionRow)
                    .where(_clear_free_text())
                    .limit(batch)
                    .with_for_update()  # progress changes under the same lock
                )
            )
            for row in texts:
                key = sealer.key_for_write(session, row.patient_ins, now)
                session.execute(
                    update(PrescriptionRow)
                    .where(PrescriptionRow.id == row.id, PrescriptionRow.version == row.version)
                    .values(
                        **seal_free_text(
                            key, row.id, row.version, row.cancel_reason, row.holder_pharmacy
                        )
                    )
                    .execution_options(synchronize_session=False)
                )
            if not acts and not given and not texts:
                return done
            done += len(acts) + len(given) + len(texts)


def rotate_kek(
    engine: Engine,
    old: KeyEncryptionKey,
    new: KeyEncryptionKey,
    *,
    batch: int = BATCH,
    limit: int | None = None,
    on_batch: Callable[[Progress], None] | None = None,
) -> int:
    """Rewrap every data key `old` wraps with `new`, content untouched; each key row names
    its KEK, so a rerun rewraps only what is left. The number rewrapped by this run."""
    if old.key_id == new.key_id:
        raise FailedPrecondition("the new KEK is the old one: make a new one with init-kek")
    with engine.connect() as connection:
        strangers = connection.execute(
            select(DataKeyRow.kek_id)
            .where(
                DataKeyRow.kek_id.not_in([old.key_id, new.key_id]),
                DataKeyRow.wrapped.is_not(None),
            )
            .limit(1)
        ).first()
    if strangers is not None:
        raise FailedPrecondition(
            f"data keys of this database are wrapped by KEK {strangers[0]}, neither the old"
            f" ({old.key_id}) nor the new ({new.key_id}) one: give the KEK file they name"
        )
    done = 0
    while limit is None or done < limit:
        size = batch if limit is None else min(batch, limit - done)
        with Session(writer(engine)) as session, session.begin():
            rows = list(
                session.scalars(
                    select(DataKeyRow)
                    .where(DataKeyRow.kek_id == old.key_id, DataKeyRow.wrapped.is_not(None))
                    .order_by(DataKeyRow.patient_ins)
                    .limit(size)
                )
            )
            if not rows:
                break
            for row in rows:
                assert row.wrapped is not None
                row.wrapped = new.wrap(old.unwrap(row.wrapped))
                row.kek_id = new.key_id
            done += len(rows)
        if on_batch is not None:
            remaining = _count(
                engine,
                DataKeyRow,
                (DataKeyRow.kek_id == old.key_id) & DataKeyRow.wrapped.is_not(None),
            )
            on_batch(Progress(done, remaining))
    # Shredded rows keep no key; they name the new KEK so that nothing points at the old.
    with Session(writer(engine)) as session, session.begin():
        session.execute(
            update(DataKeyRow)
            .where(DataKeyRow.kek_id == old.key_id, DataKeyRow.wrapped.is_(None))
            .values(kek_id=new.key_id)
        )
    return done


@dataclass(frozen=True)
class Shredded:
    patient_ins: str
    records: int
    shredded_us: int
    already: bool


def shred_patient(
    engine: Engine, kek: KeyEncryptionKey, region: str, patient_ins: str, *, operator: str = ""
) -> Shredded:
    """Destroy a patient's data key, with its audit event in the same transaction: their
    sealed content opens no more, here or in any backup that did not keep the key."""
    if _foreign(engine, kek):
        raise FailedPrecondition(f"this database's data keys are not wrapped by {kek.key_id}")
    with Session(writer(engine)) as session, session.begin():
        row = session.get(DataKeyRow, patient_ins, with_for_update=True)
        records = _count_in(session, RecordRow, RecordRow.patient_ins == patient_ins)
        clear = _count_in(
            session, RecordRow, (RecordRow.patient_ins == patient_ins) & RecordRow.sealed.is_(None)
        )
        clear += _count_in(
            session,
            PrescriptionRow,
            (PrescriptionRow.patient_ins == patient_ins)
            & (_clear(PrescriptionRow.signed) | _clear_free_text()),
        )
        clear += _count_in(
            session, PatientRow, (PatientRow.ins == patient_ins) & PatientRow.sealed.is_(None)
        )
        if clear:
            raise FailedPrecondition(
                f"{clear} record(s) of patient {patient_ins} are still stored in clear:"
                " run `dmp node encrypt` first, or shredding would leave them readable"
            )
        if row is None:
            raise FailedPrecondition(f"patient {patient_ins} has no data key on this node")
        if row.wrapped is None:
            assert row.shredded_us is not None
            return Shredded(patient_ins, records, row.shredded_us, already=True)
        row.wrapped = None
        row.shredded_us = now = now_us()
        source = f"urn:dmp:node:{region}"
        AuditLog(engine, audit_events, audit_checkpoints, source_id=source, region=region).append(
            session,
            AuditEvent(
                event_type=EventType.SHRED,
                event_date_time=now,
                active_participant_user_id=operator or "urn:dmp:operator",
                active_participant_role="operator",
                participant_object_patient_ins=patient_ins,
                detail=f"data key destroyed; {records} record(s) unreadable",
            ),
        )
    log.warning("shredded the data key of patient %s (%d records)", patient_ins, records)
    return Shredded(patient_ins, records, now, already=False)


def _foreign(engine: Engine, kek: KeyEncryptionKey) -> int:
    with engine.connect() as connection:
        return foreign_keys(connection, kek.key_id)


def _count(engine: Engine, table: type[NodeBase], condition: ColumnElement[bool]) -> int:
    with Session(engine) as session:
        return _count_in(session, table, condition)


def _count_in(session: Session, table: type[NodeBase], condition: ColumnElement[bool]) -> int:
    return int(session.scalar(select(func.count()).select_from(table).where(condition)) or 0)
