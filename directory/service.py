"""The directory's use cases: each audits its call, checks access through the policy
(directory/access.py asks dmp/policy.py), then works through the patient index, the
directives, or the nodes (relayed), a write in one unit of work with its audit event.

The servicer (directory/servicer.py) unpacks a request, calls one of these, packs the
answer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from directory.access import DirectoryAccess
from directory.channels import NodeChannels
from directory.directives import DirectiveStore
from directory.fanout import FanOut
from directory.index import Conflict, Fragment, FragmentUpdate, PatientIndex
from directory.registry import HEARTBEAT_SECONDS, EmbeddedRegistry
from directory.relay import node_address, relayed_error
from directory.view import ViewAssembler
from dmp import policy, tokens
from dmp.audit.calls import Auditor, history_events, to_proto
from dmp.audit.events import EventType
from dmp.clock import now_us, to_us
from dmp.directives import PatientDirectives
from dmp.discovery import Discovery, NodeRoute
from dmp.errors import FailedPrecondition, InvalidArgument
from dmp.fields import check_count, check_time
from dmp.identity import Role
from dmp.ins import normalize_ins
from dmp.patients import IDENTITY_CONFLICT, Traits, conflict_message, traits_of
from dmp.server import CallContext
from dmp.unit_of_work import UnitOfWork
from dmp.v1 import access_pb2, audit_pb2, page_token_pb2, patient_pb2
from dmp.v1 import directory_service_pb2 as pb
from dmp.v1 import node_service_pb2 as npb
from dmp.v1.node_service_pb2_grpc import NodeServiceStub

MAX_CONFLICT_PAGE = 1000
#: How far ahead of the directory's clock a node's report may be dated.
REPORT_CLOCK_SKEW_US = 5 * 60 * 1_000_000
MAX_HISTORY = 1000


@dataclass(frozen=True, slots=True)
class History:
    """A patient's access history across the regions, newest first."""

    events: list[audit_pb2.AuditEvent]
    regions: list[pb.RegionStatus]


@dataclass(frozen=True, slots=True)
class ConflictPage:
    conflicts: list[Conflict]
    next_page_token: str


