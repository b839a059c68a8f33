"""Issue 12, the read half: `dmp fhir serve` driven by a third-party FHIR client.

A real federation (directory and three nodes over mutual TLS, SQLite), the gateway as its
own process on a real port, and fhirclient doing what hospital software does: read the
CapabilityStatement, find the patient, search the DocumentReferences and page through
`next`, read each content at its attachment URL, ask for $everything. Every resource and
Bundle is validated with fhirclient's R4 models (tests/integration/fhir_federation.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from fhirclient import client as fhir_client
from fhirclient.models.bundle import Bundle
from fhirclient.models.documentreference import DocumentReference
from fhirclient.models.patient import Patient

from dmp.client import NodeClient
from dmp.pki import load_credentials
from tests.federation import DOCTOR, OTHER_PATIENT, PATIENT, draft, identity_of, wait_for
from tests.integration.fhir_federation import (
    DOC,
    INS_SYSTEM,
    RECORDS,
    RPPS_SYSTEM,
    FhirFed,
    Gateway,
    mask,
    running_fhir_federation,
    sha256,
    validate,
)

SHA256_EXTENSION = "urn:dmp:fhir:attachment-sha256"


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirFed]:
    root = tmp_path_factory.mktemp("fhir-gateway")
    with running_fhir_federation(root, lambda name: f"sqlite:///{root / f'{name}.db'}") as fed:
        yield fed


@pytest.fixture(scope="module")
def gateway(fed: FhirFed) -> Gateway:
    return fed.gateway(DOC)


@pytest.fixture(scope="module")
def smart(gateway: Gateway) -> fhir_client.FHIRClient:
    """The hospital's FHIR client, pointed at the gateway."""
    return fhir_client.FHIRClient(
        settings={"app_id": "hospital-software", "api_base": gateway.base}
    )


def get(gateway: Gateway, path: str, **params: Any) -> requests.Response:
    return requests.get(f"{gateway.base}/{path}", params=params, timeout=30)


def test_the_capability_statement_lists_what_is_supported(smart: fhir_client.FHIRClient) -> None:
    statement = smart.server.capabilityStatement  # fhirclient reads /metadata itself
    assert statement.fhirVersion == "4.0.1"
    rest = statement.rest[0]
    kinds = {r.type: r for r in rest.resource}
    assert set(kinds) == {
        "Patient", "DocumentReference", "Binary", "AuditEvent",
        "AllergyIntolerance", "Condition", "Immunization", "Observation",
        "MedicationRequest", "MedicationDispense",
    }  # fmt: skip
    assert [i.code for i in kinds["DocumentReference"].interaction] == ["search-type"]
    params = {p.name for p in kinds["DocumentReference"].searchParam}
    assert {"patient.identifier", "type", "date", "status", "_count"} <= params
    assert [o.name for o in kinds["Patient"].operation] == ["everything"]
    assert kinds["Condition"].interaction is None  # reachable through $everything only


def test_the_patient_is_found_by_ins_as_fr_core(
    smart: fhir_client.FHIRClient, gateway: Gateway
) -> None:
    search = Patient.where(struct={"identifier": f"{INS_SYSTEM}|{PATIENT}"})
    bundles = list(search.perform_iter(smart.server))
    assert len(bundles) == 1 and bundles[0].type == "searchset"
    [entry] = bundles[0].entry
    found = entry.resource
    assert isinstance(found, Patient)
    assert found.id == PATIENT
    [identifier] = found.identifier
    assert (identifier.system, identifier.value) == (INS_SYSTEM, PATIENT)
    assert identifier.type.coding[0].code == "INS-NIR"
    assert found.name[0].family == "DUPONT" and found.name[0].given == ["JEAN"]
    assert found.name[0].use == "official"
    assert found.birthDate.isostring == "1985-02-14" and found.gender == "male"
    birthplace = found.extension[0]
    assert birthplace.url == "http://hl7.org/fhir/StructureDefinition/patient-birthPlace"
    assert birthplace.valueAddress.extension[0].valueCoding.code == "75112"
    read = get(gateway, f"Patient/{PATIENT}")
    assert read.status_code == 200 and read.headers["content-type"].startswith(
        "application/fhir+json"
    )
    assert validate(read.json()).id == PATIENT


