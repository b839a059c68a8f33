"""The directory and three nodes over real mutual TLS: index, locator, consolidated view."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from directory.app import RunningDirectory
from dmp.assertion import sign_assertion
from dmp.ins import make_ins
from dmp.server import error_reason
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import directory_service_pb2_grpc, patient_pb2, record_pb2
from dmp.v1 import node_service_pb2 as npb
from node.app import RunningNode
from tests.federation import (
    DOCTOR,
    OTHER_PATIENT,
    PATIENT,
    READ_CONTENT,
    REGIONS,
    client,
    directory_stub,
    dmp_process,
    draft,
    identity_of,
    running_directory,
    running_node,
    wait_for,
    wait_listening,
)

S = dpb.RegionState


@dataclass
class Federation:
    pki_dir: Path
    directory: RunningDirectory
    nodes: dict[str, RunningNode]
    doctor: Any

    def put(
        self,
        region: str,
        record: record_pb2.Record,
        content: bytes = b"x",
        patient: patient_pb2.PatientIdentity | None = None,
    ) -> record_pb2.Record:
        c = client(self.pki_dir, f"practitioner-{DOCTOR}", self.nodes[region].port)
        request = npb.PutRecordRequest(record=record, content=content, patient=patient)
        try:
            return c.node.PutRecord(request, timeout=10).record
        finally:
            c.close()

    def wait_fragments(self, ins: str, counts: dict[str, int]) -> None:
        """Until the directory's locator holds these counts (people are not shown them)."""

        def known() -> bool:
            located = self.directory.index.fragments(ins)
            return {f.region: f.record_count for f in located} == counts

        wait_for(known, f"the directory to locate {counts} for {ins}")


@pytest.fixture
def federation(pki_dir: Path, db_factory: Callable[[str], str]) -> Iterator[Federation]:
    """A directory and three nodes, on SQLite files or on PostgreSQL databases."""
    with running_directory(pki_dir, db_factory("directory"), health_interval=0.2) as directory:
        nodes: dict[str, RunningNode] = {}
        stack = []
        try:
            for region in REGIONS:
                cm = running_node(
                    pki_dir,
                    region,
                    db_factory(f"node-{region}"),
                    directory=f"127.0.0.1:{directory.port}",
                )
                nodes[region] = cm.__enter__()
                stack.append(cm)
            channel, doctor = directory_stub(pki_dir, f"practitioner-{DOCTOR}", directory.port)
            wait_for(
                lambda: len([r for r in directory.discovery.routes().values() if r.healthy]) == 3,
                "3 nodes",
            )
            yield Federation(pki_dir, directory, nodes, doctor)
            channel.close()
        finally:
            for cm in reversed(stack):
                cm.__exit__(None, None, None)


def view_all(
    stub: directory_service_pb2_grpc.DirectoryServiceStub, request: dpb.GetConsolidatedViewRequest
) -> tuple[list[record_pb2.Record], list[dpb.GetConsolidatedViewResponse]]:
    records: list[record_pb2.Record] = []
    pages = []
    while True:
        page = stub.GetConsolidatedView(request, timeout=10)
        pages.append(page)
        records.extend(page.records)
        if not page.next_page_token:
            return records, pages
        request.page_token = page.next_page_token


def test_view_merges_regions_newest_first_and_pages_without_gap_or_repeat(
    federation: Federation,
) -> None:
    expected = []
    for i in range(21):
        region = REGIONS[i % 3]
        federation.put(
            region, draft(record_id=f"r{i:02d}", effective_s=1_000_000 + (i * 7919) % 5000)
        )
        expected.append((1_000_000 + (i * 7919) % 5000, f"r{i:02d}", region))
    federation.wait_fragments(PATIENT, {"11": 7, "53": 7, "84": 7})
    records, pages = view_all(
        federation.doctor, dpb.GetConsolidatedViewRequest(patient_ins=PATIENT, page_size=4)
    )
    expected.sort(reverse=True)
    assert [(r.effective_time.seconds, r.id, r.region) for r in records] == expected
    assert len(pages) == 6
    first = {s.region: s for s in pages[0].regions}
    assert set(first) == set(REGIONS)
    assert all(s.state == S.REGION_STATE_ANSWERED for s in first.values())
    assert sum(s.record_count for s in first.values()) == 4


