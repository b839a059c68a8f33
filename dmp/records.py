"""The record vocabulary of the contract: kind, status and confidentiality names, record-id
checks, text limits and the validation of a record a writer sends."""

from __future__ import annotations

import re

from dmp.errors import InvalidArgument
from dmp.fields import check_text, check_time
from dmp.ins import stored_ins
from dmp.v1 import record_pb2

LOINC = "http://loinc.org"
_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

KIND_NAMES: dict[record_pb2.RecordKind.ValueType, str] = {
    record_pb2.RECORD_KIND_DOCUMENT: "document",
    record_pb2.RECORD_KIND_PRESCRIPTION: "prescription",
    record_pb2.RECORD_KIND_DISPENSATION: "dispensation",
    record_pb2.RECORD_KIND_ALLERGY: "allergy",
    record_pb2.RECORD_KIND_CONDITION: "condition",
    record_pb2.RECORD_KIND_IMMUNIZATION: "immunization",
    record_pb2.RECORD_KIND_OBSERVATION: "observation",
    record_pb2.RECORD_KIND_PATIENT_NOTE: "patient-note",
}
KIND_VALUES = {name: value for value, name in KIND_NAMES.items()}

STATUS_NAMES: dict[record_pb2.RecordStatus.ValueType, str] = {
    record_pb2.RECORD_STATUS_CURRENT: "current",
    record_pb2.RECORD_STATUS_SUPERSEDED: "superseded",
}
STATUS_VALUES = {name: value for value, name in STATUS_NAMES.items()}

CONFIDENTIALITY_NAMES: dict[record_pb2.Confidentiality.ValueType, str] = {
    record_pb2.CONFIDENTIALITY_NORMAL: "normal",
    record_pb2.CONFIDENTIALITY_RESTRICTED: "restricted",
    record_pb2.CONFIDENTIALITY_VERY_RESTRICTED: "very-restricted",
}
CONFIDENTIALITY_VALUES = {name: value for value, name in CONFIDENTIALITY_NAMES.items()}


def kind_name(value: int, field: str = "kind") -> str:
    try:
        return KIND_NAMES[record_pb2.RecordKind.ValueType(value)]
    except KeyError:
        known = ", ".join(KIND_NAMES.values())
        raise InvalidArgument(f"{field} {value} is not a known record kind ({known})") from None


def kind_value(name: str) -> record_pb2.RecordKind.ValueType:
    try:
        return KIND_VALUES[name]
    except KeyError:
        known = ", ".join(KIND_VALUES)
        raise InvalidArgument(f"unknown record kind {name!r}: expected one of {known}") from None


def status_name(value: int, field: str = "statuses") -> str:
    try:
        return STATUS_NAMES[record_pb2.RecordStatus.ValueType(value)]
    except KeyError:
        raise InvalidArgument(f"{field}: {value} is not a known record status") from None


def check_record_id(record_id: str, field: str = "record_id") -> str:
    if not _ID.match(record_id):
        raise InvalidArgument(
            f"{field} {record_id!r} must be 1 to 64 letters, digits, '.', '_' or '-'"
        )
    return record_id


#: The documented limits of a record's text fields, in characters (the columns' sizes).
TEXT_LIMITS = {
    "type_code.system": 200,
    "type_code.code": 64,
    "type_code.display": 200,
    "title": 500,
    "organization": 200,
    "content_type": 100,
}


def validate_draft(record: record_pb2.Record) -> None:
    """Refuse, naming the field, a record a writer may not store as it is."""
    stored_ins(record.patient_ins, "record.patient_ins")
    if record.kind == record_pb2.RECORD_KIND_UNSPECIFIED:
        raise InvalidArgument(f"record.kind is required: one of {', '.join(KIND_NAMES.values())}")
    kind_name(record.kind, "record.kind")
    if record.id:
        check_record_id(record.id, "record.id")
    texts = {
        "type_code.system": record.type_code.system,
        "type_code.code": record.type_code.code,
        "type_code.display": record.type_code.display,
        "title": record.title,
        "organization": record.organization,
        "content_type": record.content_type,
    }
    for name, value in texts.items():
        check_text(value, f"record.{name}", TEXT_LIMITS[name])
    if not record.type_code.code.strip():
        raise InvalidArgument("record.type_code.code is required (a LOINC code, e.g. 11488-4)")
    if not record.title.strip():
        raise InvalidArgument("record.title is required")
    if not record.content_type.strip():
        raise InvalidArgument("record.content_type is required (e.g. application/pdf)")
    if record.confidentiality not in (0, *CONFIDENTIALITY_NAMES):
        raise InvalidArgument(f"record.confidentiality {record.confidentiality} is not known")
    if record.supersedes:
        check_record_id(record.supersedes, "record.supersedes")
    if record.HasField("effective_time"):
        check_time(record.effective_time, "record.effective_time")