def test_a_patient_the_directory_does_not_know_is_an_empty_search(gateway: Gateway) -> None:
    from dmp.ins import make_ins

    nobody = make_ins("1990175999991")
    answer = get(gateway, "Patient", identifier=f"{INS_SYSTEM}|{nobody}")
    assert answer.status_code == 200
    bundle = answer.json()
    validate(bundle)
    assert bundle["total"] == 0 and "entry" not in bundle
    read = get(gateway, f"Patient/{nobody}")
    assert read.status_code == 404
    assert validate(read.json()).issue[0].code == "not-found"


def test_documents_are_searched_and_paged_through_next(
    smart: fhir_client.FHIRClient, fed: FhirFed
) -> None:
    search = DocumentReference.where(
        struct={"patient.identifier": f"{INS_SYSTEM}|{PATIENT}", "_count": "3"}
    )
    pages = list(search.perform_iter(smart.server))
    assert len(pages) == 3  # 8 records, 3 a page, following the next links
    assert all(page.type == "searchset" for page in pages)
    assert all(any(link.relation == "next" for link in page.link) for page in pages[:-1])
    assert not any(link.relation == "next" for link in pages[-1].link)
    documents = [e.resource for page in pages for e in page.entry]
    assert all(e.search.mode == "match" for page in pages for e in page.entry)
    assert {d.identifier[0].value for d in documents} == set(fed.written)
    dates = [d.context.period.start.datetime for d in documents]
    assert dates == sorted(dates, reverse=True)  # newest first, across regions and pages
    for document in documents:
        region, record, content = fed.written[document.identifier[0].value]
        assert document.status == "current"
        assert document.type.coding[0].system == "http://loinc.org"
        assert document.type.coding[0].code == record.type_code.code
        assert document.subject.identifier.system == INS_SYSTEM
        assert document.subject.identifier.value == PATIENT
        author = document.author[0]
        assert author.type == "Practitioner" and author.identifier.system == RPPS_SYSTEM
        assert author.identifier.value == DOCTOR
        contained = document.contained[0]
        assert contained.resource_type == "Practitioner"
        assert contained.identifier[0].value == DOCTOR
        attachment = document.content[0].attachment
        assert attachment.contentType == record.content_type
        assert attachment.size == len(content)
        [extension] = attachment.extension
        assert extension.url == SHA256_EXTENSION and extension.valueString == sha256(content)
        assert document.meta.source == f"urn:dmp:node:{region}"
        labels = {c.code for label in document.securityLabel for c in label.coding}
        expected = {K_CONF[record.confidentiality]}
        assert labels == expected


K_CONF = {1: "N", 2: "R", 3: "V"}


def test_every_content_is_read_byte_identical_at_its_attachment_url(
    smart: fhir_client.FHIRClient, fed: FhirFed
) -> None:
    search = DocumentReference.where(struct={"patient.identifier": f"{INS_SYSTEM}|{PATIENT}"})
    documents = list(search.perform_resources_iter(smart.server))
    assert len(documents) == len(RECORDS)
    for document in documents:
        _, record, content = fed.written[document.identifier[0].value]
        attachment = document.content[0].attachment
        answer = smart.server.session.get(attachment.url, timeout=30)
        assert answer.status_code == 200
        assert answer.content == content
        assert answer.headers["content-type"].split(";")[0] == record.content_type
        assert sha256(answer.content) == attachment.extension[0].valueString
        digest = base64.b64encode(hashlib.sha256(content).digest()).decode()
        assert answer.headers["repr-digest"] == f"sha-256=:{digest}:"
    largest = max(fed.written.values(), key=lambda w: len(w[2]))
    assert len(largest[2]) > 300_000  # streamed in several chunks from the node


