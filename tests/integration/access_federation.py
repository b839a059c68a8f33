"""Issue 4 §6: the access policy over real mutual TLS, a directory and four nodes.

What the test_access_policy_*.py modules share. Each module gets a federation of its own
(the `fed` fixture of conftest.py); each test works on patients of its own (distinct NIRs,
certificates issued in the federation's own PKI), so the tests do not interfere. Nodes
11, 53 and 84 run the default profession matrix; node 93 runs an operator's matrix without
physiotherapists and a clock the tests move (records hidden from the patient for 30 days).

Directives are changed the way `dmp patient ...` does it: `changed()` on the current set,
signed by the patient, sent with the patient's own certificate. A call through the
directory carries the new set to the nodes; a direct call to a node sees it within the
staleness bound (5 s), so direct checks poll with `wait_for` and never assert timings.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from directory.app import RunningDirectory
from dmp.assertion import Metadata, sign_assertion
from dmp.cli.patient import changed
from dmp.clock import now_us
from dmp.directives import PatientDirectives, from_proto, sign_directives
from dmp.identity import Principal, Role
from dmp.ins import make_ins
from dmp.pki import Pki, load_credentials
from dmp.signing import Signer
from dmp.tls import secure_channel
from dmp.v1 import access_pb2, directory_service_pb2_grpc, node_service_pb2_grpc, record_pb2
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import node_service_pb2 as npb
from node.access_matrix import DEFAULT_MATRIX_PATH
from node.app import RunningNode
from tests.access_rules import DENTIST, MIDWIFE, PHYSIO, TREATING
from tests.federation import (
    DOCTOR,
    LOOKUP,
    OTHER_DOCTOR,
    READ_CONTENT,
    READ_RECORD,
    REGIONS,
    VIEW,
    draft,
    make_pki,
    running_directory,
    running_node,
    wait_for,
)

S = dpb.RegionState
K = record_pb2
OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT

REVOKED = "10000000009"
EXPIRED = "10000000010"
#: Node 93 runs an operator's matrix (no physiotherapist) and the tests' clock.
SPECIAL = "93"
ALL_REGIONS = (*REGIONS, SPECIAL)
#: Enough for a node to notice a directive change made at the directory (bound: 5 s).
DIRECTIVES_WAIT = 15.0
REASON = "unconscious patient, admitted to the emergency room"

DOC = f"practitioner-{DOCTOR}"
OTHER = f"practitioner-{OTHER_DOCTOR}"
DIRECTORY = "directory"


def practitioner(rpps: str) -> str:
    return f"practitioner-{rpps}"


def patient_identity(ins: str) -> str:
    return f"patient-{ins}"


class MutableClock:
    """The node's clock: real time plus an offset the tests move."""

    def __init__(self) -> None:
        self.offset_us = 0

    def __call__(self) -> int:
        return now_us() + self.offset_us


# -- the federation -------------------------------------------------------------------------


