"""Issue 12, reviewed as an attacker would: the FHIR gateway facing hostile clients.

A gateway acts as its --as identity for whoever reaches it, so who may reach it is the
whole of its access control: with --tls, only software holding that same identity's
federation certificate; on loopback, no web page the professional's browser happens to
load (a cross-site "simple" POST carries ``text/plain``). Malformed input is a 400
OperationOutcome, never a 500.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from dmp.client import NodeClient
from dmp.fhir.errors import FhirError
from dmp.fhir.files import export_patient
from dmp.pki import load_credentials
from dmp.v1 import node_service_pb2 as npb
from tests.federation import OTHER_DOCTOR, PATIENT, PHARMACIST
from tests.integration.fhir_bundles import ins_number, submission
from tests.integration.fhir_federation import (
    DOC,
    INS_SYSTEM,
    FhirFed,
    Gateway,
    gateway_server_cert,
    outcome_issues,
    running_fhir_federation,
)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirFed]:
    root = tmp_path_factory.mktemp("fhir-hostile")
    with running_fhir_federation(root, lambda name: f"sqlite:///{root / f'{name}.db'}") as fed:
        yield fed


@pytest.fixture(scope="module")
def writer(fed: FhirFed) -> Gateway:
    return fed.gateway(DOC, "--node", f"127.0.0.1:{fed.nodes['11'].port}")


def refused(answer: requests.Response, status: int) -> list[dict[str, Any]]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/fhir+json")
    return outcome_issues(answer.json())


def test_tls_refuses_a_federation_certificate_of_someone_else(fed: FhirFed, tmp_path: Path) -> None:
    """A patient's certificate, or another professional's, must not make the practitioner's
    gateway act as the practitioner for them (it would read every record the doctor may)."""
    cert, key = gateway_server_cert(fed.pki_dir, tmp_path)
    secure = fed.gateway(DOC, "--tls", "--tls-cert", str(cert), "--tls-key", str(key))
    ca = str(fed.pki_dir / "ca.pem")
    url = f"{secure.base}/DocumentReference"
    query = {"patient.identifier": f"{INS_SYSTEM}|{PATIENT}"}

    def pair(identity: str) -> tuple[str, str]:
        return (str(fed.pki_dir / f"{identity}.pem"), str(fed.pki_dir / f"{identity}.key"))

    own = requests.get(url, params=query, cert=pair(DOC), verify=ca, timeout=30)
    assert own.status_code == 200, own.text
    assert own.json()["entry"]
    for stranger in (f"patient-{PATIENT}", f"practitioner-{OTHER_DOCTOR}"):
        with pytest.raises(requests.exceptions.RequestException):
            answer = requests.get(url, params=query, cert=pair(stranger), verify=ca, timeout=30)
            answer.raise_for_status()


def test_a_cross_site_text_plain_post_stores_nothing(writer: Gateway, fed: FhirFed) -> None:
    """A web page can make the professional's browser POST ``text/plain`` to loopback
    without any CORS preflight: the gateway must not take it as a transaction."""
    ins = ins_number(41)
    bundle = submission(ins, "csrf")
    answer = requests.post(
        f"{writer.base}/",
        data=json.dumps(bundle).encode(),
        headers={"Content-Type": "text/plain"},
        timeout=60,
    )
    [issue] = refused(answer, 415)
    assert "application/fhir+json" in issue["diagnostics"]
    view = requests.get(
        f"{writer.base}/DocumentReference",
        params={"patient.identifier": f"{INS_SYSTEM}|{ins}"},
        timeout=30,
    )
    assert view.status_code in (200, 403, 404), view.text
    assert view.status_code != 200 or not view.json().get("entry")


def test_deeply_nested_json_is_a_400_not_a_500(writer: Gateway) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    answer = requests.post(
        f"{writer.base}/",
        data=body,
        headers={"Content-Type": "application/fhir+json"},
        timeout=60,
    )
    [issue] = refused(answer, 400)
    assert issue["expression"] == ["Bundle"]


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"_count": "²"}, "_count"),  # str.isdigit() says yes, int() says no
        ({"date": "gt9999-12-31"}, "date"),  # the day after overflows datetime
        ({"date": "le9999-12-31T23:59:59.999999Z"}, "date"),
    ],
)
def test_odd_search_values_are_a_400_naming_the_parameter(
    writer: Gateway, params: dict[str, str], named: str
) -> None:
    answer = requests.get(
        f"{writer.base}/DocumentReference",
        params={"patient.identifier": f"{INS_SYSTEM}|{PATIENT}", **params},
        timeout=30,
    )
    [issue] = refused(answer, 400)
    assert issue["expression"] == [named]


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8080", "10.0.0.1"])
def test_a_loopback_gateway_answers_only_requests_for_a_loopback_host(
    writer: Gateway, host: str
) -> None:
    """DNS rebinding: a page of attacker.example whose name now resolves to 127.0.0.1 reads
    the gateway's answers as its own origin; its requests carry its Host, which a loopback
    gateway must refuse."""
    answer = requests.get(
        f"{writer.base}/DocumentReference",
        params={"patient.identifier": f"{INS_SYSTEM}|{PATIENT}"},
        headers={"Host": host},
        timeout=30,
    )
    [issue] = refused(answer, 421)
    assert PATIENT not in answer.text
    assert "Host" in issue["diagnostics"]
    for local in (writer.address, writer.address.replace("127.0.0.1", "localhost")):
        ok = requests.get(f"{writer.base}/metadata", headers={"Host": local}, timeout=30)
        assert ok.status_code == 200, ok.text


def test_two_professionals_posting_the_same_bundle_each_store_it_once(
    writer: Gateway, fed: FhirFed
) -> None:
    """Record ids came from the patient and the fullUrl alone, whoever wrote them: the
    second professional's Bundle (or a retry of it) was refused for ever, 409, with advice
    to pick another id that no hospital software can follow, and anyone who knew a Bundle's
    fullUrls (or its predictable resource identifiers) could take its ids first."""
    other = fed.gateway(
        f"practitioner-{OTHER_DOCTOR}", "--node", f"127.0.0.1:{fed.nodes['11'].port}"
    )
    bundle = submission(ins_number(42), "two-writers")
    headers = {"Content-Type": "application/fhir+json"}
    body = json.dumps(bundle).encode()
    first = requests.post(f"{writer.base}/", data=body, headers=headers, timeout=60)
    assert first.status_code == 200, first.text
    for attempt in ("stores", "stores nothing again"):
        answer = requests.post(f"{other.base}/", data=body, headers=headers, timeout=60)
        assert answer.status_code == 200, (attempt, answer.text)
        created = [e["response"]["status"] for e in answer.json()["entry"]].count("201 Created")
        assert created == (6 if attempt == "stores" else 0)


_CANDIDATES = (
    "patient.identifier", "patient", "subject.identifier", "subject", "identifier", "_id",
    "type", "category", "date", "period", "status", "_count", "author", "_sort",
)  # fmt: skip


def test_the_capability_statement_lists_exactly_the_search_parameters_taken(
    writer: Gateway,
) -> None:
    """Each search parameter a resource's search takes is in /metadata, and each one it
    lists is taken (a parameter not taken is a 400 not-supported naming it)."""
    statement = requests.get(f"{writer.base}/metadata", timeout=30).json()
    [rest] = statement["rest"]
    searched = {
        r["type"]: {p["name"] for p in r.get("searchParam", [])}
        for r in rest["resource"]
        if {"code": "search-type"} in r.get("interaction", [])
    }
    assert searched
    for resource, listed in searched.items():
        for name in _CANDIDATES:
            base = {} if name == "identifier" else {"patient.identifier": PATIENT}
            if resource == "Patient":
                base = {} if name in ("identifier", "_id") else {"identifier": PATIENT}
            answer = requests.get(
                f"{writer.base}/{resource}",
                params={**base, name: PATIENT if "atient" in name or "ubject" in name else "x"},
                timeout=30,
            )
            issues = answer.json().get("issue", []) if answer.status_code == 400 else []
            taken = not any(
                i["code"] == "not-supported" and i.get("expression") == [name] for i in issues
            )
            assert taken == (name in listed), (resource, name, answer.text)


def test_export_does_not_write_through_a_symlink_planted_at_out(
    fed: FhirFed, tmp_path: Path
) -> None:
    """--out in a shared directory: another local user plants a link there to a file of
    the professional's; the export must not clobber it (nor put records at the link's
    target)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("the professional's own file")
    out = tmp_path / "export.json"
    out.symlink_to(victim)
    with pytest.raises(FhirError) as refused:
        export_patient(load_credentials(fed.pki_dir, DOC), fed.directory_address, PATIENT, out)
    assert "link" in refused.value.diagnostics
    assert victim.read_text() == "the professional's own file"
    again = tmp_path / "fresh.json"
    export_patient(load_credentials(fed.pki_dir, DOC), fed.directory_address, PATIENT, again)
    assert again.stat().st_mode & 0o777 == 0o600
    assert json.loads(again.read_bytes())["resourceType"] == "Bundle"


