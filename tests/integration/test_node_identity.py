"""Who answers at an announced address: the directory reaches region R only at a server
that holds the certificate of urn:dmp:node:R, whatever was announced or registered."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest

from dmp.assertion import sign_assertion
from dmp.discovery.consul import ConsulAnnouncer
from dmp.errors import FailedPrecondition
from dmp.pki import Pki, load_credentials
from dmp.tls import secure_channel
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import directory_service_pb2_grpc
from dmp.v1 import node_service_pb2 as npb
from node.app import NodeConfig, start_node
from tests.federation import (
    DOCTOR,
    PATIENT,
    READ_CONTENT,
    client,
    directory_stub,
    draft,
    running_directory,
    running_node,
    wait_for,
)

S = dpb.RegionState


def _put(pki_dir: Path, port: int, record_id: str) -> None:
    c = client(pki_dir, f"practitioner-{DOCTOR}", port)
    try:
        c.node.PutRecord(
            npb.PutRecordRequest(record=draft(record_id=record_id), content=b"x"), timeout=10
        )
    finally:
        c.close()


def _register_as(pki_dir: Path, identity: str, directory_port: int, address: str) -> None:
    creds = load_credentials(pki_dir, identity)
    channel = secure_channel(f"127.0.0.1:{directory_port}", creds)
    try:
        directory_service_pb2_grpc.DirectoryServiceStub(channel).RegisterNode(
            dpb.RegisterNodeRequest(address=address), timeout=10
        )
    finally:
        channel.close()


def _fetch(doctor: Any, region: str, record_id: str) -> bytes:
    chunks = doctor.FetchRecordContent(
        dpb.FetchRecordContentRequest(record_id=record_id, region=region),
        timeout=10,
        metadata=sign_assertion(
            doctor.signer, PATIENT, operation=READ_CONTENT, record_id=record_id
        ),
    )
    return b"".join(c.chunk for c in chunks)


def _located(directory: object, regions: set[str]) -> bool:
    return {f.region for f in directory.index.fragments(PATIENT)} == regions  # type: ignore[attr-defined]


def test_a_node_cannot_register_another_nodes_address(pki_dir: Path, tmp_path: Path) -> None:
    with ExitStack() as stack:
        directory = stack.enter_context(
            running_directory(pki_dir, f"sqlite:///{tmp_path / 'd.db'}", health_interval=0.2)
        )
        target = f"127.0.0.1:{directory.port}"
        nodes = {
            region: stack.enter_context(
                running_node(pki_dir, region, f"sqlite:///{tmp_path / f'n{region}.db'}",
                             directory=target)
            )
            for region in ("11", "84")
        }  # fmt: skip
        wait_for(
            lambda: (
                all(r.healthy for r in directory.discovery.routes().values())
                and len(directory.discovery.routes()) == 2
            ),
            "nodes 11 and 84 routed",
        )
        _put(pki_dir, nodes["11"].port, "own-11")
        _put(pki_dir, nodes["84"].port, "own-84")
        wait_for(lambda: _located(directory, {"11", "84"}), "both fragments located")

        # Node 11 announces node 84's address as its own.
        with pytest.raises(grpc.RpcError) as refused:
            _register_as(pki_dir, "node-11", directory.port, f"127.0.0.1:{nodes['84'].port}")
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        details = refused.value.details() or ""
        assert "urn:dmp:node:11" in details and "node-11.dmp.internal" in details
        assert directory.discovery.routes()["11"].address.endswith(f":{nodes['11'].port}")
        channel, doctor = directory_stub(pki_dir, f"practitioner-{DOCTOR}", directory.port)
        stack.callback(channel.close)
        with pytest.raises(grpc.RpcError) as absent:
            _fetch(doctor, "11", "own-84")  # asked of node 11 itself, which does not hold it
        assert absent.value.code() == grpc.StatusCode.NOT_FOUND

        page = doctor.GetConsolidatedView(
            dpb.GetConsolidatedViewRequest(patient_ins=PATIENT), timeout=10
        )
        assert {s.region: s.state for s in page.regions} == {
            "11": S.REGION_STATE_ANSWERED,
            "84": S.REGION_STATE_ANSWERED,
        }
        assert sorted((r.id, r.region) for r in page.records) == [
            ("own-11", "11"),
            ("own-84", "84"),
        ]


def test_an_address_answered_by_another_identity_or_nobody_is_not_registered(
    pki_dir: Path, tmp_path: Path
) -> None:
    from tests.fake_consul import free_port

    with running_directory(pki_dir, f"sqlite:///{tmp_path / 'd.db'}") as directory:
        # The directory's own address answers TLS, with the directory's certificate.
        with pytest.raises(grpc.RpcError) as refused:
            _register_as(pki_dir, "node-53", directory.port, f"127.0.0.1:{directory.port}")
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Nothing listens on a free port.
        with pytest.raises(grpc.RpcError) as unreachable:
            _register_as(pki_dir, "node-53", directory.port, f"127.0.0.1:{free_port()}")
        assert unreachable.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "does not answer" in (unreachable.value.details() or "")
        assert "53" not in directory.discovery.routes()


def test_consul_route_to_another_nodes_address_is_not_followed(
    pki_dir: Path, tmp_path: Path
) -> None:
    from tests.fake_consul import FakeConsul

    with ExitStack() as stack:
        consul = stack.enter_context(FakeConsul())
        directory = stack.enter_context(
            running_directory(pki_dir, f"sqlite:///{tmp_path / 'd.db'}", consul_url=consul.url)
        )
        target = f"127.0.0.1:{directory.port}"
        node84 = stack.enter_context(
            running_node(pki_dir, "84", f"sqlite:///{tmp_path / 'n84.db'}", directory=target,
                         consul_url=consul.url)
        )  # fmt: skip
        # Node 11 reports its fragment to the locator but is not in Consul: the only
        # dmp-node instance for region 11 is the one registered below, at node 84's address.
        with running_node(
            pki_dir, "11", f"sqlite:///{tmp_path / 'n11.db'}", directory=target
        ) as node11:
            _put(pki_dir, node11.port, "own-11")
            _put(pki_dir, node84.port, "own-84")
            wait_for(lambda: _located(directory, {"11", "84"}), "both fragments located")
        squatter = ConsulAnnouncer(consul.url, "11", f"127.0.0.1:{node84.port}")
        squatter.start()
        stack.callback(squatter.close)
        wait_for(lambda: set(directory.discovery.routes()) == {"11", "84"}, "Consul routes")

        channel, doctor = directory_stub(pki_dir, f"practitioner-{DOCTOR}", directory.port)
        stack.callback(channel.close)
        # Node 84's record, asked for as region 11's, is not served by node 84.
        with pytest.raises(grpc.RpcError) as refused:
            _fetch(doctor, "11", "own-84")
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "urn:dmp:node:11" in (refused.value.details() or "")
        assert _fetch(doctor, "84", "own-84") == b"x"
        page = doctor.GetConsolidatedView(
            dpb.GetConsolidatedViewRequest(patient_ins=PATIENT), timeout=10
        )
        states = {s.region: s.state for s in page.regions}
        assert states == {"11": S.REGION_STATE_UNAVAILABLE, "84": S.REGION_STATE_ANSWERED}
        message = {s.region: s.message for s in page.regions}["11"]
        assert "urn:dmp:node:11" in message
        assert [(r.id, r.region) for r in page.records] == [("own-84", "84")]


def test_a_node_certificate_without_its_region_name_is_refused_at_start(
    tmp_path: Path,
) -> None:
    pki = Pki.init(tmp_path / "pki")
    pki.issue_directory()
    # A certificate as issued before node certificates named their region.
    from dmp.identity import Principal, Role

    pki.issue(Principal(Role.NODE, "11"))
    config = NodeConfig(
        pki_dir=tmp_path / "pki", region="11", db_url=f"sqlite:///{tmp_path / 'n.db'}"
    )
    with pytest.raises(FailedPrecondition, match=r"node-11\.dmp\.internal.*dmp pki issue node"):
        start_node(config)
