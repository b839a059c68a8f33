"""The record vocabulary of the contract: kind, status and confidentiality names, record-id
checks, text limits and the validation of a record a writer sends."""

from __future__ import annotations

import re
from typing import NamedTuple

from google.protobuf.timestamp_pb2 import Timestamp

from dmp.clock import to_us
from dmp.errors import InvalidArgument
from dmp.fields import check_text, check_time, is_clean
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


_TEXT_FIELDS = tuple(TEXT_LIMITS)
_MAX_SYSTEM, _MAX_CODE, _MAX_DISPLAY, _MAX_TITLE, _MAX_ORGANIZATION, _MAX_CONTENT_TYPE = (
    TEXT_LIMITS[name] for name in _TEXT_FIELDS
)
_CONFIDENTIALITIES = frozenset((0, *CONFIDENTIALITY_NAMES))


class DraftFields(NamedTuple):
    """A record's fields as its writer sent them, each read from the message once (a
    message's field access builds a new object each time: validation, the fingerprint and
    the row read these instead)."""

    patient_ins: str
    kind: record_pb2.RecordKind.ValueType
    id: str
    type_system: str
    type_code: str
    type_display: str
    title: str
    organization: str
    #: The effective time, None when not sent.
    effective_time: Timestamp | None
    supersedes: str
    confidentiality: record_pb2.Confidentiality.ValueType
    hidden_from_patient: bool
    content_type: str

    @property
    def effective_us(self) -> int | None:
        return None if self.effective_time is None else to_us(self.effective_time)


def fields_of(record: record_pb2.Record) -> DraftFields:
    """The fields of a record a writer sends, read once (not validated)."""
    coding = record.type_code
    return DraftFields(
        record.patient_ins,
        record.kind,
        record.id,
        coding.system,
        coding.code,
        coding.display,
        record.title,
        record.organization,
        record.effective_time if record.HasField("effective_time") else None,
        record.supersedes,
        record.confidentiality,
        record.hidden_from_patient,
        record.content_type,
    )


def validate_draft(record: record_pb2.Record) -> DraftFields:
    """Refuse, naming the field, a record a writer may not store as it is; its fields."""
    fields = fields_of(record)
    check_draft(fields)
    return fields


def check_draft(fields: DraftFields) -> None:
    """Refuse, naming the field, a record a writer may not store as it is (`validate_draft`
    of fields already read)."""
    stored_ins(fields.patient_ins, "record.patient_ins")
    if fields.kind == record_pb2.RECORD_KIND_UNSPECIFIED:
        raise InvalidArgument(f"record.kind is required: one of {', '.join(KIND_NAMES.values())}")
    kind_name(fields.kind, "record.kind")
    if fields.id:
        check_record_id(fields.id, "record.id")
    system, code, display, title, organization = fields[3:8]
    content_type = fields.content_type
    # All at once when all pass (the common case); field by field to name the first bad one.
    if (
        len(system) > _MAX_SYSTEM
        or len(code) > _MAX_CODE
        or len(display) > _MAX_DISPLAY
        or len(title) > _MAX_TITLE
        or len(organization) > _MAX_ORGANIZATION
        or len(content_type) > _MAX_CONTENT_TYPE
        or not is_clean(system + code + display + title + organization + content_type)
    ):
        texts = (system, code, display, title, organization, content_type)
        for name, value in zip(_TEXT_FIELDS, texts, strict=True):
            check_text(value, f"record.{name}", TEXT_LIMITS[name])
    if not code.strip():
        raise InvalidArgument("record.type_code.code is required (a LOINC code, e.g. 11488-4)")
    if not title.strip():
        raise InvalidArgument("record.title is required")
    if not content_type.strip():
        raise InvalidArgument("record.content_type is required (e.g. application/pdf)")
    if fields.confidentiality not in _CONFIDENTIALITIES:
        raise InvalidArgument(f"record.confidentiality {fields.confidentiality} is not known")
    if fields.supersedes:
        check_record_id(fields.supersedes, "record.supersedes")
    if fields.effective_time is not None:
        check_time(fields.effective_time, "record.effective_time")
