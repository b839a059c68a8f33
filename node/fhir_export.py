"""`dmp node export --format fhir-ndjson`: a node's whole content as a FHIR Bulk Data
NDJSON package (node/fhir_package.py), for the patients' data to leave with them when the
hosting ends.

Everything is read in one consistent snapshot (node/backup.py's), a page at a time: no
more than a page of metadata and one record's content are ever held in memory. The
resources come from the mappings the node already serves (dmp/fhir/mapping.py for patients
and records, dmp/prescription_fhir.py for prescriptions and dispensings, dmp/audit/fhir.py
for the audit trail); sealed data is opened with the node's KEK, the content checked
against its SHA-256. A crypto-shredded patient's records leave as metadata only, marked,
without content (their data key is destroyed: nobody can open them any more).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Table, select, union
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from dmp.audit.events import AuditEvent, iso_instant
from dmp.audit.fhir import fhir_audit_event
from dmp.clock import now_us
from dmp.credentials import Credentials
from dmp.dbfile import private_directory
from dmp.fhir.mapping import binary_id, fhir_id, natural_resource, patient
from dmp.fhir.medication import resources_of
from dmp.prescription_fhir import medication_dispenses, medication_requests
from dmp.prescription_rules import status
from dmp.signing import Signer
from dmp.v1 import patient_pb2, record_pb2
from dmp.v1 import prescription_pb2 as P
from node.backup import snapshot_connection
from node.fhir_package import (
    AUDIT,
    CHECKPOINTS,
    DISPENSATION,
    DISPENSATION_FIELDS,
    DISPENSATION_ROW,
    NODE_RECORD,
    PRESCRIPTION_FIELDS,
    PRESCRIPTION_STATE,
    RECORD_FIELDS,
    SHREDDED,
    SIGNED_PRESCRIPTION,
    LineFile,
    PackageError,
    PackageSummary,
    add_extension,
    b64,
    build_manifest,
    compact,
    write_signed_manifest,
)
from node.keys import DATA_KEYS, Sealer, foreign_keys, has_sealed_data, open_traits
from node.models import (
    DispensationRow,
    PatientRow,
    PrescriptionRow,
    audit_checkpoints,
    audit_events,
)
from node.prescription_store import PrescriptionStore, progress_of
from node.store import CONTENTS, RECORDS, RecordStore

PAGE = 200
PATIENTS: Table = PatientRow.__table__  # type: ignore[assignment]
PRESCRIPTIONS: Table = PrescriptionRow.__table__  # type: ignore[assignment]
DISPENSATIONS: Table = DispensationRow.__table__  # type: ignore[assignment]
_SHREDDED_TITLE = "[crypto-shredded: content and free text destroyed]"
#: The MedicationRequest status of each state of a prescription (R4 has no "expired").
_REQUEST_STATUS = {
    P.PRESCRIPTION_STATUS_ACTIVE: "active",
    P.PRESCRIPTION_STATUS_PARTIALLY_DISPENSED: "active",
    P.PRESCRIPTION_STATUS_COMPLETED: "completed",
    P.PRESCRIPTION_STATUS_CANCELLED: "cancelled",
    P.PRESCRIPTION_STATUS_EXPIRED: "stopped",
}


@dataclass(frozen=True, slots=True)
class _Shred:
    kek_id: str
    created_us: int
    shredded_us: int

    def marker(self) -> str:
        return compact(
            {"kek_id": self.kek_id, "created_us": self.created_us, "shredded_us": self.shredded_us}
        )


class _Files:
    """The package's NDJSON files, each opened at its first line."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self.files: dict[str, LineFile] = {}

    def put(self, resource: dict[str, Any]) -> None:
        self.file(f"{resource['resourceType']}.ndjson").write(resource)

    def file(self, name: str) -> LineFile:
        found = self.files.get(name)
        if found is None:
            found = self.files[name] = LineFile(self._directory / name)
        return found

    def close(self) -> None:
        for one in self.files.values():
            one.close()