@dataclass
class Fed:
    pki_dir: Path
    pki: Pki
    foreign: Signer
    directory: RunningDirectory
    nodes: dict[str, RunningNode]
    clock: MutableClock
    _channels: dict[tuple[str, int], grpc.Channel] = field(default_factory=dict)
    _signers: dict[str, Signer] = field(default_factory=dict)
    _patients: int = 0

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    # identities and stubs

    def new_patient(self, *, not_after: datetime | None = None) -> str:
        """A patient of the test's own, with a certificate in this module's PKI."""
        self._patients += 1
        ins = make_ins(f"1800175{self._patients:06d}")
        principal = Principal(Role.PATIENT, ins, name=f"Patient {self._patients}")
        self.pki.issue(principal, not_after=not_after)
        return ins

    def unknown_patient(self) -> str:
        """An INS nobody registered, wrote for or issued a certificate to."""
        self._patients += 1
        return make_ins(f"2800175{self._patients:06d}")

    def signer(self, identity: str) -> Signer:
        if identity not in self._signers:
            self._signers[identity] = Signer(load_credentials(self.pki_dir, identity))
        return self._signers[identity]

    def _channel(self, identity: str, port: int) -> grpc.Channel:
        key = (identity, port)
        if key not in self._channels:
            creds = load_credentials(self.pki_dir, identity)
            self._channels[key] = secure_channel(f"127.0.0.1:{port}", creds)
        return self._channels[key]

    def node(self, identity: str, region: str) -> node_service_pb2_grpc.NodeServiceStub:
        return node_service_pb2_grpc.NodeServiceStub(
            self._channel(identity, self.nodes[region].port)
        )

    def dir(self, identity: str) -> directory_service_pb2_grpc.DirectoryServiceStub:
        return directory_service_pb2_grpc.DirectoryServiceStub(
            self._channel(identity, self.directory.port)
        )

    def md(
        self,
        identity: str,
        ins: str,
        emergency: str | None = None,
        *,
        op: access_pb2.Operation.ValueType = VIEW,
        record_id: str = "",
    ) -> Metadata:
        """A fresh assertion signed by `identity` (CARE, SELF or EMERGENCY with a reason)
        for operation `op` (a view or list by default), on `record_id` for a record read."""
        if emergency is not None:
            return sign_assertion(
                self.signer(identity),
                ins,
                access_pb2.PURPOSE_EMERGENCY,
                emergency,
                operation=op,
                record_id=record_id,
            )
        return sign_assertion(self.signer(identity), ins, operation=op, record_id=record_id)

    # records

    def put(
        self,
        region: str,
        record: record_pb2.Record,
        author: str = DOC,
        content: bytes = b"content",
    ) -> record_pb2.Record:
        request = npb.PutRecordRequest(record=record, content=content)
        return self.node(author, region).PutRecord(request, timeout=10).record

    def wait_fragments(self, ins: str, counts: dict[str, int]) -> None:
        def located() -> bool:
            found = {f.region: f.record_count for f in self.directory.index.fragments(ins)}
            return found == counts

        wait_for(located, f"the directory to locate {counts} for {ins}")

    # reads

    def view(
        self, identity: str, ins: str, emergency: str | None = None, page_size: int = 1000
    ) -> dpb.GetConsolidatedViewResponse:
        request = dpb.GetConsolidatedViewRequest(patient_ins=ins, page_size=page_size)
        return self.dir(identity).GetConsolidatedView(
            request, metadata=self.md(identity, ins, emergency), timeout=10
        )

    def get_patient(
        self, identity: str, ins: str, emergency: str | None = None
    ) -> dpb.GetPatientResponse:
        return self.dir(identity).GetPatient(
            dpb.GetPatientRequest(ins=ins),
            metadata=self.md(identity, ins, emergency, op=LOOKUP),
            timeout=10,
        )

    def listed(
        self, identity: str, region: str, ins: str, emergency: str | None = None
    ) -> list[record_pb2.Record]:
        request = npb.ListRecordsRequest(patient_ins=ins, page_size=1000)
        return list(
            self.node(identity, region)
            .ListRecords(request, metadata=self.md(identity, ins, emergency), timeout=10)
            .records
        )

    def listed_ids(
        self, identity: str, region: str, ins: str, emergency: str | None = None
    ) -> set[str] | None:
        """The ids a direct ListRecords returns, or None when it is refused."""
        try:
            return {r.id for r in self.listed(identity, region, ins, emergency)}
        except grpc.RpcError:
            return None

    def get_record(self, identity: str, region: str, ins: str, record_id: str) -> None:
        self.node(identity, region).GetRecord(
            npb.GetRecordRequest(record_id=record_id),
            metadata=self.md(identity, ins, op=READ_RECORD, record_id=record_id),
            timeout=10,
        )

    def fetch(self, identity: str, ins: str, record: record_pb2.Record) -> bytes:
        chunks = self.dir(identity).FetchRecordContent(
            dpb.FetchRecordContentRequest(record_id=record.id, region=record.region),
            metadata=self.md(identity, ins, op=READ_CONTENT, record_id=record.id),
            timeout=10,
        )
        return b"".join(c.chunk for c in chunks)

    # directives, as `dmp patient ...` sets them

    def set_directives(self, ins: str, change: str, target: str = "") -> PatientDirectives:
        identity = patient_identity(ins)
        stub = self.dir(identity)
        answer = stub.GetDirectives(dpb.GetDirectivesRequest(patient_ins=ins), timeout=10)
        current = (
            from_proto(access_pb2.Directives.FromString(answer.directives.directives))
            if answer.HasField("directives")
            else PatientDirectives(ins)
        )
        new = changed(current, change, target)
        signed = sign_directives(self.signer(identity), new)
        stub.SetDirectives(dpb.SetDirectivesRequest(directives=signed), timeout=10)
        return new


