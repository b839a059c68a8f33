"""NodeService over gRPC: unpack the request, call one use case (node/service.py), pack."""

from __future__ import annotations

from collections.abc import Iterator

from dmp.audit.calls import to_proto
from dmp.server import CallContext
from dmp.v1 import node_service_pb2 as pb
from dmp.v1 import node_service_pb2_grpc
from node.service import RecordService


class NodeServicer(node_service_pb2_grpc.NodeServiceServicer):
    def __init__(self, records: RecordService) -> None:
        self._records = records

    def PutRecord(self, request: pb.PutRecordRequest, context: CallContext) -> pb.PutRecordResponse:
        return pb.PutRecordResponse(record=self._records.put_record(context, request))

    def IngestRecords(
        self, request_iterator: Iterator[pb.IngestRecordsRequest], context: CallContext
    ) -> pb.IngestRecordsResponse:
        return pb.IngestRecordsResponse(
            stored_count=self._records.ingest_records(context, _puts(request_iterator))
        )

    def GetRecord(self, request: pb.GetRecordRequest, context: CallContext) -> pb.GetRecordResponse:
        return pb.GetRecordResponse(record=self._records.get_record(context, request.record_id))

    def GetRecordContent(
        self, request: pb.GetRecordContentRequest, context: CallContext
    ) -> Iterator[pb.GetRecordContentResponse]:
        for record, chunk in self._records.record_content(context, request.record_id):
            yield pb.GetRecordContentResponse(record=record, chunk=chunk)

    def RevealRecord(
        self, request: pb.RevealRecordRequest, context: CallContext
    ) -> pb.RevealRecordResponse:
        record = self._records.reveal_record(context, request.record_id)
        return pb.RevealRecordResponse(record=record)

    def ListRecords(
        self, request: pb.ListRecordsRequest, context: CallContext
    ) -> pb.ListRecordsResponse:
        return self._records.list_records(context, request)

    def ListAccessEvents(
        self, request: pb.ListAccessEventsRequest, context: CallContext
    ) -> pb.ListAccessEventsResponse:
        events = self._records.access_events(context, request)
        return pb.ListAccessEventsResponse(events=[to_proto(e) for e in events])


def _puts(requests: Iterator[pb.IngestRecordsRequest]) -> Iterator[pb.PutRecordRequest]:
    """The records of an ingest stream in the order sent: each message's `put`, then its
    `puts`."""
    for request in requests:
        if request.HasField("put"):
            yield request.put
        yield from request.puts