def _new_directory(out: Path) -> None:
    """The package's directory: new or empty, mode 0700."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PackageError(f"{out} exists and is not an empty directory: export into a new one")
    private_directory(out)
    out.chmod(0o700)


def export_node(
    engine: Engine,
    region: str,
    credentials: Credentials,
    out: Path,
    *,
    sealer: Sealer | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> PackageSummary:
    """Write the node's whole content into the new directory `out`, signed with the
    node's `credentials`; PackageError when it cannot."""
    signer = Signer(credentials)
    if signer.principal.uri != f"urn:dmp:node:{region}":
        raise PackageError(f"the package of node {region} is signed by node-{region}'s key")
    _new_directory(out)
    files = _Files(out)
    summary = PackageSummary(region)
    try:
        with snapshot_connection(engine) as conn, conn.begin():
            transaction_us = now_us()
            if has_sealed_data(conn):
                if sealer is None:
                    raise PackageError(
                        f"node {region}'s records are sealed at rest: give its --kek-file"
                    )
                if foreign_keys(conn, sealer.kek_ids):
                    raise PackageError("data keys of this node are wrapped by another KEK")
            shreds = _shreds(conn)
            exporter = _Exporter(engine, conn, region, sealer, shreds, files, summary)
            exporter.patients()
            exporter.records(progress)
            exporter.prescriptions()
            exporter.audit()
    except BaseException:
        files.close()
        for one in files.files.values():  # no half package left behind
            one.path.unlink(missing_ok=True)
        raise
    files.close()
    manifest = build_manifest(signer.principal.uri, transaction_us, files.files, summary)
    data = write_signed_manifest(out, manifest, signer)
    summary.manifest_sha256 = hashlib.sha256(data).hexdigest()
    summary.counts = {name: f.count for name, f in files.files.items()}
    return summary


def _shreds(conn: Connection) -> dict[str, _Shred]:
    rows = conn.execute(
        select(DATA_KEYS.c.patient_ins, DATA_KEYS.c.kek_id, DATA_KEYS.c.created_us,
               DATA_KEYS.c.shredded_us).where(DATA_KEYS.c.wrapped.is_(None))
    )  # fmt: skip
    return {ins: _Shred(kek, created, shredded or 0) for ins, kek, created, shredded in rows}


