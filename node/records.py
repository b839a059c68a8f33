"""Records between the contract and the database: row to message, and the put fingerprint."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

from google.protobuf.timestamp_pb2 import Timestamp

from dmp.clock import to_us
from dmp.records import (
    CONFIDENTIALITY_VALUES,
    KIND_VALUES,
    LOINC,
    STATUS_VALUES,
    DraftFields,
    fields_of,
)
from dmp.v1 import record_pb2
from node.models import RecordRow


def fingerprint(record: record_pb2.Record, content_sha256: str, author: str) -> str:
    """What the writer sent, hashed: a retry with the same fingerprint is the same put."""
    return fingerprint_of(fields_of(record), content_sha256, author)


def fingerprint_of(fields: DraftFields, content_sha256: str, author: str) -> str:
    """`fingerprint` of a record's fields already read."""
    effective = fields.effective_time
    parts = [
        fields.patient_ins,
        str(fields.kind),
        fields.type_system or LOINC,
        fields.type_code,
        fields.type_display,
        fields.title,
        fields.organization,
        "" if effective is None else str(to_us(effective)),
        fields.supersedes,
        str(fields.confidentiality or record_pb2.CONFIDENTIALITY_NORMAL),
        str(fields.hidden_from_patient),
        fields.content_type,
        content_sha256,
        author,
    ]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def to_proto(
    row: RecordRow | SimpleNamespace, region: str, masked_roots: frozenset[str] = frozenset()
) -> record_pb2.Record:
    return fill(record_pb2.Record(), row, region, masked_roots)


def fill(
    record: record_pb2.Record,
    row: RecordRow | SimpleNamespace,
    region: str,
    masked_roots: frozenset[str] = frozenset(),
) -> record_pb2.Record:
    """Set an empty message (e.g. one just added to an answer's list) from a stored row:
    in place, so that a list's records are not built and then copied into the answer."""
    record.id = row.id
    record.patient_ins = row.patient_ins
    record.kind = KIND_VALUES[row.kind]
    coding = record.type_code
    coding.system = row.type_system
    coding.code = row.type_code
    coding.display = row.type_display
    record.title = row.title
    author = record.author
    author.identity = row.author_identity
    author.name = row.author_name
    author.profession = row.author_profession
    record.organization = row.organization
    _set_time(record.created_time, row.created_us)
    _set_time(record.effective_time, row.effective_us)
    record.status = STATUS_VALUES[row.status]
    record.version = row.version
    record.supersedes = row.supersedes or ""
    record.confidentiality = CONFIDENTIALITY_VALUES[row.confidentiality]
    record.masked = row.root_id in masked_roots
    record.hidden_from_patient = row.hidden_from_patient
    record.content_type = row.content_type
    record.size = row.size
    record.sha256 = row.sha256
    record.region = region
    record.prescription_id = row.prescription_id or ""
    if row.revealed_us is not None:
        _set_time(record.revealed_time, row.revealed_us)
    return record


def _set_time(ts: Timestamp, us: int) -> None:
    seconds, micros = divmod(us, 1_000_000)
    ts.seconds = seconds
    ts.nanos = micros * 1000
