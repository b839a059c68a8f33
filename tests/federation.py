"""Helpers for integration tests: a PKI made by our own code, nodes on port 0, clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import Engine, text

from directory.app import DirectoryConfig, RunningDirectory, start_directory
from dmp.assertion import Metadata
from dmp.client import Assertions, DirectoryClient, NodeClient
from dmp.db import make_engine
from dmp.ins import make_ins
from dmp.pki import Pki, load_credentials
from dmp.signing import Signer
from dmp.v1 import (
    access_pb2,
    directory_service_pb2_grpc,
    node_service_pb2_grpc,
    patient_pb2,
    record_pb2,
)
from node.app import NodeConfig, RunningNode, start_node

DOCTOR = "10000000001"
OTHER_DOCTOR = "10000000002"
PHARMACIST = "10000000003"
NURSE = "10000000004"
PATIENT = make_ins("1850275123456")
OTHER_PATIENT = make_ins("2920133012345")
REGIONS = ("11", "53", "84")

#: What an access assertion allows (AccessAssertion.operation).
VIEW = access_pb2.OPERATION_VIEW
LOOKUP = access_pb2.OPERATION_LOOKUP
READ_RECORD = access_pb2.OPERATION_READ_RECORD
READ_CONTENT = access_pb2.OPERATION_READ_CONTENT
ACCESS_HISTORY = access_pb2.OPERATION_ACCESS_HISTORY
#: The operation each RPC that reads patient data takes.
RPC_OPERATIONS = {
    "GetConsolidatedView": VIEW,
    "ListRecords": VIEW,
    "GetPatient": LOOKUP,
    "GetRecord": READ_RECORD,
    "GetRecordContent": READ_CONTENT,
    "FetchRecordContent": READ_CONTENT,
    "GetAccessHistory": ACCESS_HISTORY,
    "ListAccessEvents": ACCESS_HISTORY,
}


def make_pki(directory: Path) -> Pki:
    """A PKI with the directory, three nodes, professionals and two patients."""
    pki = Pki.init(directory)
    for region in REGIONS:
        pki.issue_node(region)
    pki.issue_directory()
    pki.issue_practitioner(DOCTOR, "doctor", "Dr Claire MARTIN")
    pki.issue_practitioner(OTHER_DOCTOR, "doctor", "Dr Paul DURAND")
    pki.issue_practitioner(PHARMACIST, "pharmacist", "Julie PETIT")
    pki.issue_practitioner(NURSE, "nurse", "Marc ROBERT")
    pki.issue_patient(PATIENT, "Jean DUPONT")
    pki.issue_patient(OTHER_PATIENT, "Marie LEROY")
    return pki


@contextmanager
def running_node(
    pki_dir: Path, region: str, db_url: str, **kwargs: object
) -> Iterator[RunningNode]:
    node = start_node(NodeConfig(pki_dir=pki_dir, region=region, db_url=db_url, **kwargs))  # type: ignore[arg-type]
    try:
        yield node
    finally:
        node.stop(grace=None)


@dataclass
class Client:
    channel: grpc.Channel
    node: node_service_pb2_grpc.NodeServiceStub
    directory: directory_service_pb2_grpc.DirectoryServiceStub
    signer: Signer

    def md(
        self,
        ins: str = PATIENT,
        reason: str = "",
        purpose: int | None = None,
        *,
        op: int = VIEW,
        record_id: str = "",
    ) -> Metadata:
        """A fresh access assertion for one call about patient `ins`: operation `op` (a
        list or view by default), on `record_id` for a record read."""
        return Assertions(self.signer).sign(
            ins,
            operation=op,  # type: ignore[arg-type]
            record_id=record_id,
            purpose=purpose,  # type: ignore[arg-type]
            reason=reason,
        )

    def close(self) -> None:
        self.channel.close()


def client(pki_dir: Path, identity: str, port: int) -> Client:
    """Raw stubs over the typed client's channel, for tests that shape their own calls."""
    directory = DirectoryClient(f"127.0.0.1:{port}", load_credentials(pki_dir, identity))
    node = NodeClient("", directory.credentials, channel=directory.channel, signer=directory.signer)
    return Client(directory.channel, node.stub, directory.stub, directory.signer)


