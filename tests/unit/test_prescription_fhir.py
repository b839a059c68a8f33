"""The FHIR R4 content of prescription and dispensation records, and the record row hash
that covers their link to the prescription."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from dmp.clock import from_us
from dmp.identity import Principal, Role
from dmp.ins import make_ins
from dmp.prescription_fhir import INS_SYSTEM, RPPS_SYSTEM, medication_dispenses, medication_requests
from dmp.prescriptions import CIP13_SYSTEM, build_prescription, new_prescription_id, parse_line
from dmp.v1 import prescription_pb2 as P
from dmp.v1 import record_pb2
from node.integrity import HASHED_COLUMNS, hash_values

INS = make_ins("1850275123456")
DOCTOR = Principal(Role.PRACTITIONER, "10000000001", "Dr Claire MARTIN", "doctor")
NOW = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)


def prescription() -> P.Prescription:
    return build_prescription(
        prescription_id=new_prescription_id("11"),
        patient_ins=INS,
        prescriber=DOCTOR,
        organization="Cabinet",
        lines=[parse_line("3400930000001|2|1 comprimé|3 fois par jour|7 jours"),
               parse_line("3400930000002|1")],
        renewals=2,
        min_interval_days=28,
        now=NOW,
    )  # fmt: skip


def test_a_prescription_is_a_bundle_of_medication_requests() -> None:
    act = prescription()
    bundle = json.loads(medication_requests(act))
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    requests = [entry["resource"] for entry in bundle["entry"]]
    assert [r["resourceType"] for r in requests] == ["MedicationRequest"] * 2
    first = requests[0]
    assert first["groupIdentifier"]["value"] == act.id
    assert first["subject"]["identifier"] == {"system": INS_SYSTEM, "value": INS}
    assert first["requester"]["identifier"] == {"system": RPPS_SYSTEM, "value": DOCTOR.key}
    assert first["medicationCodeableConcept"]["coding"][0] == {
        "system": CIP13_SYSTEM,
        "code": "3400930000001",
    }
    assert first["dispenseRequest"]["numberOfRepeatsAllowed"] == 2
    assert first["dispenseRequest"]["quantity"] == {"value": 2, "unit": "boîte"}
    assert first["dispenseRequest"]["dispenseInterval"]["value"] == 28
    assert first["dosageInstruction"][0]["text"] == "1 comprimé ; 3 fois par jour ; 7 jours"
    assert "dosageInstruction" not in requests[1]


def test_a_dispensing_is_a_bundle_of_medication_dispenses() -> None:
    act = prescription()
    substitute = P.Medication(code=record_pb2.Coding(system=CIP13_SYSTEM, code="3400939999999"))
    dispensation = P.Dispensation(
        id="d-1",
        prescription_id=act.id,
        dispensing=1,
        lines=[
            P.DispensedLine(line=0, quantity=2, substitute=substitute),
            P.DispensedLine(line=1, quantity=0, not_delivered_reason="rupture de stock"),
        ],
        pharmacist_rpps="10000000003",
        pharmacist_name="Julie PETIT",
        pharmacy="Pharmacie du Marché",
        time=from_us(int(NOW.timestamp() * 1_000_000)),
        idempotency_key="ticket-0001",
    )
    given, declined = (
        e["resource"] for e in json.loads(medication_dispenses(act, dispensation))["entry"]
    )
    assert given["status"] == "completed" and given["substitution"] == {"wasSubstituted": True}
    assert given["medicationCodeableConcept"]["coding"][0]["code"] == "3400939999999"
    assert given["authorizingPrescription"][0]["identifier"]["value"] == act.id
    assert given["whenHandedOver"] == "2026-11-30T10:00:00.000000Z"
    assert given["location"] == {"display": "Pharmacie du Marché"}
    assert declined["status"] == "declined"
    assert declined["statusReasonCodeableConcept"] == {"text": "rupture de stock"}


def test_a_record_without_a_prescription_hashes_as_before_with_one_covered() -> None:
    values = {name: f"v-{name}" for name in HASHED_COLUMNS}
    values["hidden_from_patient"] = False  # type: ignore[assignment]
    before = hash_values(values)  # as rows written before prescriptions existed
    assert hash_values({**values, "prescription_id": None}) == before
    linked = hash_values({**values, "prescription_id": "RX-11-7Q2M0J9XG4ZB8C1DKT5E"})
    assert linked != before
    assert linked != hash_values({**values, "prescription_id": "RX-11-7Q2M0J9XG4ZB8C1DKT5F"})
