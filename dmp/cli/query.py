"""`dmp query`: a patient's consolidated record from every region, as a clinician sees it."""

from __future__ import annotations

import argparse
import json
from typing import Any

from google.protobuf.json_format import MessageToDict

from dmp.cli.common import (
    add_emergency,
    add_identity,
    directory_client,
    parse_date,
)
from dmp.client import view_request
from dmp.printing import print_view
from dmp.records import KIND_NAMES, kind_value
from dmp.regions import REGION_STATE_NAMES
from dmp.v1 import directory_service_pb2 as pb


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
    return view_request(
        args.patient,
        kinds=[kind_value(kind) for kind in args.kind or ()],
        type_codes=args.type_code or [],
        since=parse_date(args.since) if args.since else None,
        until=parse_date(args.until) if args.until else None,
        include_superseded=args.include_superseded,
        page_size=min(args.limit, 200),
    )


def run(args: argparse.Namespace) -> int:
    with directory_client(args) as directory:
        view = directory.view(
            build_request(args), limit=args.limit, timeout=args.timeout, emergency=args.emergency
        )
    records, regions = view.records, view.regions
    if args.json:
        print(
            json.dumps(
                {
                    "patient": args.patient,
                    "records": [MessageToDict(r) for r in records],
                    "regions": [
                        {
                            "region": s.region,
                            "state": REGION_STATE_NAMES.get(s.state, "unknown"),
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