def test_view_removes_duplicates_and_filters(federation: Federation) -> None:
    federation.put("11", draft(OTHER_PATIENT, record_id="dup", effective_s=500))
    federation.put("53", draft(OTHER_PATIENT, record_id="dup", effective_s=500))
    federation.put(
        "53",
        draft(
            OTHER_PATIENT,
            record_id="rx",
            effective_s=700,
            kind=record_pb2.RECORD_KIND_PRESCRIPTION,
            code="57833-6",
        ),
    )
    federation.put("84", draft(OTHER_PATIENT, record_id="lab", effective_s=900, code="11502-2"))
    federation.wait_fragments(OTHER_PATIENT, {"11": 1, "53": 2, "84": 1})
    everything, _ = view_all(
        federation.doctor, dpb.GetConsolidatedViewRequest(patient_ins=OTHER_PATIENT)
    )
    assert [r.id for r in everything] == ["lab", "rx", "dup"]
    kinds, _ = view_all(
        federation.doctor,
        dpb.GetConsolidatedViewRequest(
            patient_ins=OTHER_PATIENT, kinds=[record_pb2.RECORD_KIND_PRESCRIPTION]
        ),
    )
    assert [r.id for r in kinds] == ["rx"]
    types, _ = view_all(
        federation.doctor,
        dpb.GetConsolidatedViewRequest(patient_ins=OTHER_PATIENT, type_codes=["11502-2"]),
    )
    assert [r.id for r in types] == ["lab"]
    window = dpb.GetConsolidatedViewRequest(patient_ins=OTHER_PATIENT)
    window.since.seconds = 600
    window.until.seconds = 800
    dated, _ = view_all(federation.doctor, window)
    assert [r.id for r in dated] == ["rx"]


