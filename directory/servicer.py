"""DirectoryService over gRPC: unpack, check, call the domain, pack."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from directory.access import DirectoryAccess
from directory.channels import NodeChannels
from directory.directives import DirectiveStore
from directory.fanout import FanOut
from directory.index import FragmentUpdate, PatientIndex
from directory.registry import HEARTBEAT_SECONDS, EmbeddedRegistry
from directory.view import ViewAssembler
from dmp import policy, tokens
from dmp.assertion import ASSERTION_KEY, VerifiedAssertion
from dmp.audit.calls import REQUEST_ID_KEY, Auditor, history_events, to_proto
from dmp.audit.events import EventType
from dmp.clock import from_us, now_us, to_us
from dmp.directives import DIRECTIVES_KEY, NO_DIRECTIVES_KEY
from dmp.discovery import Discovery
from dmp.errors import DmpError, FailedPrecondition, InvalidArgument, NotFound
from dmp.fields import check_count, check_time
from dmp.identity import Role
from dmp.ins import normalize_ins
from dmp.patients import traits_of
from dmp.regions import REGION_STATE_NAMES
from dmp.server import CallContext
from dmp.v1 import access_pb2, directory_service_pb2_grpc, page_token_pb2
from dmp.v1 import directory_service_pb2 as pb
from dmp.v1 import node_service_pb2 as npb
from dmp.v1.node_service_pb2_grpc import NodeServiceStub

MAX_CONFLICT_PAGE = 1000
#: How far ahead of the directory's clock a node's report may be dated.
REPORT_CLOCK_SKEW_US = 5 * 60 * 1_000_000
MAX_HISTORY = 1000


def relayed_error(region: str, exc: grpc.RpcError) -> DmpError:
    """A node's error on a relayed call, passed on with its status code."""
    error = DmpError(f"region {region}: {exc.details()}")
    error.code = exc.code()
    error.reason = exc.code().name
    return error


