"""The gateway's CapabilityStatement: exactly what it supports, nothing more."""

from __future__ import annotations

from typing import Any

from dmp.fhir.bundles import now_instant
from dmp.fhir.systems import FHIR_VERSION, INS_SYSTEM

_PATIENT_PARAM = {
    "name": "patient.identifier",
    "type": "token",
    "documentation": f"the patient's INS-NIR, as {INS_SYSTEM}|<INS> (required)",
}
_COUNT = {"name": "_count", "type": "number", "documentation": "page size, 1 to 200"}


def _search(name: str, kind: str, doc: str) -> dict[str, Any]:
    return {"name": name, "type": kind, "documentation": doc}


#: What a transaction Bundle (ITI-65) may carry.
WRITTEN = (
    "List (the SubmissionSet), DocumentReference with its Binary (or attachment.data),"
    " AllergyIntolerance, Condition, Immunization, Observation, MedicationRequest,"
    " MedicationDispense, other resources of the patient (DiagnosticReport, Encounter,"
    " Procedure...) as documents of FHIR JSON; one Patient (with its INS-NIR) gives the"
    " patient's traits; Practitioner, PractitionerRole, Organization, Location are accepted"
    " and not stored (the author is the gateway's identity)"
)


def capability_statement(base: str, identity: str, *, writes: bool = False) -> dict[str, Any]:
    """What `dmp fhir serve` answers: FHIR R4 JSON reads (IHE MHD ITI-67 and ITI-68), and
    with a node to write to (``writes``) transaction Bundles (ITI-65)."""
    resources = [
        {
            "type": "Patient",
            "profile": "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-patient-ins",
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "searchParam": [
                _search("identifier", "token", f"the INS-NIR: {INS_SYSTEM}|<INS> (or _id)"),
                _search("_id", "token", "the INS itself, the Patient's id"),
            ],
            "operation": [
                {
                    "name": "everything",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                    "documentation": "every record the caller may see, as its natural resource"
                    " (DocumentReference for documents and patient notes,"
                    " AllergyIntolerance, Condition, Immunization, Observation,"
                    " MedicationRequest for prescriptions, MedicationDispense for"
                    " dispensations); paged with _count",
                }
            ],
        },
        {
            "type": "DocumentReference",
            "interaction": [{"code": "search-type"}],
            "documentation": "the consolidated view of every region, newest first; regions"
            " that did not answer are named in an OperationOutcome entry (search.mode"
            " outcome). The content's SHA-256 is in the attachment extension"
            " urn:dmp:fhir:attachment-sha256",
            "searchParam": [
                _PATIENT_PARAM,
                _search("patient", "reference", "Patient/<INS>, instead of patient.identifier"),
                _search("subject.identifier", "token", "the same as patient.identifier"),
                _search("subject", "reference", "the same as patient"),
                _search("type", "token", "LOINC type code(s), comma for or"),
                _search("category", "token", "record kind(s): urn:dmp:record-kind|document..."),
                _search(
                    "date",
                    "date",
                    "the record's clinical date, prefixes ge gt le lt eq (repeatable)",
                ),
                _search("period", "date", "the same as date"),
                _search("status", "token", "current (the default), superseded, or both"),
                _COUNT,
            ],
        },
        {
            "type": "Binary",
            "interaction": [{"code": "read"}],
            "documentation": "a DocumentReference's attachment URL: the content itself,"
            " streamed with its media type (never a Binary resource)",
        },
        {
            "type": "AuditEvent",
            "interaction": [{"code": "search-type"}],
            "documentation": "the patient's own access history (a patient's gateway only)",
            "searchParam": [
                _PATIENT_PARAM,
                _search("patient", "reference", "Patient/<INS>, instead of patient.identifier"),
                _COUNT,
            ],
        },
    ]
    resources.append(
        {
            "type": "MedicationRequest",
            "interaction": [{"code": "search-type"}],
            "documentation": "the patient's dispensable e-prescriptions of every region"
            " (status=active), one MedicationRequest per line; also in $everything",
            "searchParam": [
                _PATIENT_PARAM,
                _search("patient", "reference", "Patient/<INS>, instead of patient.identifier"),
                _search("subject", "reference", "the same as patient"),
                _search("status", "token", "active (the default and only value)"),
            ],
        }
    )
    structured = ["AllergyIntolerance", "Condition", "Immunization", "Observation"]
    for structured_type in [*structured, "MedicationDispense"]:
        resources.append(
            {
                "type": structured_type,
                "documentation": "returned by Patient/$everything only (no interactions)",
            }
        )
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": now_instant(),
        "publisher": "DMP federation",
        "kind": "instance",
        "software": {"name": "dmp fhir serve"},
        "implementation": {"description": f"FHIR gateway acting as {identity}", "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json"],
        "instantiates": [
            "https://profiles.ihe.net/ITI/MHD/CapabilityStatement/IHE.MHD.DocumentResponder",
            *(
                ["https://profiles.ihe.net/ITI/MHD/CapabilityStatement/IHE.MHD.DocumentRecipient"]
                if writes
                else []
            ),
        ],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    f"POST / takes transaction Bundles (IHE MHD ITI-65): {WRITTEN}; all or"
                    " nothing per Bundle, a retried Bundle stores nothing twice. No create,"
                    " update or delete of single resources."
                    if writes
                    else "read only: started without --node, this gateway writes nothing"
                ),
                **({"interaction": [{"code": "transaction"}]} if writes else {}),
                "security": {
                    "description": "served on loopback (a Host that is not loopback is"
                    " refused), or with --tls over HTTPS requiring a client certificate from"
                    " the federation CA for the gateway's own identity; every call to the"
                    " federation carries an access assertion signed with the gateway"
                    " identity's key"
                },
                "resource": resources,
            }
        ],
    }
