"""The FHIR mapping and search parameters, without servers: identifiers, ids, dates."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from starlette.datastructures import QueryParams

from dmp.fhir import params
from dmp.fhir.errors import GRPC_TO_HTTP, FhirError
from dmp.fhir.mapping import binary_id, document_reference, fhir_id, parse_binary_id, patient
from dmp.fhir.systems import INS_SYSTEM, RPPS_SYSTEM, URI_SYSTEM, identifier_for
from dmp.ins import make_ins
from dmp.v1 import patient_pb2, record_pb2

INS = make_ins("1850275123456")


def test_federation_identities_become_fr_core_identifiers() -> None:
    assert identifier_for("urn:dmp:practitioner:10000000001") == {
        "system": RPPS_SYSTEM,
        "value": "10000000001",
    }
    assert identifier_for(f"urn:dmp:patient:{INS}") == {"system": INS_SYSTEM, "value": INS}
    for service in ("urn:dmp:node:11", "urn:dmp:directory", "https://elsewhere.example/x"):
        assert identifier_for(service) == {"system": URI_SYSTEM, "value": service}


def test_record_ids_become_fhir_ids_and_binary_ids_locate_their_content() -> None:
    assert fhir_id("b808c6b0-1403-47f6-beb9-0f8877ae5697") == "b808c6b0-1403-47f6-beb9-0f8877ae5697"
    odd = fhir_id("with_underscore")
    assert odd != "with_underscore" and odd == fhir_id("with_underscore")
    assert len(fhir_id("x" * 64 + "_")) <= 64
    record = record_pb2.Record(id="rec-1", region="53", patient_ins=INS)
    assert binary_id(record) == f"53.{INS}.rec-1"
    assert parse_binary_id(binary_id(record)) == ("53", INS, "rec-1")
    assert parse_binary_id("rec-1") is None
    long = record_pb2.Record(id="y" * 60, region="53", patient_ins=INS)
    assert binary_id(long) == "y" * 60  # too long to locate: the listing gateway remembers it


def test_a_patient_is_an_fr_core_patient() -> None:
    resource = patient(
        patient_pb2.PatientIdentity(
            ins=INS,
            birth_family_name="DUPONT",
            given_names=["JEAN", "PAUL"],
            birth_date="1985-02-14",
            sex=patient_pb2.SEX_UNDETERMINED,
            birthplace_code="2A004",
        )
    )
    assert resource["identifier"][0]["system"] == INS_SYSTEM
    assert resource["name"] == [{"use": "official", "family": "DUPONT", "given": ["JEAN", "PAUL"]}]
    assert resource["gender"] == "unknown"
    code = resource["extension"][0]["valueAddress"]["extension"][0]["valueCoding"]["code"]
    assert code == "2A004"


def test_a_superseding_masked_record_says_so() -> None:
    record = record_pb2.Record(
        id="v2",
        patient_ins=INS,
        region="11",
        supersedes="v1",
        masked=True,
        confidentiality=record_pb2.CONFIDENTIALITY_VERY_RESTRICTED,
        status=record_pb2.RECORD_STATUS_SUPERSEDED,
        content_type="application/pdf",
        size=3,
        sha256="ab" * 32,
    )
    resource = document_reference(record, "http://gw/Binary/x")
    assert resource["status"] == "superseded"
    assert resource["relatesTo"] == [
        {"code": "replaces", "target": {"reference": "DocumentReference/v1"}}
    ]
    codes = [label["coding"][0]["code"] for label in resource["securityLabel"]]
    assert codes == ["V", "MASKED"]


def test_dates_become_the_views_since_and_until() -> None:
    def dates(query: str) -> tuple[datetime | None, datetime | None]:
        found = params.date_range(QueryParams(query), "date")
        return found.since, found.until

    day = datetime(2024, 3, 1, tzinfo=UTC)
    assert dates("date=ge2024-03-01") == (day, None)
    assert dates("date=lt2024-03-01") == (None, day)
    assert dates("date=2024-03") == (day, datetime(2024, 4, 1, tzinfo=UTC))
    assert dates("date=le2024-12") == (None, datetime(2025, 1, 1, tzinfo=UTC))
    assert dates("date=gt2024") == (datetime(2025, 1, 1, tzinfo=UTC), None)
    assert dates("date=ge2024-01-01&date=ge2024-03-01") == (day, None)  # both hold
    with pytest.raises(FhirError) as refused:
        dates("date=ge03/01/2024")
    assert refused.value.status == 400 and refused.value.expression == "date"


def test_search_parameters_are_checked_and_named() -> None:
    query = QueryParams(f"patient.identifier={INS_SYSTEM}|{INS}&_count=7&type=11488-4,18842-5")
    assert params.patient_ins(query, "patient.identifier") == INS
    assert params.count(query) == 7
    assert params.type_codes(query) == ["11488-4", "18842-5"]
    assert params.patient_ins(QueryParams(f"patient=Patient/{INS}"), "patient") == INS
    for bad, named in (
        ("_count=201", "_count"),
        ("patient.identifier=x|1", "patient.identifier"),
        ("category=secret", "category"),
        ("status=draft", "status"),
    ):
        with pytest.raises(FhirError) as refused:
            query = QueryParams(bad)
            params.count(query)
            params.patient_ins(query, "patient.identifier", required=False)
            params.kinds(query)
            params.statuses(query)
        assert refused.value.expression == named


def test_every_grpc_status_but_ok_has_an_http_status() -> None:
    import grpc

    missing = {c for c in grpc.StatusCode if c is not grpc.StatusCode.OK} - set(GRPC_TO_HTTP)
    assert missing == set()
    assert GRPC_TO_HTTP[grpc.StatusCode.PERMISSION_DENIED].status == 403
    assert GRPC_TO_HTTP[grpc.StatusCode.UNAUTHENTICATED].status == 401
    assert GRPC_TO_HTTP[grpc.StatusCode.UNAVAILABLE].status == 503
