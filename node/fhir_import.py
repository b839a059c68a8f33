"""`dmp node import DIR`: a reversibility package (node/fhir_package.py) back into an EMPTY
node database, every record as it was stored.

Nothing is written before the manifest's signature and every file's SHA-256 check. Then
one transaction writes it all (an import happens whole or not at all): patients' traits
(from the FHIR Patient, read as the gateway reads one), records with their metadata as the
node kept it and their content from its Binary (checked against its SHA-256), the signed
prescriptions as received and their dispensings through the prescription store, each
sealed at rest with a new data key when a KEK is given, and one event of the node's own
audit saying what was imported. The exported audit log stays in the package as the
archive it is: the imported node starts its own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography import x509
from sqlalchemy import Engine, Table, insert, update
from sqlalchemy.orm import Session

from dmp.audit.events import AuditEvent
from dmp.audit.log import AuditLog
from dmp.clock import now_us
from dmp.db import writer
from dmp.errors import DmpError
from dmp.fhir.errors import FhirError
from dmp.fhir.inbound import patient_traits
from dmp.patients import TRAIT_NAMES, Traits, traits_of
from dmp.v1 import prescription_pb2 as P
from node.fhir_package import (
    DISPENSATION,
    DISPENSATION_FIELDS,
    DISPENSATION_ROW,
    MANIFEST_EXTENSION,
    NODE_RECORD,
    PRESCRIPTION_FIELDS,
    PRESCRIPTION_STATE,
    RECORD_FIELDS,
    RECORD_TYPES,
    SHREDDED,
    SIGNED_PRESCRIPTION,
    PackageError,
    PackageSummary,
    extension_value,
    json_extension,
    lines,
    unb64,
    verify_package,
)
from node.integrity import hash_values
from node.keys import Sealer, seal_traits
from node.models import (
    DataKeyRow,
    DispensationRow,
    PatientRow,
    PrescriptionRow,
    audit_checkpoints,
    audit_events,
)
from node.outbox import announce
from node.prescription_store import PrescriptionStore, payload_digest, seal_free_text
from node.restore import empty_database
from node.store import CONTENTS, RECORDS

BATCH = 200
P_ROWS: Table = PrescriptionRow.__table__  # type: ignore[assignment]
IMPORT_EVENT = "import"
DCM_IMPORT = "110107"


def import_package(
    directory: Path,
    db_url: str,
    ca: x509.Certificate,
    crl_path: Path,
    *,
    sealer: Sealer | None = None,
    operator: str = "",
    region: str | None = None,
) -> PackageSummary:
    """Import the package in `directory` into the empty database at `db_url` (of the
    node of `region`, when given: a package of another region's node is refused)."""
    manifest, data = verify_package(directory, ca, crl_path)
    ours = manifest["extension"][MANIFEST_EXTENSION]
    summary = PackageSummary(str(ours["region"]), hashlib.sha256(data).hexdigest())
    if region is not None and region != summary.region:
        raise PackageError(f"the package is node {summary.region}'s, not node {region}'s")
    engine = empty_database(db_url, "import", PackageError)
    try:
        with Session(writer(engine)) as session, session.begin():
            _Importer(engine, session, directory, sealer, summary).run()
            AuditLog(
                engine,
                audit_events,
                audit_checkpoints,
                source_id=f"urn:dmp:node:{summary.region}",
                region=summary.region,
            ).append(session, _event(summary, ours, operator))
    finally:
        engine.dispose()
    return summary


def _event(summary: PackageSummary, ours: dict[str, Any], operator: str) -> AuditEvent:
    return AuditEvent(
        event_type=IMPORT_EVENT,
        event_id=DCM_IMPORT,
        event_action_code="C",
        active_participant_user_id=operator or "urn:dmp:operator",
        active_participant_role="operator",
        detail=f"reversibility package of {ours.get('node', '?')} imported:"
        f" {summary.records} records ({summary.shredded_records} shredded),"
        f" {summary.patients} patients, {summary.prescriptions} prescriptions,"
        f" {summary.dispensations} dispensations; manifest sha256 {summary.manifest_sha256}",
    )


def _fields(value: dict[str, Any] | None, names: tuple[str, ...], where: str) -> dict[str, Any]:
    if value is None:
        raise PackageError(f"{where}: lacks the node's extension of what it stores")
    missing = [name for name in names if name not in value]
    if missing:
        raise PackageError(f"{where}: its stored values lack {', '.join(missing)}")
    return {name: value[name] for name in names}


class _Importer:
    def __init__(
        self,
        engine: Engine,
        session: Session,
        directory: Path,
        sealer: Sealer | None,
        summary: PackageSummary,
    ) -> None:
        self.session = session
        self.directory = directory
        self.sealer = sealer
        self.summary = summary
        self.now = now_us()
        self.keys: dict[str, bytes] = {}
        self.shredded: set[str] = set()
        self.patients: set[str] = set()
        self.prescription_store = PrescriptionStore(engine, summary.region, sealer)

    def run(self) -> None:
        self.import_patients()
        self.import_records()
        self.import_prescriptions()
        self.import_dispensations()
        announce(self.session, self.patients, self.now)  # the directory learns where they are

    def key(self, ins: str) -> bytes:
        assert self.sealer is not None
        if ins not in self.keys:
            self.keys[ins] = self.sealer.key_for_write(self.session, ins, self.now)
        return self.keys[ins]

    # -- patients ---------------------------------------------------------------------------

    def import_patients(self) -> None:
        for number, resource in lines(self.directory / "Patient.ndjson"):
            where = f"Patient.ndjson line {number}"
            try:
                traits = traits_of(patient_traits(resource, "Patient"), "Patient")
            except (FhirError, DmpError) as exc:
                raise PackageError(f"{where}: {exc}") from None
            self.patients.add(traits.ins)
            self.summary.patients += 1
            shred = json_extension(resource, SHREDDED, where)
            if shred is not None:
                self._shredded_patient(traits, shred, resource, where)
            elif not traits.empty:
                values = (
                    PatientRow.values(traits)
                    if self.sealer is None
                    else seal_traits(self.key(traits.ins), traits)
                )
                self.session.add(PatientRow(ins=traits.ins, **values))
        self.session.flush()

    def _shredded_patient(
        self, traits: Traits, shred: dict[str, Any], resource: dict[str, Any], where: str
    ) -> None:
        """Their data key stays destroyed; what was sealed with it stays as it was stored."""
        if self.sealer is None:
            raise PackageError(
                f"{where}: the package holds a crypto-shredded patient's sealed metadata;"
                " import it into a node with a KEK (--kek-file)"
            )
        self.shredded.add(traits.ins)
        self.summary.shredded_patients += 1
        self.session.add(
            DataKeyRow(
                patient_ins=traits.ins,
                kek_id=str(shred["kek_id"]),
                wrapped=None,
                created_us=int(shred["created_us"]),
                shredded_us=int(shred["shredded_us"]),
            )
        )
        stored = json_extension(resource, NODE_RECORD, where)
        if stored is not None and "sealed" in stored:
            values: dict[str, Any] = {name: getattr(traits, name) for name in TRAIT_NAMES}
            values["sealed"] = unb64(stored["sealed"], where)
            self.session.add(PatientRow(ins=traits.ins, **values))

    # -- records ----------------------------------------------------------------------------

    def _binaries(self) -> dict[str, int]:
        """Where each Binary's line starts in Binary.ndjson (offsets only, not contents)."""
        offsets: dict[str, int] = {}
        path = self.directory / "Binary.ndjson"
        if not path.exists():
            return offsets
        with path.open("rb") as source:
            offset = 0
            for number, line in enumerate(source, start=1):
                if line.strip():
                    try:
                        binary_id = json.loads(line)["id"]
                    except (ValueError, KeyError, TypeError):
                        raise PackageError(f"Binary.ndjson line {number}: no Binary") from None
                    offsets[f"Binary/{binary_id}"] = offset
                offset += len(line)
        return offsets

    def import_records(self) -> None:
        offsets = self._binaries()
        pending: list[dict[str, Any]] = []
        contents: list[dict[str, Any]] = []
        with _Reader(self.directory / "Binary.ndjson") as binaries:
            for name in RECORD_TYPES:
                for number, resource in lines(self.directory / f"{name}.ndjson"):
                    where = f"{name}.ndjson line {number}"
                    stored = json_extension(resource, NODE_RECORD, where)
                    values = _fields(stored, RECORD_FIELDS, where)
                    assert stored is not None
                    content = None
                    if stored.get("binary"):
                        offset = offsets.get(str(stored["binary"]))
                        if offset is None:
                            raise PackageError(f"{where}: its {stored['binary']} is missing")
                        content = binaries.content(offset, f"{stored['binary']}")
                    row, blob = self._record(values, stored, content, where)
                    pending.append(row)
                    contents.append({"record_id": row["id"], "content": blob})
                    if len(pending) >= BATCH:
                        self._insert(pending, contents)
        self._insert(pending, contents)

    def _record(
        self, values: dict[str, Any], stored: dict[str, Any], content: bytes | None, where: str
    ) -> tuple[dict[str, Any], bytes]:
        ins = str(values["patient_ins"])
        self.patients.add(ins)
        self.summary.records += 1
        if content is None:
            if ins not in self.shredded or "sealed" not in stored:
                raise PackageError(f"{where}: record {values['id']} has no content")
            self.summary.shredded_records += 1
            values["sealed"] = unb64(stored["sealed"], where)
            values["row_hash"] = hash_values(values)
            # Its content is gone with the key: an empty one in its place, which a read
            # answers as shredded, as it did on the exporting node.
            return values, b""
        if len(content) != values["size"] or (
            hashlib.sha256(content).hexdigest() != values["sha256"]
        ):
            raise PackageError(
                f"{where}: the content of record {values['id']} does not match its SHA-256"
            )
        if self.sealer is None:
            values["row_hash"] = hash_values(values)
            return values, content
        return self.sealer.seal_row(self.key(ins), values, content)

    def _insert(self, pending: list[dict[str, Any]], contents: list[dict[str, Any]]) -> None:
        if pending:
            self.session.execute(insert(RECORDS), pending)
        if contents:
            self.session.execute(insert(CONTENTS), contents)
        pending.clear()
        contents.clear()

    # -- prescriptions and dispensings --------------------------------------------------------

    def import_prescriptions(self) -> None:
        for number, resource in lines(self.directory / "MedicationRequest.ndjson"):
            where = f"MedicationRequest.ndjson line {number}"
            state = json_extension(resource, PRESCRIPTION_STATE, where)
            if state is None:
                continue  # a further line of a prescription: its first carries it all
            values = _fields(state, PRESCRIPTION_FIELDS, where)
            self.patients.add(str(values["patient_ins"]))
            self.summary.prescriptions += 1
            if "stored_signed" in state:
                self._shredded_prescription(values, state, where)
                continue
            encoded = extension_value(resource, SIGNED_PRESCRIPTION)
            if not isinstance(encoded, str):
                raise PackageError(f"{where}: lacks the signed prescription")
            signed = P.SignedPrescription.FromString(unb64(encoded, where))
            prescription = P.Prescription.FromString(signed.prescription)
            if (
                prescription.id != values["id"]
                or payload_digest(signed) != values["payload_sha256"]
            ):
                raise PackageError(f"{where}: the signed prescription is not {values['id']}")
            row = self.prescription_store.insert(
                self.session, prescription, signed, int(values["created_us"])
            )
            progress = {
                name: values[name]
                for name in PRESCRIPTION_FIELDS[6:]  # version on: what its dispensings changed
            }
            if self.sealer is not None:
                progress.update(
                    seal_free_text(
                        self.key(row.patient_ins),
                        row.id,
                        int(values["version"]),
                        values["cancel_reason"],
                        values["holder_pharmacy"],
                    )
                )
            self.session.execute(update(P_ROWS).where(P_ROWS.c.id == row.id).values(**progress))
        self.session.flush()

    def _shredded_prescription(
        self, values: dict[str, Any], state: dict[str, Any], where: str
    ) -> None:
        if values["patient_ins"] not in self.shredded:
            raise PackageError(f"{where}: stored bytes given for a patient not shredded")
        values["signed"] = unb64(state["stored_signed"], where)
        values["sealed"] = (
            unb64(state["stored_sealed"], where) if "stored_sealed" in state else None
        )
        self.session.execute(insert(P_ROWS).values(**values))

    def import_dispensations(self) -> None:
        for number, resource in lines(self.directory / "MedicationDispense.ndjson"):
            where = f"MedicationDispense.ndjson line {number}"
            row = json_extension(resource, DISPENSATION_ROW, where)
            if row is None:
                continue
            values = _fields(row, DISPENSATION_FIELDS, where)
            self.summary.dispensations += 1
            if "stored_message" in row:
                values["message"] = unb64(row["stored_message"], where)
                self.session.add(DispensationRow(**values))
                continue
            encoded = extension_value(resource, DISPENSATION)
            if not isinstance(encoded, str):
                raise PackageError(f"{where}: lacks the dispensing's message")
            dispensation = P.Dispensation.FromString(unb64(encoded, where))
            if (dispensation.id, dispensation.prescription_id) != (
                values["id"],
                values["prescription_id"],
            ):
                raise PackageError(f"{where}: the dispensing's message is not {values['id']}")
            self.prescription_store.add_dispensation(
                self.session, dispensation, str(values["pharmacist_identity"]),
                int(values["created_us"]),
            )  # fmt: skip
        self.session.flush()


class _Reader:
    """Binary.ndjson read at the offsets of its lines: one content in memory at a time."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("rb") if path.exists() else None

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *_: object) -> None:
        if self._file is not None:
            self._file.close()

    def content(self, offset: int, name: str) -> bytes:
        assert self._file is not None
        self._file.seek(offset)
        try:
            resource = json.loads(self._file.readline())
        except ValueError:
            raise PackageError(f"{name} in Binary.ndjson is not JSON") from None
        data = resource.get("data")
        return b"" if data is None else unb64(str(data), name)
