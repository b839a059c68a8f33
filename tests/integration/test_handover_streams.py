"""A write stream (IngestRecords) open across the predecessor's freeze: what it sends is
stored and reaches the successor; a client that holds it open does not hold the freeze."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from dmp.client import NodeClient
from dmp.db import make_engine
from dmp.pki import load_credentials
from dmp.v1 import node_service_pb2 as npb
from node.app import NodeConfig, RunningNode, start_node
from node.handover_state import FREEZING, FROZEN, HANDED_OVER
from tests.federation import DOCTOR, PATIENT, draft, identity_of
from tests.handover_rig import REGION, Hosts, handover_cli, until
from tests.integration.test_handover_faults import _put, _receive, _state


def _put_request(record_id: str) -> npb.PutRecordRequest:
    return npb.PutRecordRequest(
        record=draft(record_id=record_id), content=record_id.encode(), patient=identity_of(PATIENT)
    )


@dataclass
class HeldStream:
    """An IngestRecords stream that sends one record, then waits for `go` to send the
    second and end."""

    address: str
    pki: Path
    go: threading.Event = field(default_factory=threading.Event)
    stored: list[int] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def _puts(self) -> Iterator[npb.PutRecordRequest]:
        yield _put_request("stream-1")
        self.go.wait(120)
        yield _put_request("stream-2")

    def _run(self) -> None:
        credentials = load_credentials(self.pki, f"practitioner-{DOCTOR}")
        with NodeClient(self.address, credentials) as client:
            try:
                self.stored.append(client.ingest(self._puts(), timeout=150).stored_count)
            except grpc.RpcError as exc:
                self.failed.append(f"{exc.code().name} {exc.details()}")

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="held-stream")
        thread.start()
        return thread


def _admitted(node: RunningNode) -> bool:
    """Whether a call is running past the node's gate."""
    return not node.server.gate.drain(timeout=0)


def _record_ids(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {str(r) for (r,) in conn.exec_driver_sql("SELECT id FROM records")}
    finally:
        engine.dispose()


def test_a_write_stream_open_across_the_freeze_reaches_the_successor(
    tmp_path: Path, db_url: str
) -> None:
    hosts = Hosts.make(tmp_path)
    b_url = f"sqlite:///{tmp_path / 'b.db'}"
    node = start_node(NodeConfig(pki_dir=hosts.a, region=REGION, db_url=db_url))
    try:
        a_addr = f"127.0.0.1:{node.port}"
        assert _put(a_addr, hosts.national, "before")
        assert handover_cli("start", hosts.a, db_url, "--to", str(hosts.b / "node-53.pem")) == 0
        stream = HeldStream(a_addr, hosts.national)
        sending = stream.start()
        until(lambda: _admitted(node), "the stream admitted")
        result: list[int] = []
        completing = threading.Thread(
            target=lambda: result.append(
                handover_cli("complete", hosts.a, db_url, "--wait", "120", "--now")
            )
        )
        completing.start()
        until(lambda: _state(db_url) == FREEZING, "the freeze requested")
        until(lambda: node.server.gate.closed is not None, "the gate closed")
        assert _put(a_addr, hosts.national, "refused-while-freezing") is False
        stream.go.set()  # the stream's second record, after the gate closed
        sending.join(timeout=60)
        assert stream.stored == [2] and not stream.failed
        until(lambda: _state(db_url) == FROZEN, "the freeze")
        _receive(hosts, b_url, a_addr)
        completing.join(timeout=60)
        assert result == [0]
    finally:
        node.stop(grace=None)
    assert _state(db_url) == HANDED_OVER
    assert {"before", "stream-1", "stream-2"} <= _record_ids(b_url)


def test_a_client_holding_a_write_stream_does_not_hold_the_freeze(tmp_path: Path) -> None:
    hosts = Hosts.make(tmp_path)
    a_url = f"sqlite:///{tmp_path / 'a.db'}"
    node = start_node(NodeConfig(pki_dir=hosts.a, region=REGION, db_url=a_url))
    stream = HeldStream(f"127.0.0.1:{node.port}", hosts.national)
    sending: threading.Thread | None = None
    try:
        assert handover_cli("start", hosts.a, a_url, "--to", str(hosts.b / "node-53.pem")) == 0
        sending = stream.start()
        until(lambda: _admitted(node), "the stream admitted")
        assert (
            handover_cli("complete", hosts.a, a_url, "--wait", "20", "--now") != 0
        )  # no successor
        assert _state(a_url) == FROZEN
    finally:
        stream.go.set()
        if sending is not None:
            sending.join(timeout=60)
        node.stop(grace=None)
