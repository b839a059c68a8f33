"""FHIR to our records (the write direction of the mapping): a transaction Bundle, checked
entry by entry, as the records to store.

Pure: no transport. Every check names the element at fault
(``Bundle.entry[3].resource.content[0].attachment.size``), and nothing is stored unless
every entry passed (see ``dmp.fhir.transaction``).

- ``DocumentReference`` with its content (a ``Binary`` entry its attachment URL names, or
  ``attachment.data``): a document record, its LOINC type, title, clinical date,
  confidentiality, organization; the attachment's size, SHA-1 ``hash`` and SHA-256
  extension, when given, must match the content (a tampered Bundle is refused).
- ``AllergyIntolerance``, ``Condition``, ``Immunization``, ``Observation``,
  ``MedicationRequest``, ``MedicationDispense``: a record of that kind whose content is the
  resource itself, as sent (FHIR JSON), so that every fact it carries is kept.
- Any other resource about the patient (``DiagnosticReport``, ``Encounter``,
  ``Procedure``...): a document whose content is the resource.
- ``Patient``: the patient's traits; its INS-NIR identifier says who every entry is about.
  ``List`` (the SubmissionSet), ``Practitioner``, ``PractitionerRole``, ``Organization``,
  ``Location``, ``Medication``: accepted, not stored (the author of every record is the
  identity whose certificate writes it).

Record ids are derived from the patient, the writer and the entry's ``fullUrl`` (or,
without one, the resource's first identifier): ``fhir-`` and 40 hex digits of their
SHA-256. The same Bundle sent again by the same writer names the same records, which a node
stores once; another writer's copy names records of its own.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from dmp.errors import InvalidArgument
from dmp.fhir.errors import FhirError
from dmp.fhir.systems import (
    CONFIDENTIALITY_SYSTEM,
    INS_SYSTEM,
    LOINC_SYSTEM,
    RECORD_KIND_SYSTEM,
    SHA256_EXTENSION,
)
from dmp.ins import normalize_ins
from dmp.v1 import node_service_pb2 as npb
from dmp.v1 import patient_pb2, record_pb2

Resource = dict[str, Any]
K = record_pb2
FHIR_JSON: Final = "application/fhir+json"
#: At most this many entries in one Bundle (a node commits up to 1000 records at once).
MAX_ENTRIES: Final = 1000

#: Structured kinds: resource type -> (record kind, the section's LOINC code, its title).
STRUCTURED: Final[dict[str, tuple[record_pb2.RecordKind.ValueType, str, str]]] = {
    "AllergyIntolerance": (K.RECORD_KIND_ALLERGY, "48765-2", "Allergie"),
    "Condition": (K.RECORD_KIND_CONDITION, "11450-4", "Problème de santé"),
    "Immunization": (K.RECORD_KIND_IMMUNIZATION, "11369-6", "Vaccination"),
    "Observation": (K.RECORD_KIND_OBSERVATION, "8716-3", "Observation"),
    "MedicationRequest": (K.RECORD_KIND_PRESCRIPTION, "57833-6", "Ordonnance"),
    "MedicationDispense": (K.RECORD_KIND_DISPENSATION, "60593-1", "Délivrance"),
}
#: Other resources about the patient, stored as documents: their LOINC type by default.
DOCUMENT_TYPES: Final = {
    "DiagnosticReport": "11502-2",
    "Encounter": "46240-8",
    "Procedure": "47519-4",
    "MedicationStatement": "10160-0",
    "CarePlan": "18776-5",
    "ServiceRequest": "57133-1",
    "FamilyMemberHistory": "10157-6",
}
DEFAULT_DOCUMENT_TYPE: Final = "34133-9"
#: Accepted and not stored.
NOT_STORED: Final = {
    "List": "the SubmissionSet: its documents are stored, not the list",
    "Practitioner": "the author of every record is the writer's certificate",
    "PractitionerRole": "the author of every record is the writer's certificate",
    "Organization": "the organization is kept as the records' organization name",
    "Location": "not a record of the patient",
    "Medication": "not a record of the patient",
}
_WHEN: Final = (
    "effectiveDateTime", "effectivePeriod.start", "onsetDateTime", "occurrenceDateTime",
    "performedDateTime", "performedPeriod.start", "authoredOn", "whenHandedOver",
    "recordedDate", "recorded", "issued", "period.start", "context.period.start", "date",
)  # fmt: skip
_CODE: Final = ("code", "vaccineCode", "medicationCodeableConcept", "type")
_DATE: Final = re.compile(
    r"^\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2}))?)?)?$"
)
_CONFIDENTIALITY: Final = {
    "N": K.CONFIDENTIALITY_NORMAL,
    "R": K.CONFIDENTIALITY_RESTRICTED,
    "V": K.CONFIDENTIALITY_VERY_RESTRICTED,
}
_SEX: Final = {
    "female": patient_pb2.SEX_FEMALE,
    "male": patient_pb2.SEX_MALE,
    "unknown": patient_pb2.SEX_UNDETERMINED,
    "other": patient_pb2.SEX_UNDETERMINED,
}


def invalid(path: str, message: str, status: int = 400) -> FhirError:
    """A refusal naming the element at fault."""
    issue = "too-costly" if status == 413 else "invalid"
    return FhirError(status, issue, f"{path}: {message}", expression=path)


@dataclass
class Put:
    """One entry to store: where it was in the Bundle, and the record with its content."""

    index: int
    resource_type: str
    request: npb.PutRecordRequest


@dataclass
class Submission:
    """A checked transaction Bundle: whose it is, what to store, what was not stored."""

    patient_ins: str
    traits: patient_pb2.PatientIdentity | None
    entries: int
    puts: list[Put] = field(default_factory=list)
    #: Entry index -> why it is accepted without being stored.
    skipped: dict[int, str] = field(default_factory=dict)


def record_id(patient_ins: str, key: str) -> str:
    """The record id an entry of a Bundle always gets (see the module docstring)."""
    return "fhir-" + hashlib.sha256(f"{patient_ins}|{key}".encode()).hexdigest()[:40]


def canonical(resource: Resource) -> bytes:
    """The bytes a structured resource is stored as: JSON, keys sorted, no spaces."""
    return json.dumps(resource, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


def _get(resource: Resource, dotted: str) -> Any:
    value: Any = resource
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def fhir_time(value: Any, path: str) -> datetime:
    """A FHIR date or dateTime as a UTC instant (a date alone: its midnight UTC)."""
    if not isinstance(value, str) or not _DATE.match(value):
        raise invalid(path, f"{value!r} is not a FHIR date or dateTime")
    text = value.replace("Z", "+00:00")
    if len(text) == 4:
        text += "-01-01"
    elif len(text) == 7:
        text += "-01"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise invalid(path, f"{value!r} is not a valid date") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _coding(concept: Any) -> dict[str, Any] | None:
    """The concept's LOINC coding if it has one, else its first coding with a code."""
    codings = [c for c in (concept or {}).get("coding") or [] if isinstance(c, dict)]
    codings = [c for c in codings if isinstance(c.get("code"), str) and c["code"].strip()]
    loinc = [c for c in codings if c.get("system") == LOINC_SYSTEM]
    chosen = loinc or codings
    return chosen[0] if chosen else None


