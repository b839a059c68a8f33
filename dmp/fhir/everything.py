"""A patient's record as FHIR: each record as its natural resource, for
``Patient/{id}/$everything`` and for `dmp fhir export`.

A structured record (allergy, condition, immunization, observation) whose content is the
FHIR resource itself (what import and the writers store) is that resource, said to be the
record's (its id, where it lives, its labels and record id, the patient as FR Core's INS);
without FHIR content it is described from its metadata (``dmp.fhir.mapping``). A
prescription is its MedicationRequests, a dispensation its MedicationDispenses
(``dmp.fhir.medication``). Documents and patients' notes are DocumentReferences whose
attachment is the content.

The export is the same entries, every page, and each record's content inline as a Binary
(base64) that the DocumentReference's attachment (or the structured resource's
``urn:dmp:fhir:content`` extension) points to: one file that holds every fact and every
byte the caller may see.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Iterable
from typing import Final

from dmp.fhir.bundles import now_instant
from dmp.fhir.mapping import NATURAL, Resource, binary_id, natural_resource, patient
from dmp.fhir.medication import FHIR_JSON, medication_resources, parse_content, resources_of
from dmp.v1 import patient_pb2, record_pb2

#: The records read with their content to be given as their natural resource.
MEDICATION: Final = (record_pb2.RECORD_KIND_PRESCRIPTION, record_pb2.RECORD_KIND_DISPENSATION)
#: Largest content read to build a natural resource from (FHIR JSON is small).
MAX_INLINE: Final = 1024 * 1024
#: Where a structured resource of an export says which Binary holds its record's content.
CONTENT_EXTENSION: Final = "urn:dmp:fhir:content"
_OURS: Final = {"resourceType", "id", "meta", "identifier", "contained", "subject", "patient"}
_NAMESPACE: Final = uuid.UUID("3f1c2b8e-6d0a-4f57-9a51-0c9a3e7d2b61")


def needs_content(record: record_pb2.Record) -> bool:
    """Whether the record's natural resource is built from its content."""
    natural = record.kind in NATURAL or record.kind in MEDICATION
    return natural and record.content_type.startswith(FHIR_JSON) and record.size <= MAX_INLINE


def natural_resources(
    record: record_pb2.Record, content_url: str, content: bytes | None
) -> list[Resource]:
    """The record as the resource(s) a FHIR client expects for its kind."""
    if record.kind in MEDICATION:
        return medication_resources(record, content)
    described = natural_resource(record, content_url)
    if record.kind not in NATURAL:
        return [described]
    found = resources_of(parse_content(record, content), described["resourceType"])
    if len(found) != 1:
        return [described]
    merged = dict(described)
    merged.update({k: v for k, v in found[0].items() if k not in _OURS})
    return [merged]


def natural_entries(
    records: Iterable[record_pb2.Record],
    content_url: Callable[[record_pb2.Record], str],
    read_content: Callable[[record_pb2.Record, int], bytes | None],
) -> list[tuple[str, Resource]]:
    """(relative url, resource) of each record's natural resource(s), each read with its
    content when it is built from it (structured FHIR content, prescriptions and
    dispensations); ``read_content`` answers None when it cannot be read."""
    matches = []
    for record in records:
        content = read_content(record, MAX_INLINE) if needs_content(record) else None
        for resource in natural_resources(record, content_url(record), content):
            matches.append((entry_url(resource), resource))
    return matches


def entry_url(resource: Resource) -> str:
    return f"{resource['resourceType']}/{resource['id']}"


def _urn(key: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_NAMESPACE, key)}"


def export_bundle(
    identity: patient_pb2.PatientIdentity | None,
    records: Iterable[record_pb2.Record],
    content_of: Callable[[record_pb2.Record], bytes],
    *,
    outcome: Resource | None = None,
) -> Resource:
    """The patient's $everything as one searchset Bundle, every content inline as a Binary.
    ``content_of`` reads a record's content (all of it)."""
    entries: list[Resource] = []
    if identity is not None:
        resource = patient(identity)
        entries.append(
            {
                "fullUrl": _urn(entry_url(resource)),
                "resource": resource,
                "search": {"mode": "include"},
            }
        )
    binaries: list[Resource] = []
    for record in records:
        content = content_of(record)
        key = binary_id(record)
        binary_url = _urn(f"Binary/{key}")
        for resource in natural_resources(record, binary_url, content):
            if resource["resourceType"] != "DocumentReference":
                extension = [
                    e for e in resource.get("extension") or [] if e.get("url") != CONTENT_EXTENSION
                ]
                resource["extension"] = [
                    *extension,
                    {"url": CONTENT_EXTENSION, "valueUri": binary_url},
                ]
            entries.append(
                {
                    "fullUrl": _urn(entry_url(resource)),
                    "resource": resource,
                    "search": {"mode": "match"},
                }
            )
        binary: Resource = {
            "resourceType": "Binary",
            "id": key,
            "contentType": record.content_type or "application/octet-stream",
            "data": base64.b64encode(content).decode("ascii"),
        }
        binaries.append({"fullUrl": binary_url, "resource": binary, "search": {"mode": "include"}})
    entries.extend(binaries)
    if outcome is not None:
        entries.append(
            {
                "fullUrl": f"urn:uuid:{outcome['id']}",
                "resource": outcome,
                "search": {"mode": "outcome"},
            }
        )
    bundle: Resource = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": now_instant()},
        "type": "searchset",
        "total": sum(1 for e in entries if e["search"]["mode"] == "match"),
    }
    if entries:
        bundle["entry"] = entries
    return bundle
