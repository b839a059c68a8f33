"""The federation's typed client: the directory and the nodes as a person's program sees them.

A client opens the federation's mutual-TLS channel with the credentials of the person (or
service) it acts for, signs a fresh access assertion for each call that reads a patient's
data (one operation per assertion, dmp/assertion.py), and returns domain values. The CLI,
the demo, the benchmark and the tests' helpers all reach the services through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, ClassVar, Self, TypeAlias

import grpc

from dmp.assertion import Metadata, sign_assertion
from dmp.directives import PatientDirectives, from_proto, sign_directives
from dmp.errors import DmpError
from dmp.identity import Role
from dmp.pki import Credentials
from dmp.signing import Signer
from dmp.tls import secure_channel
from dmp.v1 import (
    access_pb2,
    directory_service_pb2_grpc,
    node_service_pb2_grpc,
    patient_pb2,
    record_pb2,
)
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import node_service_pb2 as npb

Operation: TypeAlias = access_pb2.Operation.ValueType
VIEW = access_pb2.OPERATION_VIEW
LOOKUP = access_pb2.OPERATION_LOOKUP
READ_RECORD = access_pb2.OPERATION_READ_RECORD
READ_CONTENT = access_pb2.OPERATION_READ_CONTENT
ACCESS_HISTORY = access_pb2.OPERATION_ACCESS_HISTORY


#: An ingest message carries up to this many records, or this many bytes of them (a
#: record larger than that goes alone): several records a message spare the stream's
#: per-message cost, and a message stays far below the channel's size limit.
INGEST_MESSAGE_RECORDS = 200
INGEST_MESSAGE_BYTES = 1024 * 1024


def ingest_messages(
    puts: Iterable[npb.PutRecordRequest],
    *,
    records: int = INGEST_MESSAGE_RECORDS,
    size: int = INGEST_MESSAGE_BYTES,
) -> Iterator[npb.IngestRecordsRequest]:
    """The messages of an IngestRecords stream carrying `puts`, in order, several a
    message (`IngestRecordsRequest.puts`)."""
    batch: list[npb.PutRecordRequest] = []
    used = 0
    for put in puts:
        length = put.ByteSize()
        if batch and (len(batch) >= records or used + length > size):
            yield npb.IngestRecordsRequest(puts=batch)
            batch, used = [], 0
        batch.append(put)
        used += length
    if batch:
        yield npb.IngestRecordsRequest(puts=batch)


class EmergencyNotAllowed(DmpError):
    """Break-the-glass asked for by someone who is not a professional."""


def open_channel(target: str, credentials: Credentials) -> grpc.Channel:
    """The federation's mutual-TLS channel to `target`, as `credentials`."""
    return secure_channel(target, credentials)


class Assertions:
    """Fresh access assertions signed with one identity's own key."""

    def __init__(self, signer: Signer) -> None:
        self.signer = signer

    def sign(
        self,
        patient_ins: str,
        *,
        operation: Operation,
        record_id: str = "",
        emergency: str | None = None,
        purpose: access_pb2.Purpose.ValueType | None = None,
        reason: str = "",
    ) -> tuple[tuple[str, bytes], ...]:
        """Metadata with a fresh assertion for one call about `patient_ins`: it allows
        `operation` only (on `record_id`, for a record read). `emergency` is the reason of
        a break-the-glass access, for professionals only; otherwise `purpose` (default:
        the identity's own, SELF or CARE) with its `reason`."""
        if emergency is not None:
            if self.signer.principal.role is not Role.PRACTITIONER:
                raise EmergencyNotAllowed("emergency (break-the-glass) access is for professionals")
            purpose, reason = access_pb2.PURPOSE_EMERGENCY, emergency
        return sign_assertion(
            self.signer, patient_ins, purpose, reason, operation=operation, record_id=record_id
        )


