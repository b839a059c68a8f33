"""`dmp node backup`, `dmp node backup verify`, `dmp node restore`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from dmp.certificates import CA_FILE, load_private_key
from dmp.cli.common import PKI_ENV, CommandError, add_pki, credentials
from dmp.db import make_engine
from dmp.envelope import load_kek_file
from dmp.sealed import SealError, read_header

BACKUP_HELP = (
    "Back up the node's database while it serves: one consistent snapshot of every table,"
    " signed by the node's key (--as) and encrypted to a certificate (--to, default the"
    " node's own). Never holds the KEK. `dmp node backup verify FILE` proves a backup."
)


class Bar:
    """A progress line on stderr, only when stderr is a terminal."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._on = sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self._on or now - self._last < 0.2:
            return
        self._last = now
        if total:
            width = 30
            filled = width * done // total
            bar = "#" * filled + "." * (width - filled)
            sys.stderr.write(f"\r{self._what} [{bar}] {done}/{total} rows")
        else:
            sys.stderr.write(f"\r{self._what} {done} rows")
        sys.stderr.flush()

    def close(self) -> None:
        if self._on and self._last:
            sys.stderr.write("\n")


def register(node_sub: argparse._SubParsersAction[Any]) -> None:
    backup = node_sub.add_parser(
        "backup", help="back up the node's database", description=BACKUP_HELP
    )
    # Not required here, so that `dmp node backup verify FILE` parses; checked in _backup.
    default_pki = os.environ.get(PKI_ENV)
    backup.add_argument(
        "--pki",
        type=Path,
        metavar="DIR",
        default=Path(default_pki) if default_pki else None,
        help=f"the federation PKI directory (default: ${PKI_ENV})",
    )
    backup.add_argument(
        "--as", dest="identity", metavar="node-REGION", help="the node whose key signs"
    )
    backup.add_argument("--db", metavar="URL", help="the node's database URL")
    backup.add_argument("--out", type=Path, metavar="FILE", help="the backup file to write (0600)")
    backup.add_argument(
        "--to",
        type=Path,
        metavar="CERT.pem",
        help="encrypt to this certificate's key (default: the node's own certificate)",
    )
    backup.set_defaults(handler=_backup)
    verbs = backup.add_subparsers(dest="backup_command", metavar="verify")
    verify = verbs.add_parser(
        "verify",
        help="prove a backup: signature, hashes, a restore, content hashes, audit log",
        description="Decrypt, check the signature against the federation CA and every hash,"
        " restore into a scratch database, check every record's content against its SHA-256"
        " and verify the restored audit log. One line; exit status 1 naming any problem.",
    )
    verify.add_argument("file", type=Path, metavar="FILE")
    add_pki(verify)
    _add_key(verify)
    verify.add_argument(
        "--scratch",
        type=Path,
        metavar="DIR",
        help="where the scratch database goes (default: TMPDIR)",
    )
    verify.add_argument(
        "--kek-file",
        type=Path,
        metavar="FILE",
        help="the node's KEK: open every sealed content with its patient's data key and"
        " check it against its SHA-256. Without it sealed contents cannot be authenticated"
        " (the backup never holds the KEK): they are checked for shape and data key, and"
        " the verdict counts them as not opened",
    )
    verify.set_defaults(handler=_verify)
    restore = node_sub.add_parser(
        "restore",
        help="restore a backup into an empty database",
        description="Restore a backup into an empty database (refuses one holding any row),"
        " after checking its signature and hashes; `dmp node serve --db URL` then serves it.",
    )
    restore.add_argument("file", type=Path, metavar="FILE")
    restore.add_argument("--db", required=True, metavar="URL", help="the (empty) database URL")
    add_pki(restore)
    _add_key(restore)
    restore.set_defaults(handler=_restore)


def _add_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key",
        type=Path,
        metavar="KEY.pem",
        help="the recipient's private key (default: the key in --pki of the identity the"
        " backup is encrypted to, e.g. node-11.key)",
    )


def _ca(pki: Path) -> tuple[x509.Certificate, bytes]:
    try:
        pem = (pki / CA_FILE).read_bytes()
        return x509.load_pem_x509_certificate(pem), pem
    except (OSError, ValueError):
        raise CommandError(f"cannot read the federation CA certificate {pki / CA_FILE}") from None