def test_view_refusals_and_bad_input(federation: Federation) -> None:
    federation.put("11", draft(record_id="p1"))
    federation.wait_fragments(PATIENT, {"11": 1})
    channel, other_patient = directory_stub(
        federation.pki_dir, f"patient-{OTHER_PATIENT}", federation.directory.port
    )
    for ins in (PATIENT, make_ins("1991299000123")):  # an existing patient and an unknown one
        with pytest.raises(grpc.RpcError) as err:
            other_patient.GetConsolidatedView(
                dpb.GetConsolidatedViewRequest(patient_ins=ins), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    channel.close()
    channel, patient = directory_stub(
        federation.pki_dir, f"patient-{PATIENT}", federation.directory.port
    )
    own, _ = view_all(patient, dpb.GetConsolidatedViewRequest(patient_ins=PATIENT))
    assert [r.id for r in own] == ["p1"]
    channel.close()
    for request in (
        dpb.GetConsolidatedViewRequest(patient_ins=PATIENT[:-1] + "0"),
        dpb.GetConsolidatedViewRequest(patient_ins=PATIENT, page_size=-1),
        dpb.GetConsolidatedViewRequest(patient_ins=PATIENT, page_token="garbage!"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            federation.doctor.GetConsolidatedView(request, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_content_through_the_directory(federation: Federation) -> None:
    stored = federation.put("84", draft(record_id="doc-84"), b"%PDF-1.4 body")
    chunks = list(
        federation.doctor.FetchRecordContent(
            dpb.FetchRecordContentRequest(record_id=stored.id, region="84"),
            timeout=10,
            metadata=sign_assertion(
                federation.doctor.signer,
                PATIENT,
                operation=READ_CONTENT,
                record_id=stored.id,
            ),
        )
    )
    assert b"".join(c.chunk for c in chunks) == b"%PDF-1.4 body"
    assert chunks[0].record.sha256 == stored.sha256
    with pytest.raises(grpc.RpcError) as err:
        list(
            federation.doctor.FetchRecordContent(
                dpb.FetchRecordContentRequest(record_id=stored.id, region="11"),
                timeout=10,
                metadata=sign_assertion(
                    federation.doctor.signer,
                    PATIENT,
                    operation=READ_CONTENT,
                    record_id=stored.id,
                ),
            )
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_identity_conflict_is_refused_and_kept_for_review(federation: Federation) -> None:
    ins = make_ins("1850599000111")
    created = federation.doctor.RegisterPatient(
        dpb.RegisterPatientRequest(patient=identity_of(ins)), timeout=5
    )
    assert created.created
    again = federation.doctor.RegisterPatient(
        dpb.RegisterPatientRequest(patient=identity_of(ins)), timeout=5
    )
    assert not again.created
    with pytest.raises(grpc.RpcError) as err:
        federation.doctor.RegisterPatient(
            dpb.RegisterPatientRequest(patient=identity_of(ins, family="MARTIN")), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err.value) == "IDENTITY_CONFLICT"
    # A node reporting contradicting traits is refused the same way: not routed, kept.
    federation.put(
        "53", draft(ins, record_id="conflicting"), patient=identity_of(ins, given=("PIERRE",))
    )
    channel, operator = directory_stub(federation.pki_dir, "directory", federation.directory.port)

    def two_conflicts() -> bool:
        return (
            len(
                operator.ListIdentityConflicts(
                    dpb.ListIdentityConflictsRequest(), timeout=5
                ).conflicts
            )
            == 2
        )

    wait_for(two_conflicts, "the node's conflicting report")
    conflicts = operator.ListIdentityConflicts(
        dpb.ListIdentityConflictsRequest(), timeout=5
    ).conflicts
    assert [c.proposed.birth_family_name for c in conflicts] == ["MARTIN", "DUPONT"]
    assert conflicts[1].reported_by == "urn:dmp:node:53"
    assert conflicts[0].stored.birth_family_name == "DUPONT"
    # Paged one at a time, through an opaque token, the same two in the same order.
    first = operator.ListIdentityConflicts(dpb.ListIdentityConflictsRequest(page_size=1), timeout=5)
    second = operator.ListIdentityConflicts(
        dpb.ListIdentityConflictsRequest(page_size=1, page_token=first.next_page_token), timeout=5
    )
    assert [c.proposed for c in (*first.conflicts, *second.conflicts)] == [
        c.proposed for c in conflicts
    ]
    assert first.next_page_token and not second.next_page_token
    with pytest.raises(grpc.RpcError) as bad_token:
        operator.ListIdentityConflicts(
            dpb.ListIdentityConflictsRequest(page_token="Mg=="), timeout=5
        )
    assert bad_token.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    patient = federation.doctor.GetPatient(dpb.GetPatientRequest(ins=ins), timeout=5)
    assert list(patient.fragments) == []
    with pytest.raises(grpc.RpcError) as denied:
        federation.doctor.ListIdentityConflicts(dpb.ListIdentityConflictsRequest(), timeout=5)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    channel.close()


def test_only_a_node_reports_and_only_for_its_region(federation: Federation) -> None:
    report = dpb.ReportFragmentsRequest(
        fragments=[dpb.FragmentReport(patient=identity_of(PATIENT), record_count=3)]
    )
    with pytest.raises(grpc.RpcError) as err:
        federation.doctor.ReportFragments(report, timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    channel, node53 = directory_stub(federation.pki_dir, "node-53", federation.directory.port)
    node53.ReportFragments(report, timeout=5)
    located = federation.directory.index.fragments(PATIENT)
    assert [(f.region, f.record_count) for f in located] == [("53", 3)]
    shown = federation.doctor.GetPatient(dpb.GetPatientRequest(ins=PATIENT), timeout=5)
    assert [(f.region, f.record_count) for f in shown.fragments] == [("53", 0)]  # no count
    channel.close()


def test_a_node_accepts_someone_elses_assertion_only_from_the_directory(
    federation: Federation,
) -> None:
    federation.put("11", draft(record_id="relay"))
    patient = client(federation.pki_dir, f"patient-{PATIENT}", federation.nodes["11"].port)
    doctor = client(federation.pki_dir, f"practitioner-{DOCTOR}", federation.nodes["11"].port)
    directory = client(federation.pki_dir, "directory", federation.nodes["11"].port)
    request = npb.ListRecordsRequest(patient_ins=PATIENT)
    with pytest.raises(grpc.RpcError) as err:
        doctor.node.ListRecords(request, metadata=patient.md(), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        directory.node.ListRecords(request, timeout=5)  # the directory alone reads nothing
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    relayed = directory.node.ListRecords(request, metadata=patient.md(), timeout=5)
    assert [r.id for r in relayed.records] == ["relay"]
    for c in (patient, doctor, directory):
        c.close()


def test_locator_outbox_survives_a_directory_restart(pki_dir: Path, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'directory.db'}"
    with running_directory(pki_dir, db) as directory:
        port = directory.port
    with running_node(
        pki_dir, "11", f"sqlite:///{tmp_path / 'n.db'}", directory=f"127.0.0.1:{port}"
    ) as node:
        c = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        for i in range(5):
            c.node.PutRecord(
                npb.PutRecordRequest(record=draft(record_id=f"o{i}"), content=b"x"), timeout=10
            )
        c.close()
        assert node.store.pending_notifications()[1]  # nothing delivered: directory down
        with running_directory(pki_dir, db, listen=f"127.0.0.1:{port}") as directory:

            def located() -> bool:
                known = directory.index.fragments(PATIENT)
                return [(f.region, f.record_count) for f in known] == [("11", 5)]

            wait_for(located, "the restarted directory to learn the outbox")


def _node_process(
    pki_dir: Path, region: str, tmp_path: Path, directory_port: int
) -> tuple[object, str]:
    process = dmp_process(
        "node", "serve", "--pki", str(pki_dir), "--region", region,
        "--db", f"sqlite:///{tmp_path / f'node-{region}.db'}",
        "--directory", f"127.0.0.1:{directory_port}",
    )  # fmt: skip
    return process, wait_listening(process)


def test_dead_and_hung_regions_are_flagged_while_others_answer(
    pki_dir: Path, tmp_path: Path
) -> None:
    # Health checks are slow here so that the hung node is met by the view's own deadline.
    with running_directory(
        pki_dir, f"sqlite:///{tmp_path / 'd.db'}", region_deadline=1.0, health_interval=3600
    ) as directory:
        processes = {r: _node_process(pki_dir, r, tmp_path, directory.port) for r in REGIONS}
        try:
            wait_for(lambda: len(directory.discovery.routes()) == 3, "3 announced nodes")
            for i, (_, address) in enumerate(processes.values()):
                port = int(address.rsplit(":", 1)[1])
                c = client(pki_dir, f"practitioner-{DOCTOR}", port)
                c.node.PutRecord(
                    npb.PutRecordRequest(
                        record=draft(record_id=f"k{i}", effective_s=i), content=b"x"
                    ),
                    timeout=10,
                )
                c.close()
            channel, doctor = directory_stub(pki_dir, f"practitioner-{DOCTOR}", directory.port)
            fed = Federation(pki_dir, directory, {}, doctor)
            fed.wait_fragments(PATIENT, {"11": 1, "53": 1, "84": 1})
            dead, hung = processes["53"][0], processes["84"][0]
            dead.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
            dead.wait()  # type: ignore[attr-defined]
            hung.send_signal(signal.SIGSTOP)  # type: ignore[attr-defined]
            page = doctor.GetConsolidatedView(
                dpb.GetConsolidatedViewRequest(patient_ins=PATIENT), timeout=10
            )
            states = {s.region: s.state for s in page.regions}
            assert states == {
                "11": S.REGION_STATE_ANSWERED,
                "53": S.REGION_STATE_UNAVAILABLE,
                "84": S.REGION_STATE_DEADLINE_EXCEEDED,
            }
            assert [r.id for r in page.records] == ["k0"]
            message = {s.region: s.message for s in page.regions}["84"]
            assert "did not answer" in message
            channel.close()
        finally:
            for process, _ in processes.values():
                process.send_signal(signal.SIGCONT)  # type: ignore[attr-defined]
                process.kill()  # type: ignore[attr-defined]
                process.communicate(timeout=10)  # type: ignore[attr-defined]


def test_embedded_discovery_notices_a_dead_node_and_its_return(
    pki_dir: Path, tmp_path: Path
) -> None:
    with running_directory(
        pki_dir, f"sqlite:///{tmp_path / 'd.db'}", health_interval=0.2
    ) as directory:
        process, _ = _node_process(pki_dir, "11", tmp_path, directory.port)
        try:
            wait_for(
                lambda: (
                    directory.discovery.routes().get("11")
                    and directory.discovery.routes()["11"].healthy
                ),
                "node 11 up",
            )
            process.kill()  # type: ignore[attr-defined]
            process.communicate(timeout=10)  # type: ignore[attr-defined]
            wait_for(lambda: not directory.discovery.routes()["11"].healthy, "node 11 marked down")
            channel, doctor = directory_stub(pki_dir, f"practitioner-{DOCTOR}", directory.port)
            nodes = doctor.ListNodes(dpb.ListNodesRequest(), timeout=5).nodes
            assert [(n.region, n.healthy) for n in nodes] == [("11", False)]
            process, _ = _node_process(pki_dir, "11", tmp_path, directory.port)
            wait_for(lambda: directory.discovery.routes()["11"].healthy, "node 11 back")
            assert [
                (n.region, n.healthy)
                for n in doctor.ListNodes(dpb.ListNodesRequest(), timeout=5).nodes
            ] == [("11", True)]
            channel.close()
        finally:
            process.kill()  # type: ignore[attr-defined]
            process.communicate(timeout=10)  # type: ignore[attr-defined]


def test_view_through_consul_discovery(pki_dir: Path, tmp_path: Path) -> None:
    from tests.fake_consul import FakeConsul

    with (
        FakeConsul() as consul,
        running_directory(
            pki_dir, f"sqlite:///{tmp_path / 'd.db'}", consul_url=consul.url
        ) as directory,
    ):
        nodes = []
        try:
            for region in ("11", "53"):
                cm = running_node(
                    pki_dir,
                    region,
                    f"sqlite:///{tmp_path / f'n{region}.db'}",
                    directory=f"127.0.0.1:{directory.port}",
                    consul_url=consul.url,
                )
                nodes.append((cm, cm.__enter__()))
            wait_for(lambda: set(directory.discovery.routes()) == {"11", "53"}, "Consul routes")
            for i, (_, node) in enumerate(nodes):
                c = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
                c.node.PutRecord(
                    npb.PutRecordRequest(
                        record=draft(record_id=f"c{i}", effective_s=i), content=b"x"
                    ),
                    timeout=10,
                )
                c.close()
            channel, doctor = directory_stub(pki_dir, f"practitioner-{DOCTOR}", directory.port)
            Federation(pki_dir, directory, {}, doctor).wait_fragments(PATIENT, {"11": 1, "53": 1})
            page = doctor.GetConsolidatedView(
                dpb.GetConsolidatedViewRequest(patient_ins=PATIENT), timeout=10
            )
            assert [r.id for r in page.records] == ["c1", "c0"]
            nodes[1][0].__exit__(None, None, None)  # deregisters from Consul on shutdown
            nodes.pop()
            wait_for(lambda: set(directory.discovery.routes()) == {"11"}, "node 53 withdrawn")
            page = doctor.GetConsolidatedView(
                dpb.GetConsolidatedViewRequest(patient_ins=PATIENT), timeout=10
            )
            assert {s.region: s.state for s in page.regions} == {
                "11": S.REGION_STATE_ANSWERED,
                "53": S.REGION_STATE_UNAVAILABLE,
            }
            channel.close()
        finally:
            for cm, _ in reversed(nodes):
                cm.__exit__(None, None, None)


def test_regions_that_just_answered_a_view_are_not_health_checked_that_round(
    pki_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A node's answer to the view proves it serves: the next round of health checks
    skips it and asks only the region the view did not call."""
    # No background rounds: the test runs them.
    with running_directory(
        pki_dir, f"sqlite:///{tmp_path / 'd.db'}", health_interval=3600
    ) as directory:
        assert directory.registry is not None
        with contextlib.ExitStack() as stack:
            nodes = {
                region: stack.enter_context(
                    running_node(
                        pki_dir,
                        region,
                        f"sqlite:///{tmp_path / f'n{region}.db'}",
                        directory=f"127.0.0.1:{directory.port}",
                    )
                )
                for region in REGIONS
            }
            wait_for(
                lambda: len([r for r in directory.discovery.routes().values() if r.healthy]) == 3,
                "3 nodes",
            )
            fed = Federation(pki_dir, directory, nodes, None)
            for region in REGIONS[:2]:
                fed.put(region, draft())
            fed.wait_fragments(PATIENT, {region: 1 for region in REGIONS[:2]})
            channel, doctor = directory_stub(pki_dir, f"practitioner-{DOCTOR}", directory.port)
            view = doctor.GetConsolidatedView(
                dpb.GetConsolidatedViewRequest(patient_ins=PATIENT), timeout=10
            )
            assert len(view.records) == 2
            caplog.set_level(logging.INFO, logger="dmp.rpc")
            caplog.clear()
            directory.registry.check_all()
            checks = [
                r
                for r in caplog.records
                if r.name == "dmp.rpc" and "/grpc.health.v1.Health/Check" in r.getMessage()
            ]
            assert len(checks) == 1  # the third region's only; the two that answered: none
            assert all(r.healthy for r in directory.discovery.routes().values())
            channel.close()
