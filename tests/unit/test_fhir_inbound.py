"""FHIR to records, without servers: what a transaction Bundle becomes, the ids a retry
finds again, and each refusal naming its element (dmp/fhir/inbound.py, transaction.py)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from dmp.fhir.errors import FhirError
from dmp.fhir.inbound import canonical, fhir_time, record_id
from dmp.fhir.transaction import parse
from dmp.v1 import record_pb2
from tests.integration.fhir_bundles import INS_SYSTEM, PDF, ins_number, submission

K = record_pb2
LIMIT = 20 * 1024 * 1024


def test_each_entry_becomes_its_kind_of_record() -> None:
    ins = ins_number(1)
    parsed = parse(submission(ins, "unit"), max_content=LIMIT)
    assert parsed.patient_ins == ins
    kinds = {p.resource_type: p.request.record for p in parsed.puts}
    assert {t: r.kind for t, r in kinds.items()} == {
        "DocumentReference": K.RECORD_KIND_DOCUMENT,
        "AllergyIntolerance": K.RECORD_KIND_ALLERGY,
        "Condition": K.RECORD_KIND_CONDITION,
        "Immunization": K.RECORD_KIND_IMMUNIZATION,
        "Observation": K.RECORD_KIND_OBSERVATION,
        "MedicationRequest": K.RECORD_KIND_PRESCRIPTION,
    }
    document = next(p.request for p in parsed.puts if p.resource_type == "DocumentReference")
    assert document.content == PDF and document.record.content_type == "application/pdf"
    assert document.record.confidentiality == K.CONFIDENTIALITY_RESTRICTED
    assert document.record.type_code.code == "11488-4"
    assert kinds["Observation"].type_code.code == "4548-4"  # its own LOINC code
    assert kinds["Condition"].type_code.code == "11450-4"  # the section (SNOMED code inside)
    assert kinds["Condition"].effective_time.ToJsonString() == "2019-05-01T00:00:00Z"
    assert all(p.request.patient.ins == ins for p in parsed.puts)
    assert sorted(parsed.skipped) == [0, 1, 3]  # the List, the Patient, the Binary


def test_a_structured_record_is_the_resource_as_sent() -> None:
    bundle = submission(ins_number(2), "unit")
    parsed = parse(bundle, max_content=LIMIT)
    sent = next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Condition"
    )
    stored = next(p.request for p in parsed.puts if p.resource_type == "Condition")
    assert stored.content == canonical(sent)


def test_record_ids_come_from_the_patient_and_the_full_url() -> None:
    ins = ins_number(3)
    first = [p.request.record.id for p in parse(submission(ins, "same"), max_content=LIMIT).puts]
    again = [p.request.record.id for p in parse(submission(ins, "same"), max_content=LIMIT).puts]
    other = [p.request.record.id for p in parse(submission(ins, "other"), max_content=LIMIT).puts]
    assert first == again and not set(first) & set(other)
    assert record_id(ins, "urn:uuid:x") != record_id(ins_number(4), "urn:uuid:x")
    assert all(i.startswith("fhir-") and len(i) == 45 for i in first)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024", "2024-01-01T00:00:00+00:00"),
        ("2024-03", "2024-03-01T00:00:00+00:00"),
        ("2024-03-05", "2024-03-05T00:00:00+00:00"),
        ("2024-03-05T10:20:30+02:00", "2024-03-05T08:20:30+00:00"),
        ("2024-03-05T10:20:30.5Z", "2024-03-05T10:20:30.500000+00:00"),
    ],
)
def test_fhir_dates_are_utc_instants(value: str, expected: str) -> None:
    assert fhir_time(value, "x").isoformat() == expected


def _refusal(bundle: dict[str, Any]) -> FhirError:
    with pytest.raises(FhirError) as caught:
        parse(bundle, max_content=LIMIT)
    return caught.value


def test_refusals_name_the_element() -> None:
    bundle = submission(ins_number(5), "unit")
    no_method = copy.deepcopy(bundle)
    del no_method["entry"][4]["request"]
    assert _refusal(no_method).expression == "Bundle.entry[4].request.method"
    no_subject = copy.deepcopy(bundle)
    del no_subject["entry"][5]["resource"]["subject"]
    assert _refusal(no_subject).expression == "Bundle.entry[5].resource.subject"
    bad_ins = copy.deepcopy(bundle)
    bad_ins["entry"][1]["resource"]["identifier"] = [{"system": INS_SYSTEM, "value": "123"}]
    assert _refusal(bad_ins).expression == "Bundle.entry[1].resource.identifier.value"
    no_url = copy.deepcopy(bundle)
    del no_url["entry"][6]["fullUrl"]
    assert _refusal(no_url).expression == "Bundle.entry[6].fullUrl"
    dangling = copy.deepcopy(bundle)
    dangling["entry"][2]["resource"]["content"][0]["attachment"]["url"] = "urn:uuid:nowhere"
    assert _refusal(dangling).expression == "Bundle.entry[2].resource.content[0].attachment.url"
    big = _refusal(submission(ins_number(6), "big", content=b"x" * (LIMIT + 1)))
    assert big.status == 413


def test_a_patient_note_beside_professional_records_is_refused() -> None:
    bundle = submission(ins_number(7), "unit")
    bundle["entry"][2]["resource"]["category"] = [
        {"coding": [{"system": "urn:dmp:record-kind", "code": "patient-note"}]}
    ]
    assert _refusal(bundle).expression == "Bundle.entry[2].resource.category"
