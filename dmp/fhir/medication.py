"""Prescription and dispensation records as MedicationRequest and MedicationDispense.

One place builds these resources: ``dmp/prescription_fhir.py``, from the signed act, when
the owning node writes the record; the record's content is that Bundle. Here we only read
it back (never build a second version of it): each resource of the content, enriched with
where the record lives and its record id. A prescription record whose content is not FHIR
(a scanned PDF, say) is described from its metadata alone, as honestly as that allows
(status ``unknown``, the title as the medication's text).

A prescription is *active* (dispensable) when the node wrote it from e-prescription (the
record names its prescription), it is the current version, its validity has not ended and
fewer dispensings were recorded than it allows (first plus its renewals).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
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
from dmp.v1 import record_pb2

FHIR_JSON: Final = "application/fhir+json"
#: Largest prescription content read (the node's are a few kilobytes).
MAX_CONTENT: Final = 1024 * 1024


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


def _end(resources: list[Resource]) -> datetime | None:
    for resource in resources:
        end = ((resource.get("dispenseRequest") or {}).get("validityPeriod") or {}).get("end")
        if isinstance(end, str):
            try:
                return datetime.fromisoformat(end.replace("Z", "+00:00"))
            except ValueError:
                return None
    return None


def _allowed(resources: list[Resource]) -> int:
    repeats = [(r.get("dispenseRequest") or {}).get("numberOfRepeatsAllowed") for r in resources]
    numbers = [n for n in repeats if isinstance(n, int)]
    return 1 + (max(numbers) if numbers else 0)


def is_active(
    record: record_pb2.Record,
    resources: list[Resource],
    dispensings: int,
    now: datetime | None = None,
) -> bool:
    """Still dispensable, as far as the records show it (see the module docstring)."""
    if not record.prescription_id or record.status != record_pb2.RECORD_STATUS_CURRENT:
        return False
    end = _end(resources)
    if end is not None and end <= (now or datetime.now(UTC)):
        return False
    return dispensings < _allowed(resources)


def active_medication_requests(
    records: Iterable[record_pb2.Record],
    read_content: Callable[[record_pb2.Record, int], bytes | None],
    now: datetime | None = None,
) -> list[Resource]:
    """The MedicationRequests of every dispensable prescription among ``records`` (the
    patient's prescription and dispensation records), each said to be active."""
    records = list(records)
    dispensed: dict[str, int] = {}
    for record in records:
        if record.kind == record_pb2.RECORD_KIND_DISPENSATION and record.prescription_id:
            dispensed[record.prescription_id] = dispensed.get(record.prescription_id, 0) + 1
    found: list[Resource] = []
    for record in records:
        if record.kind != record_pb2.RECORD_KIND_PRESCRIPTION or not record.prescription_id:
            continue
        resources = medication_resources(record, read_content(record, MAX_CONTENT))
        if is_active(record, resources, dispensed.get(record.prescription_id, 0), now):
            found.extend({**r, "status": "active"} for r in resources)
    return found


__all__: Any = [
    "active_medication_requests",
    "is_active",
    "medication_resources",
    "parse_content",
    "resources_of",
]
