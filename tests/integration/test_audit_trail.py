"""Every access to patient data leaves a trace where it happened, and the patient reads
them all in one place."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from directory.app import RunningDirectory
from dmp.assertion import sign_assertion
from dmp.audit.events import AuditEvent
from dmp.v1 import access_pb2, record_pb2
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import node_service_pb2 as npb
from node.app import RunningNode
from tests.federation import (
    ACCESS_HISTORY,
    DOCTOR,
    OTHER_DOCTOR,
    PATIENT,
    READ_CONTENT,
    READ_RECORD,
    REGIONS,
    VIEW,
    client,
    directory_stub,
    draft,
    running_directory,
    running_node,
    wait_for,
)


@dataclass
class Trail:
    pki_dir: Path
    tmp: Path
    directory: RunningDirectory
    nodes: dict[str, RunningNode]
    doctor: Any

    def events(self, service: RunningDirectory | RunningNode) -> list[AuditEvent]:
        assert service.audit is not None
        return [e.event for e in service.audit.events_for_patient(PATIENT, limit=10_000)]

    def put(self, region: str, record_id: str, effective_s: int) -> record_pb2.Record:
        c = client(self.pki_dir, f"practitioner-{DOCTOR}", self.nodes[region].port)
        try:
            request = npb.PutRecordRequest(
                record=draft(record_id=record_id, effective_s=effective_s), content=b"x"
            )
            return c.node.PutRecord(request, timeout=10).record
        finally:
            c.close()


@pytest.fixture
def trail(pki_dir: Path, tmp_path: Path) -> Iterator[Trail]:
    with running_directory(pki_dir, f"sqlite:///{tmp_path / 'directory.db'}") as directory:
        nodes = {}
        stack = []
        try:
            for region in REGIONS:
                cm = running_node(
                    pki_dir,
                    region,
                    f"sqlite:///{tmp_path / f'node-{region}.db'}",
                    directory=f"127.0.0.1:{directory.port}",
                )
                nodes[region] = cm.__enter__()
                stack.append(cm)
            channel, doctor = directory_stub(pki_dir, f"practitioner-{DOCTOR}", directory.port)
            wait_for(lambda: all(r.healthy for r in directory.discovery.routes().values())
                     and len(directory.discovery.routes()) == 3, "3 nodes")  # fmt: skip
            t = Trail(pki_dir, tmp_path, directory, nodes, doctor)
            for i, region in enumerate(REGIONS):
                t.put(region, f"a{i}", 1000 + i)

            def located() -> bool:
                try:
                    answer = doctor.GetPatient(dpb.GetPatientRequest(ins=PATIENT), timeout=5)
                except grpc.RpcError:
                    return False
                return len(answer.fragments) == 3

            wait_for(located, "fragments located")
            yield t
            channel.close()
        finally:
            for cm in reversed(stack):
                cm.__exit__(None, None, None)


def test_each_call_leaves_exactly_its_events_with_one_request_id_per_view(trail: Trail) -> None:
    before = {r: len(trail.events(n)) for r, n in trail.nodes.items()}
    directory_before = Counter(e.event_type for e in trail.events(trail.directory))
    views = 3
    for _ in range(views):
        trail.doctor.GetConsolidatedView(
            dpb.GetConsolidatedViewRequest(patient_ins=PATIENT), timeout=10
        )
    refusals = 2
    channel, other = directory_stub(
        trail.pki_dir, f"practitioner-{OTHER_DOCTOR}", trail.directory.port
    )
    for _ in range(refusals):
        with pytest.raises(grpc.RpcError):  # no assertion
            other.GetConsolidatedView(
                dpb.GetConsolidatedViewRequest(patient_ins=PATIENT), metadata=(), timeout=10
            )
    channel.close()
    directory_events = Counter(e.event_type for e in trail.events(trail.directory))
    assert directory_events["view"] - directory_before["view"] == views
    refused = [e for e in trail.events(trail.directory) if e.event_type == "refused"]
    assert len(refused) == refusals
    assert {e.status_code for e in refused} == {"UNAUTHENTICATED"}
    assert {e.active_participant_user_id for e in refused} == {
        f"urn:dmp:practitioner:{OTHER_DOCTOR}"
    }
    view_ids = [e.request_id for e in trail.events(trail.directory) if e.event_type == "view"][
        -views:
    ]
    for region, node in trail.nodes.items():
        events = trail.events(node)
        assert len(events) - before[region] == views
        new = events[:views]  # newest first
        assert {e.event_type for e in new} == {"view"}
        assert {e.request_id for e in new} == set(view_ids)
        assert {e.relaying_participant for e in new} == {"urn:dmp:directory"}
        assert {e.active_participant_user_id for e in new} == {f"urn:dmp:practitioner:{DOCTOR}"}
        assert {e.purpose_of_use for e in new} == {"CARE"}
        assert all(e.audit_source_region == region for e in new)


def test_direct_reads_writes_and_refusals_at_a_node(trail: Trail) -> None:
    node = trail.nodes["11"]
    doctor = client(trail.pki_dir, f"practitioner-{DOCTOR}", node.port)
    other = client(trail.pki_dir, f"practitioner-{OTHER_DOCTOR}", node.port)
    before = Counter(e.event_type for e in trail.events(node))
    doctor.node.GetRecord(
        npb.GetRecordRequest(record_id="a0"),
        metadata=doctor.md(op=READ_RECORD, record_id="a0"),
        timeout=5,
    )
    list(
        doctor.node.GetRecordContent(
            npb.GetRecordContentRequest(record_id="a0"),
            metadata=doctor.md(op=READ_CONTENT, record_id="a0"),
            timeout=5,
        )
    )
    trail.put("11", "a-new", 5000)
    with pytest.raises(grpc.RpcError):
        other.node.GetRecord(npb.GetRecordRequest(record_id="a0"), timeout=5)  # no assertion
    with pytest.raises(grpc.RpcError):
        doctor.node.GetRecord(
            npb.GetRecordRequest(record_id="nope"),
            metadata=doctor.md(op=READ_RECORD, record_id="nope"),
            timeout=5,
        )
    after = Counter(e.event_type for e in trail.events(node))
    assert after - before == Counter({"read-record": 2, "read-content": 1, "write": 1})
    # The refusal without an assertion has no patient: it is in the log all the same.
    assert node.audit is not None
    refused = [e.event for e in node.audit.events_for_patient("", limit=100)]
    assert [(e.event_type, e.status_code) for e in refused] == [("refused", "UNAUTHENTICATED")]
    not_found = [e for e in trail.events(node) if e.status_code == "NOT_FOUND"]
    assert len(not_found) == 1 and not_found[0].participant_object_record_ids == ("nope",)
    write = next(
        e
        for e in trail.events(node)
        if e.event_type == "write" and "a-new" in e.participant_object_record_ids
    )
    assert write.active_participant_user_id == f"urn:dmp:practitioner:{DOCTOR}"
    doctor.close()
    other.close()


def test_patient_history_gathers_every_region_and_flags_emergencies(trail: Trail) -> None:
    trail.doctor.GetConsolidatedView(
        dpb.GetConsolidatedViewRequest(patient_ins=PATIENT), timeout=10
    )
    channel, other = directory_stub(
        trail.pki_dir, f"practitioner-{OTHER_DOCTOR}", trail.directory.port
    )
    reason = "unconscious at the emergency department"
    other.GetConsolidatedView(
        dpb.GetConsolidatedViewRequest(patient_ins=PATIENT),
        metadata=sign_assertion(
            other.signer, PATIENT, access_pb2.PURPOSE_EMERGENCY, reason, operation=VIEW
        ),
        timeout=10,
    )
    with pytest.raises(grpc.RpcError) as err:
        other.GetAccessHistory(dpb.GetAccessHistoryRequest(patient_ins=PATIENT), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    channel.close()
    channel, patient = directory_stub(trail.pki_dir, f"patient-{PATIENT}", trail.directory.port)
    history = patient.GetAccessHistory(dpb.GetAccessHistoryRequest(patient_ins=PATIENT), timeout=10)
    assert {s.region: s.state for s in history.regions} == dict.fromkeys(
        REGIONS, dpb.REGION_STATE_ANSWERED
    )
    views = [e for e in history.events if e.event_type == "view"]
    emergency = [e for e in views if e.purpose_of_use == "EMERGENCY"]
    assert {e.audit_source_region for e in emergency} == {"", *REGIONS}
    assert {e.emergency_reason for e in emergency} == {reason}
    assert {e.active_participant_user_id for e in emergency} == {
        f"urn:dmp:practitioner:{OTHER_DOCTOR}"
    }
    care = [e for e in views if e.purpose_of_use == "CARE"]
    assert {e.audit_source_region for e in care} == {"", *REGIONS}
    times = [e.event_date_time.ToMicroseconds() for e in history.events]
    assert times == sorted(times, reverse=True)
    # The refused history request by the professional is in the patient's history too.
    assert any(
        e.event_type == "refused" and e.active_participant_user_id.endswith(OTHER_DOCTOR)
        for e in history.events
    )
    own = patient.GetAccessHistory(dpb.GetAccessHistoryRequest(patient_ins=PATIENT), timeout=10)
    assert any(e.active_participant_user_id == f"urn:dmp:patient:{PATIENT}" for e in own.events)
    without = patient.GetAccessHistory(
        dpb.GetAccessHistoryRequest(patient_ins=PATIENT, exclude_own=True), timeout=10
    )
    assert all(e.active_participant_user_id != f"urn:dmp:patient:{PATIENT}" for e in without.events)
    channel.close()
    node = client(trail.pki_dir, f"practitioner-{DOCTOR}", trail.nodes["53"].port)
    with pytest.raises(grpc.RpcError) as err:
        node.node.ListAccessEvents(
            npb.ListAccessEventsRequest(patient_ins=PATIENT),
            metadata=node.md(op=ACCESS_HISTORY),
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    node.close()


def test_no_data_without_its_trace(trail: Trail) -> None:
    db = trail.tmp / "node-84.db"
    with sqlite3.connect(db) as connection:
        connection.execute("ALTER TABLE audit_events RENAME TO audit_events_gone")
    doctor = client(trail.pki_dir, f"practitioner-{DOCTOR}", trail.nodes["84"].port)
    with pytest.raises(grpc.RpcError) as err:
        doctor.node.ListRecords(
            npb.ListRecordsRequest(patient_ins=PATIENT), metadata=doctor.md(), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "audit" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        doctor.node.PutRecord(
            npb.PutRecordRequest(record=draft(record_id="untraced"), content=b"x"), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with sqlite3.connect(db) as connection:
        connection.execute("ALTER TABLE audit_events_gone RENAME TO audit_events")
        assert connection.execute(
            "SELECT count(*) FROM records WHERE id = 'untraced'"
        ).fetchone() == (0,)
    # Through the directory the region's failure is reported, the others answer.
    page = trail.doctor.GetConsolidatedView(
        dpb.GetConsolidatedViewRequest(patient_ins=PATIENT), timeout=10
    )
    assert {s.region for s in page.regions if s.state == dpb.REGION_STATE_ANSWERED} == set(REGIONS)
    doctor.close()


def test_editing_one_row_with_sqlite3_is_named_by_dmp_audit_verify(
    pki_dir: Path, tmp_path: Path
) -> None:
    db = tmp_path / "node.db"
    with running_node(pki_dir, "11", f"sqlite:///{db}") as node:
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        for i in range(5):
            doctor.node.PutRecord(
                npb.PutRecordRequest(record=draft(record_id=f"v{i}"), content=b"x"), timeout=5
            )
            doctor.node.ListRecords(
                npb.ListRecordsRequest(patient_ins=PATIENT), metadata=doctor.md(), timeout=5
            )
        doctor.close()
    # The node signed a last checkpoint at shutdown.
    verify = [
        sys.executable,
        "-m",
        "dmp.cli.main",
        "audit",
        "verify",
        "--db",
        f"sqlite:///{db}",
        "--pki",
        str(pki_dir),
    ]
    ok = subprocess.run(verify, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    edit = "UPDATE audit_events SET event_json = replace(event_json, 'CARE', 'SELF') WHERE seq = 4"
    subprocess.run(["sqlite3", str(db), edit], check=True, timeout=30)
    bad = subprocess.run(verify, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "4" in bad.stdout and "changed" in bad.stdout.lower(), bad.stdout


def test_concurrent_records_share_commits_and_keep_the_log_whole(
    pki_dir: Path, tmp_path: Path
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from dmp.audit.log import AuditLog
    from dmp.audit.verify import verify_log
    from dmp.db import make_engine, upgrade
    from dmp.pki import load_credentials
    from node.app import MIGRATIONS
    from node.models import audit_checkpoints, audit_events

    engine = make_engine(f"sqlite:///{tmp_path / 'n.db'}")
    upgrade(engine, MIGRATIONS, "alembic_version_node")
    signer = load_credentials(pki_dir, "node-11")
    log = AuditLog(
        engine,
        audit_events,
        audit_checkpoints,
        source_id=signer.principal.uri,
        region="11",
        signer=signer,
    )

    def read(i: int) -> int:
        return log.record(
            AuditEvent(event_type="view", participant_object_patient_ins=PATIENT, detail=str(i))
        )

    with ThreadPoolExecutor(max_workers=16) as pool:
        seqs = list(pool.map(read, range(400)))
    assert sorted(seqs) == list(range(1, 401))
    assert log.checkpoint() is not None
    report = verify_log(engine, audit_events, audit_checkpoints, (pki_dir / "ca.pem").read_bytes())
    assert report.ok and report.events == 400
    details = {e.event.detail for e in log.events_for_patient(PATIENT, limit=1000)}
    assert details == {str(i) for i in range(400)}
    engine.dispose()
