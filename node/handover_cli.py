"""`dmp node handover start | complete | abort | status | receive`: hand a region over to
a successor host (node/handover_*.py), and `dmp node serve --successor-of` for the
successor that receives then serves."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, inspect, select
from sqlalchemy.exc import SQLAlchemyError

from dmp.audit.events import AuditEvent, EventType
from dmp.audit.log import AuditLog
from dmp.audit.verify import log_owner
from dmp.certificates import certificate_sha256, issued_by
from dmp.cli.common import CommandError, add_pki
from dmp.db import make_engine, upgrade
from dmp.dbfile import prepare_sqlite
from dmp.envelope import load_kek_file
from dmp.errors import DmpError, FailedPrecondition
from dmp.pki import (
    CRL_FILE,
    RevocationList,
    certificate_dns_names,
    certificate_from_pem,
    load_credentials,
    node_tls_name,
    principal_from_pem,
)
from dmp.regions import check_region
from node.handover_capture import start_capture, stop_capture
from node.handover_state import (
    FREEZING,
    FROZEN,
    HANDED_OVER,
    PREDECESSOR,
    STREAMING,
    begin,
    forget,
    move,
    read,
)
from node.models import HandoverChangeRow, audit_events

_CHANGES = HandoverChangeRow.__table__


def register(node_sub: argparse._SubParsersAction[Any]) -> None:
    parser = node_sub.add_parser(
        "handover",
        help="hand this node's region over to a successor host, while it serves",
        description="Hand a region over to a successor node (another host, its own"
        " certificate for the same region from the same CA): `start --to CERT` on the"
        " predecessor, `dmp node serve --successor-of ADDR` (or `receive`) on the successor,"
        " then `complete` on the predecessor. `abort` before the successor confirmed leaves"
        " the predecessor in charge.",
    )
    sub = parser.add_subparsers(dest="handover_command", metavar="STEP", required=True)
    start = sub.add_parser("start", help="start streaming to the successor (writes go on)")
    _database(start)
    start.add_argument(
        "--to", type=Path, required=True, metavar="CERT", help="the successor's node certificate"
    )
    start.set_defaults(handler=_start)
    complete = sub.add_parser(
        "complete", help="stop accepting writes, let the successor take the last changes"
    )
    _database(complete)
    complete.add_argument(
        "--wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the successor's confirmation (default 60)",
    )
    complete.add_argument(
        "--behind",
        type=int,
        default=1000,
        metavar="ROWS",
        help="first wait, still serving, until the successor is at most ROWS changed rows"
        " behind (default 1000): the shorter the catch-up after the freeze",
    )
    complete.add_argument(
        "--now",
        action="store_true",
        help="freeze at once, without waiting for the successor to catch up",
    )
    complete.set_defaults(handler=_complete)
    abort = sub.add_parser("abort", help="give up before the successor confirmed: serve again")
    _database(abort)
    abort.set_defaults(handler=_abort)
    status = sub.add_parser("status", help="where the hand-over stands")
    _database(status)
    status.set_defaults(handler=_status)
    receive = sub.add_parser(
        "receive", help="on the successor: take the region over, then exit (serve after)"
    )
    _database(receive)
    receive.add_argument("--from", dest="predecessor", required=True, metavar="HOST:PORT")
    receive.add_argument("--kek-file", type=Path, metavar="FILE", help="the successor's own KEK")
    receive.add_argument(
        "--advertise", default="", metavar="HOST:PORT", help="where the successor will serve"
    )
    receive.set_defaults(handler=_receive)


def _database(parser: argparse.ArgumentParser) -> None:
    add_pki(parser)
    parser.add_argument("--region", required=True, help="the node's region")
    parser.add_argument("--db", metavar="URL", help="the node's database URL")
    parser.add_argument(
        "--data-dir", type=Path, default=Path("data"), help="where the default SQLite file lives"
    )


def _url(args: argparse.Namespace) -> str:
    from node.app import NodeConfig

    config = NodeConfig(
        pki_dir=args.pki, region=check_region(args.region), db_url=args.db, data_dir=args.data_dir
    )
    return config.database_url()


def open_node_database(url: str, *, create: bool = False) -> Engine:
    """A node's database at the node's schema (created only for a successor)."""
    from node.app import MIGRATIONS, TABLES

    os.umask(0o077)
    prepare_sqlite(url, initialise=create)
    engine = make_engine(url)
    try:
        upgrade(engine, MIGRATIONS, TABLES.version_table)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _existing(args: argparse.Namespace) -> Engine:
    """The database of an existing node, as it is (its serving process migrates it)."""
    url = _url(args)
    if url.startswith("sqlite") and not Path(url.split("///", 1)[-1]).exists():
        raise CommandError(f"no node database at {url}: give the node's --db or --data-dir")
    engine = make_engine(url, pool_size=2)
    try:
        present = inspect(engine).has_table("handover")
    except SQLAlchemyError as exc:
        engine.dispose()
        raise CommandError(f"cannot read the node's database: {exc.__class__.__name__}") from None
    if not present:
        engine.dispose()
        raise CommandError(
            "this node's database predates hand-overs: serve it once with this version"
            " (it migrates at start), then run the hand-over"
        )
    owner = log_owner(engine, audit_events)
    if owner and owner != f"urn:dmp:node:{check_region(args.region)}":
        engine.dispose()
        raise CommandError(
            f"this database is the one of {owner}, not of the node of region {args.region}:"
            " give the --region of the node whose --db this is"
        )
    return engine


def _audit(engine: Engine, region: str, detail: str) -> None:
    """The operator's step, in the node's own audit log (handed over with the rest)."""
    from node.models import audit_checkpoints, audit_events

    log = AuditLog(
        engine, audit_events, audit_checkpoints, source_id=f"urn:dmp:node:{region}", region=region
    )
    log.record(
        AuditEvent(
            event_type=EventType.HANDOVER,
            active_participant_user_id="urn:dmp:operator",
            active_participant_role="operator",
            detail=detail,
        )
    )


def check_successor(pki_dir: Path, region: str, pem: bytes) -> str:
    """Refuse a successor certificate that is not a current node certificate of this
    region from this CA, or is this node's own; its principal's URI."""
    own = load_credentials(pki_dir, f"node-{region}")
    try:
        cert = certificate_from_pem(pem)
        who = principal_from_pem(pem)
    except DmpError as exc:
        raise FailedPrecondition(f"the successor certificate: {exc.message}") from None
    ca = certificate_from_pem(own.ca_pem)
    if not issued_by(cert, ca):
        raise FailedPrecondition(
            "the successor certificate is not issued by this federation's CA: the national"
            f" operator issues it with `dmp pki issue node --region {region}`"
        )
    if who.uri != f"urn:dmp:node:{region}" or node_tls_name(region) not in (
        certificate_dns_names(cert)
    ):
        raise FailedPrecondition(
            f"the successor certificate names {who.uri}, not the node of region {region}:"
            " a region is handed over only to a node of the same region"
        )
    if certificate_sha256(pem) == certificate_sha256(own.cert_pem):
        raise FailedPrecondition(
            "the successor certificate is this node's own: the successor has its own key"
        )
    if RevocationList(pki_dir / CRL_FILE, ca).is_revoked(cert):
        raise FailedPrecondition("the successor certificate has been revoked")
    return who.uri


def _start(args: argparse.Namespace) -> int:
    region = check_region(args.region)
    try:
        pem = args.to.read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {args.to}: {exc.strerror}") from None
    check_successor(args.pki, region, pem)
    engine = _existing(args)
    try:
        if read(engine) is not None:
            raise FailedPrecondition(
                "a hand-over is already recorded on this node: `dmp node handover status`"
            )
        start_capture(engine)
        begin(engine, PREDECESSOR, STREAMING, pem.decode("ascii"), "")
        _audit(engine, region, f"hand-over started to certificate {certificate_sha256(pem)}")
    finally:
        engine.dispose()
    print(
        f"hand-over of region {region} started to certificate"
        f" {certificate_sha256(pem)[:16]}: this node keeps serving; on the successor run"
        f" `dmp node serve --region {region} --successor-of THIS_NODE_ADDRESS ...`"
    )
    return 0


def _complete(args: argparse.Namespace) -> int:
    engine = _existing(args)
    try:
        handover = read(engine)
        if handover is None or handover.role != PREDECESSOR:
            raise FailedPrecondition("no hand-over was started on this node")
        deadline = time.monotonic() + args.wait
        if handover.state == STREAMING:
            if not args.now:
                _catch_up(engine, args.behind, deadline)
            move(engine, {STREAMING}, state=FREEZING)
        print(f"region {args.region}: no more writes accepted; waiting for the successor")
        last = FREEZING if handover.state == STREAMING else handover.state
        while time.monotonic() < deadline:
            handover = read(engine)
            if handover is None:
                raise CommandError("the hand-over was aborted")
            if handover.state != last:
                last = handover.state
                if last == FROZEN:
                    print(
                        f"frozen at record {handover.final_record_seq}, audit"
                        f" {handover.final_audit_seq}"
                    )
            if handover.state == HANDED_OVER:
                where = handover.peer_address or "the successor"
                print(
                    f"region {args.region} handed over to {where}"
                    f" at record {handover.final_record_seq}, audit {handover.final_audit_seq}:"
                    " this node now points every caller there; ask the national operator to"
                    " revoke its certificate"
                )
                return 0
            time.sleep(0.05)
    finally:
        engine.dispose()
    raise CommandError(
        f"the successor has not confirmed within {args.wait:g} s; this node stays"
        f" frozen ({last}): run `complete` again to keep waiting, or `abort` to serve again"
    )


def _pending(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(_CHANGES)).scalar_one())


def _catch_up(engine: Engine, behind: int, deadline: float) -> None:
    """Before freezing: wait (still serving) until the successor has taken its snapshot
    and applied all but `behind` changed rows, so that the freeze is short."""
    said = False
    while True:
        handover = read(engine)
        pending = _pending(engine)
        started = handover is not None and handover.snapshot_done
        if started and pending <= behind:
            return
        if time.monotonic() >= deadline:
            raise CommandError(
                "the successor has not caught up"
                + (
                    f" ({pending} changed rows behind)"
                    if started
                    else " (it has not taken its snapshot)"
                )
                + ": this node keeps serving; run `complete` again once it has"
            )
        if not said:
            print(f"waiting for the successor to catch up ({pending} changed rows behind)")
            said = True
        time.sleep(0.1)


def _abort(args: argparse.Namespace) -> int:
    engine = _existing(args)
    try:
        handover = read(engine)
        if handover is None:
            raise FailedPrecondition("no hand-over is recorded on this node")
        if handover.state == HANDED_OVER or handover.role != PREDECESSOR:
            raise FailedPrecondition(
                "the successor already confirmed: this region is handed over and this node"
                " never serves it again"
                if handover.state == HANDED_OVER
                else "this node is a successor: discard its database to give up"
            )
        if not forget(engine, {STREAMING, FREEZING, FROZEN}):
            raise FailedPrecondition("the successor confirmed meanwhile: the region is handed over")
        stop_capture(engine)
        _audit(engine, check_region(args.region), "hand-over aborted: this node serves again")
    finally:
        engine.dispose()
    print(f"hand-over of region {args.region} aborted: this node serves it again")
    return 0


def _status(args: argparse.Namespace) -> int:
    engine = _existing(args)
    try:
        handover = read(engine)
        with engine.connect() as conn:
            pending = conn.execute(select(func.count()).select_from(_CHANGES)).scalar_one()
    finally:
        engine.dispose()
    if handover is None:
        print(f"region {args.region}: no hand-over")
        return 0
    print(
        f"region {args.region}: {handover.role} {handover.state}"
        f"; peer {handover.peer_address or '-'}"
        + f"; snapshot {'taken' if handover.snapshot_done else 'not yet taken'}"
        + ("" if handover.role == "successor" else f"; changed rows not yet applied {pending}")
        + (
            f"; final record {handover.final_record_seq}, audit {handover.final_audit_seq}"
            if handover.final_record_seq is not None
            else ""
        )
    )
    return 0


def receive_for(
    pki_dir: Path,
    region: str,
    url: str,
    predecessor: str,
    kek_file: Path | None,
    advertise: str,
    max_content: int = 64 << 20,
) -> None:
    """Receive region `region` into the database at `url`, printing progress."""
    from node.handover_receive import receive

    credentials = load_credentials(pki_dir, f"node-{region}")
    kek = load_kek_file(kek_file) if kek_file else None
    engine = open_node_database(url, create=True)
    try:
        shown = [0.0]

        def progress(phase: str, rows: int) -> None:
            if time.monotonic() - shown[0] >= 1.0:
                shown[0] = time.monotonic()
                print(f"hand-over: {phase}, {rows} rows applied", flush=True)

        done = receive(
            engine,
            credentials,
            predecessor,
            kek=kek,
            advertise=advertise,
            progress=progress,
            max_content=max_content,
        )
    finally:
        engine.dispose()
    if done.already:
        print(f"region {region}: already in charge (hand-over from {done.predecessor})")
    else:
        print(
            f"region {region} taken over from {done.predecessor}: {done.rows} rows in"
            f" {done.seconds:.1f} s, records 1..{done.final_record_seq}, audit"
            f" 1..{done.final_audit_seq}",
            flush=True,
        )


def _receive(args: argparse.Namespace) -> int:
    region = check_region(args.region)
    receive_for(args.pki, region, _url(args), args.predecessor, args.kek_file, args.advertise)
    return 0
