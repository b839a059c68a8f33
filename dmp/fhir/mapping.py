"""Our records and identities as FHIR R4 resources (the read direction).

One function per resource, each from the record's metadata alone (the content is fetched
on demand, as ``Binary``): a document is a ``DocumentReference`` (IHE MHD), a structured
item its natural resource (``AllergyIntolerance``, ``Condition``, ``Immunization``,
``Observation``). Prescriptions and dispensations are ``DocumentReference``s until
e-prescription maps them to ``MedicationRequest`` and ``MedicationDispense``: add them to
:data:`NATURAL`. The write direction (FHIR to records) belongs here too, beside these.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import Any, Final

from google.protobuf.timestamp_pb2 import Timestamp

from dmp.fhir.systems import (
    BIRTH_PLACE,
    CONFIDENTIALITY_SYSTEM,
    FR_CORE_IDENTIFIER_TYPE,
    FR_CORE_INSEE_CODE,
    FR_CORE_PATIENT_INS,
    LOINC_SYSTEM,
    OBSERVATION_VALUE_SYSTEM,
    PROFESSION_SYSTEM,
    RECORD_ID_SYSTEM,
    RECORD_KIND_SYSTEM,
    SHA256_EXTENSION,
    identifier_for,
    ins_identifier,
    resource_type_for,
)
from dmp.records import KIND_NAMES
from dmp.v1 import patient_pb2, record_pb2

Resource = dict[str, Any]

_FHIR_ID: Final = re.compile(r"^[A-Za-z0-9.-]{1,64}$")

GENDERS: Final = {
    patient_pb2.SEX_FEMALE: "female",
    patient_pb2.SEX_MALE: "male",
    patient_pb2.SEX_UNDETERMINED: "unknown",
}
_CONFIDENTIALITY: Final = {
    record_pb2.CONFIDENTIALITY_NORMAL: ("N", "normal"),
    record_pb2.CONFIDENTIALITY_RESTRICTED: ("R", "restricted"),
    record_pb2.CONFIDENTIALITY_VERY_RESTRICTED: ("V", "very restricted"),
}
_STATUSES: Final = {
    record_pb2.RECORD_STATUS_CURRENT: "current",
    record_pb2.RECORD_STATUS_SUPERSEDED: "superseded",
}


def fhir_id(record_id: str) -> str:
    """A record's FHIR id: its own id when FHIR allows it ([A-Za-z0-9.-]{1,64}, as every id
    a node assigns), else a digest of it (record ids may hold '_', FHIR ids may not)."""
    if _FHIR_ID.match(record_id):
        return record_id
    return "h" + hashlib.sha256(record_id.encode()).hexdigest()[:40]


def binary_id(record: record_pb2.Record) -> str:
    """The FHIR id of a record's content (its Binary): ``REGION.INS.RECORD-ID``, which says
    where to fetch it, so that an attachment URL stays readable by any gateway, after a
    restart too. The locator grants nothing: the node decides every read for the caller's
    own signed assertion. An id too long for FHIR falls back to the record's FHIR id, which
    the gateway that listed it remembers."""
    located = f"{record.region}.{record.patient_ins}.{record.id}"
    if record.region and _FHIR_ID.match(located):
        return located
    return fhir_id(record.id)


def parse_binary_id(key: str) -> tuple[str, str, str] | None:
    """(region, INS, record id) of a located Binary id; None for any other id."""
    region, dot, rest = key.partition(".")
    ins, dot2, record_id = rest.partition(".")
    if not (dot and dot2 and len(region) == 2 and len(ins) == 15 and record_id):
        return None
    return region, ins, record_id


def instant(stamp: Timestamp) -> str:
    """A protobuf Timestamp as a FHIR instant (UTC, microseconds)."""
    return stamp.ToDatetime().strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------- people


def patient(identity: patient_pb2.PatientIdentity) -> Resource:
    """The directory's identity as an FR Core Patient (INS profile): INS-NIR, birth name,
    given names, birth date, gender, birth place (INSEE code)."""
    identifier = {
        "use": "official",
        "type": {
            "coding": [
                {"system": FR_CORE_IDENTIFIER_TYPE, "code": "INS-NIR", "display": "NIR définitif"}
            ]
        },
        **ins_identifier(identity.ins),
    }
    resource: Resource = {
        "resourceType": "Patient",
        "id": identity.ins,
        "meta": {"profile": [FR_CORE_PATIENT_INS]},
    }
    if identity.birthplace_code:
        code = identity.birthplace_code
        resource["extension"] = [
            {
                "url": BIRTH_PLACE,
                "valueAddress": {
                    "extension": [{"url": FR_CORE_INSEE_CODE, "valueCoding": {"code": code}}]
                },
            }
        ]
    resource["identifier"] = [identifier]
    name: Resource = {"use": "official"}
    if identity.birth_family_name:
        name["family"] = identity.birth_family_name
    if identity.given_names:
        name["given"] = list(identity.given_names)
    if len(name) > 1:
        resource["name"] = [name]
    if identity.sex in GENDERS:
        resource["gender"] = GENDERS[identity.sex]
    if identity.birth_date:
        resource["birthDate"] = identity.birth_date
    return resource


def patient_reference(ins: str) -> Resource:
    return {"reference": f"Patient/{ins}", "type": "Patient", "identifier": ins_identifier(ins)}


def author_resource(author: record_pb2.Author, resource_id: str = "author") -> Resource:
    """Who wrote a record, as a contained Practitioner (RPPS, name, profession) or Patient."""
    kind = resource_type_for(author.identity)
    resource: Resource = {
        "resourceType": kind,
        "id": resource_id,
        "identifier": [identifier_for(author.identity)],
    }
    if author.name:
        resource["name"] = [{"text": author.name}]
    if kind == "Practitioner" and author.profession:
        resource["qualification"] = [
            {"code": {"coding": [{"system": PROFESSION_SYSTEM, "code": author.profession}]}}
        ]
    if kind == "Device":  # a service wrote it: a Device has a name of another shape
        resource.pop("name", None)
        resource["deviceName"] = [
            {"name": author.name or author.identity, "type": "user-friendly-name"}
        ]
    return resource


def author_reference(author: record_pb2.Author, resource_id: str = "author") -> Resource:
    out: Resource = {
        "reference": f"#{resource_id}",
        "type": resource_type_for(author.identity),
        "identifier": identifier_for(author.identity),
    }
    if author.name:
        out["display"] = author.name
    return out


# --------------------------------------------------------------------------- records


def security_labels(record: record_pb2.Record) -> list[Resource]:
    """Confidentiality (HL7 v3 N/R/V), and MASKED when the patient masked the record."""
    code, display = _CONFIDENTIALITY.get(record.confidentiality, ("N", "normal"))
    labels = [{"system": CONFIDENTIALITY_SYSTEM, "code": code, "display": display}]
    if record.masked:
        labels.append({"system": OBSERVATION_VALUE_SYSTEM, "code": "MASKED", "display": "masked"})
    return labels


def _type_coding(record: record_pb2.Record) -> Resource:
    coding: Resource = {
        "system": record.type_code.system or LOINC_SYSTEM,
        "code": record.type_code.code,
    }
    if record.type_code.display:
        coding["display"] = record.type_code.display
    return coding


def _common(record: record_pb2.Record, resource_type: str) -> Resource:
    """What every resource made from a record carries: id, where it lives, its labels,
    its record id, and its author contained."""
    meta: Resource = {"source": f"urn:dmp:node:{record.region}"} if record.region else {}
    if record.HasField("created_time"):
        meta["lastUpdated"] = instant(record.created_time)
    meta["security"] = security_labels(record)
    resource: Resource = {"resourceType": resource_type, "id": fhir_id(record.id), "meta": meta}
    if record.author.identity:
        resource["contained"] = [author_resource(record.author)]
    resource["identifier"] = [{"system": RECORD_ID_SYSTEM, "value": record.id}]
    return resource


def _effective(record: record_pb2.Record) -> str | None:
    if record.HasField("effective_time"):
        return instant(record.effective_time)
    if record.HasField("created_time"):
        return instant(record.created_time)
    return None


def document_reference(record: record_pb2.Record, content_url: str) -> Resource:
    """A record as an IHE MHD DocumentReference: LOINC type, author (RPPS), dates, status,
    security labels, and the attachment (media type, size, URL, SHA-256 in an extension)."""
    resource = _common(record, "DocumentReference")
    resource["status"] = _STATUSES.get(record.status, "current")
    resource["type"] = {"coding": [_type_coding(record)], "text": record.title}
    kind = KIND_NAMES.get(record.kind, "document")
    resource["category"] = [{"coding": [{"system": RECORD_KIND_SYSTEM, "code": kind}]}]
    resource["subject"] = patient_reference(record.patient_ins)
    if record.HasField("created_time"):
        resource["date"] = instant(record.created_time)
    authors = [author_reference(record.author)] if record.author.identity else []
    if record.organization:
        authors.append({"type": "Organization", "display": record.organization})
    if authors:
        resource["author"] = authors
    if record.supersedes:
        resource["relatesTo"] = [
            {
                "code": "replaces",
                "target": {"reference": f"DocumentReference/{fhir_id(record.supersedes)}"},
            }
        ]
    resource["description"] = record.title
    resource["securityLabel"] = [{"coding": [label]} for label in security_labels(record)]
    attachment: Resource = {
        "extension": [{"url": SHA256_EXTENSION, "valueString": record.sha256}],
        "contentType": record.content_type,
        "url": content_url,
        "size": record.size,
        "title": record.title,
    }
    effective = _effective(record)
    if effective:
        attachment["creation"] = effective
    if not record.sha256:
        del attachment["extension"]
    resource["content"] = [{"attachment": attachment}]
    if record.HasField("effective_time"):
        resource["context"] = {"period": {"start": instant(record.effective_time)}}
    return resource


def _code(record: record_pb2.Record) -> Resource:
    return {"coding": [_type_coding(record)], "text": record.title}


def _recorded(record: record_pb2.Record, resource_type: str, patient_element: str) -> Resource:
    """A coded resource about the patient (under `patient_element`), recorded by the
    record's author on its clinical date."""
    resource = _common(record, resource_type)
    resource["code"] = _code(record)
    resource[patient_element] = patient_reference(record.patient_ins)
    effective = _effective(record)
    if effective:
        resource["recordedDate"] = effective
    if record.author.identity:
        resource["recorder"] = author_reference(record.author)
    return resource