def draft(
    patient: str = PATIENT,
    *,
    kind: int = record_pb2.RECORD_KIND_DOCUMENT,
    code: str = "11488-4",
    title: str = "Compte rendu de consultation",
    effective_s: int | None = None,
    record_id: str = "",
) -> record_pb2.Record:
    record = record_pb2.Record(
        id=record_id,
        patient_ins=patient,
        kind=kind,  # type: ignore[arg-type]
        type_code=record_pb2.Coding(code=code, display="Consultation note"),
        title=title,
        organization="CHU de Rennes",
        content_type="text/plain",
    )
    if effective_s is not None:
        record.effective_time.seconds = effective_s
    return record


def dmp_process(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start `dmp ARGS` as its own process (servers never fork from a gRPC process)."""
    return subprocess.Popen(
        [sys.executable, "-m", "dmp.cli.main", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def wait_listening(process: subprocess.Popen[str]) -> str:
    """Read the process's 'listening on HOST:PORT' line; return HOST:PORT."""
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on" not in line:
        _, err = process.communicate(timeout=10)
        raise AssertionError(f"server did not start: {line!r} {err}")
    return line.rsplit(" ", 1)[1].strip()


def wait_for(condition: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    """Poll until condition() is truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def running_directory(pki_dir: Path, db_url: str, **kwargs: object) -> Iterator[RunningDirectory]:
    directory = start_directory(DirectoryConfig(pki_dir=pki_dir, db_url=db_url, **kwargs))  # type: ignore[arg-type]
    try:
        yield directory
    finally:
        directory.stop(grace=None)


class AutoSign:
    """A stub whose calls carry a fresh access assertion for the request's patient (its
    patient_ins or ins field) and the call's operation (RPC_OPERATIONS), unless the call
    passes its own metadata."""

    def __init__(self, stub: object, signer: Signer) -> None:
        self._stub = stub
        self.signer = signer
        self._assertions = Assertions(signer)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._stub, name)

        def call(request: Any, **kwargs: Any) -> Any:
            if "metadata" not in kwargs:
                ins = getattr(request, "patient_ins", "") or getattr(request, "ins", "")
                operation = RPC_OPERATIONS.get(name)
                if ins and operation is not None:
                    record_id = getattr(request, "record_id", "")
                    kwargs["metadata"] = self._assertions.sign(
                        ins, operation=operation, record_id=record_id
                    )
            return method(request, **kwargs)

        return call


def directory_stub(pki_dir: Path, identity: str, port: int) -> tuple[grpc.Channel, Any]:
    """A channel to the directory and a stub that signs assertions as `identity`."""
    directory = DirectoryClient(f"127.0.0.1:{port}", load_credentials(pki_dir, identity))
    return directory.channel, AutoSign(directory.stub, directory.signer)


def identity_of(
    ins: str, family: str = "DUPONT", given: tuple[str, ...] = ("JEAN",)
) -> patient_pb2.PatientIdentity:
    return patient_pb2.PatientIdentity(
        ins=ins,
        birth_family_name=family,
        given_names=list(given),
        birth_date="1985-02-14",
        sex=patient_pb2.SEX_MALE,
        birthplace_code="75112",
    )


def logged_events_of(engine: Engine) -> list[dict[str, object]]:
    """Every audit event of a service's database, as stored, oldest first."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT event_json FROM audit_events ORDER BY seq")).scalars()
        return [json.loads(row) for row in rows]


def logged_events(db_url: str) -> list[dict[str, object]]:
    """logged_events_of a database by its URL (an engine opened and closed for it)."""
    engine = make_engine(db_url)
    try:
        return logged_events_of(engine)
    finally:
        engine.dispose()