class _Client:
    """A channel, the signer of the identity a client acts for, and the service's stub."""

    #: The generated stub of the service a client calls.
    _stub_type: ClassVar[type[Any]]
    stub: Any

    def __init__(
        self,
        target: str,
        credentials: Credentials,
        *,
        channel: grpc.Channel | None = None,
        signer: Signer | None = None,
    ) -> None:
        self.credentials = credentials
        self.signer = signer or Signer(credentials)
        self.assertions = Assertions(self.signer)
        self.channel = channel if channel is not None else open_channel(target, credentials)
        self.stub = self._stub_type(self.channel)

    def assertion(
        self,
        patient_ins: str,
        *,
        operation: Operation,
        record_id: str = "",
        emergency: str | None = None,
    ) -> tuple[tuple[str, bytes], ...]:
        return self.assertions.sign(
            patient_ins, operation=operation, record_id=record_id, emergency=emergency
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the channel is connected (the TLS handshake is done)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


@dataclass
class View:
    """A consolidated view: its records, newest first, and each region's status."""

    records: list[record_pb2.Record] = field(default_factory=list)
    regions: dict[str, dpb.RegionStatus] = field(default_factory=dict)


def view_request(
    patient_ins: str,
    *,
    kinds: Iterable[record_pb2.RecordKind.ValueType] = (),
    type_codes: Iterable[str] = (),
    since: datetime | None = None,
    until: datetime | None = None,
    include_superseded: bool = False,
    page_size: int = 200,
) -> dpb.GetConsolidatedViewRequest:
    request = dpb.GetConsolidatedViewRequest(
        patient_ins=patient_ins,
        kinds=list(kinds),
        type_codes=list(type_codes),
        include_superseded=include_superseded,
        page_size=page_size,
    )
    if since is not None:
        request.since.FromDatetime(since)
    if until is not None:
        request.until.FromDatetime(until)
    return request


class DirectoryClient(_Client):
    """The national directory, as one identity."""

    _stub_type = directory_service_pb2_grpc.DirectoryServiceStub
    stub: directory_service_pb2_grpc.DirectoryServiceStub

    def register_patient(
        self, identity: patient_pb2.PatientIdentity, *, timeout: float = 10
    ) -> dpb.RegisterPatientResponse:
        """Register (or confirm) an identity; the answer says whether it was created."""
        answer: dpb.RegisterPatientResponse = self.stub.RegisterPatient(
            dpb.RegisterPatientRequest(patient=identity), timeout=timeout
        )
        return answer

    def get_patient(self, ins: str, *, timeout: float = 10) -> dpb.GetPatientResponse:
        answer: dpb.GetPatientResponse = self.stub.GetPatient(
            dpb.GetPatientRequest(ins=ins),
            timeout=timeout,
            metadata=self.assertion(ins, operation=LOOKUP),
        )
        return answer

    def list_nodes(self, *, timeout: float = 5) -> list[dpb.NodeInfo]:
        return list(self.stub.ListNodes(dpb.ListNodesRequest(), timeout=timeout).nodes)

    def view_page(
        self,
        request: dpb.GetConsolidatedViewRequest,
        *,
        timeout: float = 10,
        emergency: str | None = None,
    ) -> dpb.GetConsolidatedViewResponse:
        """One page of a consolidated view."""
        page: dpb.GetConsolidatedViewResponse = self.stub.GetConsolidatedView(
            request,
            timeout=timeout,
            metadata=self.assertion(request.patient_ins, operation=VIEW, emergency=emergency),
        )
        return page

    def view(
        self,
        request: dpb.GetConsolidatedViewRequest,
        *,
        limit: int = 500,
        timeout: float = 10,
        emergency: str | None = None,
    ) -> View:
        """Every page up to `limit` records (a fresh assertion for each); the regions'
        statuses of the first page, updated by later pages."""
        view = View()
        while True:
            page = self.view_page(request, timeout=timeout, emergency=emergency)
            view.records.extend(page.records)
            for status in page.regions:
                known = view.regions.get(status.region)
                if known is None or known.state == dpb.REGION_STATE_ANSWERED:
                    count = (known.record_count if known else 0) + status.record_count
                    view.regions[status.region] = status
                    status.record_count = count
            if not page.next_page_token or len(view.records) >= limit:
                view.records = view.records[:limit]
                return view
            request.page_token = page.next_page_token

    def fetch_content(
        self,
        record_id: str,
        region: str,
        patient_ins: str,
        *,
        emergency: str | None = None,
        timeout: float = 120,
    ) -> Iterator[dpb.FetchRecordContentResponse]:
        """A record's content relayed from its region: its record, then its chunks."""
        metadata = self.assertion(
            patient_ins, operation=READ_CONTENT, record_id=record_id, emergency=emergency
        )
        chunks: Iterator[dpb.FetchRecordContentResponse] = self.stub.FetchRecordContent(
            dpb.FetchRecordContentRequest(record_id=record_id, region=region),
            timeout=timeout,
            metadata=metadata,
        )
        return chunks

    def directives(self, ins: str, *, timeout: float = 10) -> PatientDirectives:
        """The patient's directives in force (the defaults when they set none)."""
        answer = self.stub.GetDirectives(dpb.GetDirectivesRequest(patient_ins=ins), timeout=timeout)
        if not answer.HasField("directives"):
            return PatientDirectives(ins)
        return from_proto(access_pb2.Directives.FromString(answer.directives.directives))

    def set_directives(self, directives: PatientDirectives, *, timeout: float = 10) -> None:
        """Sign `directives` with our own key (the patient's) and put them in force."""
        signed = sign_directives(self.signer, directives)
        self.stub.SetDirectives(dpb.SetDirectivesRequest(directives=signed), timeout=timeout)

    def access_history(
        self, ins: str, *, exclude_own: bool = False, limit: int = 100, timeout: float = 10
    ) -> dpb.GetAccessHistoryResponse:
        """Who accessed the patient's record, from the directory and every region."""
        answer: dpb.GetAccessHistoryResponse = self.stub.GetAccessHistory(
            dpb.GetAccessHistoryRequest(patient_ins=ins, exclude_own=exclude_own, page_size=limit),
            timeout=timeout,
            metadata=self.assertion(ins, operation=ACCESS_HISTORY),
        )
        return answer

    def identity_conflicts(
        self, *, page_size: int = 100, timeout: float = 10
    ) -> Iterator[dpb.IdentityConflict]:
        """Every identity conflict kept for review (the directory's own certificate)."""
        request = dpb.ListIdentityConflictsRequest(page_size=page_size)
        while True:
            page = self.stub.ListIdentityConflicts(request, timeout=timeout)
            yield from page.conflicts
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token


class NodeClient(_Client):
    """A regional record node, as one identity."""

    _stub_type = node_service_pb2_grpc.NodeServiceStub
    stub: node_service_pb2_grpc.NodeServiceStub

    def put_record(
        self,
        record: record_pb2.Record,
        content: bytes,
        *,
        patient: patient_pb2.PatientIdentity | None = None,
        timeout: float = 60,
    ) -> record_pb2.Record:
        """Store a record (a writer's certificate authorizes it); the record as stored."""
        request = npb.PutRecordRequest(record=record, content=content, patient=patient)
        answer: npb.PutRecordResponse = self.stub.PutRecord(request, timeout=timeout)
        return answer.record

    def ingest(
        self, puts: Iterable[npb.PutRecordRequest], *, timeout: float = 600
    ) -> npb.IngestRecordsResponse:
        """Store many records over one stream, several a message."""
        answer: npb.IngestRecordsResponse = self.stub.IngestRecords(
            ingest_messages(puts), timeout=timeout
        )
        return answer

    def list_records(
        self,
        request: npb.ListRecordsRequest,
        *,
        emergency: str | None = None,
        timeout: float = 30,
    ) -> Iterator[record_pb2.Record]:
        """Every record the node holds for the request's patient, page by page."""
        while True:
            page = self.stub.ListRecords(
                request,
                timeout=timeout,
                metadata=self.assertion(request.patient_ins, operation=VIEW, emergency=emergency),
            )
            yield from page.records
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def get_record(
        self,
        record_id: str,
        patient_ins: str,
        *,
        emergency: str | None = None,
        timeout: float = 30,
    ) -> record_pb2.Record:
        answer: npb.GetRecordResponse = self.stub.GetRecord(
            npb.GetRecordRequest(record_id=record_id),
            timeout=timeout,
            metadata=self.assertion(
                patient_ins, operation=READ_RECORD, record_id=record_id, emergency=emergency
            ),
        )
        return answer.record

    def content(
        self,
        record_id: str,
        patient_ins: str,
        *,
        emergency: str | None = None,
        timeout: float = 120,
    ) -> Iterator[npb.GetRecordContentResponse]:
        """A record's content: its record, then its chunks."""
        metadata = self.assertion(
            patient_ins, operation=READ_CONTENT, record_id=record_id, emergency=emergency
        )
        chunks: Iterator[npb.GetRecordContentResponse] = self.stub.GetRecordContent(
            npb.GetRecordContentRequest(record_id=record_id), timeout=timeout, metadata=metadata
        )
        return chunks

    def reveal(self, record_id: str, *, timeout: float = 30) -> None:
        """Make a record its author hid from the patient visible to them."""
        self.stub.RevealRecord(npb.RevealRecordRequest(record_id=record_id), timeout=timeout)


__all__ = [
    "ACCESS_HISTORY",
    "LOOKUP",
    "READ_CONTENT",
    "READ_RECORD",
    "VIEW",
    "Assertions",
    "DirectoryClient",
    "EmergencyNotAllowed",
    "Metadata",
    "NodeClient",
    "View",
    "open_channel",
    "view_request",
]