def _text(concept: Any) -> str:
    if not isinstance(concept, dict):
        return ""
    coding = _coding(concept)
    text = concept.get("text") or (coding or {}).get("display") or (coding or {}).get("code")
    return str(text or "").strip()


def subject_ins(resource: Resource, path: str, patients: dict[str, str]) -> str | None:
    """The INS an entry is about: its subject (or patient) reference, resolved against the
    Bundle's Patient entries, ``Patient/INS``, or an INS-NIR identifier."""
    for name in ("subject", "patient"):
        ref = resource.get(name)
        if ref is None:
            continue
        where = f"{path}.{name}"
        if not isinstance(ref, dict):
            raise invalid(where, "must be a Reference")
        target = ref.get("reference")
        identifier = ref.get("identifier")
        if isinstance(target, str) and target in patients:
            return patients[target]
        if isinstance(target, str) and target.startswith("Patient/"):
            return _ins(target.removeprefix("Patient/"), f"{where}.reference")
        if isinstance(identifier, dict) and identifier.get("system") == INS_SYSTEM:
            return _ins(identifier.get("value"), f"{where}.identifier.value")
        raise invalid(
            where,
            "names no patient of this Bundle: reference the Patient entry's fullUrl,"
            f" Patient/<INS>, or give identifier {INS_SYSTEM}|<INS>",
        )
    return None


