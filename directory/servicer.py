"""DirectoryService over gRPC: unpack the request, call one use case (directory/service.py),
pack the answer."""

from __future__ import annotations

from collections.abc import Iterator

from directory.service import DirectoryService
from dmp.clock import from_us
from dmp.server import CallContext
from dmp.v1 import access_pb2, directory_service_pb2_grpc
from dmp.v1 import directory_service_pb2 as pb


class DirectoryServicer(directory_service_pb2_grpc.DirectoryServiceServicer):
    def __init__(self, service: DirectoryService) -> None:
        self._service = service

    def RegisterPatient(
        self, request: pb.RegisterPatientRequest, context: CallContext
    ) -> pb.RegisterPatientResponse:
        traits, created = self._service.register_patient(context, request.patient)
        return pb.RegisterPatientResponse(patient=traits.to_proto(), created=created)

    def GetPatient(
        self, request: pb.GetPatientRequest, context: CallContext
    ) -> pb.GetPatientResponse:
        traits, fragments = self._service.get_patient(context, request.ins)
        # Regions only: a count or a date would tell of records the caller may not see.
        return pb.GetPatientResponse(
            patient=traits.to_proto(), fragments=[pb.Fragment(region=f.region) for f in fragments]
        )

    def ReportFragments(
        self, request: pb.ReportFragmentsRequest, context: CallContext
    ) -> pb.ReportFragmentsResponse:
        conflicting = self._service.report_fragments(context, request.fragments)
        return pb.ReportFragmentsResponse(conflicting_ins=conflicting)

    def RegisterNode(
        self, request: pb.RegisterNodeRequest, context: CallContext
    ) -> pb.RegisterNodeResponse:
        heartbeat = self._service.register_node(context, request.address)
        return pb.RegisterNodeResponse(heartbeat_seconds=heartbeat)

    def ListNodes(self, request: pb.ListNodesRequest, context: CallContext) -> pb.ListNodesResponse:
        return pb.ListNodesResponse(
            nodes=[
                pb.NodeInfo(region=r.region, address=r.address, healthy=r.healthy)
                for r in self._service.nodes()
            ]
        )

    def GetConsolidatedView(
        self, request: pb.GetConsolidatedViewRequest, context: CallContext
    ) -> pb.GetConsolidatedViewResponse:
        return self._service.consolidated_view(context, request)

    def FetchRecordContent(
        self, request: pb.FetchRecordContentRequest, context: CallContext
    ) -> Iterator[pb.FetchRecordContentResponse]:
        for part in self._service.record_content(context, request.region, request.record_id):
            yield pb.FetchRecordContentResponse(record=part.record, chunk=part.chunk)

    def GetDirectives(
        self, request: pb.GetDirectivesRequest, context: CallContext
    ) -> pb.GetDirectivesResponse:
        signed = self._service.directives(context, request.patient_ins)
        if signed is None:
            return pb.GetDirectivesResponse()
        return pb.GetDirectivesResponse(directives=access_pb2.SignedDirectives.FromString(signed))

    def SetDirectives(
        self, request: pb.SetDirectivesRequest, context: CallContext
    ) -> pb.SetDirectivesResponse:
        stored = self._service.set_directives(context, request.directives)
        return pb.SetDirectivesResponse(version=stored.version)

    def GetAccessHistory(
        self, request: pb.GetAccessHistoryRequest, context: CallContext
    ) -> pb.GetAccessHistoryResponse:
        history = self._service.access_history(context, request)
        return pb.GetAccessHistoryResponse(events=history.events, regions=history.regions)

    def ListIdentityConflicts(
        self, request: pb.ListIdentityConflictsRequest, context: CallContext
    ) -> pb.ListIdentityConflictsResponse:
        page = self._service.identity_conflicts(context, request)
        return pb.ListIdentityConflictsResponse(
            conflicts=[
                pb.IdentityConflict(
                    ins=c.ins,
                    stored=c.stored.to_proto(),
                    proposed=c.proposed.to_proto(),
                    reported_by=c.reported_by,
                    time=from_us(c.created_us),
                )
                for c in page.conflicts
            ],
            next_page_token=page.next_page_token,
        )
