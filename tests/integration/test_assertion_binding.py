"""Issue 9 §5 and §11: an access assertion is single-use across restarts, allows one
operation (on one record, for a record read), and its checks tell a person what to fix.

Over real mutual TLS, on SQLite files and on PostgreSQL databases: the seen nonces live in
each service's database, so a restart forgets none of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import pytest

from directory.app import RunningDirectory
from dmp.assertion import ASSERTION_KEY, AUDIENCE, Metadata, sign_assertion
from dmp.clock import from_us, now_us
from dmp.errors import InvalidArgument
from dmp.pki import load_credentials
from dmp.signing import Signer
from dmp.v1 import access_pb2
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import node_service_pb2 as npb
from node.app import NodeConfig, RunningNode, start_node
from tests.federation import (
    ACCESS_HISTORY,
    DOCTOR,
    LOOKUP,
    PATIENT,
    READ_CONTENT,
    READ_RECORD,
    VIEW,
    Client,
    client,
    draft,
    identity_of,
    running_directory,
    running_node,
    wait_for,
)

DOC = f"practitioner-{DOCTOR}"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


def refusal(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    return err.value


def forge(
    signer: Signer,
    ins: str,
    *,
    issued_us: int | None = None,
    lifetime_us: int = 60_000_000,
    nonce: bytes | None = None,
    operation: int = VIEW,
    record_id: str = "",
) -> Metadata:
    """An assertion built by hand (a client of its own), signed by `signer`."""
    issued = now_us() if issued_us is None else issued_us
    assertion = access_pb2.AccessAssertion(
        subject=signer.principal.uri,
        patient_ins=ins,
        purpose=access_pb2.PURPOSE_CARE,
        issued_at=from_us(issued),
        expires_at=from_us(issued + lifetime_us),
        nonce=os.urandom(16) if nonce is None else nonce,
        audience=AUDIENCE,
        operation=operation,  # type: ignore[arg-type]
        record_id=record_id,
    )
    payload = assertion.SerializeToString()
    signed = access_pb2.SignedAssertion(
        assertion=payload, signature=signer.sign(payload), certificate=signer.certificate_der
    )
    return ((ASSERTION_KEY, signed.SerializeToString()),)


@dataclass
class Fed:
    pki_dir: Path
    db_factory: Callable[[str], str]
    directory: RunningDirectory
    node: RunningNode
    node_db: str

    def node_client(self, identity: str) -> Client:
        return client(self.pki_dir, identity, self.node.port)

    def directory_client(self, identity: str) -> Client:
        return client(self.pki_dir, identity, self.directory.port)

    def start_node(self) -> None:
        self.node = start_node(
            NodeConfig(
                pki_dir=self.pki_dir,
                region="11",
                db_url=self.node_db,
                directory=f"127.0.0.1:{self.directory.port}",
            )
        )

    def restart_node(self) -> None:
        """Stop node 11 and start it again on the same database."""
        self.node.stop(grace=None)
        self.start_node()


@pytest.fixture
def fed(pki_dir: Path, db_factory: Callable[[str], str]) -> Iterator[Fed]:
    """A directory and node 11, each on its own database (SQLite or PostgreSQL)."""
    node_db = db_factory("node-11")
    with running_directory(pki_dir, db_factory("directory"), health_interval=0.2) as directory:
        fed = Fed(pki_dir, db_factory, directory, None, node_db)  # type: ignore[arg-type]
        fed.start_node()
        try:
            wait_for(
                lambda: any(r.healthy for r in directory.discovery.routes().values()), "node 11"
            )
            yield fed
        finally:
            fed.node.stop(grace=None)


def _stored(fed: Fed) -> str:
    doctor = fed.node_client(DOC)
    try:
        stored = doctor.node.PutRecord(
            npb.PutRecordRequest(record=draft(), content=b"report"), timeout=10
        ).record
    finally:
        doctor.close()
    wait_for(lambda: bool(fed.directory.index.fragments(PATIENT)), "the locator")
    return stored.id


# -- single use, across restarts ------------------------------------------------------------


def test_an_assertion_used_before_a_node_restart_is_refused_after_it(
    pki_dir: Path, db_url: str
) -> None:
    with running_node(pki_dir, "11", db_url) as node:
        doctor = client(pki_dir, DOC, node.port)
        stored = doctor.node.PutRecord(
            npb.PutRecordRequest(record=draft(), content=b"x"), timeout=10
        ).record
        md = doctor.md()
        listed = doctor.node.ListRecords(
            npb.ListRecordsRequest(patient_ins=PATIENT), metadata=md, timeout=10
        )
        assert [r.id for r in listed.records] == [stored.id]
        doctor.close()
    with running_node(pki_dir, "11", db_url) as node:
        doctor = client(pki_dir, DOC, node.port)
        err = refusal(
            lambda: doctor.node.ListRecords(
                npb.ListRecordsRequest(patient_ins=PATIENT), metadata=md, timeout=10
            )
        )
        assert err.code() == UNAUTHENTICATED
        assert "already used" in (err.details() or "")
        doctor.close()


def test_an_assertion_used_before_a_directory_restart_is_refused_after_it(
    pki_dir: Path, db_factory: Callable[[str], str]
) -> None:
    database = db_factory("directory")
    with running_directory(pki_dir, database) as directory:
        doctor = client(pki_dir, DOC, directory.port)
        doctor.directory.RegisterPatient(
            dpb.RegisterPatientRequest(patient=identity_of(PATIENT)), timeout=10
        )
        md = doctor.md(op=LOOKUP)
        found = doctor.directory.GetPatient(
            dpb.GetPatientRequest(ins=PATIENT), metadata=md, timeout=10
        )
        assert found.patient.ins == PATIENT
        doctor.close()
    with running_directory(pki_dir, database) as directory:
        doctor = client(pki_dir, DOC, directory.port)
        err = refusal(
            lambda: doctor.directory.GetPatient(
                dpb.GetPatientRequest(ins=PATIENT), metadata=md, timeout=10
            )
        )
        assert err.code() == UNAUTHENTICATED
        assert "already used" in (err.details() or "")
        doctor.close()


# -- bound to one operation --------------------------------------------------------------------


def test_a_view_assertion_relayed_by_the_directory_is_never_a_content_read(fed: Fed) -> None:
    """The red team's replay: the directory's certificate presented a doctor's view
    assertion to a node as a content read, and the node's audit blamed the doctor."""
    record_id = _stored(fed)
    doctor = fed.directory_client(DOC)
    md = doctor.md()  # a view
    view = doctor.directory.GetConsolidatedView(
        dpb.GetConsolidatedViewRequest(patient_ins=PATIENT), metadata=md, timeout=10
    )
    assert [r.id for r in view.records] == [record_id]  # relayed to node 11's list: allowed
    unused = doctor.md()  # a view assertion the node never saw
    directory = fed.node_client("directory")
    content = npb.GetRecordContentRequest(record_id=record_id)
    for metadata in (unused, md):
        err = refusal(partial(directory.node.GetRecordContent, content, metadata=metadata))
        assert err.code() == PERMISSION_DENIED
        assert "allows a view of the record, not a read of one record's content" in (
            err.details() or ""
        )
        get = npb.GetRecordRequest(record_id=record_id)
        err = refusal(partial(directory.node.GetRecord, get, metadata=metadata, timeout=10))
        assert err.code() == PERMISSION_DENIED
    directory.close()
    # The same after a restart of the node, when a per-process memory would have forgotten.
    fed.restart_node()
    directory = fed.node_client("directory")
    err = refusal(lambda: directory.node.GetRecordContent(content, metadata=md))
    assert err.code() == PERMISSION_DENIED
    directory.close()
    # And no event of the node's audit says the doctor read anything of the record.
    assert fed.node.audit is not None
    events = [logged.event for logged in fed.node.audit.events_for_patient(PATIENT, limit=1000)]
    assert [e.event_type for e in events if e.event_type.startswith("read")] == []
    assert any(e.event_type == "view" for e in events)  # the relayed view is there
    doctor.close()