def allergy_intolerance(record: record_pb2.Record, _content_url: str) -> Resource:
    return _recorded(record, "AllergyIntolerance", "patient")


def condition(record: record_pb2.Record, _content_url: str) -> Resource:
    return _recorded(record, "Condition", "subject")


def immunization(record: record_pb2.Record, _content_url: str) -> Resource:
    resource = _common(record, "Immunization")
    resource["status"] = "completed"
    # The vaccine's code is in the content; the record's metadata names it in its title.
    resource["vaccineCode"] = {"text": record.title}
    resource["patient"] = patient_reference(record.patient_ins)
    effective = _effective(record)
    if effective:  # always, from a node (created_time at least); required by R4
        resource["occurrenceDateTime"] = effective
    if record.HasField("created_time"):
        resource["recorded"] = instant(record.created_time)
    if record.author.identity:
        resource["performer"] = [{"actor": author_reference(record.author)}]
    return resource


def observation(record: record_pb2.Record, _content_url: str) -> Resource:
    resource = _common(record, "Observation")
    resource["status"] = "final"
    resource["code"] = _code(record)
    resource["subject"] = patient_reference(record.patient_ins)
    effective = _effective(record)
    if effective:
        resource["effectiveDateTime"] = effective
    if record.HasField("created_time"):
        resource["issued"] = instant(record.created_time)
    if record.author.identity:
        resource["performer"] = [author_reference(record.author)]
    return resource


Mapper = Callable[[record_pb2.Record, str], Resource]

#: The natural resource of each record kind; every other kind is a DocumentReference.
NATURAL: Final[dict[int, Mapper]] = {
    record_pb2.RECORD_KIND_ALLERGY: allergy_intolerance,
    record_pb2.RECORD_KIND_CONDITION: condition,
    record_pb2.RECORD_KIND_IMMUNIZATION: immunization,
    record_pb2.RECORD_KIND_OBSERVATION: observation,
}


def natural_resource(record: record_pb2.Record, content_url: str) -> Resource:
    """A record as the resource a FHIR client expects for its kind."""
    return NATURAL.get(record.kind, document_reference)(record, content_url)
