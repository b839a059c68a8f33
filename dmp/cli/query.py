"""`dmp query`: a patient's consolidated record from every region, as a clinician sees it."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from google.protobuf.json_format import MessageToDict

from dmp.assertion import Metadata
from dmp.cli.common import (
    add_emergency,
    add_identity,
    assertion,
    channel,
    credentials,
    parse_date,
    print_table,
)
from dmp.records import KIND_NAMES, kind_value
from dmp.v1 import access_pb2, directory_service_pb2_grpc, record_pb2
from dmp.v1 import directory_service_pb2 as pb

STATE_NAMES = {
    pb.REGION_STATE_ANSWERED: "answered",
    pb.REGION_STATE_UNAVAILABLE: "unavailable",
    pb.REGION_STATE_DEADLINE_EXCEEDED: "deadline exceeded",
    pb.REGION_STATE_REFUSED: "refused",
    pb.REGION_STATE_FAILED: "failed",
}


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "query",
        help="a patient's consolidated record across regions",
        description="Ask the directory for a patient's consolidated record: every region that"
        " holds records is asked in parallel; regions that did not answer are named.",
    )
    add_identity(parser)
    parser.add_argument("--directory", required=True, metavar="HOST:PORT")
    parser.add_argument("--patient", required=True, metavar="INS")
    parser.add_argument("--kind", action="append", choices=list(KIND_NAMES.values()))
    parser.add_argument("--type-code", action="append", metavar="CODE", help="LOINC code")
    parser.add_argument("--since", metavar="DATE", help="records dated on or after DATE")
    parser.add_argument("--until", metavar="DATE", help="records dated before DATE")
    parser.add_argument(
        "--include-superseded", action="store_true", help="also show replaced versions"
    )
    parser.add_argument(
        "--limit", type=int, default=500, help="stop after this many records (default 500)"
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="overall deadline in seconds (default 10)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON for programs")
    add_emergency(parser)
    parser.set_defaults(handler=run)


def build_request(args: argparse.Namespace) -> pb.GetConsolidatedViewRequest:
    request = pb.GetConsolidatedViewRequest(
        patient_ins=args.patient,
        type_codes=args.type_code or [],
        include_superseded=args.include_superseded,
        page_size=min(args.limit, 200),
    )
    for kind in args.kind or ():
        request.kinds.append(kind_value(kind))
    if args.since:
        request.since.FromDatetime(parse_date(args.since))
    if args.until:
        request.until.FromDatetime(parse_date(args.until))
    return request


def fetch(
    stub: directory_service_pb2_grpc.DirectoryServiceStub,
    request: pb.GetConsolidatedViewRequest,
    limit: int,
    timeout: float,
    sign: Callable[[], Metadata],
) -> tuple[list[record_pb2.Record], dict[str, pb.RegionStatus]]:
    """Every page up to `limit` records (a fresh assertion from `sign` for each); the
    regions' statuses of the first page, updated by later pages."""
    records: list[record_pb2.Record] = []
    regions: dict[str, pb.RegionStatus] = {}
    while True:
        page = stub.GetConsolidatedView(request, timeout=timeout, metadata=sign())
        records.extend(page.records)
        for status in page.regions:
            known = regions.get(status.region)
            if known is None or known.state == pb.REGION_STATE_ANSWERED:
                count = (known.record_count if known else 0) + status.record_count
                regions[status.region] = status
                status.record_count = count
        if not page.next_page_token or len(records) >= limit:
            return records[:limit], regions
        request.page_token = page.next_page_token


def run(args: argparse.Namespace) -> int:
    creds = credentials(args)
    with channel(args.directory, creds) as ch:
        stub = directory_service_pb2_grpc.DirectoryServiceStub(ch)
        records, regions = fetch(
            stub,
            build_request(args),
            args.limit,
            args.timeout,
            lambda: assertion(
                creds, args.patient, args.emergency, operation=access_pb2.OPERATION_VIEW
            ),
        )
    if args.json:
        print(
            json.dumps(
                {
                    "patient": args.patient,
                    "records": [MessageToDict(r) for r in records],
                    "regions": [
                        {
                            "region": s.region,
                            "state": STATE_NAMES.get(s.state, "unknown"),
                            "records": s.record_count,
                            "message": s.message,
                        }
                        for s in regions.values()
                    ],
                },
                ensure_ascii=False,
                indent=2,
            )
        )
        return 0
    print_view(records, regions)
    return 0


def print_view(records: list[record_pb2.Record], regions: dict[str, pb.RegionStatus]) -> None:
    rows = [("DATE", "REGION", "KIND", "TYPE", "TITLE", "AUTHOR")]
    rows += [
        (
            r.effective_time.ToDatetime().date().isoformat(),
            r.region,
            KIND_NAMES.get(r.kind, "?"),
            r.type_code.code,
            r.title + (" [masked]" if r.masked else ""),
            r.author.name or r.author.identity,
        )
        for r in records
    ]
    if records:
        print_table(rows)
    else:
        print("no records")
    print()
    for status in sorted(regions.values(), key=lambda s: s.region):
        state = STATE_NAMES.get(status.state, "unknown")
        detail = (
            f" ({status.record_count} records)"
            if status.state == pb.REGION_STATE_ANSWERED
            else f": {status.message}"
        )
        print(f"region {status.region}: {state}{detail}")