def test_a_large_content_streams_through_byte_identical(
    smart: fhir_client.FHIRClient, fed: FhirFed
) -> None:
    """6 MiB: beyond gRPC's default 4 MiB message, relayed in chunks, streamed over HTTP."""
    content = os.urandom(6 * 1024 * 1024)
    record = draft(OTHER_PATIENT, title="Imagerie : scanner thoracique")
    record.content_type = "application/dicom"
    creds = load_credentials(fed.pki_dir, DOC)
    with NodeClient(f"127.0.0.1:{fed.nodes['11'].port}", creds) as node:
        node.put_record(record, content, patient=identity_of(OTHER_PATIENT, "LEROY", ("MARIE",)))
    search = DocumentReference.where(struct={"patient.identifier": f"{INS_SYSTEM}|{OTHER_PATIENT}"})

    def listed() -> list[Any]:
        return list(search.perform_resources_iter(smart.server))

    wait_for(lambda: len(listed()) == 1, "the large record in the view")
    [document] = listed()
    attachment = document.content[0].attachment
    assert attachment.size == len(content) and attachment.contentType == "application/dicom"
    with smart.server.session.get(attachment.url, stream=True, timeout=60) as answer:
        assert answer.status_code == 200
        received = b"".join(answer.iter_content(chunk_size=256 * 1024))
    assert received == content


def test_an_attachment_url_is_read_by_a_gateway_that_never_listed_it(
    gateway: Gateway, fed: FhirFed
) -> None:
    """The URL says where the content lives: kept by hospital software, it stays readable
    after the gateway restarts, or from another gateway of the same professional."""
    bundle = get(gateway, "DocumentReference", **{"patient.identifier": PATIENT}).json()
    urls = {
        e["resource"]["identifier"][0]["value"]: e["resource"]["content"][0]["attachment"]["url"]
        for e in bundle["entry"]
    }
    fresh = fed.gateway(DOC)
    for record_id, url in urls.items():
        region, _, content = fed.written[record_id]
        path = url.removeprefix(gateway.base + "/")
        assert path == f"Binary/{region}.{PATIENT}.{record_id}"
        answer = get(fresh, path)
        assert answer.status_code == 200 and answer.content == content
    fresh.stop()


def test_filters_by_type_date_and_status(gateway: Gateway, fed: FhirFed) -> None:
    patient = f"{INS_SYSTEM}|{PATIENT}"
    by_type = get(
        gateway,
        "DocumentReference",
        **{"patient.identifier": patient, "type": "http://loinc.org|11488-4"},
    )
    bundle = by_type.json()
    validate(bundle)
    titles = sorted(e["resource"]["description"] for e in bundle["entry"])
    assert titles == ["Compte rendu de consultation", "Consultation de suivi"]
    since = get(
        gateway, "DocumentReference",
        **{"patient.identifier": patient, "date": "ge" + _days_ago(15), "status": "current"},
    ).json()  # fmt: skip
    validate(since)
    assert {e["resource"]["description"] for e in since["entry"]} == {
        "Compte rendu de consultation", "Constantes vitales", "Ordonnance",
    }  # fmt: skip
    window = get(
        gateway, "DocumentReference",
        **{"patient.identifier": patient, "date": ["ge" + _days_ago(45), "lt" + _days_ago(25)]},
    ).json()  # fmt: skip
    assert {e["resource"]["description"] for e in window["entry"]} == {
        "Lettre de sortie", "Vaccination : grippe",
    }  # fmt: skip


def _days_ago(days: int) -> str:
    from datetime import UTC, datetime, timedelta

    return (datetime.now(UTC) - timedelta(days=days)).strftime("%Y-%m-%d")


def test_everything_gives_each_record_as_its_natural_resource(
    smart: fhir_client.FHIRClient, gateway: Gateway, fed: FhirFed
) -> None:
    answer = get(gateway, f"Patient/{PATIENT}/$everything")
    assert answer.status_code == 200
    bundle = answer.json()
    model = validate(bundle)
    assert isinstance(model, Bundle) and model.type == "searchset"
    kinds = sorted(e["resource"]["resourceType"] for e in bundle["entry"])
    assert kinds == sorted(
        [
            "Patient", "DocumentReference", "DocumentReference", "DocumentReference",
            "AllergyIntolerance", "Immunization", "Observation", "Condition",
            "MedicationRequest",  # the prescription (a PDF: described from its metadata)
        ]
    )  # fmt: skip
    by_type = {e["resource"]["resourceType"]: e["resource"] for e in bundle["entry"]}
    allergy = by_type["AllergyIntolerance"]
    assert allergy["patient"]["identifier"] == {"system": INS_SYSTEM, "value": PATIENT}
    assert allergy["code"]["coding"][0]["code"] == "48765-2"
    assert allergy["recorder"]["identifier"] == {"system": RPPS_SYSTEM, "value": DOCTOR}
    assert by_type["Immunization"]["status"] == "completed"
    assert by_type["Observation"]["status"] == "final"
    assert by_type["Condition"]["subject"]["identifier"]["value"] == PATIENT
    own = requests.get(
        f"{fed.gateway(f'patient-{PATIENT}').base}/Patient/{PATIENT}/$everything", timeout=30
    )
    assert own.status_code == 200
    validate(own.json())
    assert len(own.json()["entry"]) >= len(RECORDS)  # the patient sees their own record
    paged = list(
        fhir_client.FHIRClient(settings={"app_id": "h", "api_base": gateway.base})
        .server.request_json(f"Patient/{PATIENT}/$everything?_count=4")
        .get("link", [])
    )
    assert any(link["relation"] == "next" for link in paged)