def test_a_record_read_allows_that_record_only(fed: Fed) -> None:
    record_id = _stored(fed)
    doctor = fed.directory_client(DOC)
    fetch = dpb.FetchRecordContentRequest(record_id=record_id, region="11")

    def fetched(metadata: Metadata) -> bytes:
        chunks = doctor.directory.FetchRecordContent(fetch, metadata=metadata, timeout=10)
        return b"".join(c.chunk for c in chunks)

    assert fetched(doctor.md(op=READ_CONTENT, record_id=record_id)) == b"report"
    wrong: dict[str, Metadata] = {
        "a view": doctor.md(),
        "another record": doctor.md(op=READ_CONTENT, record_id="some-other-record"),
        "a metadata read": doctor.md(op=READ_RECORD, record_id=record_id),
        "no operation": forge(doctor.signer, PATIENT, operation=0),
    }
    for name, metadata in wrong.items():
        err = refusal(partial(fetched, metadata))
        assert err.code() == PERMISSION_DENIED, name
        assert "sign" in (err.details() or ""), name
    node = fed.node_client(DOC)
    get = npb.GetRecordRequest(record_id=record_id)
    assert (
        node.node.GetRecord(
            get, metadata=node.md(op=READ_RECORD, record_id=record_id), timeout=10
        ).record.id
        == record_id
    )
    for metadata in (
        node.md(op=READ_RECORD, record_id="some-other-record"),
        node.md(op=READ_CONTENT, record_id=record_id),
        node.md(op=ACCESS_HISTORY),
    ):
        err = refusal(partial(node.node.GetRecord, get, metadata=metadata, timeout=10))
        assert err.code() == PERMISSION_DENIED
    err = refusal(
        lambda: node.node.ListRecords(
            npb.ListRecordsRequest(patient_ins=PATIENT),
            metadata=forge(node.signer, PATIENT, operation=0),
            timeout=10,
        )
    )
    assert err.code() == PERMISSION_DENIED
    assert "names no operation" in (err.details() or "")
    node.close()
    doctor.close()