def _ins(value: Any, path: str) -> str:
    try:
        return normalize_ins(str(value or ""), path)
    except InvalidArgument as exc:
        raise FhirError(400, "invalid", exc.message, expression=path) from None


def patient_traits(resource: Resource, path: str) -> patient_pb2.PatientIdentity:
    identifiers = [i for i in resource.get("identifier") or [] if isinstance(i, dict)]
    ins = [i.get("value") for i in identifiers if i.get("system") == INS_SYSTEM]
    if len(ins) != 1:
        raise invalid(
            f"{path}.identifier", f"a Patient needs exactly one INS-NIR identifier ({INS_SYSTEM})"
        )
    identity = patient_pb2.PatientIdentity(ins=_ins(ins[0], f"{path}.identifier.value"))
    names = [n for n in resource.get("name") or [] if isinstance(n, dict)]
    official = [n for n in names if n.get("use") == "official"] or names
    if official:
        identity.birth_family_name = str(official[0].get("family") or "")
        identity.given_names.extend(str(g) for g in official[0].get("given") or [])
    if resource.get("birthDate"):
        identity.birth_date = fhir_time(resource["birthDate"], f"{path}.birthDate").strftime(
            "%Y-%m-%d"
        )
    gender = resource.get("gender")
    if gender is not None:
        if gender not in _SEX:
            raise invalid(f"{path}.gender", f"{gender!r} is not male, female, other or unknown")
        identity.sex = _SEX[gender]
    for extension in resource.get("extension") or []:
        if isinstance(extension, dict) and extension.get("url", "").endswith("patient-birthPlace"):
            for inner in (extension.get("valueAddress") or {}).get("extension") or []:
                code = (inner.get("valueCoding") or {}).get("code")
                if code:
                    identity.birthplace_code = str(code)
    return identity


def _when(resource: Resource, path: str) -> datetime | None:
    for name in _WHEN:
        value = _get(resource, name)
        if value is not None:
            return fhir_time(value, f"{path}.{name}")
    return None


def _confidentiality(resource: Resource) -> record_pb2.Confidentiality.ValueType:
    labels = list((resource.get("meta") or {}).get("security") or [])
    for label in resource.get("securityLabel") or []:
        labels.extend((label or {}).get("coding") or [])
    levels = [
        _CONFIDENTIALITY[c["code"]]
        for c in labels
        if isinstance(c, dict)
        and c.get("system") == CONFIDENTIALITY_SYSTEM
        and c.get("code") in _CONFIDENTIALITY
    ]
    return max(levels, default=K.CONFIDENTIALITY_NORMAL)


def _record(
    ins: str, key: str, kind: record_pb2.RecordKind.ValueType, coding: dict[str, Any], title: str
) -> record_pb2.Record:
    return record_pb2.Record(
        id=record_id(ins, key),
        patient_ins=ins,
        kind=kind,
        type_code=record_pb2.Coding(
            system=str(coding.get("system") or LOINC_SYSTEM),
            code=str(coding["code"]).strip(),
            display=str(coding.get("display") or ""),
        ),
        title=title,
    )


def structured(resource: Resource, ins: str, key: str, path: str) -> npb.PutRecordRequest:
    """A structured resource (or any other of the patient's) as a record whose content is
    the resource itself."""
    kind_type = resource["resourceType"]
    if kind_type in STRUCTURED:
        kind, section, label = STRUCTURED[kind_type]
        if kind_type == "Observation" and not isinstance(resource.get("code"), dict):
            raise invalid(f"{path}.code", "required: what was observed (a LOINC code)")
    else:
        kind, label = K.RECORD_KIND_DOCUMENT, kind_type
        section = DOCUMENT_TYPES.get(kind_type, DEFAULT_DOCUMENT_TYPE)
    concept = next((resource[c] for c in _CODE if isinstance(resource.get(c), dict)), None)
    text = _text(concept)
    own = _coding(concept)
    loinc = own is not None and own.get("system") == LOINC_SYSTEM
    if loinc and kind in (K.RECORD_KIND_OBSERVATION, K.RECORD_KIND_DOCUMENT):
        assert own is not None
        coding = own
    else:
        coding = {"system": LOINC_SYSTEM, "code": section}
    record = _record(ins, key, kind, coding, f"{label} : {text}"[:500] if text else label)
    record.content_type = FHIR_JSON
    record.confidentiality = _confidentiality(resource)
    when = _when(resource, path)
    if when is not None:
        record.effective_time.FromDatetime(when)
    return npb.PutRecordRequest(record=record, content=canonical(resource))