class _Exporter:
    def __init__(
        self,
        engine: Engine,
        conn: Connection,
        region: str,
        sealer: Sealer | None,
        shreds: dict[str, _Shred],
        files: _Files,
        summary: PackageSummary,
    ) -> None:
        self.conn = conn
        self.region = region
        self.sealer = sealer
        self.shreds = shreds
        self.files = files
        self.summary = summary
        self.records_store = RecordStore(engine, region, sealer=sealer)
        self.prescription_store = PrescriptionStore(engine, region, sealer)
        self.source = f"urn:dmp:node:{region}"

    # -- patients ---------------------------------------------------------------------------

    def patients(self) -> None:
        """Every patient the node knows, with a row of traits or only records."""
        known = union(
            select(PATIENTS.c.ins.label("ins")),
            select(RECORDS.c.patient_ins.label("ins")),
            select(PRESCRIPTIONS.c.patient_ins.label("ins")),
        ).subquery()
        last = ""
        with Session(bind=self.conn) as session:
            while True:
                page = list(
                    self.conn.execute(
                        select(known.c.ins).where(known.c.ins > last).order_by(known.c.ins)
                        .limit(PAGE)
                    ).scalars()
                )  # fmt: skip
                if not page:
                    return
                last = page[-1]
                rows = {
                    row.ins: row
                    for row in session.scalars(select(PatientRow).where(PatientRow.ins.in_(page)))
                }
                keys = self._keys(page)
                for ins in page:
                    self._patient(ins, rows.get(ins), keys)

    def _keys(self, patients: Sequence[str]) -> dict[str, bytes | None]:
        if self.sealer is None:
            return {}
        found = self.sealer.keys_for_read(self.conn, patients)
        return {ins: key.key for ins, key in found.items()}

    def _patient(self, ins: str, row: PatientRow | None, keys: dict[str, bytes | None]) -> None:
        identity = patient_pb2.PatientIdentity(ins=ins)
        shred = self.shreds.get(ins)
        if row is not None:
            if row.sealed is not None and shred is None and keys.get(ins) is None:
                raise PackageError(f"patient {ins}'s identity traits are sealed: no data key")
            identity = open_traits(keys.get(ins), row).to_proto()
        resource = patient(identity)
        resource["meta"]["source"] = self.source
        self.summary.patients += 1
        if shred is not None:
            self.summary.shredded_patients += 1
            add_extension(resource, SHREDDED, "String", shred.marker())
            if row is not None and row.sealed is not None:
                add_extension(resource, NODE_RECORD, "String", compact({"sealed": b64(row.sealed)}))
        self.files.put(resource)

    # -- records ----------------------------------------------------------------------------

    def records(self, progress: Callable[[str, int], None] | None) -> None:
        last = 0
        while True:
            rows = list(
                self.conn.execute(
                    select(RECORDS).where(RECORDS.c.seq > last).order_by(RECORDS.c.seq).limit(PAGE)
                )
            )
            if not rows:
                return
            last = rows[-1].seq
            messages = self.records_store.messages(self.conn, rows)
            keys = self._keys(sorted({r.patient_ins for r in rows if r.sealed is not None}))
            for row, record in zip(rows, messages, strict=True):
                self._record(row, record, keys)
            self.summary.records += len(rows)
            if progress is not None:
                progress("records", self.summary.records)

    def _record(self, row: Any, record: record_pb2.Record, keys: dict[str, bytes | None]) -> None:
        values = {name: getattr(row, name) for name in RECORD_FIELDS}
        shredded = row.sealed is not None and row.patient_ins in self.shreds
        if row.sealed is not None and not shredded:
            values.update(
                title=record.title,
                type_display=record.type_code.display,
                organization=record.organization,
                author_name=record.author.name,
            )
        content = None
        if not shredded:
            content = self._content(row, keys)
        shown = record
        if shredded:
            self.summary.shredded_records += 1
            values["sealed"] = b64(row.sealed)
            shown = record_pb2.Record()
            shown.CopyFrom(record)
            shown.title = _SHREDDED_TITLE
        located = f"Binary/{binary_id(record)}"
        values["binary"] = None if shredded else located
        resource = natural_resource(shown, located)
        add_extension(resource, NODE_RECORD, "String", compact(values))
        if shredded:
            add_extension(resource, SHREDDED, "String", self.shreds[row.patient_ins].marker())
        self.files.put(resource)
        if content is not None:
            binary: dict[str, Any] = {
                "resourceType": "Binary",
                "id": binary_id(record),
                "contentType": row.content_type,
                "securityContext": {"reference": f"{resource['resourceType']}/{resource['id']}"},
            }
            if content:
                binary["data"] = b64(content)
            self.files.put(binary)

    def _content(self, row: Any, keys: dict[str, bytes | None]) -> bytes:
        blob = self.conn.execute(
            select(CONTENTS.c.content).where(CONTENTS.c.record_id == row.id)
        ).scalar()
        if blob is None:
            raise PackageError(f"record {row.id} has no content on this node")
        if row.sealed is not None:
            key = keys.get(row.patient_ins)
            if key is None:
                raise PackageError(f"record {row.id}: its patient's data key is missing")
            blob = Sealer.open_content(key, row, blob)
        if hashlib.sha256(blob).hexdigest() != row.sha256:
            raise PackageError(f"content of record {row.id} does not match its SHA-256")
        return bytes(blob)

    # -- prescriptions and their dispensings ------------------------------------------------

    def prescriptions(self) -> None:
        last = ""
        with Session(bind=self.conn) as session:
            while True:
                rows = list(
                    session.scalars(
                        select(PrescriptionRow).where(PrescriptionRow.id > last)
                        .order_by(PrescriptionRow.id).limit(PAGE)
                    )
                )  # fmt: skip
                if not rows:
                    return
                last = rows[-1].id
                for row in rows:
                    self._prescription(session, row)

    def _prescription(self, session: Session, row: PrescriptionRow) -> None:
        state = {name: getattr(row, name) for name in PRESCRIPTION_FIELDS}
        given = list(
            self.conn.execute(
                select(DISPENSATIONS).where(DISPENSATIONS.c.prescription_id == row.id)
                .order_by(DISPENSATIONS.c.dispensing)
            )
        )  # fmt: skip
        self.summary.prescriptions += 1
        self.summary.dispensations += len(given)
        shred = self.shreds.get(row.patient_ins)
        if shred is not None:
            self._shredded_prescription(row, state, given, shred)
            return
        free = self.prescription_store.free_text_of(row)
        state.update(cancel_reason=free.cancel_reason, holder_pharmacy=free.holder_pharmacy)
        signed_bytes = self.prescription_store.signed_of(row)
        signed = P.SignedPrescription.FromString(signed_bytes)
        prescription = P.Prescription.FromString(signed.prescription)
        now = status(prescription, progress_of(row), now_us())
        requests = resources_of(json.loads(medication_requests(prescription)), "MedicationRequest")
        if not requests:
            raise PackageError(f"prescription {row.id} has no line")
        for index, request in enumerate(requests):
            request["meta"] = {"source": self.source}
            request["status"] = _REQUEST_STATUS.get(now, "unknown")
            if index == 0:
                add_extension(request, SIGNED_PRESCRIPTION, "Base64Binary", b64(signed_bytes))
                add_extension(request, PRESCRIPTION_STATE, "String", compact(state))
            self.files.put(request)
        messages = {d.id: d for d in self.prescription_store.dispensations(session, row.id)}
        for one in given:
            dispensation = messages[one.id]
            built = json.loads(medication_dispenses(prescription, dispensation))
            dispenses = resources_of(built, "MedicationDispense") or [
                _dispense_without_lines(one.id, row.patient_ins)
            ]
            for index, dispense in enumerate(dispenses):
                dispense["meta"] = {"source": self.source}
                if index == 0:
                    message = dispensation.SerializeToString(deterministic=True)
                    add_extension(dispense, DISPENSATION, "Base64Binary", b64(message))
                    add_extension(dispense, DISPENSATION_ROW, "String", _dispensation_row(one))
                self.files.put(dispense)

    def _shredded_prescription(
        self, row: PrescriptionRow, state: dict[str, Any], given: list[Any], shred: _Shred
    ) -> None:
        """Metadata only: the signed act and the dispensings are sealed with a destroyed
        key. Their stored bytes go along, opaque, so that an import keeps them as stored."""
        state.update(stored_signed=b64(row.signed))
        if row.sealed is not None:
            state["stored_sealed"] = b64(row.sealed)
        request: dict[str, Any] = {
            "resourceType": "MedicationRequest",
            "id": fhir_id(row.id),
            "meta": {"source": self.source},
            "status": "unknown",
            "intent": "order",
            "medicationCodeableConcept": {"text": _SHREDDED_TITLE},
            "subject": {"reference": f"Patient/{row.patient_ins}"},
            "authoredOn": iso_instant(row.authored_us),
        }
        add_extension(request, PRESCRIPTION_STATE, "String", compact(state))
        add_extension(request, SHREDDED, "String", shred.marker())
        self.files.put(request)
        for one in given:
            dispense = _dispense_without_lines(one.id, row.patient_ins)
            dispense["meta"] = {"source": self.source}
            add_extension(dispense, DISPENSATION_ROW, "String", _dispensation_row(one, True))
            add_extension(dispense, SHREDDED, "String", shred.marker())
            self.files.put(dispense)

    # -- the audit trail --------------------------------------------------------------------

    def audit(self) -> None:
        """The audit log's rows verbatim (bytes as hex), its checkpoints, and each event as
        a FHIR AuditEvent."""
        rows = self.conn.execution_options(yield_per=1000).execute(
            select(audit_events).order_by(audit_events.c.seq)
        )
        log = self.files.file(AUDIT)
        for row in rows:
            values = dict(row._mapping)
            values["leaf_hash"] = bytes(values["leaf_hash"]).hex()
            log.write(values)
            self.files.put(fhir_audit_event(AuditEvent.from_json(row.event_json), seq=row.seq))
            self.summary.audit_events += 1
        checkpoints = self.files.file(CHECKPOINTS)
        for row in self.conn.execute(
            select(audit_checkpoints).order_by(audit_checkpoints.c.tree_size)
        ):
            values = dict(row._mapping)
            values["root_hash"] = bytes(values["root_hash"]).hex()
            values["signature"] = b64(bytes(values["signature"]))
            checkpoints.write(values)


def _dispense_without_lines(dispensation_id: str, ins: str) -> dict[str, Any]:
    return {
        "resourceType": "MedicationDispense",
        "id": fhir_id(dispensation_id),
        "status": "unknown",
        "medicationCodeableConcept": {"text": "dispensing without lines"},
        "subject": {"reference": f"Patient/{ins}"},
    }


def _dispensation_row(row: Any, stored: bool = False) -> str:
    values = {name: getattr(row, name) for name in DISPENSATION_FIELDS}
    if stored:
        values["stored_message"] = b64(row.message)
    return compact(values)
