"""Issue 12, the write half: transaction Bundles (IHE MHD ITI-65) through the gateway's
`POST /`, `dmp fhir import` and `dmp fhir export`, prescriptions as MedicationRequest.

A real federation (directory and three nodes over mutual TLS, SQLite files and
PostgreSQL), the gateway and the CLI as their own processes, fhirclient posting as
hospital software does, and every Bundle returned or exported validated with fhirclient's
R4 models (tests/integration/fhir_federation.py).
"""

from __future__ import annotations

import base64
import copy
import http.client
import json
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from fhirclient import client as fhir_client
from fhirclient.server import FHIRServer

from dmp.client import NodeClient
from dmp.fhir.inbound import canonical
from dmp.pki import load_credentials
from dmp.v1 import node_service_pb2 as npb
from dmp.v1 import record_pb2
from tests.federation import DOCTOR, PATIENT, PHARMACIST, dmp_process
from tests.integration.fhir_bundles import (
    INS_SYSTEM,
    PDF,
    carebundle_transactions,
    ins_number,
    submission,
)
from tests.integration.fhir_federation import (
    DOC,
    FhirFed,
    Gateway,
    running_fhir_federation,
    validate,
)
from tests.integration.prescription_helpers import Actor, rx_id
from tests.postgres import PostgresCluster

REGION = "11"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def fed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FhirFed]:
    root = tmp_path_factory.mktemp(f"fhir-write-{request.param}")
    made: list[str] = []
    cluster: PostgresCluster | None = None
    if request.param == "postgres":
        cluster = request.getfixturevalue("postgres_cluster")

    def db(name: str) -> str:
        if cluster is None:
            return f"sqlite:///{root / f'{name}.db'}"
        database = f"t_{uuid.uuid4().hex[:12]}_{name}".replace("-", "_")
        made.append(database)
        return str(cluster.create_database(database))

    try:
        with running_fhir_federation(root, db) as fed:
            yield fed
    finally:
        for database in made:
            assert cluster is not None
            cluster.drop_database(database)


def node_address(fed: FhirFed, region: str = REGION) -> str:
    return f"127.0.0.1:{fed.nodes[region].port}"


@pytest.fixture(scope="module")
def gateway(fed: FhirFed) -> Gateway:
    return fed.gateway(DOC, "--node", node_address(fed), "--max-body-mib", "2")


def server(gateway: Gateway) -> FHIRServer:
    smart = fhir_client.FHIRClient(settings={"app_id": "hospital", "api_base": gateway.base})
    return smart.server


def post(gateway: Gateway, body: Any) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(
        f"{gateway.base}/", data=data, headers={"Content-Type": "application/fhir+json"}, timeout=60
    )


def held(fed: FhirFed, ins: str) -> list[record_pb2.Record]:
    """Every record the node holds for the patient, as the doctor sees them."""
    creds = load_credentials(fed.pki_dir, DOC)
    request = npb.ListRecordsRequest(
        patient_ins=ins,
        statuses=[record_pb2.RECORD_STATUS_CURRENT, record_pb2.RECORD_STATUS_SUPERSEDED],
    )
    with NodeClient(node_address(fed), creds) as node:
        return list(node.list_records(request))


def everything(gateway: Gateway, ins: str) -> dict[str, Any]:
    answer = server(gateway).request_json(f"Patient/{ins}/$everything?_count=200")
    validate(answer)
    assert answer["type"] == "searchset"
    return answer


