"""Issue 12, the read half: what the FHIR gateway refuses, and how it says so.

Every refusal and bad request is an OperationOutcome (validated with fhirclient's R4
models) with the HTTP status the federation's answer calls for: 400 naming the parameter,
403 saying nothing of whether the patient exists, 404, 413, 503 naming the region that is
down, and partial views naming the region that did not answer inside the Bundle. With
--tls, a client without a federation certificate is refused at TLS.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from dmp.pki import Pki
from tests.federation import OTHER_PATIENT, PATIENT, wait_for
from tests.integration.fhir_federation import (
    DOC,
    INS_SYSTEM,
    FhirFed,
    Gateway,
    gateway_server_cert,
    outcome_issues,
    running_fhir_federation,
    validate,
)

BAD_KEY = PATIENT[:-2] + f"{(int(PATIENT[-2:]) + 1) % 97:02d}"


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirFed]:
    root = tmp_path_factory.mktemp("fhir-errors")
    with running_fhir_federation(root, lambda name: f"sqlite:///{root / f'{name}.db'}") as fed:
        yield fed


@pytest.fixture(scope="module")
def gateway(fed: FhirFed) -> Gateway:
    return fed.gateway(DOC)


def get(gateway: Gateway, path: str, **params: Any) -> requests.Response:
    return requests.get(f"{gateway.base}/{path}", params=params, timeout=30)


def refused(answer: requests.Response, status: int) -> list[dict[str, Any]]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/fhir+json")
    return outcome_issues(answer.json())


DOCS = "DocumentReference"
PID = "patient.identifier"


@pytest.mark.parametrize(
    ("path", "params", "named"),
    [
        (DOCS, {}, PID),
        (DOCS, {PID: f"{INS_SYSTEM}|{BAD_KEY}"}, PID),
        (DOCS, {PID: f"urn:oid:1.2.3|{PATIENT}"}, PID),
        (DOCS, {PID: PATIENT, "_count": "0"}, "_count"),
        (DOCS, {PID: PATIENT, "_count": "lots"}, "_count"),
        (DOCS, {PID: PATIENT, "date": "ge2024-13-45"}, "date"),
        (DOCS, {PID: PATIENT, "status": "entered-in-error"}, "status"),
        (DOCS, {PID: PATIENT, "type": "http://snomed.info/sct|1"}, "type"),
        (DOCS, {PID: PATIENT, "author": "x"}, "author"),
        (DOCS, {PID: PATIENT, "_page_token": "not a token!"}, "_page_token"),
        ("Patient", {"identifier": "12"}, "identifier"),
        ("AuditEvent", {}, PID),
        (f"Patient/{BAD_KEY}/$everything", {}, "id"),
    ],
)  # fmt: skip
def test_bad_input_is_a_400_naming_the_parameter(
    gateway: Gateway, path: str, params: dict[str, str], named: str
) -> None:
    [issue] = refused(get(gateway, path, **params), 400)
    assert issue["severity"] == "error"
    assert issue["code"] in ("invalid", "not-supported")
    assert issue["expression"] == [named]
    assert named in issue["diagnostics"]


def test_a_page_token_from_another_query_is_refused(gateway: Gateway) -> None:
    first = get(gateway, "DocumentReference", **{"patient.identifier": PATIENT, "_count": "2"})
    next_url = next(link["url"] for link in first.json()["link"] if link["relation"] == "next")
    token = next_url.split("_page_token=")[1]
    [issue] = refused(
        get(
            gateway,
            "DocumentReference",
            **{"patient.identifier": PATIENT, "type": "11488-4", "_page_token": token},
        ),
        400,
    )
    assert "page_token" in issue["diagnostics"]


def test_refusals_say_nothing_of_whether_the_patient_exists(fed: FhirFed) -> None:
    """Another patient's gateway asks for PATIENT's documents, and for an INS nobody holds:
    the same 403, the same words."""
    other = fed.gateway(f"patient-{OTHER_PATIENT}")
    unknown = "2990175999999"
    from dmp.ins import make_ins

    answers = [
        get(other, "DocumentReference", **{"patient.identifier": f"{INS_SYSTEM}|{ins}"})
        for ins in (PATIENT, make_ins(unknown))
    ]
    issues = [refused(answer, 403) for answer in answers]
    assert all(i[0]["code"] == "forbidden" for i in issues)
    texts = [i[0]["diagnostics"] for i in issues]
    assert texts[0].replace(PATIENT, "X") == texts[1].replace(make_ins(unknown), "X")
    assert "PERMISSION_DENIED" in texts[0]


def test_a_professional_may_not_read_a_patients_access_history(gateway: Gateway) -> None:
    [issue] = refused(get(gateway, "AuditEvent", **{"patient.identifier": PATIENT}), 403)
    assert issue["code"] == "forbidden"


def test_a_revoked_gateway_identity_is_a_401(fed: FhirFed) -> None:
    """The federation refuses a revoked certificate: the gateway says 401, naming why."""
    rpps = "10000000077"
    fed.pki.issue_practitioner(rpps, "doctor", "Dr Rene REVOQUE")
    revoked = fed.gateway(f"practitioner-{rpps}")
    params = {"patient.identifier": PATIENT}
    assert get(revoked, "DocumentReference", **params).status_code == 200
    fed.pki.revoke(f"practitioner-{rpps}")

    def refused_now() -> bool:
        return get(revoked, "DocumentReference", **params).status_code == 401

    wait_for(refused_now, "the directory to refuse the revoked certificate")
    [issue] = refused(get(revoked, "DocumentReference", **params), 401)
    assert issue["code"] == "login" and "revoked" in issue["diagnostics"]


def test_unknown_things_are_404_and_writes_are_not_there_yet(gateway: Gateway) -> None:
    [issue] = refused(get(gateway, "Observation"), 404)
    assert issue["code"] == "not-found" and "/metadata" in issue["diagnostics"]
    [issue] = refused(get(gateway, "Binary/never-listed"), 404)
    assert "DocumentReference" in issue["diagnostics"]
    [issue] = refused(get(gateway, f"Binary/99.{PATIENT}.some-record"), 400)
    assert issue["expression"] == ["id"] and "region" in issue["diagnostics"]


def test_a_forged_content_locator_reads_nothing(gateway: Gateway, fed: FhirFed) -> None:
    """The locator in a Binary id grants nothing: the record's node checks the caller's
    assertion, which names another patient here."""
    region, record, _ = fed.by_title("Lettre de sortie")
    answer = get(gateway, f"Binary/{region}.{OTHER_PATIENT}.{record.id}")
    [issue] = refused(answer, answer.status_code)
    assert answer.status_code in (403, 404)
    assert record.title not in answer.text and "Sortie" not in answer.text
    [issue] = refused(requests.post(f"{gateway.base}/", json={}, timeout=10), 405)
    assert issue["code"] == "not-supported"


def test_a_body_over_the_limit_is_a_413_before_it_is_read(gateway: Gateway) -> None:
    host, port = gateway.address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest("POST", "/")
        connection.putheader("Content-Type", "application/fhir+json")
        connection.putheader("Content-Length", str(100 * 1024 * 1024))
        connection.endheaders()  # and never sends the 100 MiB
        answer = connection.getresponse()
        body = answer.read()
    finally:
        connection.close()
    assert answer.status == 413
    import json

    [issue] = outcome_issues(json.loads(body))
    assert issue["code"] == "too-costly"


def test_tls_requires_a_federation_client_certificate(fed: FhirFed, tmp_path: Path) -> None:
    cert, key = gateway_server_cert(fed.pki_dir, tmp_path)
    gone = "10000000078"  # a federation certificate, revoked before the gateway starts
    fed.pki.issue_practitioner(gone, "doctor", "Dr Ex PARTI")
    fed.pki.revoke(f"practitioner-{gone}")
    secure = fed.gateway(DOC, "--tls", "--tls-cert", str(cert), "--tls-key", str(key))
    url = f"{secure.base}/metadata"
    ca = str(fed.pki_dir / "ca.pem")
    doctor = (str(fed.pki_dir / f"{DOC}.pem"), str(fed.pki_dir / f"{DOC}.key"))
    answer = requests.get(url, cert=doctor, verify=ca, timeout=10)
    assert answer.status_code == 200
    validate(answer.json())
    later = "10000000079"
    fed.pki.issue_practitioner(later, "nurse", "Marc BIENTOT")
    soon_revoked = (
        str(fed.pki_dir / f"practitioner-{later}.pem"),
        str(fed.pki_dir / f"practitioner-{later}.key"),
    )
    # The gateway serves its own identity's certificate only: the nurse's is checked
    # against a gateway of the nurse's own.
    nurses = fed.gateway(
        f"practitioner-{later}", "--tls", "--tls-cert", str(cert), "--tls-key", str(key)
    )
    nurse_url = f"{nurses.base}/metadata"
    assert requests.get(nurse_url, cert=soon_revoked, verify=ca, timeout=10).status_code == 200
    # No certificate: refused at TLS (after the TLS 1.3 handshake: the request fails).
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(url, verify=ca, timeout=10)
    # A certificate from another CA, for the same identity: refused too.
    foreign = Pki.init(tmp_path / "foreign")
    foreign.issue_practitioner(DOC.split("-")[1], "doctor", "Dr Claire MARTIN")
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(
            url,
            cert=(
                str(tmp_path / "foreign" / f"{DOC}.pem"),
                str(tmp_path / "foreign" / f"{DOC}.key"),
            ),
            verify=ca,
            timeout=10,
        )
    # A revoked federation certificate: refused (the CRL is checked for the leaf).
    revoked = (
        str(fed.pki_dir / f"practitioner-{gone}.pem"),
        str(fed.pki_dir / f"practitioner-{gone}.key"),
    )
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(url, cert=revoked, verify=ca, timeout=10)
    # Revoked while the gateway runs: refused from the next connection on.
    fed.pki.revoke(f"practitioner-{later}")
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(nurse_url, cert=soon_revoked, verify=ca, timeout=10)
    # Plain HTTP to the HTTPS port gets nothing either.
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(url.replace("https://", "http://"), timeout=10).raise_for_status()


def test_a_region_down_makes_views_partial_and_its_content_a_503(
    gateway: Gateway, fed: FhirFed
) -> None:
    """Last in this module: it stops node 53."""
    region, record, _ = fed.by_title("Allergie : pénicillines")
    assert region == "53"
    listed = get(gateway, "DocumentReference", **{"patient.identifier": PATIENT}).json()
    assert all(e["search"]["mode"] == "match" for e in listed["entry"])  # all answered
    fed.nodes["53"].stop(grace=None)
    answer = get(gateway, "DocumentReference", **{"patient.identifier": PATIENT})
    assert answer.status_code == 200
    bundle = answer.json()
    validate(bundle)
    matches = [e for e in bundle["entry"] if e["search"]["mode"] == "match"]
    outcomes = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert {e["resource"]["meta"]["source"] for e in matches} == {
        "urn:dmp:node:11",
        "urn:dmp:node:84",
    }
    [outcome] = outcomes
    [issue] = outcome_issues(outcome["resource"])
    assert issue["severity"] == "warning"
    assert issue["diagnostics"].startswith("region 53 (Bretagne): ")
    assert issue["details"]["coding"] == [
        {"system": "urn:dmp:region", "code": "53", "display": "Bretagne"}
    ]
    everything = get(gateway, f"Patient/{PATIENT}/$everything").json()
    validate(everything)
    assert [e["search"]["mode"] for e in everything["entry"]].count("outcome") == 1
    for path in (f"Binary/{record.id}", f"Binary/53.{PATIENT}.{record.id}"):
        [issue] = refused(get(gateway, path), 503)
        assert issue["code"] == "transient"
        assert "region 53 (Bretagne)" in issue["diagnostics"]
