"""NodeService over gRPC: check access, call the store, pack the answer."""

from __future__ import annotations

from collections.abc import Iterator

from dmp.ins import normalize_ins
from dmp.server import CallContext
from dmp.v1 import node_service_pb2 as pb
from dmp.v1 import node_service_pb2_grpc, patient_pb2, record_pb2
from node.access import NodeAccess
from node.records import kind_name, validate_draft
from node.store import RecordStore


def _patient(put: pb.PutRecordRequest) -> patient_pb2.PatientIdentity | None:
    return put.patient if put.HasField("patient") else None


class NodeServicer(node_service_pb2_grpc.NodeServiceServicer):
    def __init__(self, store: RecordStore, access: NodeAccess) -> None:
        self._store = store
        self._access = access

    def _check_write(self, context: CallContext, record: record_pb2.Record) -> None:
        validate_draft(record)
        self._access.writer(context, kind_name(record.kind), record.patient_ins)

    def PutRecord(self, request: pb.PutRecordRequest, context: CallContext) -> pb.PutRecordResponse:
        self._check_write(context, request.record)
        record = self._store.put(
            context.principal, request.record, request.content, _patient(request)
        )
        return pb.PutRecordResponse(record=record)

    def IngestRecords(
        self, request_iterator: Iterator[pb.IngestRecordsRequest], context: CallContext
    ) -> pb.IngestRecordsResponse:
        def items() -> Iterator[
            tuple[record_pb2.Record, bytes, patient_pb2.PatientIdentity | None]
        ]:
            for r in request_iterator:
                self._check_write(context, r.put.record)
                yield r.put.record, r.put.content, _patient(r.put)

        return pb.IngestRecordsResponse(
            stored_count=self._store.put_many(context.principal, items())
        )

    def GetRecord(self, request: pb.GetRecordRequest, context: CallContext) -> pb.GetRecordResponse:
        _, scope = self._access.reader(context)
        return pb.GetRecordResponse(record=self._store.get(scope, request.record_id))

    def GetRecordContent(
        self, request: pb.GetRecordContentRequest, context: CallContext
    ) -> Iterator[pb.GetRecordContentResponse]:
        _, scope = self._access.reader(context)
        for record, chunk in self._store.content(scope, request.record_id):
            if record is not None:
                yield pb.GetRecordContentResponse(record=record, chunk=chunk)
            else:
                yield pb.GetRecordContentResponse(chunk=chunk)

    def RevealRecord(
        self, request: pb.RevealRecordRequest, context: CallContext
    ) -> pb.RevealRecordResponse:
        return pb.RevealRecordResponse(
            record=self._store.reveal(context.principal, request.record_id)
        )

    def ListRecords(
        self, request: pb.ListRecordsRequest, context: CallContext
    ) -> pb.ListRecordsResponse:
        patient = normalize_ins(request.patient_ins, "patient_ins")
        _, scope = self._access.reader(context, patient)
        return self._store.list_records(scope, request)