def test_a_transaction_posted_by_a_fhir_client_is_stored_as_natural_records(
    gateway: Gateway, fed: FhirFed
) -> None:
    ins = ins_number(1)
    bundle = submission(ins, "posted")
    # fhirclient's own POST, to the server's base, as hospital software sends ITI-65.
    answer = server(gateway).post_json("", bundle).json()
    validate(answer)
    assert answer["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert len(statuses) == len(bundle["entry"])
    assert statuses.count("201 Created") == 6  # the document and five structured records
    locations = {
        e["response"].get("location", "").split("/")[-2]
        for e in answer["entry"]
        if "location" in e["response"]
    }
    assert locations == {
        "DocumentReference", "AllergyIntolerance", "Condition", "Immunization",
        "Observation", "MedicationRequest",
    }  # fmt: skip
    records = held(fed, ins)
    assert sorted(record_pb2.RecordKind.Name(r.kind) for r in records) == sorted(
        [
            "RECORD_KIND_DOCUMENT", "RECORD_KIND_ALLERGY", "RECORD_KIND_CONDITION",
            "RECORD_KIND_IMMUNIZATION", "RECORD_KIND_OBSERVATION", "RECORD_KIND_PRESCRIPTION",
        ]
    )  # fmt: skip
    # The directory now knows the patient (from the Bundle's Patient) and locates them.
    found = server(gateway).request_json(f"Patient/{ins}")
    validate(found)
    assert found["name"][0]["family"] == "MARTIN" and found["gender"] == "female"
    whole = everything(gateway, ins)
    by_type: dict[str, dict[str, Any]] = {}
    for entry in whole["entry"]:
        by_type[entry["resource"]["resourceType"]] = entry["resource"]
    assert set(by_type) == {
        "Patient", "DocumentReference", "AllergyIntolerance", "Condition", "Immunization",
        "Observation", "MedicationRequest",
    }  # fmt: skip
    sent = {e["resource"]["resourceType"]: e["resource"] for e in bundle["entry"]}
    assert by_type["Condition"]["code"] == sent["Condition"]["code"]
    assert by_type["Condition"]["onsetDateTime"] == sent["Condition"]["onsetDateTime"]
    assert by_type["Observation"]["valueQuantity"] == {"value": 7.2, "unit": "%"}
    assert by_type["Immunization"]["lotNumber"] == "AB123"
    assert by_type["AllergyIntolerance"]["criticality"] == "high"
    medication = by_type["MedicationRequest"]
    assert medication["dosageInstruction"] == [{"text": "1 comprimé matin et soir"}]
    assert medication["subject"]["identifier"] == {"system": INS_SYSTEM, "value": ins}
    document = by_type["DocumentReference"]
    assert document["securityLabel"][0]["coding"][0]["code"] == "R"
    attachment = document["content"][0]["attachment"]
    content = requests.get(attachment["url"], timeout=30)
    assert content.status_code == 200 and content.content == PDF
    assert content.headers["content-type"] == "application/pdf"


def test_a_retried_bundle_stores_nothing_twice(gateway: Gateway, fed: FhirFed) -> None:
    ins = ins_number(2)
    bundle = submission(ins, "retried")
    first = post(gateway, bundle)
    assert first.status_code == 200, first.text
    before = held(fed, ins)
    assert len(before) == 6
    again = post(gateway, bundle)
    assert again.status_code == 200, again.text
    answer = again.json()
    validate(answer)
    assert {e["response"]["status"] for e in answer["entry"]} == {"200 OK"}
    after = held(fed, ins)
    assert sorted(r.id for r in after) == sorted(r.id for r in before)
    assert [r.created_time for r in sorted(after, key=lambda r: r.id)] == [
        r.created_time for r in sorted(before, key=lambda r: r.id)
    ]
    # The same resource changed under the same fullUrl is not a retry: refused, 409.
    changed = copy.deepcopy(bundle)
    for entry in changed["entry"]:
        if entry["resource"]["resourceType"] == "Condition":
            entry["resource"]["onsetDateTime"] = "2020-01-01"
    # ...with a new entry written before it in the same unit: the node rolls back both.
    new = copy.deepcopy(_entry_of(bundle, "Observation"))
    new["fullUrl"] = "urn:uuid:5e1f0000-0000-4000-8000-00000000beef"
    changed["entry"].insert(0, new)
    conflict = post(gateway, changed)
    assert conflict.status_code == 409, conflict.text
    [issue] = validate(conflict.json()).as_json()["issue"]
    assert "never overwritten" in issue["diagnostics"]
    assert sorted(r.id for r in held(fed, ins)) == sorted(r.id for r in before)


def _entry_of(bundle: dict[str, Any], kind: str) -> dict[str, Any]:
    entry: dict[str, Any] = next(
        e for e in bundle["entry"] if e["resource"]["resourceType"] == kind
    )
    return entry


def _entry(bundle: dict[str, Any], kind: str) -> dict[str, Any]:
    resource: dict[str, Any] = next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind
    )
    return resource


def _tamper_size(b: dict[str, Any]) -> None:
    _entry(b, "DocumentReference")["content"][0]["attachment"]["size"] += 1


def _tamper_sha256(b: dict[str, Any]) -> None:
    _entry(b, "Binary")["data"] = base64.b64encode(PDF[:-1] + b"!").decode()


def _no_type(b: dict[str, Any]) -> None:
    del _entry(b, "DocumentReference")["type"]


