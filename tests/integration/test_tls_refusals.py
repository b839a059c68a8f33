"""Nobody talks to a node without a valid federation certificate."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dmp.identity import Principal, Role
from dmp.pki import Credentials, Pki, load_credentials
from dmp.tls import channel_options, secure_channel
from node.app import RunningNode
from tests.federation import DOCTOR, running_node


@pytest.fixture(scope="module")
def own_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A PKI of this module's own: these tests revoke certificates."""
    pki = Pki.init(tmp_path_factory.mktemp("tls-pki"))
    pki.issue_node("11")
    pki.issue_practitioner(DOCTOR, "doctor", "Dr Claire MARTIN")
    return pki


@pytest.fixture
def node(own_pki: Pki, tmp_path: Path) -> Iterator[RunningNode]:
    with running_node(own_pki.directory, "11", f"sqlite:///{tmp_path / 'n.db'}") as running:
        yield running


def list_call(channel: grpc.Channel) -> health_pb2.HealthCheckResponse:
    """A call any federation certificate may make: the TLS layer and the CRL decide."""
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=5)


def call_code(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        list_call(channel)
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()
    return grpc.StatusCode.OK


def target(node: RunningNode) -> str:
    return f"127.0.0.1:{node.port}"


def test_valid_practitioner_is_served(own_pki: Pki, node: RunningNode) -> None:
    creds = load_credentials(own_pki.directory, f"practitioner-{DOCTOR}")
    assert call_code(secure_channel(target(node), creds)) == grpc.StatusCode.OK


def test_plaintext_is_refused(node: RunningNode) -> None:
    assert call_code(grpc.insecure_channel(target(node))) == grpc.StatusCode.UNAVAILABLE


def test_no_client_certificate_is_refused(own_pki: Pki, node: RunningNode) -> None:
    # TLS 1.3 refuses a missing certificate only after the handshake: exchange data.
    creds = grpc.ssl_channel_credentials(root_certificates=own_pki.ca_pem_path.read_bytes())
    channel = grpc.secure_channel(target(node), creds, options=channel_options())
    assert call_code(channel) == grpc.StatusCode.UNAVAILABLE


def test_certificate_from_another_ca_is_refused(
    own_pki: Pki, node: RunningNode, tmp_path: Path
) -> None:
    foreign = Pki.init(tmp_path / "foreign")
    foreign.issue_practitioner(DOCTOR, "doctor", "Dr Mallory")
    theirs = load_credentials(foreign.directory, f"practitioner-{DOCTOR}")
    creds = Credentials(
        ca_pem=own_pki.ca_pem_path.read_bytes(),
        cert_pem=theirs.cert_pem,
        key_pem=theirs.key_pem,
        principal=theirs.principal,
    )
    assert call_code(secure_channel(target(node), creds)) == grpc.StatusCode.UNAVAILABLE


def test_expired_certificate_is_refused(own_pki: Pki, node: RunningNode) -> None:
    now = datetime.now(UTC)
    expired = Principal(Role.PRACTITIONER, "10000000099", "Dr Old", "doctor")
    own_pki.issue(expired, not_before=now - timedelta(days=30), not_after=now - timedelta(days=1))
    creds = load_credentials(own_pki.directory, expired.identity)
    assert call_code(secure_channel(target(node), creds)) == grpc.StatusCode.UNAVAILABLE


def test_revoked_certificate_is_unauthenticated_even_after_crl_changes_while_running(
    own_pki: Pki, node: RunningNode
) -> None:
    someone = Principal(Role.PRACTITIONER, "10000000098", "Dr Soon Revoked", "doctor")
    own_pki.issue(someone)
    creds = load_credentials(own_pki.directory, someone.identity)
    channel = secure_channel(target(node), creds)
    list_call(channel)  # served before revocation, on a connection that stays open
    own_pki.revoke(someone.identity)
    deadline = time.monotonic() + 15  # the node re-reads the CRL on change, within a second
    code = grpc.StatusCode.OK
    while time.monotonic() < deadline:
        try:
            list_call(channel)
        except grpc.RpcError as exc:
            code = exc.code()
            break
        time.sleep(0.1)
    channel.close()
    assert code == grpc.StatusCode.UNAUTHENTICATED
    # And a new connection with it is refused the same way.
    assert call_code(secure_channel(target(node), creds)) == grpc.StatusCode.UNAUTHENTICATED
