"""`dmp audit`: verify, checkpoint and export the audit trail of a node or of the directory.

Each works on the service's database directly (a SQLite file or a PostgreSQL URL), while
the service is stopped or, on SQLite, while it runs. The audit tables have the same names
in a node's and in the directory's database; whose log it is comes from its events.
``verify --witness``/``--witnessed`` also checks the log against the signed heads another
service witnessed for it (the directory for a node, a node for the directory), which the
host of the database cannot rewrite; ``witnessed export`` writes those heads to a file.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import Engine, Table, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from dmp.audit.fhir import export_events
from dmp.audit.handovers import verify_handovers
from dmp.audit.log import AuditLog
from dmp.audit.tables import audit_tables
from dmp.audit.verify import VerifyReport, log_owner, verify_log
from dmp.audit.witness import Witnessed, list_witnessed, witnessed_heads_table
from dmp.audit.witness_check import WitnessReport, check_witnessed, read_witnessed, to_json
from dmp.audit.witness_client import fetch_witnessed
from dmp.cli.common import (
    PKI_ENV,
    CommandError,
    add_identity,
    add_pki,
    channel,
    credentials,
    parse_date,
)
from dmp.db import make_engine, new_metadata, sqlite_url
from dmp.errors import DmpError
from dmp.identity import Principal, parse_uri
from dmp.v1 import witness_pb2_grpc

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "audit",
        help="verify, checkpoint and export a node's or the directory's audit trail",
        description="The audit trail of a node or of the directory, read from its database.",
    )
    asub = parser.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)

    verify = asub.add_parser(
        "verify",
        help="check the whole log; exit 1 and name each damaged event if it does not verify",
        description="Recompute every event's hash and the Merkle root at every signed"
        " checkpoint, check the signatures against the federation CA, and report any event"
        " changed, deleted or moved and any truncation behind a signed checkpoint.",
    )
    _add_db(verify)
    add_pki(verify)
    verify.add_argument(
        "--source",
        metavar="URI",
        help="whose log it must be, e.g. urn:dmp:node:11 or urn:dmp:directory"
        " (default: the audit source its events name)",
    )
    verify.add_argument(
        "--max-problems",
        type=int,
        default=100,
        metavar="N",
        help="print at most N problems (default 100)",
    )
    verify.add_argument(
        "--witness",
        metavar="HOST:PORT",
        help="also check the log against the heads this witness kept for it: the directory"
        " for a node's log, a node for the directory's (needs --as)",
    )
    verify.add_argument(
        "--as",
        dest="identity",
        metavar="IDENTITY",
        help="the certificate to ask the witness with: node-<region> or directory",
    )
    verify.add_argument(
        "--witnessed",
        type=Path,
        metavar="FILE",
        help="also check the log against the witnessed heads of this file"
        " (from `dmp audit witnessed export`)",
    )
    verify.set_defaults(handler=_verify)

    checkpoint = asub.add_parser(
        "checkpoint",
        help="sign a checkpoint of the log now",
        description="Sign the current tree size and root with the key of the service whose"
        " log it is (--as node-<region> or --as directory) and store it in the log.",
    )
    _add_db(checkpoint)
    add_identity(checkpoint)
    checkpoint.set_defaults(handler=_checkpoint)

    export = asub.add_parser(
        "export",
        help="write the events to standard output as JSON lines or a FHIR R4 Bundle",
    )
    _add_db(export)
    export.add_argument("--format", choices=["jsonl", "fhir"], default="jsonl")
    export.add_argument("--since", metavar="DATE", help="only events from this date or instant")
    export.set_defaults(handler=_export)

    witnessed = asub.add_parser(
        "witnessed",
        help="the audit heads a service witnessed for another",
        description="The signed audit heads a witness keeps for another service's log.",
    )
    wsub = witnessed.add_subparsers(dest="witnessed_command", metavar="SUBCOMMAND", required=True)
    wexport = wsub.add_parser(
        "export",
        help="write the heads witnessed for a signer to a file, for `verify --witnessed`",
        description="Write, one JSON line each, the heads a witness kept for a signer, each"
        " with the witness's cosignature: from the witness's database (--db) or asked of the"
        " running witness (--witness HOST:PORT --as IDENTITY).",
    )
    wexport.add_argument(
        "--signer", required=True, metavar="URI", help="whose heads, e.g. urn:dmp:node:11"
    )
    wexport.add_argument("--db", metavar="URL", help="the witness's database")
    wexport.add_argument("--witness", metavar="HOST:PORT", help="the running witness")
    wexport.add_argument(
        "--pki",
        metavar="DIR",
        type=Path,
        default=Path(os.environ[PKI_ENV]) if os.environ.get(PKI_ENV) else None,
        help=f"with --witness: the federation PKI directory (default: ${PKI_ENV})",
    )
    wexport.add_argument("--as", dest="identity", metavar="IDENTITY", help="with --witness")
    wexport.add_argument(
        "--output", type=Path, metavar="FILE", help="write there (default: standard output)"
    )
    wexport.set_defaults(handler=_export_witnessed)


def _add_db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        required=True,
        metavar="URL",
        help="the service's database: sqlite:///PATH, postgresql://... or a SQLite file path",
    )


def _open(db: str) -> tuple[Engine, Table, Table]:
    """An engine on an existing database holding the audit tables."""
    url = db if "://" in db else sqlite_url(Path(db))
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise CommandError(f"{db!r} is not a database URL or a SQLite file path") from None
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if not path or path == ":memory:" or not Path(path).is_file():
            # Opening it would create an empty database.
            raise CommandError(f"no SQLite database at {path or db!r}")
    engine = make_engine(url, pool_size=2)
    events, checkpoints = audit_tables(new_metadata())
    try:
        present = inspect(engine)
        missing = [t.name for t in (events, checkpoints) if not present.has_table(t.name)]
    except SQLAlchemyError as exc:
        engine.dispose()
        raise CommandError(f"cannot read the database {db}: {exc.__class__.__name__}") from None
    if missing:
        engine.dispose()
        raise CommandError(
            f"{db} has no {' or '.join(missing)} table: is it a node's or the directory's"
            " database, migrated to the current version?"
        )
    return engine, events, checkpoints


def _verify(args: argparse.Namespace) -> int:
    ca_path = args.pki / "ca.pem"
    try:
        ca_pem = ca_path.read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read the CA certificate {ca_path}: {exc.strerror}") from None
    if args.source:
        try:
            parse_uri(args.source)
        except DmpError as exc:
            raise CommandError(f"--source: {exc.message}") from None
    engine, events, checkpoints = _open(args.db)
    try:
        report = verify_log(
            engine,
            events,
            checkpoints,
            ca_pem,
            source_id=args.source or None,
            max_problems=max(1, args.max_problems),
        )
        handovers = verify_handovers(engine, events, checkpoints, ca_pem, report.source_id)
    finally:
        engine.dispose()
    witnessed = _witness_report(args, report.source_id, ca_pem)
    if witnessed is not None and not witnessed.ok:
        total = len(witnessed.problems) + witnessed.problems_omitted
        print(
            f"FAILED: the audit log of {report.source_id} does not match the {witnessed.heads}"
            f" heads its witness kept for it (the largest of {witnessed.largest} events):"
            f" {total} problems"
        )
        for wproblem in witnessed.problems:
            print(wproblem)
        if witnessed.problems_omitted:
            print(f"... and {witnessed.problems_omitted} more problems")
        if report.ok:
            return 1
    print(_verdict(report, witnessed))
    for problem in report.problems:
        print(problem)
    if handovers.handovers or handovers.problems:
        if handovers.ok:
            print(
                f"hand-overs: {handovers.handovers} verified (both nodes' signatures, the"
                " event, the checkpoints on each side)"
            )
        else:
            print(f"FAILED: {len(handovers.problems)} hand-over problems")
            for line in handovers.problems:
                print(line)

    if report.problems_omitted:
        print(f"... and {report.problems_omitted} more problems")
    return 0 if report.ok and handovers.ok and (witnessed is None or witnessed.ok) else 1


def _witness_report(args: argparse.Namespace, source: str, ca_pem: bytes) -> WitnessReport | None:
    """The log checked against its witnessed heads, when --witness or --witnessed asks."""
    if args.witness is None and args.witnessed is None:
        return None
    if not source:
        raise CommandError("this log names no owner: give --source to check it with a witness")
    heads: list[Witnessed] = []
    if args.witnessed is not None:
        try:
            with args.witnessed.open(encoding="utf-8") as lines:
                heads.extend(read_witnessed(lines))
        except OSError as exc:
            raise CommandError(f"cannot read {args.witnessed}: {exc.strerror}") from None
        except ValueError as exc:
            raise CommandError(f"{args.witnessed}: {exc}") from None
    if args.witness is not None:
        heads.extend(_ask_witness(args, source))
    engine, events, checkpoints = _open(args.db)
    try:
        return check_witnessed(
            engine,
            events,
            checkpoints,
            heads,
            ca_pem,
            source,
            max_problems=max(1, args.max_problems),
        )
    finally:
        engine.dispose()


def _ask_witness(args: argparse.Namespace, signer: str) -> list[Witnessed]:
    """Every head the running witness at --witness kept for ``signer``."""
    if not args.identity or args.pki is None:
        raise CommandError(
            "--witness needs --pki DIR and --as IDENTITY (node-<region> or directory)"
        )
    creds = credentials(args)
    with channel(args.witness, creds) as chan:
        stub = witness_pb2_grpc.WitnessServiceStub(chan)
        try:
            return fetch_witnessed(stub, signer)
        except grpc.RpcError as exc:
            raise CommandError(
                f"the witness at {args.witness} did not answer: {exc.code().name}: {exc.details()}"
            ) from None


def _export_witnessed(args: argparse.Namespace) -> int:
    try:
        parse_uri(args.signer)
    except DmpError as exc:
        raise CommandError(f"--signer: {exc.message}") from None
    if (args.db is None) == (args.witness is None):
        raise CommandError("give either --db (the witness's database) or --witness HOST:PORT")
    if args.witness is not None:
        heads = _ask_witness(args, args.signer)
    else:
        heads = _witnessed_in_db(args.db, args.signer)
    text = "".join(to_json(head) + "\n" for head in heads)
    if args.output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        args.output.write_text(text, encoding="utf-8")
        print(f"{len(heads)} witnessed heads of {args.signer} written to {args.output}")
    return 0


def _witnessed_in_db(db: str, signer: str) -> list[Witnessed]:
    engine, _, _ = _open(db)
    try:
        table = witnessed_heads_table(new_metadata())
        if not inspect(engine).has_table(table.name):
            raise CommandError(f"{db} has no {table.name} table: it witnessed nothing yet")
        heads: list[Witnessed] = []
        while True:
            page = list_witnessed(engine, table, signer, heads[-1].head.tree_size if heads else 0)
            heads.extend(page)
            if len(page) < 1000:
                return heads
    finally:
        engine.dispose()


def _verdict(report: VerifyReport, witnessed: WitnessReport | None = None) -> str:
    owner = report.source_id or "an unknown source"
    counts = (
        f"{report.events} events, {report.checkpoints_verified} of {report.checkpoints}"
        " checkpoints verified"
    )
    if not report.ok:
        total = len(report.problems) + report.problems_omitted
        return f"FAILED: the audit log of {owner} does not verify ({counts}): {total} problems"
    line = f"OK: the audit log of {owner} verifies ({counts}"
    if report.checkpoints_verified:
        line += f", the last covering {report.last_checkpoint_size} events"
        if report.unsigned_events:
            line += f"; {report.unsigned_events} newer events not yet checkpointed"
    elif report.events:
        line += "; no signed checkpoint yet: run `dmp audit checkpoint`"
    if witnessed is not None:
        line += f"; it matches the {witnessed.heads} heads its witness kept" + (
            f", the largest of {witnessed.largest} events" if witnessed.heads else ""
        )
    return line + ")"


def _checkpoint(args: argparse.Namespace) -> int:
    creds = credentials(args)
    uri = creds.principal.uri
    engine, events, checkpoints = _open(args.db)
    try:
        owner = log_owner(engine, events)
        if owner and owner != uri:
            try:
                role, key = parse_uri(owner)
                whose = f"--as {Principal(role, key).identity}"
            except DmpError:
                whose = "its owner's identity"
            raise CommandError(
                f"this is the audit log of {owner}, not of {uri}: sign it with {whose}"
            )
        log = AuditLog(engine, events, checkpoints, source_id=uri, signer=creds)
        signed = log.checkpoint()
        if signed is None:
            print(f"no new events since the last checkpoint ({log.size()} events)")
            return 0
    finally:
        engine.dispose()
    at = _EPOCH + timedelta(microseconds=signed.signed_at_us)
    print(
        f"checkpoint of {signed.tree_size} events signed by {uri} at"
        f" {at.isoformat(timespec='seconds')}: root {signed.root_hash.hex()}"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    since_us = None
    if args.since:
        since_us = (parse_date(args.since) - _EPOCH) // timedelta(microseconds=1)
    engine, events, _ = _open(args.db)
    try:
        out = sys.stdout
        for chunk in export_events(engine, events, since_us=since_us, fmt=args.format):
            out.write(chunk)
        out.flush()
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python from complaining
        # again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        engine.dispose()
    return 0