def _other_patient(b: dict[str, Any]) -> None:
    _entry(b, "Condition")["subject"] = {
        "identifier": {"system": INS_SYSTEM, "value": ins_number(99)}
    }


def _bad_date(b: dict[str, Any]) -> None:
    _entry(b, "Observation")["effectiveDateTime"] = "hier"


def _orphan_binary(b: dict[str, Any]) -> None:
    binary = {"resourceType": "Binary", "contentType": "text/plain", "data": "eA=="}
    b["entry"].append(
        {
            "fullUrl": "urn:uuid:0b0b0b0b-0000-4000-8000-000000000000",
            "resource": binary,
            "request": {"method": "POST", "url": "Binary"},
        }
    )


def _batch(b: dict[str, Any]) -> None:
    b["type"] = "batch"


TAMPERED = [
    (_tamper_size, "Bundle.entry[2].resource.content[0].attachment.size"),
    (_tamper_sha256, "Bundle.entry[2].resource.content[0].attachment.hash"),
    (_no_type, "Bundle.entry[2].resource.type"),
    (_other_patient, "Bundle.entry[5].resource.subject"),
    (_bad_date, "Bundle.entry[7].resource.effectiveDateTime"),
    (_orphan_binary, "Bundle.entry[9].resource"),
    (_batch, "Bundle.type"),
]


@pytest.mark.parametrize(("tamper", "element"), TAMPERED)
def test_a_tampered_or_invalid_bundle_is_refused_naming_the_element_and_nothing_stored(
    gateway: Gateway, fed: FhirFed, tamper: Callable[[dict[str, Any]], None], element: str
) -> None:
    ins = ins_number(20 + [t.__name__ for t, _ in TAMPERED].index(tamper.__name__))
    bundle = submission(ins, f"tampered-{tamper.__name__}")
    tamper(bundle)
    answer = post(gateway, bundle)
    assert answer.status_code == 400, answer.text
    [issue] = validate(answer.json()).as_json()["issue"]
    assert issue["expression"] == [element]
    assert element in issue["diagnostics"]
    assert held(fed, ins) == []


def test_a_body_over_the_limit_is_413_before_it_is_sent(gateway: Gateway) -> None:
    """The gateway answers from the request's headers: a hospital system sending a 3 MiB
    Bundle to a gateway started with --max-body-mib 2 learns it before sending the body."""
    size = len(json.dumps(submission(ins_number(3), "big", content=b"x" * (3 * 1024 * 1024))))
    host, port = gateway.address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.putrequest("POST", "/")
        connection.putheader("Content-Type", "application/fhir+json")
        connection.putheader("Content-Length", str(size))
        connection.endheaders()
        answer = connection.getresponse()
        body = json.loads(answer.read())
    finally:
        connection.close()
    assert answer.status == 413
    [issue] = validate(body).as_json()["issue"]
    assert issue["code"] == "too-costly" and str(2 * 1024 * 1024) in issue["diagnostics"]


def test_active_medication_requests_are_the_dispensable_prescriptions(
    gateway: Gateway, fed: FhirFed
) -> None:
    ins = ins_number(4)
    assert post(gateway, submission(ins, "rx")).status_code == 200  # a hospital's, not signed
    doctor = Actor(fed.pki_dir, DOC, fed.nodes[REGION].port)
    pharmacist = Actor(fed.pki_dir, f"practitioner-{PHARMACIST}", fed.nodes[REGION].port)
    try:
        used_up = rx_id(doctor.prescribe(patient=ins))
        renewable = rx_id(doctor.prescribe(patient=ins, renewals=2, interval=0))
        cancelled = rx_id(doctor.prescribe(patient=ins))
        pharmacist.dispense(used_up, ins=ins)
        pharmacist.dispense(renewable, ins=ins)
        doctor.cancel(cancelled)
    finally:
        doctor.close()
        pharmacist.close()
    smart = server(gateway)

    def active() -> dict[str, Any]:
        bundle = smart.request_json(
            f"MedicationRequest?patient.identifier={INS_SYSTEM}|{ins}&status=active"
        )
        validate(bundle)
        return bundle

    from tests.federation import wait_for

    wait_for(lambda: len(active().get("entry", [])) == 2, "the renewable prescription's 2 lines")
    bundle = active()
    requests_ = [e["resource"] for e in bundle["entry"]]
    assert {r["groupIdentifier"]["value"] for r in requests_} == {renewable}
    first = requests_[0]
    assert first["status"] == "active" and first["intent"] == "order"
    assert first["dispenseRequest"]["numberOfRepeatsAllowed"] == 2
    assert "start" in first["dispenseRequest"]["validityPeriod"]
    assert first["dispenseRequest"]["quantity"]["value"] in (1, 2)
    assert first["requester"]["identifier"]["value"] == DOCTOR
    assert first["meta"]["source"] == f"urn:dmp:node:{REGION}"
    assert any("dosageInstruction" in r for r in requests_)
    # $everything gives both prescriptions as MedicationRequests, the dispensings as
    # MedicationDispenses.
    whole = everything(gateway, ins)
    kinds = [e["resource"]["resourceType"] for e in whole["entry"]]
    assert kinds.count("MedicationDispense") == 4  # two dispensings of two lines
    assert kinds.count("MedicationRequest") == 7  # three e-prescriptions of 2 lines, one hospital's


