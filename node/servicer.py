"""NodeService over gRPC: audit the call, check access, call the store, pack the answer."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from sqlalchemy.orm import Session

from dmp import tokens
from dmp.audit.calls import AuditedCall, Auditor, history_events, to_proto
from dmp.audit.events import EventType
from dmp.ins import normalize_ins
from dmp.policy import check_history
from dmp.records import kind_name
from dmp.server import CallContext
from dmp.v1 import access_pb2, node_service_pb2_grpc, patient_pb2, record_pb2
from dmp.v1 import node_service_pb2 as pb
from node.access import NodeAccess
from node.store import RecordStore, WriteAudit, WriteCheck, Written

MAX_EVENTS = 1000


def _patient(put: pb.PutRecordRequest) -> patient_pb2.PatientIdentity | None:
    return put.patient if put.HasField("patient") else None


def _by_patient(audited: AuditedCall) -> WriteAudit:
    """The write audit: one event per patient of the stored records, in their transaction."""

    def append(session: Session, written: list[Written]) -> None:
        patients: dict[str, list[str]] = {}
        for record in written:
            ids = patients.setdefault(record.patient_ins, [])
            ids.append(record.id)
            if record.supersedes:  # the retired version is named too
                ids.append(record.supersedes)
                audited.detail = f"supersedes {record.supersedes}" if len(written) == 1 else ""
        for ins, ids in patients.items():
            audited.patient_ins = ins
            audited.append(session, ids)

    return append


class NodeServicer(node_service_pb2_grpc.NodeServiceServicer):
    def __init__(self, store: RecordStore, access: NodeAccess, auditor: Auditor) -> None:
        self._store = store
        self._access = access
        self._auditor = auditor

    def _writer_check(self, context: CallContext) -> WriteCheck:
        """The access check of each record the store validated."""

        def check(record: record_pb2.Record) -> None:
            self._access.writer(context, kind_name(record.kind), record.patient_ins)

        return check

    def _reveal_check(
        self, context: CallContext, audited: AuditedCall
    ) -> Callable[[str, str], None]:
        """Revealing is a write: the author's access is checked against the directives."""

        def check(kind: str, patient_ins: str) -> None:
            audited.patient_ins = patient_ins
            self._access.writer(context, kind, patient_ins)

        return check

    def PutRecord(self, request: pb.PutRecordRequest, context: CallContext) -> pb.PutRecordResponse:
        with self._auditor.call(context, EventType.WRITE, request.record.patient_ins) as audited:
            record = self._store.put(
                context.principal,
                request.record,
                request.content,
                _patient(request),
                audit=_by_patient(audited),
                check=self._writer_check(context),
                supersede=self._access.superseder(context),
            )
        return pb.PutRecordResponse(record=record)

    def IngestRecords(
        self, request_iterator: Iterator[pb.IngestRecordsRequest], context: CallContext
    ) -> pb.IngestRecordsResponse:
        def items() -> Iterator[
            tuple[record_pb2.Record, bytes, patient_pb2.PatientIdentity | None]
        ]:
            for r in request_iterator:
                audited.patient_ins = r.put.record.patient_ins
                yield r.put.record, r.put.content, _patient(r.put)

        with self._auditor.call(context, EventType.WRITE) as audited:
            stored = self._store.put_many(
                context.principal,
                items(),
                audit=_by_patient(audited),
                check=self._writer_check(context),
                supersede=self._access.superseder(context),
            )
        return pb.IngestRecordsResponse(stored_count=stored)

    def GetRecord(self, request: pb.GetRecordRequest, context: CallContext) -> pb.GetRecordResponse:
        with self._auditor.call(context, EventType.READ_RECORD) as audited:
            audited.record_ids = (request.record_id,)
            caller, scope = self._access.reader(
                context, access_pb2.OPERATION_READ_RECORD, record_id=request.record_id
            )
            audited.caller(caller.assertion)
            record = self._store.get(scope, request.record_id)
            audited.commit([record.id])
        return pb.GetRecordResponse(record=record)

    def GetRecordContent(
        self, request: pb.GetRecordContentRequest, context: CallContext
    ) -> Iterator[pb.GetRecordContentResponse]:
        with self._auditor.call(context, EventType.READ_CONTENT) as audited:
            audited.record_ids = (request.record_id,)
            caller, scope = self._access.reader(
                context, access_pb2.OPERATION_READ_CONTENT, record_id=request.record_id
            )
            audited.caller(caller.assertion)
            chunks = self._store.content(scope, request.record_id)
            record, first = next(chunks)
            audited.commit([request.record_id])
        yield pb.GetRecordContentResponse(record=record, chunk=first)
        for _, chunk in chunks:
            yield pb.GetRecordContentResponse(chunk=chunk)

    def RevealRecord(
        self, request: pb.RevealRecordRequest, context: CallContext
    ) -> pb.RevealRecordResponse:
        with self._auditor.call(context, EventType.WRITE) as audited:
            audited.record_ids = (request.record_id,)
            audited.detail = "revealed to the patient"
            record = self._store.reveal(
                context.principal,
                request.record_id,
                audit=lambda session, ins: _reveal_audit(audited, session, ins),
                check=self._reveal_check(context, audited),
            )
        return pb.RevealRecordResponse(record=record)

    def ListRecords(
        self, request: pb.ListRecordsRequest, context: CallContext
    ) -> pb.ListRecordsResponse:
        with self._auditor.call(context, EventType.VIEW, request.patient_ins) as audited:
            patient = normalize_ins(request.patient_ins, "patient_ins")
            caller, scope = self._access.reader(context, access_pb2.OPERATION_VIEW, patient)
            audited.caller(caller.assertion)
            response = self._store.list_records(scope, request)
            audited.commit([r.id for r in response.records])
        return response

    def ListAccessEvents(
        self, request: pb.ListAccessEventsRequest, context: CallContext
    ) -> pb.ListAccessEventsResponse:
        with self._auditor.call(context, EventType.ACCESS_HISTORY, request.patient_ins) as audited:
            patient = normalize_ins(request.patient_ins, "patient_ins")
            caller, _ = self._access.reader(context, access_pb2.OPERATION_ACCESS_HISTORY, patient)
            audited.caller(caller.assertion)
            check_history(caller.assertion)
            limit = tokens.page_size(request.page_size, 100, MAX_EVENTS)
            events = history_events(
                self._auditor.log, patient, exclude_own=request.exclude_own, limit=limit
            )
            audited.commit()
        return pb.ListAccessEventsResponse(events=[to_proto(e) for e in events])


def _reveal_audit(audited: AuditedCall, session: Session, patient_ins: str) -> None:
    audited.patient_ins = patient_ins
    audited.append(session)
