"""DirectoryService over gRPC: unpack, check, call the domain, pack."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import grpc

from directory import access
from directory.access import DirectoryAccess
from directory.channels import NodeChannels
from directory.directives import DirectiveStore
from directory.index import FragmentUpdate, PatientIndex
from directory.registry import HEARTBEAT_SECONDS, EmbeddedRegistry
from directory.view import ViewAssembler
from dmp.assertion import ASSERTION_KEY, VerifiedAssertion
from dmp.clock import from_us, to_us
from dmp.directives import DIRECTIVES_KEY
from dmp.discovery import Discovery
from dmp.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from dmp.identity import Role
from dmp.ins import normalize_ins
from dmp.patients import traits_of
from dmp.server import CallContext
from dmp.v1 import access_pb2, directory_service_pb2_grpc
from dmp.v1 import directory_service_pb2 as pb
from dmp.v1 import node_service_pb2 as npb

MAX_CONFLICT_PAGE = 1000


def forward_metadata(
    assertion: VerifiedAssertion, signed_directives: bytes | None
) -> tuple[tuple[str, bytes], ...]:
    """What the directory passes to nodes: the caller's assertion unchanged, and the
    patient's directives as the patient signed them."""
    if signed_directives is None:
        return ((ASSERTION_KEY, assertion.raw),)
    return ((ASSERTION_KEY, assertion.raw), (DIRECTIVES_KEY, signed_directives))


