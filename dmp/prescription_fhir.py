"""Prescriptions and dispensings as FHIR R4 (4.0.1): the content of the `prescription` and
`dispensation` records a node writes, so that hospital software reads them as FHIR.

A prescription is a Bundle (type collection) of one MedicationRequest per line, grouped by
the prescription id (groupIdentifier); a dispensing a Bundle of one MedicationDispense per
line. Identifiers after FR Core: INS-NIR and RPPS.
"""

from __future__ import annotations

import json
from typing import Any

from dmp.audit.events import iso_instant
from dmp.clock import to_us
from dmp.fhir.systems import INS_SYSTEM as INS_SYSTEM  # one place for FR Core systems
from dmp.fhir.systems import RPPS_SYSTEM as RPPS_SYSTEM
from dmp.v1 import prescription_pb2, record_pb2

PRESCRIPTION_ID_SYSTEM = "urn:dmp:prescription"
DISPENSATION_ID_SYSTEM = "urn:dmp:dispensation"
CONTENT_TYPE = "application/fhir+json"


def _coding(code: record_pb2.Coding) -> dict[str, Any]:
    out: dict[str, Any] = {"system": code.system, "code": code.code}
    if code.display:
        out["display"] = code.display
    return out


def _patient(ins: str) -> dict[str, Any]:
    return {"identifier": {"system": INS_SYSTEM, "value": ins}}


def _practitioner(rpps: str, name: str) -> dict[str, Any]:
    return {"identifier": {"system": RPPS_SYSTEM, "value": rpps}, "display": name}


def _json(resource: dict[str, Any]) -> bytes:
    return json.dumps(resource, ensure_ascii=False, sort_keys=True, indent=1).encode("utf-8")


def medication_requests(prescription: prescription_pb2.Prescription) -> bytes:
    """The prescription as a Bundle of MedicationRequest, one per line."""
    group = {"system": PRESCRIPTION_ID_SYSTEM, "value": prescription.id}
    validity: dict[str, Any] = {"start": iso_instant(to_us(prescription.authored_time))}
    if prescription.HasField("treatment_end"):
        validity["end"] = iso_instant(to_us(prescription.treatment_end))
    entries = []
    for index, line in enumerate(prescription.lines):
        dosage = " ; ".join(
            part
            for part in (line.dose, line.route, line.frequency, line.duration, line.instructions)
            if part
        )
        request: dict[str, Any] = {
            "resourceType": "MedicationRequest",
            "id": f"{prescription.id}-{index}",
            "status": "active",
            "intent": "order",
            "groupIdentifier": group,
            "medicationCodeableConcept": {"coding": [_coding(line.medication.code)]},
            "subject": _patient(prescription.patient_ins),
            "authoredOn": iso_instant(to_us(prescription.authored_time)),
            "requester": _practitioner(prescription.prescriber.rpps, prescription.prescriber.name),
            "substitution": {"allowedBoolean": line.substitution_allowed},
            "dispenseRequest": {
                "validityPeriod": validity,
                "numberOfRepeatsAllowed": prescription.renewals,
                "quantity": {"value": line.quantity, "unit": line.unit},
            },
        }
        if prescription.min_interval_days:
            request["dispenseRequest"]["dispenseInterval"] = {
                "value": prescription.min_interval_days,
                "unit": "days",
                "system": "http://unitsofmeasure.org",
                "code": "d",
            }
        if dosage:
            request["dosageInstruction"] = [{"text": dosage}]
        entries.append({"resource": request})
    return _json({"resourceType": "Bundle", "type": "collection", "entry": entries})


def medication_dispenses(
    prescription: prescription_pb2.Prescription, dispensation: prescription_pb2.Dispensation
) -> bytes:
    """One dispensing as a Bundle of MedicationDispense, one per line of it."""
    entries = []
    for given in dispensation.lines:
        line = prescription.lines[given.line]
        product = given.substitute.code if given.HasField("substitute") else line.medication.code
        dispense: dict[str, Any] = {
            "resourceType": "MedicationDispense",
            "id": f"{dispensation.id}-{given.line}",
            "identifier": [{"system": DISPENSATION_ID_SYSTEM, "value": dispensation.id}],
            "status": "completed" if given.quantity > 0 else "declined",
            "medicationCodeableConcept": {"coding": [_coding(product)]},
            "subject": _patient(prescription.patient_ins),
            "performer": [
                {"actor": _practitioner(dispensation.pharmacist_rpps, dispensation.pharmacist_name)}
            ],
            "authorizingPrescription": [
                {"identifier": {"system": PRESCRIPTION_ID_SYSTEM, "value": prescription.id}}
            ],
            "quantity": {"value": given.quantity, "unit": line.unit},
            "whenHandedOver": iso_instant(to_us(dispensation.time)),
            "substitution": {"wasSubstituted": given.HasField("substitute")},
        }
        if dispensation.pharmacy:
            dispense["location"] = {"display": dispensation.pharmacy}
        if given.not_delivered_reason:
            dispense["statusReasonCodeableConcept"] = {"text": given.not_delivered_reason}
        entries.append({"resource": dispense})
    return _json({"resourceType": "Bundle", "type": "collection", "entry": entries})