def _run(*args: str) -> tuple[int, str, str]:
    process = dmp_process(*args)
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def test_carebundle_round_trip_keeps_every_fact_and_byte(fed: FhirFed, tmp_path: Path) -> None:
    # Three carebundle patients (US Core: Encounter, Conditions, Observations,
    # DiagnosticReports, MedicationRequests), and an MHD submission with a PDF.
    bundles = carebundle_transactions(3)
    mhd = ins_number(200)
    bundles.append((mhd, submission(mhd, "round-trip")))
    folder = tmp_path / "from-hospital"
    folder.mkdir()
    for index, (_, bundle) in enumerate(bundles):
        (folder / f"bundle-{index}.json").write_text(json.dumps(bundle))
    (folder / "bundle-9-tampered.json").write_text(
        json.dumps({"resourceType": "Bundle", "type": "batch"})
    )
    common = ("--pki", str(fed.pki_dir), "--as", DOC)
    code, out, err = _run("fhir", "import", str(folder), *common, "--node", node_address(fed),
                          "--directory", fed.directory_address)  # fmt: skip
    assert code == 1, err  # the tampered file is refused, the others stored
    stored_now = sum(_records_in(b) for _, b in bundles)
    assert (
        f"5 file(s): {stored_now} record(s) stored, 0 already stored (skipped), 1 Bundle(s) refused"
        in out
    )
    assert "refused" in out and "bundle-9-tampered.json: Bundle.type" in out
    code, out, err = _run("fhir", "import", str(folder), *common, "--node", node_address(fed))
    assert code == 1 and f"0 record(s) stored, {stored_now} already stored (skipped)" in out, (
        out + err
    )
    for ins, bundle in bundles:
        out_file = tmp_path / f"export-{ins}.json"
        from tests.federation import wait_for

        expected = _records_in(bundle)

        def located(ins: str = ins, expected: int = expected) -> bool:
            return len(_view_ids(fed, ins)) == expected

        wait_for(located, "the directory to locate every imported record")
        code, out, err = _run("fhir", "export", *common, "--directory", fed.directory_address,
                              "--patient", ins, "--out", str(out_file))  # fmt: skip
        assert code == 0, err
        assert stat.S_IMODE(out_file.stat().st_mode) == 0o600
        exported = json.loads(out_file.read_text())
        validate(exported)
        _check_facts(ins, bundle, exported)


def _records_in(bundle: dict[str, Any]) -> int:
    """How many records a Bundle makes: all but the Patient, the Practitioner, the
    SubmissionSet and the Binaries (their DocumentReference's content)."""
    kept = ("Patient", "Practitioner", "List", "Binary")
    return sum(1 for e in bundle["entry"] if e["resource"]["resourceType"] not in kept)


def _view_ids(fed: FhirFed, ins: str) -> list[str]:
    from dmp.client import DirectoryClient, view_request

    creds = load_credentials(fed.pki_dir, DOC)
    with DirectoryClient(fed.directory_address, creds) as directory:
        return [r.id for r in directory.view(view_request(ins), limit=1000).records]


#: The kinds given as their natural resource, built from what was sent.
STRUCTURED = (
    "AllergyIntolerance", "Condition", "Immunization", "Observation", "MedicationRequest",
)  # fmt: skip
#: What a natural resource says of its own (id, where it lives, the patient as an INS).
OURS = ("id", "meta", "subject", "patient", "identifier", "extension")