class DirectoryServicer(directory_service_pb2_grpc.DirectoryServiceServicer):
    def __init__(
        self,
        index: PatientIndex,
        discovery: Discovery,
        registry: EmbeddedRegistry | None,
        channels: NodeChannels,
        assembler: ViewAssembler,
        access: DirectoryAccess,
        directives: DirectiveStore,
    ) -> None:
        self._access = access
        self._directives = directives
        self._index = index
        self._discovery = discovery
        self._registry = registry
        self._channels = channels
        self._assembler = assembler

    def RegisterPatient(
        self, request: pb.RegisterPatientRequest, context: CallContext
    ) -> pb.RegisterPatientResponse:
        access.check_register(context.principal)
        traits, created = self._index.register(request.patient, context.principal.uri)
        return pb.RegisterPatientResponse(patient=traits.to_proto(), created=created)

    def GetPatient(
        self, request: pb.GetPatientRequest, context: CallContext
    ) -> pb.GetPatientResponse:
        ins = normalize_ins(request.ins)
        self._access.reader(context, ins)
        traits, fragments = self._index.get(ins)
        return pb.GetPatientResponse(
            patient=traits.to_proto(),
            fragments=[
                pb.Fragment(
                    region=f.region,
                    record_count=f.record_count,
                    last_update=from_us(f.last_update_us),
                )
                for f in fragments
            ],
        )

    def ReportFragments(
        self, request: pb.ReportFragmentsRequest, context: CallContext
    ) -> pb.ReportFragmentsResponse:
        region = access.check_node(context.principal)
        updates = [
            FragmentUpdate(
                traits=traits_of(report.patient, f"fragments[{i}].patient"),
                record_count=report.record_count,
                last_update_us=to_us(report.last_update),
            )
            for i, report in enumerate(request.fragments)
        ]
        conflicting = self._index.report(region, updates, context.principal.uri)
        return pb.ReportFragmentsResponse(conflicting_ins=conflicting)

    def RegisterNode(
        self, request: pb.RegisterNodeRequest, context: CallContext
    ) -> pb.RegisterNodeResponse:
        region = access.check_node(context.principal)
        if self._registry is None:
            raise FailedPrecondition(
                "this directory finds nodes through Consul: start the node with --consul"
            )
        host, _, port = request.address.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidArgument(f"address {request.address!r} must be HOST:PORT")
        self._registry.announce(region, request.address)
        return pb.RegisterNodeResponse(heartbeat_seconds=HEARTBEAT_SECONDS)

    def ListNodes(self, request: pb.ListNodesRequest, context: CallContext) -> pb.ListNodesResponse:
        routes = self._discovery.routes()
        return pb.ListNodesResponse(
            nodes=[
                pb.NodeInfo(region=r.region, address=r.address, healthy=r.healthy)
                for r in sorted(routes.values(), key=lambda r: r.region)
            ]
        )

    def GetConsolidatedView(
        self, request: pb.GetConsolidatedViewRequest, context: CallContext
    ) -> pb.GetConsolidatedViewResponse:
        ins = normalize_ins(request.patient_ins, "patient_ins")
        assertion, _, signed = self._access.reader(context, ins)
        return self._assembler.view(
            request,
            metadata=forward_metadata(assertion, signed),
            time_remaining=context.time_remaining(),
        )

    def FetchRecordContent(
        self, request: pb.FetchRecordContentRequest, context: CallContext
    ) -> Iterator[pb.FetchRecordContentResponse]:
        assertion, _, signed = self._access.reader(context)
        route = self._discovery.routes().get(request.region)
        if route is None:
            raise NotFound(f"no node is registered for region {request.region!r}")
        if not route.healthy:
            raise FailedPrecondition(
                f"region {request.region} is not reachable now ({route.reason}): retry later"
            )
        stub = self._channels.node(route.address)
        chunks = stub.GetRecordContent(
            npb.GetRecordContentRequest(record_id=request.record_id),
            metadata=forward_metadata(assertion, signed),
            timeout=context.time_remaining(),
        )
        try:
            for chunk in chunks:
                yield pb.FetchRecordContentResponse(
                    record=chunk.record if chunk.HasField("record") else None, chunk=chunk.chunk
                )
        except grpc.RpcError as exc:
            # The node's own answer, passed on as it is.
            context.abort(exc.code(), f"region {request.region}: {exc.details()}")

    def GetDirectives(
        self, request: pb.GetDirectivesRequest, context: CallContext
    ) -> pb.GetDirectivesResponse:
        ins = normalize_ins(request.patient_ins, "patient_ins")
        access.check_own_directives(context.principal, ins)
        _, signed = self._directives.current(ins)
        if signed is None:
            return pb.GetDirectivesResponse()
        return pb.GetDirectivesResponse(directives=access_pb2.SignedDirectives.FromString(signed))

    def SetDirectives(
        self, request: pb.SetDirectivesRequest, context: CallContext
    ) -> pb.SetDirectivesResponse:
        caller = context.principal
        if caller.role is not Role.PATIENT:
            raise PermissionDenied("only the patient sets their directives")
        stored = self._directives.replace(request.directives, caller.key)
        return pb.SetDirectivesResponse(version=stored.version)

    def ListIdentityConflicts(
        self, request: pb.ListIdentityConflictsRequest, context: CallContext
    ) -> pb.ListIdentityConflictsResponse:
        access.check_operator(context.principal)
        if request.page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        size = min(request.page_size or 50, MAX_CONFLICT_PAGE)
        after = 0
        if request.page_token:
            try:
                after = int(base64.urlsafe_b64decode(request.page_token.encode()).decode())
            except ValueError:
                raise InvalidArgument(
                    "page_token is malformed: pass the next_page_token unchanged"
                ) from None
        conflicts = self._index.conflicts(after, size + 1)
        response = pb.ListIdentityConflictsResponse(
            conflicts=[
                pb.IdentityConflict(
                    ins=c.ins,
                    stored=c.stored.to_proto(),
                    proposed=c.proposed.to_proto(),
                    reported_by=c.reported_by,
                    time=from_us(c.created_us),
                )
                for c in conflicts[:size]
            ]
        )
        if len(conflicts) > size:
            response.next_page_token = base64.urlsafe_b64encode(
                str(conflicts[size - 1].seq).encode()
            ).decode()
        return response