def test_the_patients_history_needs_a_history_assertion(fed: Fed) -> None:
    _stored(fed)
    patient = fed.directory_client(f"patient-{PATIENT}")
    request = dpb.GetAccessHistoryRequest(patient_ins=PATIENT)
    answer = patient.directory.GetAccessHistory(
        request, metadata=patient.md(op=ACCESS_HISTORY), timeout=10
    )
    assert [(s.region, s.state) for s in answer.regions] == [("11", dpb.REGION_STATE_ANSWERED)]
    err = refusal(
        lambda: patient.directory.GetAccessHistory(request, metadata=patient.md(), timeout=10)
    )
    assert err.code() == PERMISSION_DENIED
    patient.close()


# -- what the checks say (§11) -----------------------------------------------------------------


def test_nonce_and_clock_refusals_say_what_to_fix(fed: Fed) -> None:
    _stored(fed)
    doctor = fed.node_client(DOC)
    request = npb.ListRecordsRequest(patient_ins=PATIENT)

    def listed(metadata: Metadata) -> object:
        return doctor.node.ListRecords(request, metadata=metadata, timeout=10)

    # A client whose clock is 2 minutes slow signs "now" 2 minutes in the past, for 60 s.
    slow = now_us() - 120_000_000
    listed(forge(doctor.signer, PATIENT, issued_us=slow))
    # Really expired: the message says to sign again, and to check the clock.
    err = refusal(lambda: listed(forge(doctor.signer, PATIENT, issued_us=now_us() - 600_000_000)))
    assert err.code() == UNAUTHENTICATED
    assert "expired" in (err.details() or "") and "check your clock" in (err.details() or "")
    # A 15-byte nonce is malformed, not "already used".
    err = refusal(lambda: listed(forge(doctor.signer, PATIENT, nonce=os.urandom(15))))
    assert err.code() == UNAUTHENTICATED
    assert "malformed" in (err.details() or "")
    assert "already used" not in (err.details() or "")
    doctor.close()


def test_the_signing_helper_needs_an_operation_and_its_record(pki_dir: Path) -> None:
    signer = Signer(load_credentials(pki_dir, DOC))
    with pytest.raises(InvalidArgument, match="operation"):
        sign_assertion(signer, PATIENT, operation=access_pb2.OPERATION_UNSPECIFIED)
    with pytest.raises(InvalidArgument, match="record_id"):
        sign_assertion(signer, PATIENT, operation=READ_CONTENT)
    with pytest.raises(InvalidArgument, match="record_id"):
        sign_assertion(signer, PATIENT, operation=VIEW, record_id="r1")
