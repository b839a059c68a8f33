"""Refusals are all audited, revoked certificates included, and a flood of identical
refusals from one peer becomes a few counted events, the peer slowed down."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from dmp.audit.calls import to_proto
from dmp.audit.events import AuditEvent
from dmp.identity import Principal, Role
from dmp.pki import Pki, load_credentials
from dmp.tls import secure_channel
from dmp.v1 import node_service_pb2 as npb
from dmp.v1 import node_service_pb2_grpc
from node.app import RunningNode
from tests.federation import DOCTOR, PATIENT, client, running_node

FLOOD = 300


@pytest.fixture(scope="module")
def own_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A PKI of this module's own: a test revokes a certificate."""
    pki = Pki.init(tmp_path_factory.mktemp("refusal-pki"))
    pki.issue_node("11")
    pki.issue_practitioner(DOCTOR, "doctor", "Dr Claire MARTIN")
    pki.issue_patient(PATIENT, "Jean DUPONT")
    return pki


def unattributed(node: RunningNode) -> list[AuditEvent]:
    """Events about no patient (refusals before an assertion named one), newest first."""
    assert node.audit is not None
    return [e.event for e in node.audit.events_for_patient("", limit=10_000)]


def test_a_revoked_certificate_is_refused_and_audited(own_pki: Pki, tmp_path: Path) -> None:
    someone = Principal(Role.PRACTITIONER, "10000000097", "Dr Soon Revoked", "doctor")
    own_pki.issue(someone)
    own_pki.revoke(someone.identity)
    with running_node(own_pki.directory, "11", f"sqlite:///{tmp_path / 'n.db'}") as node:
        channel = secure_channel(
            f"127.0.0.1:{node.port}", load_credentials(own_pki.directory, someone.identity)
        )
        stub = node_service_pb2_grpc.NodeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ListRecords(npb.ListRecordsRequest(patient_ins=PATIENT), timeout=5)
        channel.close()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        refused = [e for e in unattributed(node) if e.active_participant_user_id == someone.uri]
        assert [(e.event_type, e.status_code) for e in refused] == [("refused", "UNAUTHENTICATED")]
        assert "revoked" in refused[0].detail
        assert "ListRecords" in refused[0].detail


def test_a_flood_of_identical_refusals_is_counted_and_slowed(own_pki: Pki, tmp_path: Path) -> None:
    db = tmp_path / "n.db"
    patient_uri = f"urn:dmp:patient:{PATIENT}"
    # One window for the whole test: what is counted is written at shutdown.
    with running_node(own_pki.directory, "11", f"sqlite:///{db}", refusal_window=3600) as node:
        flooder = client(own_pki.directory, f"patient-{PATIENT}", node.port)
        doctor = client(own_pki.directory, f"practitioner-{DOCTOR}", node.port)
        codes: list[grpc.StatusCode] = []
        messages: dict[grpc.StatusCode, str] = {}
        for _ in range(FLOOD):  # no assertion: refused before the patient is known
            try:
                flooder.node.ListRecords(npb.ListRecordsRequest(patient_ins=PATIENT), timeout=5)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                messages[exc.code()] = exc.details()
        assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert "wait" in messages[grpc.StatusCode.RESOURCE_EXHAUSTED]
        # Another caller is served normally meanwhile.
        answer = doctor.node.ListRecords(
            npb.ListRecordsRequest(patient_ins=PATIENT), metadata=doctor.md(), timeout=5
        )
        assert len(answer.records) == 0
        # The first identical refusals are in the log at once, one event each.
        at_once = _from(node, patient_uri)
        assert {e.status_code for e in at_once} == {"UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}
        assert {e.repeat_count for e in at_once} == {1}
        flooder.close()
        doctor.close()
    # At shutdown the counted events are flushed: every refused call is accounted for.
    with running_node(own_pki.directory, "11", f"sqlite:///{db}") as node:
        events = _from(node, patient_uri)
    assert len(events) <= 12
    assert sum(e.repeat_count for e in events) == FLOOD
    counted = [e for e in events if e.repeat_count > 1]
    assert {e.status_code for e in counted} == {"UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}
    # Turned away before the call began, the event names the method.
    assert all("ListRecords" in e.detail for e in events if e.status_code == "RESOURCE_EXHAUSTED")
    assert {to_proto(e).repeat_count for e in counted} == {e.repeat_count for e in counted}
    # The log with counted events verifies, as it did before.
    verified = subprocess.run(
        [
            sys.executable,
            "-m",
            "dmp.cli.main",
            "audit",
            "verify",
            "--db",
            f"sqlite:///{db}",
            "--pki",
            str(own_pki.directory),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr


def _from(node: RunningNode, uri: str) -> list[AuditEvent]:
    """The events of `uri`'s calls about PATIENT or about no patient."""
    assert node.audit is not None
    logged = node.audit.events_for_patient(PATIENT, limit=10_000)
    events = [e.event for e in logged] + unattributed(node)
    return [e for e in events if e.active_participant_user_id == uri]


def test_an_event_without_repeats_is_encoded_as_before() -> None:
    event = AuditEvent(event_type="refused", event_date_time=5, status_code="UNAUTHENTICATED")
    assert b"repeat_count" not in event.canonical_bytes()
    counted = AuditEvent.from_dict({**event.to_dict(), "repeat_count": 7})
    assert counted.repeat_count == 7
    assert AuditEvent.from_json(counted.canonical_bytes()).repeat_count == 7


def test_the_patients_history_shows_how_many_calls_an_event_counts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dmp.printing import print_history
    from dmp.v1 import directory_service_pb2 as dpb

    counted = AuditEvent(
        event_type="refused", status_code="PERMISSION_DENIED", event_date_time=5, repeat_count=7
    )
    print_history(dpb.GetAccessHistoryResponse(events=[to_proto(counted)]))
    assert "refused x7" in capsys.readouterr().out
