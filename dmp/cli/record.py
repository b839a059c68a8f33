"""`dmp record`: put, get and list records on a node."""

from __future__ import annotations

import argparse
import hashlib
import json
import mimetypes
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict

from dmp.cli.common import (
    CommandError,
    add_emergency,
    add_identity,
    directory_client,
    node_client,
    parse_date,
)
from dmp.client import DirectoryClient, NodeClient
from dmp.records import KIND_NAMES, kind_value
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import node_service_pb2 as pb
from dmp.v1 import record_pb2


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser("record", help="put, get and list records on a node")
    rsub = parser.add_subparsers(dest="record_command", metavar="SUBCOMMAND", required=True)

    put = rsub.add_parser("put", help="store a record and print its id")
    add_identity(put)
    put.add_argument("--node", required=True, metavar="HOST:PORT")
    put.add_argument("--patient", required=True, metavar="INS")
    put.add_argument("--kind", required=True, choices=list(KIND_NAMES.values()))
    put.add_argument("--type-code", required=True, metavar="CODE", help="LOINC code, e.g. 11488-4")
    put.add_argument("--type-display", default="", metavar="TEXT")
    put.add_argument("--title", required=True)
    put.add_argument("--file", required=True, type=Path, help="the content to store")
    put.add_argument("--content-type", help="media type (default: guessed from --file)")
    put.add_argument("--organization", default="")
    put.add_argument("--effective", metavar="DATE", help="clinical date (default: now)")
    put.add_argument("--id", default="", help="record id (default: a new UUID)")
    put.add_argument("--supersedes", default="", metavar="ID", help="write a new version of ID")
    put.add_argument(
        "--hidden-from-patient", action="store_true", help="hide from the patient until announced"
    )
    put.set_defaults(handler=_put)

    get = rsub.add_parser(
        "get",
        help="fetch a record's content (checked against its SHA-256)",
        description="Fetch a record's content directly from a node (--node), or through the"
        " directory (--directory with --region, the region the view names).",
    )
    add_identity(get)
    where = get.add_mutually_exclusive_group(required=True)
    where.add_argument("--node", metavar="HOST:PORT")
    where.add_argument("--directory", metavar="HOST:PORT")
    get.add_argument("--region", help="with --directory: the region holding the record")
    get.add_argument("--record", required=True, metavar="ID")
    get.add_argument("--patient", required=True, metavar="INS", help="the record's patient")
    add_emergency(get)
    get.add_argument("--out", type=Path, help="write the content here (default: standard output)")
    get.set_defaults(handler=_get)

    reveal = rsub.add_parser(
        "reveal",
        help="make a record you hid from the patient visible to them (you announced it)",
    )
    add_identity(reveal)
    reveal.add_argument("--node", required=True, metavar="HOST:PORT")
    reveal.add_argument("--record", required=True, metavar="ID")
    reveal.set_defaults(handler=_reveal)

    lst = rsub.add_parser("list", help="list a patient's records held by a node")
    add_identity(lst)
    lst.add_argument("--node", required=True, metavar="HOST:PORT")
    lst.add_argument("--patient", required=True, metavar="INS")
    lst.add_argument("--kind", action="append", choices=list(KIND_NAMES.values()))
    lst.add_argument("--since", metavar="DATE")
    lst.add_argument("--json", action="store_true", help="one JSON object per record")
    add_emergency(lst)
    lst.set_defaults(handler=_list)


def _put(args: argparse.Namespace) -> int:
    try:
        content = args.file.read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {args.file}: {exc.strerror}") from None
    content_type = args.content_type or mimetypes.guess_type(args.file.name)[0]
    record = record_pb2.Record(
        id=args.id,
        patient_ins=args.patient,
        kind=kind_value(args.kind),
        type_code=record_pb2.Coding(code=args.type_code, display=args.type_display),
        title=args.title,
        organization=args.organization,
        content_type=content_type or "application/octet-stream",
        supersedes=args.supersedes,
        hidden_from_patient=args.hidden_from_patient,
    )
    if args.effective:
        record.effective_time.FromDatetime(parse_date(args.effective))
    with node_client(args) as node:
        stored = node.put_record(record, content, timeout=60)
    print(stored.id)
    return 0


def _get(args: argparse.Namespace) -> int:
    if args.directory and not args.region:
        raise CommandError("--directory needs --region: the region holding the record")
    digest = hashlib.sha256()
    expected = ""
    size = 0
    client: NodeClient | DirectoryClient
    chunks: Iterable[pb.GetRecordContentResponse | dpb.FetchRecordContentResponse]
    if args.node:
        client = node_client(args)
        chunks = client.content(args.record, args.patient, emergency=args.emergency, timeout=120)
    else:
        client = directory_client(args)
        chunks = client.fetch_content(
            args.record, args.region, args.patient, emergency=args.emergency, timeout=120
        )
    with client:
        out = args.out.open("wb") if args.out else sys.stdout.buffer
        try:
            for response in chunks:
                if response.HasField("record"):
                    expected = response.record.sha256
                digest.update(response.chunk)
                size += len(response.chunk)
                out.write(response.chunk)
        finally:
            if args.out:
                out.close()
    if digest.hexdigest() != expected:
        raise CommandError(f"content of {args.record} does not match its SHA-256 {expected}")
    if args.out:
        print(f"wrote {size} bytes to {args.out} (sha256 {expected})", file=sys.stderr)
    return 0


def _reveal(args: argparse.Namespace) -> int:
    with node_client(args) as node:
        node.reveal(args.record, timeout=30)
    print(f"{args.record}: now visible to the patient")
    return 0


def _list(args: argparse.Namespace) -> int:
    request = pb.ListRecordsRequest(patient_ins=args.patient, page_size=200)
    for kind in args.kind or ():
        request.kinds.append(kind_value(kind))
    if args.since:
        request.since.FromDatetime(parse_date(args.since))
    with node_client(args) as node:
        for r in node.list_records(request, emergency=args.emergency, timeout=30):
            if args.json:
                print(json.dumps(MessageToDict(r), ensure_ascii=False))
            else:
                when = r.effective_time.ToDatetime().date().isoformat()
                print(
                    f"{r.id}  {when}  {KIND_NAMES[r.kind]:<13} {r.type_code.code:<8}"
                    f" {r.title}  ({r.author.name})"
                )
    return 0
