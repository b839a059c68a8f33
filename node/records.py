"""Records between the contract and the database: row to message, and the put fingerprint."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

from dmp.clock import from_us, to_us
from dmp.records import CONFIDENTIALITY_VALUES, KIND_VALUES, LOINC, STATUS_VALUES
from dmp.v1 import record_pb2
from node.models import RecordRow


def fingerprint(record: record_pb2.Record, content_sha256: str, author: str) -> str:
    """What the writer sent, hashed: a retry with the same fingerprint is the same put."""
    parts = [
        record.patient_ins,
        str(record.kind),
        record.type_code.system or LOINC,
        record.type_code.code,
        record.type_code.display,
        record.title,
        record.organization,
        str(to_us(record.effective_time)) if record.HasField("effective_time") else "",
        record.supersedes,
        str(record.confidentiality or record_pb2.CONFIDENTIALITY_NORMAL),
        str(record.hidden_from_patient),
        record.content_type,
        content_sha256,
        author,
    ]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def to_proto(
    row: RecordRow | SimpleNamespace, region: str, masked_roots: frozenset[str] = frozenset()
) -> record_pb2.Record:
    """The message of a stored row (or of the values a write inserted, as attributes: no ORM
    object is built for an answer)."""
    record = record_pb2.Record(
        id=row.id,
        patient_ins=row.patient_ins,
        kind=KIND_VALUES[row.kind],
        type_code=record_pb2.Coding(
            system=row.type_system, code=row.type_code, display=row.type_display
        ),
        title=row.title,
        author=record_pb2.Author(
            identity=row.author_identity, name=row.author_name, profession=row.author_profession
        ),
        organization=row.organization,
        created_time=from_us(row.created_us),
        effective_time=from_us(row.effective_us),
        status=STATUS_VALUES[row.status],
        version=row.version,
        supersedes=row.supersedes or "",
        confidentiality=CONFIDENTIALITY_VALUES[row.confidentiality],
        masked=row.root_id in masked_roots,
        hidden_from_patient=row.hidden_from_patient,
        content_type=row.content_type,
        size=row.size,
        sha256=row.sha256,
        region=region,
        prescription_id=row.prescription_id or "",
    )
    if row.revealed_us is not None:
        record.revealed_time.CopyFrom(from_us(row.revealed_us))
    return record