def forward_metadata(
    assertion: VerifiedAssertion, signed_directives: bytes | None, request_id: str
) -> tuple[tuple[str, str | bytes], ...]:
    """What the directory passes to nodes: the caller's assertion unchanged, the patient's
    directives as the patient signed them, and the request id its audit event carries."""
    metadata: tuple[tuple[str, str | bytes], ...] = (
        (ASSERTION_KEY, assertion.raw),
        (REQUEST_ID_KEY, request_id),
    )
    if signed_directives is not None:
        metadata += ((DIRECTIVES_KEY, signed_directives),)
    else:  # what GetDirectives would answer: saves each node a round trip back
        metadata += ((NO_DIRECTIVES_KEY, "1"),)
    return metadata


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
        fanout: FanOut,
        auditor: Auditor,
    ) -> None:
        self._fanout = fanout
        self._auditor = auditor
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
        with self._auditor.call(context, EventType.WRITE, request.patient.ins) as audited:
            audited.detail = "patient identity registered"
            policy.check_register(context.principal)
            traits, created = self._index.register(
                request.patient, context.principal.uri, audit=audited.append
            )
        return pb.RegisterPatientResponse(patient=traits.to_proto(), created=created)

    def GetPatient(
        self, request: pb.GetPatientRequest, context: CallContext
    ) -> pb.GetPatientResponse:
        with self._auditor.call(context, EventType.READ_RECORD, request.ins) as audited:
            audited.detail = "patient identity and record locations"
            ins = normalize_ins(request.ins)
            assertion, _, _ = self._access.reader(context, access_pb2.OPERATION_LOOKUP, ins)
            audited.caller(assertion)
            traits, fragments = self._index.get(ins)
            audited.commit()
        # Regions only: a count or a date would tell of records the caller may not see.
        return pb.GetPatientResponse(
            patient=traits.to_proto(), fragments=[pb.Fragment(region=f.region) for f in fragments]
        )

    def ReportFragments(
        self, request: pb.ReportFragmentsRequest, context: CallContext
    ) -> pb.ReportFragmentsResponse:
        region = policy.check_node(context.principal)
        latest = now_us() + REPORT_CLOCK_SKEW_US
        updates = []
        for i, report in enumerate(request.fragments):
            check_count(report.record_count, f"fragments[{i}].record_count")
            last_update = to_us(check_time(report.last_update, f"fragments[{i}].last_update"))
            if last_update > latest:
                raise InvalidArgument(
                    f"fragments[{i}].last_update is in the future: check the node's clock"
                )
            updates.append(
                FragmentUpdate(
                    traits=traits_of(report.patient, f"fragments[{i}].patient"),
                    record_count=report.record_count,
                    last_update_us=last_update,
                )
            )
        conflicting = self._index.report(region, updates, context.principal.uri)
        return pb.ReportFragmentsResponse(conflicting_ins=conflicting)

    def RegisterNode(
        self, request: pb.RegisterNodeRequest, context: CallContext
    ) -> pb.RegisterNodeResponse:
        region = policy.check_node(context.principal)
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
        with self._auditor.call(context, EventType.VIEW, request.patient_ins) as audited:
            ins = normalize_ins(request.patient_ins, "patient_ins")
            assertion, _, signed = self._access.reader(context, access_pb2.OPERATION_VIEW, ins)
            audited.caller(assertion)
            view = self._assembler.view(
                request,
                metadata=forward_metadata(assertion, signed, audited.request_id),
                time_remaining=context.time_remaining(),
            )
            audited.detail = "regions " + ", ".join(
                f"{s.region}:{REGION_STATE_NAMES.get(s.state, '?').replace(' ', '-')}"
                for s in view.regions
            )
            audited.commit([r.id for r in view.records])
        return view

    def FetchRecordContent(
        self, request: pb.FetchRecordContentRequest, context: CallContext
    ) -> Iterator[pb.FetchRecordContentResponse]:
        with self._auditor.call(context, EventType.READ_CONTENT) as audited:
            audited.record_ids = (request.record_id,)
            assertion, _, signed = self._access.reader(
                context, access_pb2.OPERATION_READ_CONTENT, record_id=request.record_id
            )
            audited.caller(assertion)
            route = self._discovery.routes().get(request.region)
            if route is None:
                raise NotFound(f"no node is registered for region {request.region!r}")
            if not route.healthy:
                raise FailedPrecondition(
                    f"region {request.region} is not reachable now ({route.reason}): retry later"
                )
            stub = self._channels.node(request.region, route.address)
            chunks = stub.GetRecordContent(
                npb.GetRecordContentRequest(record_id=request.record_id),
                metadata=forward_metadata(assertion, signed, audited.request_id),
                timeout=context.time_remaining(),
            )
            try:
                first = next(chunks)
            except grpc.RpcError as exc:
                raise relayed_error(request.region, exc) from None
            audited.commit()
        yield pb.FetchRecordContentResponse(record=first.record, chunk=first.chunk)
        try:
            for chunk in chunks:
                yield pb.FetchRecordContentResponse(chunk=chunk.chunk)
        except grpc.RpcError as exc:
            raise relayed_error(request.region, exc) from None

    def GetDirectives(
        self, request: pb.GetDirectivesRequest, context: CallContext
    ) -> pb.GetDirectivesResponse:
        with self._auditor.call(context, EventType.READ_RECORD, request.patient_ins) as audited:
            ins = normalize_ins(request.patient_ins, "patient_ins")
            audited.detail = (
                "patient directives for the node's access checks"
                if context.principal.role is Role.NODE
                else "patient directives"
            )
            policy.check_own_directives(context.principal, ins)
            _, signed = self._directives.current(ins)
            audited.commit()
        if signed is None:
            return pb.GetDirectivesResponse()
        return pb.GetDirectivesResponse(directives=access_pb2.SignedDirectives.FromString(signed))

    def SetDirectives(
        self, request: pb.SetDirectivesRequest, context: CallContext
    ) -> pb.SetDirectivesResponse:
        caller = context.principal
        with self._auditor.call(context, EventType.DIRECTIVE_CHANGE, caller.key) as audited:
            policy.check_sets_directives(caller)
            stored = self._directives.replace(request.directives, caller.key, audit=audited.append)
        return pb.SetDirectivesResponse(version=stored.version)

    def GetAccessHistory(
        self, request: pb.GetAccessHistoryRequest, context: CallContext
    ) -> pb.GetAccessHistoryResponse:
        with self._auditor.call(context, EventType.ACCESS_HISTORY, request.patient_ins) as audited:
            ins = normalize_ins(request.patient_ins, "patient_ins")
            assertion, _, signed = self._access.reader(
                context, access_pb2.OPERATION_ACCESS_HISTORY, ins
            )
            audited.caller(assertion)
            policy.check_history(assertion)
            limit = tokens.page_size(request.page_size, 100, MAX_HISTORY)
            metadata = forward_metadata(assertion, signed, audited.request_id)
            node_request = npb.ListAccessEventsRequest(
                patient_ins=ins, exclude_own=request.exclude_own, page_size=limit
            )

            def call(stub: NodeServiceStub, region: str, deadline: float) -> grpc.Future:
                return stub.ListAccessEvents.future(
                    node_request, timeout=deadline, metadata=metadata
                )

            regions = [f.region for f in self._index.fragments(ins)]
            answers = self._fanout.ask(regions, call, context.time_remaining())
            events = [
                to_proto(e)
                for e in history_events(
                    self._auditor.log, ins, exclude_own=request.exclude_own, limit=limit
                )
            ]
            for answer, _ in answers.values():
                if answer is not None:
                    events.extend(answer.events)
            events.sort(key=lambda e: to_us(e.event_date_time), reverse=True)
            audited.commit()
        return pb.GetAccessHistoryResponse(
            events=events[:limit], regions=[status for _, status in answers.values()]
        )

    def ListIdentityConflicts(
        self, request: pb.ListIdentityConflictsRequest, context: CallContext
    ) -> pb.ListIdentityConflictsResponse:
        with self._auditor.call(context, EventType.READ_RECORD) as audited:
            audited.detail = "identity conflict review"
            policy.check_operator(context.principal)
            size = tokens.page_size(request.page_size, 50, MAX_CONFLICT_PAGE)
            query_print = tokens.query_fingerprint(request)
            after = 0
            if request.page_token:
                cursor = tokens.decode(
                    request.page_token, page_token_pb2.ConflictCursor, query_print
                )
                after = cursor.seq
            conflicts = self._index.conflicts(after, size + 1)
            # Identity traits were read: one event in each patient's trail.
            audited.commit_each([c.ins for c in conflicts[:size]])
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
            response.next_page_token = tokens.encode(
                page_token_pb2.ConflictCursor(
                    seq=conflicts[size - 1].seq, query_fingerprint=query_print
                )
            )
        return response