def _decode(data: Any, path: str) -> bytes:
    if not isinstance(data, str):
        raise invalid(path, "must be base64 text")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(path, "is not valid base64") from None


def document(
    resource: Resource, ins: str, key: str, path: str, binaries: dict[str, tuple[str, Resource]]
) -> tuple[npb.PutRecordRequest, str | None]:
    """A DocumentReference and its content; also the Binary entry it used (its fullUrl)."""
    if resource.get("status") not in ("current", None):
        raise invalid(f"{path}.status", f"{resource.get('status')!r}: only current documents")
    coding = _coding(resource.get("type"))
    if coding is None:
        raise invalid(f"{path}.type", "required: the document's type, a LOINC code")
    contents = resource.get("content")
    if not isinstance(contents, list) or len(contents) != 1:
        raise invalid(f"{path}.content", "exactly one content (one attachment) is expected")
    where = f"{path}.content[0].attachment"
    attachment = contents[0].get("attachment") if isinstance(contents[0], dict) else None
    if not isinstance(attachment, dict):
        raise invalid(where, "required")
    used = None
    content_type = attachment.get("contentType")
    if "data" in attachment:
        data = _decode(attachment["data"], f"{where}.data")
    elif isinstance(attachment.get("url"), str):
        found = binaries.get(attachment["url"])
        if found is None:
            raise invalid(f"{where}.url", "names no Binary entry of this Bundle")
        used, binary = found
        data = _decode(binary.get("data"), f"{used}.data")
        content_type = content_type or binary.get("contentType")
    else:
        raise invalid(where, "needs data, or a url naming a Binary entry of this Bundle")
    if not isinstance(content_type, str) or not content_type.strip():
        raise invalid(f"{where}.contentType", "required: the content's media type")
    if "size" in attachment and attachment["size"] != len(data):
        raise invalid(
            f"{where}.size", f"says {attachment['size']} bytes, the content has {len(data)}"
        )
    if "hash" in attachment:
        sha1 = base64.b64encode(hashlib.sha1(data).digest()).decode()
        if attachment["hash"] != sha1:
            raise invalid(f"{where}.hash", "does not match the content (SHA-1, base64)")
    for extension in attachment.get("extension") or []:
        ours = isinstance(extension, dict) and extension.get("url") == SHA256_EXTENSION
        if ours and extension.get("valueString") != hashlib.sha256(data).hexdigest():
            raise invalid(f"{where}.extension", "the SHA-256 does not match the content")
    title = str(
        resource.get("description") or attachment.get("title") or _text(resource.get("type"))
    ).strip()
    kind = K.RECORD_KIND_DOCUMENT
    for category in resource.get("category") or []:
        for c in (category or {}).get("coding") or []:
            if c.get("system") == RECORD_KIND_SYSTEM and c.get("code") == "patient-note":
                kind = K.RECORD_KIND_PATIENT_NOTE
    record = _record(ins, key, kind, coding, title[:500] or "Document")
    record.content_type = content_type.strip()
    record.confidentiality = _confidentiality(resource)
    organizations = [
        a.get("display")
        for a in resource.get("author") or []
        if isinstance(a, dict) and a.get("type") == "Organization" and a.get("display")
    ]
    custodian = (resource.get("custodian") or {}).get("display")
    record.organization = str((organizations or [custodian or ""])[0])[:200]
    when = None
    for name, value in (
        ("context.period.start", _get(resource, "context.period.start")),
        ("content[0].attachment.creation", attachment.get("creation")),
        ("date", resource.get("date")),
    ):
        if value is not None:
            when = fhir_time(value, f"{path}.{name}")
            break
    if when is not None:
        record.effective_time.FromDatetime(when)
    return npb.PutRecordRequest(record=record, content=data), used