def _key(args: argparse.Namespace) -> ec.EllipticCurvePrivateKey:
    path: Path | None = args.key
    if path is None:
        try:
            with args.file.open("rb") as source:
                header, _ = read_header(source)
        except OSError as exc:
            raise CommandError(f"cannot read {args.file}: {exc.strerror}") from None
        except SealError as exc:
            raise CommandError(f"{args.file}: {exc}") from None
        recipient = str(header.get("recipient", ""))
        if not recipient.startswith("node-"):
            raise CommandError(f"the backup is encrypted to {recipient}: give its key with --key")
        path = args.pki / f"{recipient}.key"
    try:
        return load_private_key(path.read_bytes())
    except OSError as exc:
        raise CommandError(f"cannot read the recipient key {path}: {exc.strerror}") from None


def _backup(args: argparse.Namespace) -> int:
    from node.backup import BackupError, write_backup

    if args.db is None or args.out is None or args.pki is None or args.identity is None:
        raise CommandError(
            "dmp node backup needs --db URL, --out FILE, --pki DIR and --as node-REGION"
        )
    creds = credentials(args)
    recipient = None
    if args.to is not None:
        try:
            recipient = x509.load_pem_x509_certificate(args.to.read_bytes())
        except (OSError, ValueError):
            raise CommandError(f"{args.to} is not a readable PEM certificate") from None
    engine = make_engine(args.db, pool_size=2)
    bar = Bar("backup")
    started = time.monotonic()
    try:
        summary = write_backup(engine, creds, args.out, recipient=recipient, progress=bar)
    except BackupError as exc:
        raise CommandError(str(exc)) from None
    finally:
        bar.close()
        engine.dispose()
    seconds = time.monotonic() - started
    print(
        f"backup of node {summary.region}: {summary.records} records, {summary.rows} rows in"
        f" {len(summary.tables)} tables, record seq {summary.last_record_seq}, audit seq"
        f" {summary.last_audit_seq}, {summary.file_bytes} bytes in {seconds:.1f} s"
    )
    return 0


def _quiet_migrations() -> None:
    """The scratch or target database's migrations are not the operator's news."""
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _verify(args: argparse.Namespace) -> int:
    from node.backup import BackupError
    from node.restore import verify_backup

    _quiet_migrations()
    ca, ca_pem = _ca(args.pki)
    key = _key(args)
    kek = load_kek_file(args.kek_file) if args.kek_file else None
    bar = Bar("verify")
    try:
        summary = verify_backup(
            args.file, key, ca, ca_pem, scratch=args.scratch, kek=kek, progress=bar
        )
    except BackupError as exc:
        raise CommandError(f"backup {args.file.name} is NOT valid: {exc}") from None
    finally:
        bar.close()
    m = summary.manifest
    c = summary.contents
    parts = []
    if c.clear:
        parts.append(f"{c.clear} in clear checked against their SHA-256")
    if c.opened:
        parts.append(f"{c.opened} opened with the KEK and checked against their SHA-256")
    if c.sealed:
        parts.append(f"{c.sealed} sealed, not opened (no --kek-file)")
    if c.shredded:
        parts.append(f"{c.shredded} shredded")
    print(
        f"backup {args.file.name} OK: node {m['region']}, signed by {m['node']},"
        f" {summary.records} records ({', '.join(parts) or 'none'}), {summary.rows} rows,"
        f" audit log of {summary.audit_events} events verified"
    )
    return 0


def _restore(args: argparse.Namespace) -> int:
    from node.backup import BackupError
    from node.restore import restore_backup

    _quiet_migrations()
    ca, _ = _ca(args.pki)
    key = _key(args)
    bar = Bar("restore")
    try:
        summary = restore_backup(args.file, key, ca, args.db, progress=bar)
    except BackupError as exc:
        raise CommandError(str(exc)) from None
    finally:
        bar.close()
    m = summary.manifest
    print(
        f"restored node {m['region']}'s backup: {summary.records} records, {summary.rows} rows,"
        f" record seq {m['last_record_seq']}, audit seq {m['last_audit_seq']}"
    )
    return 0