def _check_facts(ins: str, sent: dict[str, Any], exported: dict[str, Any]) -> None:
    """Every clinical resource sent is in the export, byte for byte as its content and fact
    for fact as its natural resource; the patient's identity is the one sent."""
    binaries = {
        e["fullUrl"]: base64.b64decode(e["resource"]["data"])
        for e in exported["entry"] if e["resource"]["resourceType"] == "Binary"
    }  # fmt: skip
    contents = set(binaries.values())
    naturals = [e["resource"] for e in exported["entry"] if e["search"]["mode"] == "match"]
    for entry in sent["entry"]:
        resource = entry["resource"]
        kind = resource["resourceType"]
        if kind == "Patient":
            [patient] = [
                e["resource"]
                for e in exported["entry"]
                if e["resource"]["resourceType"] == "Patient"
            ]
            assert patient["identifier"][0]["value"] == ins
            assert patient["birthDate"] == resource["birthDate"]
            assert patient["gender"] == resource["gender"]
            assert patient["name"][0]["family"].upper() == resource["name"][0]["family"].upper()
            continue
        if kind in ("Practitioner", "List", "Binary"):
            continue
        if kind == "DocumentReference":
            url = resource["content"][0]["attachment"]["url"]
            sent_binary = next(e for e in sent["entry"] if e["fullUrl"] == url)["resource"]
            assert base64.b64decode(sent_binary["data"]) in contents, "a document's bytes lost"
            [document] = [n for n in naturals if n["resourceType"] == "DocumentReference"]
            assert document["type"]["coding"] == resource["type"]["coding"]
            assert document["description"] == resource["description"]
            assert document["securityLabel"][0]["coding"][0]["code"] == "R"
            assert document["context"]["period"]["start"].startswith("2026-11-29T09:30:00")
            got = binaries[document["content"][0]["attachment"]["url"]]
            assert got == PDF
            continue
        assert canonical(resource) in contents, f"{kind} {entry['fullUrl']} lost"
        if kind in STRUCTURED:
            facts = {k: v for k, v in resource.items() if k not in OURS}
            same = [
                n
                for n in naturals
                if n["resourceType"] == kind and all(n.get(k) == v for k, v in facts.items())
            ]
            assert same, f"{kind} {entry['fullUrl']}: its facts are not in the natural resource"


def test_a_writing_gateway_says_it_takes_transactions(gateway: Gateway) -> None:
    statement = server(gateway).request_json("metadata")
    validate(statement)
    [rest] = statement["rest"]
    assert rest["interaction"] == [{"code": "transaction"}]
    assert "ITI-65" in rest["documentation"]
    assert any(i.endswith("IHE.MHD.DocumentRecipient") for i in statement["instantiates"])
    types = {r["type"] for r in rest["resource"]}
    assert {"MedicationRequest", "MedicationDispense"} <= types


def test_an_export_with_a_region_down_is_partial_and_says_so(fed: FhirFed, tmp_path: Path) -> None:
    """Last in this module: it stops node 53."""
    fed.nodes["53"].stop(grace=None)
    out_file = tmp_path / "partial.json"
    code, _, err = _run("fhir", "export", "--pki", str(fed.pki_dir), "--as", DOC,
                        "--directory", fed.directory_address, "--patient", PATIENT,
                        "--out", str(out_file))  # fmt: skip
    assert code == 1
    assert "partial: region 53 (Bretagne)" in err
    exported = json.loads(out_file.read_text())
    validate(exported)
    sources = {
        e["resource"]["meta"]["source"] for e in exported["entry"] if e["search"]["mode"] == "match"
    }
    assert sources == {"urn:dmp:node:11", "urn:dmp:node:84"}
    [outcome] = [e["resource"] for e in exported["entry"] if e["search"]["mode"] == "outcome"]
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "53"
    written = {r.id for region, r, _ in fed.written.values() if region != "53"}
    binaries = [e for e in exported["entry"] if e["resource"]["resourceType"] == "Binary"]
    assert len(binaries) == len(written)


def test_a_bundle_for_a_node_that_is_down_is_a_503_naming_its_region(
    fed: FhirFed, gateway: Gateway
) -> None:
    """Last in this module: it stops the gateway's own node."""
    fed.nodes[REGION].stop(grace=None)
    response = post(gateway, submission(ins_number(90), "node-down"))
    assert response.status_code == 503
    outcome = response.json()
    validate(outcome)
    diagnostics = outcome["issue"][0]["diagnostics"]
    assert f"region {REGION} (Île-de-France)" in diagnostics
    assert "send the same Bundle again" in diagnostics
