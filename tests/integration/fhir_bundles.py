# ruff: noqa: E501  (FHIR test resources read best one element a line)
"""Transaction Bundles as hospital software builds them, for the FHIR write tests: built
with fhirclient's R4 models (not our code), and carebundle's US Core patients given French
test INS numbers."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from typing import Any

from fhirclient.models.bundle import Bundle, BundleEntry, BundleEntryRequest
from fhirclient.models.fhirelementfactory import FHIRElementFactory

from dmp.synth import ins_for_index

INS_SYSTEM = "urn:oid:1.2.250.1.213.1.4.8"
LOINC = "http://loinc.org"
SHA256_EXTENSION = "urn:dmp:fhir:attachment-sha256"
PDF = b"%PDF-1.4 compte rendu\n" + bytes(range(256)) * 300


#: FR Core's birth place (INSEE code of Lyon 3e), which the directory requires.
BIRTHPLACE = {
    "url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
    "valueAddress": {"extension": [{
        "url": "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-address-insee-code",
        "valueCoding": {"code": "69383"},
    }]},
}  # fmt: skip


def ins_number(index: int) -> str:
    """A valid test INS of its own for each test's patient (NIR with its key)."""
    return ins_for_index(9000 + index, seed=12)


def _entry(full_url: str, resource: dict[str, Any]) -> BundleEntry:
    entry = BundleEntry()
    entry.fullUrl = full_url
    entry.resource = FHIRElementFactory.instantiate(resource["resourceType"], resource)
    request = BundleEntryRequest()
    request.method = "POST"
    request.url = resource["resourceType"]
    entry.request = request
    return entry


def submission(ins: str, tag: str, content: bytes = PDF) -> dict[str, Any]:
    """An IHE MHD ITI-65 Bundle: SubmissionSet List, a DocumentReference and its Binary, a
    Patient, and one resource of each structured kind, as fhirclient serializes them."""

    def u(name: str) -> str:
        return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{tag}/{name}')}"

    patient_url = u("patient")
    subject = {"reference": patient_url}
    binary_url, doc_url = u("binary"), u("doc")
    resources: list[tuple[str, dict[str, Any]]] = [
        (u("list"), {
            "resourceType": "List", "status": "current", "mode": "working",
            "code": {"coding": [{"system": "https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes", "code": "submissionset"}]},
            "subject": subject, "date": "2026-11-30T10:00:00Z",
            "entry": [{"item": {"reference": doc_url}}],
        }),
        (patient_url, {
            "resourceType": "Patient",
            "identifier": [{"system": INS_SYSTEM, "value": ins}],
            "name": [{"use": "official", "family": "MARTIN", "given": ["Louise", "Anne"]}],
            "gender": "female", "birthDate": "1962-03-05", "extension": [BIRTHPLACE],
        }),
        (doc_url, {
            "resourceType": "DocumentReference", "status": "current",
            "type": {"coding": [{"system": LOINC, "code": "11488-4", "display": "Consultation note"}]},
            "subject": subject, "description": f"Compte rendu de consultation {tag}",
            "securityLabel": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}]}],
            "content": [{"attachment": {
                "contentType": "application/pdf", "url": binary_url, "size": len(content),
                "hash": base64.b64encode(hashlib.sha1(content).digest()).decode(),
                "extension": [{"url": SHA256_EXTENSION, "valueString": hashlib.sha256(content).hexdigest()}],
            }}],
            "context": {"period": {"start": "2026-11-29T09:30:00Z"}},
        }),
        (binary_url, {"resourceType": "Binary", "contentType": "application/pdf", "data": base64.b64encode(content).decode()}),
        (u("allergy"), {
            "resourceType": "AllergyIntolerance", "patient": subject,
            "code": {"text": "pénicillines"}, "criticality": "high", "recordedDate": "2026-10-01",
        }),
        (u("condition"), {
            "resourceType": "Condition", "subject": subject,
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006", "display": "Diabetes mellitus type 2"}]},
            "onsetDateTime": "2019-05-01",
        }),
        (u("immunization"), {
            "resourceType": "Immunization", "status": "completed", "patient": subject,
            "vaccineCode": {"text": "grippe saisonnière"}, "occurrenceDateTime": "2025-10-20", "lotNumber": "AB123",
        }),
        (u("observation"), {
            "resourceType": "Observation", "status": "final", "subject": subject,
            "code": {"coding": [{"system": LOINC, "code": "4548-4", "display": "Hemoglobin A1c"}]},
            "valueQuantity": {"value": 7.2, "unit": "%"}, "effectiveDateTime": "2026-11-02T08:00:00Z",
        }),
        (u("medication"), {
            "resourceType": "MedicationRequest", "status": "active", "intent": "order", "subject": subject,
            "medicationCodeableConcept": {"text": "metformine 1000 mg"},
            "dosageInstruction": [{"text": "1 comprimé matin et soir"}], "authoredOn": "2026-11-02",
        }),
    ]  # fmt: skip
    bundle = Bundle()
    bundle.type = "transaction"
    bundle.entry = [_entry(url, resource) for url, resource in resources]
    serialized: dict[str, Any] = bundle.as_json()
    return serialized


def carebundle_transactions(count: int) -> list[tuple[str, dict[str, Any]]]:
    """carebundle's US Core transaction Bundles, each patient given a French test INS."""
    from carebundle import generate_bundle, to_json

    bundles = []
    for index in range(count):
        generated = json.loads(to_json(generate_bundle(profile="type2_diabetes", seed=40 + index)))
        ins = ins_number(100 + index)
        for entry in generated["entry"]:
            if entry["resource"]["resourceType"] == "Patient":
                entry["resource"].setdefault("identifier", []).append(
                    {"system": INS_SYSTEM, "value": ins}
                )
                entry["resource"].setdefault("extension", []).append(BIRTHPLACE)
        bundles.append((ins, generated))
    return bundles
