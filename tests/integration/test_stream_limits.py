"""Idle or slow streams from one peer never starve other callers' unary calls.

Each open stream holds a worker thread of a synchronous gRPC server; streams are admitted
within per-peer and total limits (the rest answered RESOURCE_EXHAUSTED), and people's
streams that wait on their peer too long are closed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dmp.pki import load_credentials
from dmp.tls import secure_channel
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import node_service_pb2 as npb
from dmp.v1 import node_service_pb2_grpc
from tests.federation import (
    DOCTOR,
    PATIENT,
    client,
    directory_stub,
    draft,
    running_directory,
    running_node,
    wait_for,
)

WATCH = health_pb2.HealthCheckRequest(service="")


class Flood:
    """Idle streams opened by one identity: health Watches that are never read past their
    first answer, and IngestRecords streams that never send a record."""

    def __init__(self, pki_dir: Path, identity: str, port: int) -> None:
        self.channel = secure_channel(f"127.0.0.1:{port}", load_credentials(pki_dir, identity))
        self.release = threading.Event()
        self.watches: list[Any] = []
        self.ingests: list[grpc.Future] = []

    def idle_requests(self) -> Iterator[npb.IngestRecordsRequest]:
        self.release.wait()
        return
        yield  # a generator that sends nothing until released

    def open(self, watches: int, ingests: int = 0) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        node = node_service_pb2_grpc.NodeServiceStub(self.channel)
        self.watches += [health.Watch(WATCH, timeout=120) for _ in range(watches)]
        self.ingests += [
            node.IngestRecords.future(self.idle_requests(), timeout=120) for _ in range(ingests)
        ]

    def settle(self, timeout: float = 20.0) -> list[grpc.StatusCode | None]:
        """Each Watch's outcome once the server has dealt with it: None when it answered
        (the stream is open, holding a thread), else its status."""

        def first(watch: Any) -> grpc.StatusCode | None:
            try:
                next(watch)
            except grpc.RpcError as exc:
                return exc.code()
            return None

        with futures.ThreadPoolExecutor(max_workers=64) as pool:
            outcomes = [pool.submit(first, w) for w in self.watches]
            done, _ = futures.wait(outcomes, timeout=timeout)
            return [o.result() for o in outcomes if o in done]

    def close(self) -> None:
        self.release.set()
        for watch in self.watches:
            watch.cancel()
        for ingest in self.ingests:
            ingest.cancel()
        self.channel.close()


def test_200_idle_streams_from_a_patient_leave_a_doctors_view_answering(
    pki_dir: Path, tmp_path: Path
) -> None:
    with running_directory(pki_dir, f"sqlite:///{tmp_path / 'directory.db'}") as directory:
        address = f"127.0.0.1:{directory.port}"
        with running_node(pki_dir, "11", f"sqlite:///{tmp_path / 'n.db'}", directory=address) as n:
            wait_for(
                lambda: (
                    directory.discovery.routes().get("11", None) is not None
                    and directory.discovery.routes()["11"].healthy
                ),
                "node 11 routed",
            )
            writer = client(pki_dir, f"practitioner-{DOCTOR}", n.port)
            writer.node.PutRecord(npb.PutRecordRequest(record=draft(), content=b"x"), timeout=10)
            writer.close()
            channel, doctor = directory_stub(pki_dir, f"practitioner-{DOCTOR}", directory.port)

            def located() -> bool:
                try:
                    return bool(doctor.GetPatient(dpb.GetPatientRequest(ins=PATIENT)).fragments)
                except grpc.RpcError:
                    return False  # not yet reported by the node

            wait_for(located, "the record located")
            at_node = Flood(pki_dir, f"patient-{PATIENT}", n.port)
            at_directory = Flood(pki_dir, f"patient-{PATIENT}", directory.port)
            try:
                at_node.open(watches=150, ingests=50)
                at_directory.open(watches=200)
                outcomes = at_node.settle() + at_directory.settle()
                view = doctor.GetConsolidatedView(
                    dpb.GetConsolidatedViewRequest(patient_ins=PATIENT), timeout=10
                )
                assert [(s.region, s.state) for s in view.regions] == [
                    ("11", dpb.REGION_STATE_ANSWERED)
                ]
                assert len(view.records) == 1
                # The streams beyond the patient's share were refused, saying why.
                refused = [o for o in outcomes if o is grpc.StatusCode.RESOURCE_EXHAUSTED]
                assert len(refused) >= 300
                with pytest.raises(grpc.RpcError) as err:
                    next(at_directory.watches[-1])
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "streams" in err.value.details()
                # The directory's own Watch on the node's channel and its health checks
                # were not refused: the node stays routed.
                assert directory.discovery.routes()["11"].healthy
            finally:
                at_node.close()
                at_directory.close()
            # Closed streams give their slots back: the patient may open one again.
            again = Flood(pki_dir, f"patient-{PATIENT}", n.port)
            try:
                wait_for(lambda: _opens(again), "a stream admitted again")
            finally:
                again.close()
            channel.close()


def _opens(flood: Flood) -> bool:
    flood.open(watches=1)
    return flood.settle()[-1:] == [None]


def test_a_peoples_idle_stream_is_closed_a_services_is_kept(pki_dir: Path, tmp_path: Path) -> None:
    with running_node(
        pki_dir, "11", f"sqlite:///{tmp_path / 'n.db'}", stream_idle_timeout=0.5
    ) as node:
        service = Flood(pki_dir, "directory", node.port)
        person = Flood(pki_dir, f"patient-{PATIENT}", node.port)
        try:
            service.open(watches=1)
            assert service.settle() == [None]
            person.open(watches=1, ingests=1)
            assert person.settle() == [None]
            with pytest.raises(grpc.RpcError) as err:
                next(person.watches[0])  # no status change: idle until the node closes it
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "idle" in err.value.details()
            ingest = person.ingests[0].exception(timeout=20)
            assert ingest is not None and ingest.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "idle" in ingest.details()
            # The service's Watch, opened first, is still open.
            assert service.watches[0].is_active()
        finally:
            service.close()
            person.close()


def test_unary_calls_holding_back_their_request_leave_a_doctor_served(
    pki_dir: Path, tmp_path: Path
) -> None:
    with running_node(pki_dir, "11", f"sqlite:///{tmp_path / 'n.db'}") as node:
        flood = Flood(pki_dir, f"patient-{PATIENT}", node.port)
        # A unary method called as a stream that never sends its one request message.
        held_back = flood.channel.stream_unary(
            "/dmp.v1.NodeService/ListRecords",
            request_serializer=npb.ListRecordsRequest.SerializeToString,
            response_deserializer=npb.ListRecordsResponse.FromString,
        )
        ended: list[grpc.Future] = []
        lock = threading.Lock()

        def done(call: grpc.Future) -> None:
            with lock:
                ended.append(call)

        calls = [held_back.future(flood.idle_requests(), timeout=120) for _ in range(200)]
        for call in calls:
            call.add_done_callback(done)
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        try:
            answer = doctor.node.ListRecords(
                npb.ListRecordsRequest(patient_ins=PATIENT), metadata=doctor.md(), timeout=10
            )
            assert len(answer.records) == 0
            # All but the patient's few were refused at once, saying why.
            wait_for(lambda: len(ended) >= 190, "the calls beyond the patient's share refused")
            with lock:
                errors = [call.exception() for call in ended]
            assert {e.code() for e in errors if e is not None} == {
                grpc.StatusCode.RESOURCE_EXHAUSTED
            }
            assert all("waiting for their request" in e.details() for e in errors if e)
        finally:
            doctor.close()
            flood.close()
