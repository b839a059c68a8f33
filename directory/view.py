"""The consolidated view: ask every region holding fragments, in parallel, merge, page.

Each region is asked through its reused channel with its own deadline (never beyond the
caller's). A region that fails is reported in the answer with what happened; it never
blocks the others. Pages follow one opaque token holding a cursor per region.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from directory.fanout import FanOut, answered
from directory.index import PatientIndex
from dmp import tokens
from dmp.clock import from_us, to_us
from dmp.fields import check_time
from dmp.ins import normalize_ins
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import node_service_pb2 as npb
from dmp.v1 import node_service_pb2_grpc, page_token_pb2, record_pb2

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
DEFAULT_REGION_DEADLINE = 2.0

S = dpb.RegionState


@dataclass
class _Region:
    region: str
    cursor: page_token_pb2.RegionCursor
    future: grpc.Future | None = None
    status: dpb.RegionStatus | None = None
    records: Sequence[record_pb2.Record] = ()
    more: bool = False


def _sort_key(record: record_pb2.Record) -> tuple[int, str]:
    return to_us(record.effective_time), record.id


@dataclass(frozen=True)
class ViewQuery:
    """A consolidated view's request, checked (ViewAssembler.query)."""

    request: dpb.GetConsolidatedViewRequest
    patient: str
    size: int
    query_print: bytes
    previous: dict[str, page_token_pb2.RegionCursor]


class ViewAssembler:
    def __init__(self, index: PatientIndex, fanout: FanOut) -> None:
        self._index = index
        self._fanout = fanout

    @staticmethod
    def query(request: dpb.GetConsolidatedViewRequest) -> ViewQuery:
        """The request checked (patient, page size, time bounds, page token): a view the
        directory will serve, or InvalidArgument. Its audit event commits only after this."""
        patient = normalize_ins(request.patient_ins, "patient_ins")
        size = tokens.page_size(request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        for name in ("since", "until"):
            if request.HasField(name):
                check_time(getattr(request, name), name)
        query_print = tokens.query_fingerprint(request)
        previous = (
            {
                c.region: c
                for c in tokens.decode(
                    request.page_token, page_token_pb2.ViewCursor, query_print
                ).regions
            }
            if request.page_token
            else {}
        )
        return ViewQuery(request, patient, size, query_print, previous)

    def view(
        self,
        query: ViewQuery,
        *,
        metadata: Sequence[tuple[str, str | bytes]],
        time_remaining: float | None,
    ) -> dpb.GetConsolidatedViewResponse:
        """Assemble one page. The caller's right to see the patient is checked before."""
        request, patient, size = query.request, query.patient, query.size
        query_print, previous = query.query_print, query.previous

        regions: list[_Region] = []
        to_ask: list[str] = []
        for fragment in self._index.fragments(patient):
            cursor = previous.get(fragment.region) or page_token_pb2.RegionCursor(
                region=fragment.region
            )
            part = _Region(fragment.region, cursor)
            regions.append(part)
            if cursor.exhausted:
                part.status = answered(fragment.region)
            else:
                to_ask.append(fragment.region)
        by_region = {part.region: part for part in regions}
        # The request of every region without a cursor (all of them on a first page) is
        # the same message: built once, serialized by each call.
        first = self._node_request(request, patient, size, page_token_pb2.RegionCursor())

        def call(
            stub: node_service_pb2_grpc.NodeServiceStub, region: str, deadline: float
        ) -> grpc.Future:
            cursor = by_region[region].cursor
            return stub.ListRecords.future(
                self._node_request(request, patient, size, cursor) if cursor.record_id else first,
                timeout=deadline,
                metadata=metadata,
            )

        answers = self._fanout.ask(to_ask, call, time_remaining)
        for region, (answer, status) in answers.items():
            part = by_region[region]
            part.status = status
            if answer is not None:
                part.records = answer.records
                part.more = bool(answer.next_page_token)
        return self._merge(regions, size, query_print)

    @staticmethod
    def _node_request(
        request: dpb.GetConsolidatedViewRequest,
        patient: str,
        size: int,
        cursor: page_token_pb2.RegionCursor,
    ) -> npb.ListRecordsRequest:
        node_request = npb.ListRecordsRequest(
            patient_ins=patient,
            kinds=request.kinds,
            type_codes=request.type_codes,
            page_size=size,
        )
        if request.HasField("since"):
            node_request.since.CopyFrom(request.since)
        if request.HasField("until"):
            node_request.until.CopyFrom(request.until)
        if not request.include_superseded:
            node_request.statuses.append(record_pb2.RECORD_STATUS_CURRENT)
        if cursor.record_id:
            node_request.start_after.effective_time.CopyFrom(from_us(cursor.effective_time_us))
            node_request.start_after.record_id = cursor.record_id
        return node_request

    @staticmethod
    def _merge(
        regions: list[_Region], size: int, query_print: bytes
    ) -> dpb.GetConsolidatedViewResponse:
        candidates = [(record, part) for part in regions for record in part.records]
        candidates.sort(key=lambda item: _sort_key(item[0]), reverse=True)
        response = dpb.GetConsolidatedViewResponse()
        seen: set[str] = set()
        consumed: dict[str, int] = {}
        last: dict[str, record_pb2.Record] = {}
        taken = 0
        for record, part in candidates:
            if taken == size:
                break
            consumed[part.region] = consumed.get(part.region, 0) + 1
            last[part.region] = record
            if record.id in seen:
                continue
            seen.add(record.id)
            response.records.append(record)
            taken += 1
            assert part.status is not None
            part.status.record_count += 1
        token = page_token_pb2.ViewCursor(query_fingerprint=query_print)
        has_more = False
        for part in regions:
            cursor = page_token_pb2.RegionCursor()
            cursor.CopyFrom(part.cursor)
            answered = part.status is not None and part.status.state == S.REGION_STATE_ANSWERED
            if answered and not cursor.exhausted:
                if part.region in last:
                    cursor.effective_time_us, cursor.record_id = _sort_key(last[part.region])
                exhausted = not part.more and consumed.get(part.region, 0) == len(part.records)
                cursor.exhausted = exhausted
                has_more = has_more or not exhausted
            token.regions.append(cursor)
            assert part.status is not None
            response.regions.append(part.status)
        if has_more:
            response.next_page_token = tokens.encode(token)
        return response
