"""Prescription and dispensation records as MedicationRequest and MedicationDispense.

One place builds these resources: ``dmp/prescription_fhir.py``, from the signed act, when
the owning node writes the record; the record's content is that Bundle. Here we only read
it back (never build a second version of it): each resource of the content, enriched with
where the record lives and its record id. A prescription record whose content is not FHIR
(a scanned PDF, say) is described from its metadata alone, as honestly as that allows
(status ``unknown``, the title as the medication's text).

The dispensable prescriptions (``GET /MedicationRequest?status=active``) come from the
typed client's FindPrescriptions, which the node that holds each one answers from its
state (active or partially dispensed: not cancelled, expired nor used up), each built by
``dmp/prescription_fhir.py`` from its signed act.
"""

from __future__ import annotations

import json
from typing import Any, Final

from dmp.fhir.mapping import (
    Resource,
    author_reference,
    author_resource,
    fhir_id,
    instant,
    patient_reference,
    security_labels,
)
from dmp.fhir.systems import RECORD_ID_SYSTEM
from dmp.prescription_fhir import medication_requests
from dmp.v1 import prescription_pb2, record_pb2

FHIR_JSON: Final = "application/fhir+json"


def parse_content(record: record_pb2.Record, content: bytes | None) -> Resource | None:
    """The record's content as a FHIR resource, when it is one (FHIR JSON); else None."""
    if content is None or not record.content_type.startswith(FHIR_JSON):
        return None
    try:
        parsed = json.loads(content)
    except (UnicodeDecodeError, ValueError):
        return None
    return parsed if isinstance(parsed, dict) and "resourceType" in parsed else None


def resources_of(content: Resource | None, resource_type: str) -> list[Resource]:
    """The resources of ``resource_type`` in a content: itself, or a Bundle's entries."""
    if content is None:
        return []
    if content.get("resourceType") == resource_type:
        return [content]
    if content.get("resourceType") == "Bundle":
        found = []
        for entry in content.get("entry") or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and resource.get("resourceType") == resource_type:
                found.append(resource)
        return found
    return []


def _located(record: record_pb2.Record, resource: Resource, index: int, count: int) -> Resource:
    """A resource of the record's content, said to be that record's: its FHIR id, where it
    lives (meta.source), its labels and its record id."""
    out = dict(resource)
    out["id"] = fhir_id(record.id) if count == 1 else fhir_id(f"{record.id}-{index}")
    meta: Resource = dict(out.get("meta") or {})
    if record.region:
        meta["source"] = f"urn:dmp:node:{record.region}"
    if record.HasField("created_time"):
        meta["lastUpdated"] = instant(record.created_time)
    meta["security"] = security_labels(record)
    out["meta"] = meta
    identifiers = [i for i in out.get("identifier") or [] if i.get("system") != RECORD_ID_SYSTEM]
    out["identifier"] = [*identifiers, {"system": RECORD_ID_SYSTEM, "value": record.id}]
    out["subject"] = patient_reference(record.patient_ins)
    return out


def _described(record: record_pb2.Record, resource_type: str) -> Resource:
    """From the metadata alone, for a content that is not FHIR."""
    resource: Resource = {
        "resourceType": resource_type,
        "id": fhir_id(record.id),
        "meta": {"security": security_labels(record)},
    }
    if record.region:
        resource["meta"]["source"] = f"urn:dmp:node:{record.region}"
    if record.author.identity:
        resource["contained"] = [author_resource(record.author)]
    resource["identifier"] = [{"system": RECORD_ID_SYSTEM, "value": record.id}]
    resource["status"] = "unknown"
    if resource_type == "MedicationRequest":
        resource["intent"] = "order"
    resource["medicationCodeableConcept"] = {"text": record.title}
    resource["subject"] = patient_reference(record.patient_ins)
    when = record.effective_time if record.HasField("effective_time") else record.created_time
    if resource_type == "MedicationRequest":
        resource["authoredOn"] = instant(when)
        if record.author.identity:
            resource["requester"] = author_reference(record.author)
    else:
        resource["whenHandedOver"] = instant(when)
        if record.author.identity:
            resource["performer"] = [{"actor": author_reference(record.author)}]
    return resource


def medication_resources(record: record_pb2.Record, content: bytes | None) -> list[Resource]:
    """A prescription record as its MedicationRequests (one per line), a dispensation
    record as its MedicationDispenses, from the content the node built."""
    resource_type = (
        "MedicationRequest"
        if record.kind == record_pb2.RECORD_KIND_PRESCRIPTION
        else "MedicationDispense"
    )
    found = resources_of(parse_content(record, content), resource_type)
    if not found:
        return [_described(record, resource_type)]
    return [_located(record, r, i, len(found)) for i, r in enumerate(found)]


def dispensable_requests(stored: prescription_pb2.StoredPrescription) -> list[Resource]:
    """A dispensable prescription, as FindPrescriptions answers it, as its MedicationRequests:
    built from the signed act by ``dmp/prescription_fhir.py`` (the one builder), said to
    be active and where the prescription lives."""
    prescription = prescription_pb2.Prescription.FromString(stored.signed.prescription)
    built = json.loads(medication_requests(prescription))
    out = []
    for resource in resources_of(built, "MedicationRequest"):
        resource["status"] = "active"
        if stored.region:
            resource["meta"] = {"source": f"urn:dmp:node:{stored.region}"}
        out.append(resource)
    return out


__all__: Any = [
    "dispensable_requests",
    "medication_resources",
    "parse_content",
    "resources_of",
]