def test_a_masked_record_carries_its_security_label(gateway: Gateway, fed: FhirFed) -> None:
    _, record, _ = fed.by_title("Consultation de suivi")
    mask(fed, record.id)
    bundle = get(
        gateway, "DocumentReference", **{"patient.identifier": f"{INS_SYSTEM}|{PATIENT}"}
    ).json()
    validate(bundle)
    labels = {
        e["resource"]["identifier"][0]["value"]: {
            c["code"] for label in e["resource"]["securityLabel"] for c in label["coding"]
        }
        for e in bundle["entry"]
    }
    assert labels[record.id] == {"N", "MASKED"}  # its author still sees it, labelled
    restricted = fed.by_title("Lettre de sortie")[1]
    assert labels[restricted.id] == {"R"}


def test_the_patient_reads_their_access_history_as_audit_events(fed: FhirFed) -> None:
    own = fed.gateway(f"patient-{PATIENT}")
    answer = get(own, "AuditEvent", **{"patient.identifier": f"{INS_SYSTEM}|{PATIENT}"})
    assert answer.status_code == 200
    bundle = answer.json()
    validate(bundle)
    events = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "match"]
    assert events
    doctors = [
        e
        for e in events
        if e["agent"][0].get("who", {}).get("identifier", {}).get("system") == RPPS_SYSTEM
    ]
    assert doctors, "the doctor's views through the gateway are in the patient's history"
    assert all(e["agent"][0]["who"]["identifier"]["value"] == DOCTOR for e in doctors)
    # The patient's own gateway reads content too, found through their own view.
    _, record, content = fed.by_title("Lettre de sortie")
    read = requests.get(f"{own.base}/Binary/{record.id}", timeout=30)
    assert read.status_code == 200 and read.content == content


def test_the_gateway_logs_each_request_without_naming_the_patient(fed: FhirFed) -> None:
    extra = fed.gateway(DOC)
    assert get(extra, "metadata").status_code == 200
    assert get(extra, f"Patient/{PATIENT}/$everything").status_code == 200
    assert get(extra, "DocumentReference", **{"patient.identifier": "1"}).status_code == 400
    extra.stop()
    assert extra.process.returncode == 0  # SIGTERM: a clean stop
    assert extra.log_path is not None
    log = extra.log_path.read_text()
    lines = [
        json.loads(line.split(" dmp.fhir ", 1)[1])
        for line in log.splitlines()
        if " dmp.fhir " in line
    ]
    assert [(line["method"], line["resource"], line["status"]) for line in lines] == [
        ("GET", "/metadata", 200),
        ("GET", "/Patient/*/$everything", 200),
        ("GET", "/DocumentReference", 400),
    ]
    assert PATIENT not in log


def test_the_validator_refuses_what_r4_refuses() -> None:
    """The independent check has teeth: an unknown element, a wrong type, a missing
    required element are each refused by fhirclient's R4 models."""
    from fhirclient.models.fhirabstractbase import FHIRValidationError

    good: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "status": "current",
        "content": [{"attachment": {"contentType": "text/plain", "size": 3}}],
    }
    validate(good)
    for broken in (
        {**good, "sha256": "ab"},
        {**good, "content": [{"attachment": {"size": "three"}}]},
        {key: value for key, value in good.items() if key != "content"},
    ):
        with pytest.raises(FHIRValidationError):
            validate(broken)