def test_a_bundle_the_node_stored_is_answered_as_stored(writer: Gateway, fed: FhirFed) -> None:
    """All or nothing, and said so: after the node stored the Bundle, the gateway read the
    first record back, which a writer who may write but not read (a pharmacist, a
    DocumentReference) may not: a 404 answered for a Bundle that was stored whole."""
    pharmacist = fed.gateway(
        f"practitioner-{PHARMACIST}", "--node", f"127.0.0.1:{fed.nodes['11'].port}"
    )
    ins = ins_number(43)
    answer = requests.post(
        f"{pharmacist.base}/",
        data=json.dumps(submission(ins, "write-only")).encode(),
        headers={"Content-Type": "application/fhir+json"},
        timeout=60,
    )
    request = npb.ListRecordsRequest(patient_ins=ins)
    with NodeClient(f"127.0.0.1:{fed.nodes['11'].port}", load_credentials(fed.pki_dir, DOC)) as n:
        stored = list(n.list_records(request))
    if answer.status_code != 200:
        assert not stored, answer.text  # refused: then nothing is stored
    else:
        statuses = [e["response"]["status"] for e in answer.json()["entry"]]
        assert statuses.count("201 Created") == len(stored) == 6


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "https://attacker.example"},
        {"Origin": "null"},
    ],
)
def test_a_loopback_gateway_refuses_what_a_browser_sends_for_another_site(
    writer: Gateway, headers: dict[str, str]
) -> None:
    """A page of another site cannot read the answers (no CORS), but its blind GETs still
    made the gateway look patients up as the professional: audited accesses, in the
    professional's name, to patients they never asked for. Browsers say where a request
    comes from (Sec-Fetch-Site, Origin); software and curl send neither."""
    answer = requests.get(
        f"{writer.base}/DocumentReference",
        params={"patient.identifier": f"{INS_SYSTEM}|{PATIENT}"},
        headers=headers,
        timeout=30,
    )
    [issue] = refused(answer, 403)
    assert "browser" in issue["diagnostics"]
    for fine in ({"Sec-Fetch-Site": "none"}, {"Origin": writer.base}):
        ok = requests.get(f"{writer.base}/metadata", headers=fine, timeout=30)
        assert ok.status_code == 200, ok.text
