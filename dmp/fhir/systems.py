"""Identifier and code systems: one name for each, used by every FHIR view we give.

FR Core (the French FHIR core profiles) fixes the patient's INS-NIR system and the
professional's RPPS system; federation identities that are neither (nodes, the directory)
are URIs.
"""

from __future__ import annotations

from typing import Any, Final

from dmp.identity import URN_PREFIX, Role

FHIR_VERSION: Final = "4.0.1"

#: FR Core: the INS-NIR, the patient's national health identifier.
INS_SYSTEM: Final = "urn:oid:1.2.250.1.213.1.4.8"
#: FR Core: the RPPS number of a health professional.
RPPS_SYSTEM: Final = "https://rpps.esante.gouv.fr"
#: Any URI (federation identities of services: urn:dmp:node:11, urn:dmp:directory).
URI_SYSTEM: Final = "urn:ietf:rfc:3986"
#: Our record ids (DocumentReference.identifier, AuditEvent.entity).
RECORD_ID_SYSTEM: Final = "urn:dmp:record-id"
#: Our professions (doctor, pharmacist...), as a role or qualification code.
PROFESSION_SYSTEM: Final = "urn:dmp:profession"
#: Our record kinds (document, prescription...), as DocumentReference.category.
RECORD_KIND_SYSTEM: Final = "urn:dmp:record-kind"
LOINC_SYSTEM: Final = "http://loinc.org"
#: Regions by INSEE code (which regions did not answer a view).
REGION_SYSTEM: Final = "urn:dmp:region"

FR_CORE_PATIENT_INS: Final = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-patient-ins"
FR_CORE_IDENTIFIER_TYPE: Final = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203"
FR_CORE_INSEE_CODE: Final = (
    "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-address-insee-code"
)
BIRTH_PLACE: Final = "http://hl7.org/fhir/StructureDefinition/patient-birthPlace"

#: R4's Attachment.hash is SHA-1: the content's SHA-256 (lower-case hex) goes here.
SHA256_EXTENSION: Final = "urn:dmp:fhir:attachment-sha256"

CONFIDENTIALITY_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
#: The security label of a record the patient masked from professionals.
OBSERVATION_VALUE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"


def ins_identifier(ins: str) -> dict[str, Any]:
    """The patient's INS-NIR as an FR Core identifier."""
    return {"system": INS_SYSTEM, "value": ins}


def rpps_identifier(rpps: str) -> dict[str, Any]:
    return {"system": RPPS_SYSTEM, "value": rpps}


def identifier_for(uri: str) -> dict[str, Any]:
    """A federation identity as a FHIR Identifier: a professional's RPPS, a patient's
    INS-NIR, any other identity (a node, the directory, a URI we do not know) as a URI."""
    role, _, key = uri.removeprefix(URN_PREFIX).partition(":")
    if uri.startswith(URN_PREFIX) and key:
        if role == Role.PRACTITIONER:
            return rpps_identifier(key)
        if role == Role.PATIENT:
            return ins_identifier(key)
    return {"system": URI_SYSTEM, "value": uri}


def resource_type_for(uri: str) -> str:
    """Which FHIR resource a federation identity is: Practitioner, Patient or Device."""
    if uri.startswith(f"{URN_PREFIX}{Role.PRACTITIONER}:"):
        return "Practitioner"
    if uri.startswith(f"{URN_PREFIX}{Role.PATIENT}:"):
        return "Patient"
    return "Device"