class DirectoryService:
    """What the directory does, for the person or node each call is for."""

    def __init__(
        self,
        engine: Engine,
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
        self._engine = engine
        self._index = index
        self._discovery = discovery
        self._registry = registry
        self._channels = channels
        self._assembler = assembler
        self._access = access
        self._directives = directives
        self._fanout = fanout
        self._auditor = auditor

    # -- identities -----------------------------------------------------------------------

    def register_patient(
        self, context: CallContext, identity: patient_pb2.PatientIdentity
    ) -> tuple[Traits, bool]:
        """Store or confirm an identity; contradicting traits are refused and kept for
        review."""
        with self._auditor.call(context, EventType.WRITE, identity.ins) as audited:
            audited.detail = "patient identity registered"
            policy.check_register(context.principal)
            traits = traits_of(identity, "patient", require_all=True)
            for _attempt in range(2):
                try:
                    with UnitOfWork(self._engine, audited) as uow:
                        outcome = self._index.merge(uow.session, traits, context.principal.uri)
                        if not isinstance(outcome, list):
                            uow.audit()
                        uow.commit()  # a conflict is kept for review, then refused
                except IntegrityError:
                    continue  # a concurrent registration of the same INS: look again
                if isinstance(outcome, list):
                    raise FailedPrecondition(
                        conflict_message(traits.ins, outcome), reason=IDENTITY_CONFLICT
                    )
                return outcome
            raise FailedPrecondition(f"INS {traits.ins} is being registered concurrently: retry")

    def get_patient(self, context: CallContext, ins: str) -> tuple[Traits, list[Fragment]]:
        with self._auditor.call(context, EventType.READ_RECORD, ins) as audited:
            audited.detail = "patient identity and record locations"
            ins = normalize_ins(ins)
            self._access.relay(context, audited, access_pb2.OPERATION_LOOKUP, ins)
            found = self._index.get(ins)
            audited.commit()
            return found

    def identity_conflicts(
        self, context: CallContext, request: pb.ListIdentityConflictsRequest
    ) -> ConflictPage:
        """The identity conflicts for an operator to review, oldest first."""
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
        token = ""
        if len(conflicts) > size:
            token = tokens.encode(
                page_token_pb2.ConflictCursor(
                    seq=conflicts[size - 1].seq, query_fingerprint=query_print
                )
            )
        return ConflictPage(conflicts[:size], token)

    # -- nodes ----------------------------------------------------------------------------

    def report_fragments(
        self, context: CallContext, reports: Sequence[pb.FragmentReport]
    ) -> list[str]:
        """A node's fragment counts; the INS whose traits conflict with the index."""
        region = policy.check_node(context.principal)
        latest = now_us() + REPORT_CLOCK_SKEW_US
        updates = []
        for i, report in enumerate(reports):
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
        return self._index.report(region, updates, context.principal.uri)

    def register_node(self, context: CallContext, address: str) -> int:
        """A node announces its address; the heartbeat interval it keeps."""
        region = policy.check_node(context.principal)
        if self._registry is None:
            raise FailedPrecondition(
                "this directory finds nodes through Consul: start the node with --consul"
            )
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidArgument(f"address {address!r} must be HOST:PORT")
        self._registry.announce(region, address)
        return HEARTBEAT_SECONDS

    def nodes(self) -> list[NodeRoute]:
        return sorted(self._discovery.routes().values(), key=lambda r: r.region)

    # -- the record, relayed --------------------------------------------------------------

    def consolidated_view(
        self, context: CallContext, request: pb.GetConsolidatedViewRequest
    ) -> pb.GetConsolidatedViewResponse:
        with self._auditor.call(context, EventType.VIEW, request.patient_ins) as audited:
            ins = normalize_ins(request.patient_ins, "patient_ins")
            metadata = self._access.relay(context, audited, access_pb2.OPERATION_VIEW, ins)
            # The view's event (and the assertion's nonce) commits while the regions work:
            # one flush in series, not two. It names the patient, the caller and the request
            # id, which every node's event of this view shares with the records it served.
            # Checked first: an event says the caller viewed the record only for a request
            # the directory serves (a bad page token is refused, audited as such).
            query = self._assembler.query(request)
            audited.detail = "consolidated view"
            committing = audited.start_commit()
            try:
                view = self._assembler.view(
                    query, metadata=metadata, time_remaining=context.time_remaining()
                )
            except BaseException:
                committing.result()
                audited.recorded = False  # the failure is audited too, under the request id
                raise
            committing.result()  # nothing is answered before the trace is durable
            return view

    def record_content(
        self, context: CallContext, region: str, record_id: str
    ) -> Iterator[npb.GetRecordContentResponse]:
        """The record then its content in chunks, relayed from the node of `region`; the
        read is audited once the node has answered."""
        with self._auditor.call(context, EventType.READ_CONTENT) as audited:
            audited.record_ids = (record_id,)
            metadata = self._access.relay(
                context, audited, access_pb2.OPERATION_READ_CONTENT, record_id=record_id
            )
            stub = self._channels.node(region, node_address(self._discovery, region))
            chunks = stub.GetRecordContent(
                npb.GetRecordContentRequest(record_id=record_id),
                metadata=metadata,
                timeout=context.time_remaining(),
            )
            try:
                first = next(chunks)
            except grpc.RpcError as exc:
                raise relayed_error(region, exc) from None
            audited.commit()
        yield first
        try:
            yield from chunks
        except grpc.RpcError as exc:
            raise relayed_error(region, exc) from None

    def access_history(self, context: CallContext, request: pb.GetAccessHistoryRequest) -> History:
        """Who accessed the patient's record, at the directory and every region: for the
        patient only."""
        with self._auditor.call(context, EventType.ACCESS_HISTORY, request.patient_ins) as audited:
            ins = normalize_ins(request.patient_ins, "patient_ins")
            operation = access_pb2.OPERATION_ACCESS_HISTORY
            metadata = self._access.relay(context, audited, operation, ins)
            policy.check_history(audited.assertion)
            limit = tokens.page_size(request.page_size, 100, MAX_HISTORY)
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
        return History(events[:limit], [status for _, status in answers.values()])

    # -- directives -----------------------------------------------------------------------

    def directives(self, context: CallContext, ins: str) -> bytes | None:
        """The patient's signed directives (None when never set): for the patient, and
        for nodes' access checks."""
        with self._auditor.call(context, EventType.READ_RECORD, ins) as audited:
            ins = normalize_ins(ins, "patient_ins")
            audited.detail = (
                "patient directives for the node's access checks"
                if context.principal.role is Role.NODE
                else "patient directives"
            )
            policy.check_own_directives(context.principal, ins)
            _, signed = self._directives.current(ins)
            audited.commit()
            return signed

    def set_directives(
        self, context: CallContext, signed: access_pb2.SignedDirectives
    ) -> PatientDirectives:
        """A new version of the patient's directives, signed by the patient."""
        caller = context.principal
        with self._auditor.call(context, EventType.DIRECTIVE_CHANGE, caller.key) as audited:
            policy.check_sets_directives(caller)
            directives = self._directives.verify_new(signed, caller.key)
            with UnitOfWork(self._engine, audited) as uow:
                self._directives.store(uow.session, signed, directives)
                uow.audit()
                uow.commit()
            return directives
