"""NodeService over gRPC: unpack the request, call the store, pack the answer."""

from __future__ import annotations

from collections.abc import Iterator

from dmp.server import CallContext
from dmp.v1 import node_service_pb2 as pb
from dmp.v1 import node_service_pb2_grpc
from node.access import Caller, caller_of
from node.store import RecordStore


def _caller(context: CallContext) -> Caller:
    return caller_of(context.principal, context.invocation_metadata())


class NodeServicer(node_service_pb2_grpc.NodeServiceServicer):
    def __init__(self, store: RecordStore) -> None:
        self._store = store

    def PutRecord(self, request: pb.PutRecordRequest, context: CallContext) -> pb.PutRecordResponse:
        patient = request.patient if request.HasField("patient") else None
        record = self._store.put(_caller(context), request.record, request.content, patient)
        return pb.PutRecordResponse(record=record)

    def IngestRecords(
        self, request_iterator: Iterator[pb.IngestRecordsRequest], context: CallContext
    ) -> pb.IngestRecordsResponse:
        items = (
            (r.put.record, r.put.content, r.put.patient if r.put.HasField("patient") else None)
            for r in request_iterator
        )
        return pb.IngestRecordsResponse(stored_count=self._store.put_many(_caller(context), items))

    def GetRecord(self, request: pb.GetRecordRequest, context: CallContext) -> pb.GetRecordResponse:
        return pb.GetRecordResponse(record=self._store.get(_caller(context), request.record_id))

    def GetRecordContent(
        self, request: pb.GetRecordContentRequest, context: CallContext
    ) -> Iterator[pb.GetRecordContentResponse]:
        for record, chunk in self._store.content(_caller(context), request.record_id):
            if record is not None:
                yield pb.GetRecordContentResponse(record=record, chunk=chunk)
            else:
                yield pb.GetRecordContentResponse(chunk=chunk)

    def ListRecords(
        self, request: pb.ListRecordsRequest, context: CallContext
    ) -> pb.ListRecordsResponse:
        return self._store.list_records(_caller(context), request)