@contextmanager
def running_access_federation(root: Path) -> Iterator[Fed]:
    """A directory and nodes 11, 53, 84 and 93 over their own PKI, under `root`."""
    pki_dir = root / "pki"
    pki = make_pki(pki_dir)
    pki.issue_node(SPECIAL)
    for rpps, profession, name in (
        (MIDWIFE, "midwife", "Anne SAGE"),
        (DENTIST, "dentist", "Dr Luc DENT"),
        (PHYSIO, "physiotherapist", "Eric KINE"),
        (TREATING, "doctor", "Dr Alice TRAITANT"),
        (REVOKED, "doctor", "Dr Rene REVOQUE"),
    ):
        pki.issue_practitioner(rpps, profession, name)
    now = datetime.now(UTC)
    pki.issue(
        Principal(Role.PRACTITIONER, EXPIRED, name="Dr Old EXPIRE", profession="doctor"),
        not_before=now - timedelta(days=400),
        not_after=now - timedelta(days=1),
    )
    # Another CA (same names as ours) issuing a certificate to our doctor's identity.
    foreign = Pki.init(root / "foreign")
    foreign.issue_practitioner(DOCTOR, "doctor", "Dr Claire MARTIN")
    matrix = json.loads(DEFAULT_MATRIX_PATH.read_text())
    del matrix["professions"]["physiotherapist"]
    matrix_path = root / "matrix-without-physiotherapists.json"
    matrix_path.write_text(json.dumps(matrix))
    clock = MutableClock()
    with ExitStack() as stack:
        directory = stack.enter_context(
            running_directory(pki_dir, f"sqlite:///{root / 'directory.db'}", health_interval=0.2)
        )
        nodes: dict[str, RunningNode] = {}
        for region in ALL_REGIONS:
            special: dict[str, Any] = (
                {"access_matrix": matrix_path, "clock": clock} if region == SPECIAL else {}
            )
            nodes[region] = stack.enter_context(
                running_node(
                    pki_dir,
                    region,
                    f"sqlite:///{root / f'node-{region}.db'}",
                    directory=f"127.0.0.1:{directory.port}",
                    **special,
                )
            )
        federation = Fed(
            pki_dir,
            pki,
            Signer(load_credentials(root / "foreign", practitioner(DOCTOR))),
            directory,
            nodes,
            clock,
        )
        stack.callback(federation.close)
        wait_for(
            lambda: len([r for r in directory.discovery.routes().values() if r.healthy]) == 4,
            "4 healthy nodes",
        )
        yield federation


# -- helpers --------------------------------------------------------------------------------


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return OK


def answer_of(call: Callable[[], object]) -> str:
    """The status and message of a call, for polling on the reason of a refusal."""
    try:
        call()
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return "OK"


def refusal(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def eventually(call: Callable[[], object], code: grpc.StatusCode, what: str) -> None:
    wait_for(lambda: code_of(call) == code, what, timeout=DIRECTIVES_WAIT)


def check_view(view: dpb.GetConsolidatedViewResponse, expected: set[str]) -> None:
    """Exactly the expected records; every region answered and counted only what it gave."""
    assert sorted(r.id for r in view.records) == sorted(expected)
    given = Counter(r.region for r in view.records)
    for status in view.regions:
        assert status.state == S.REGION_STATE_ANSWERED, status.message
        assert status.record_count == given[status.region], status.region


def record(
    ins: str,
    record_id: str,
    kind: record_pb2.RecordKind.ValueType = K.RECORD_KIND_DOCUMENT,
    code: str = "11488-4",
    title: str = "Compte rendu de consultation",
    *,
    hidden: bool = False,
) -> record_pb2.Record:
    r = draft(ins, kind=kind, code=code, title=title, record_id=record_id)
    r.hidden_from_patient = hidden
    return r


@dataclass(frozen=True)
class Target:
    ins: str
    doc: record_pb2.Record
    rx: record_pb2.Record


@contextmanager
def setup() -> Iterator[None]:
    """In an xfail test: a failure here is a real failure, not the expected one."""
    try:
        yield
    except (AssertionError, grpc.RpcError) as exc:
        pytest.fail(f"setup failed: {exc}")
