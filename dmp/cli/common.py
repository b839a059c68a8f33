"""Options and helpers shared by the client commands."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path

import grpc

from dmp.assertion import sign_assertion
from dmp.errors import InvalidArgument
from dmp.identity import Role, parse_identity
from dmp.pki import Credentials, load_credentials
from dmp.signing import Signer
from dmp.tls import secure_channel
from dmp.v1 import access_pb2


class CommandError(Exception):
    """A command-line failure: printed as one line, exit status 1."""


PKI_ENV = "DMP_PKI"


def add_pki(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get(PKI_ENV) or None
    parser.add_argument(
        "--pki",
        metavar="DIR",
        type=Path,
        default=Path(default) if default else None,
        required=default is None,
        help=f"the federation PKI directory (default: ${PKI_ENV}"
        + (f", now {default})" if default else ", which is not set)"),
    )


def add_service_storage(serve: argparse.ArgumentParser, *, witness: str) -> None:
    """The options a serving node and directory share about their database and audit log."""
    serve.add_argument(
        "--initialise",
        action="store_true",
        help="accept an existing empty (0-byte) SQLite file as a new database; without it"
        " such a file is refused as possibly damaged (a file that does not exist is always"
        " created). Never erases anything",
    )
    serve.add_argument(
        "--audit-checkpoint-every",
        type=int,
        default=1000,
        metavar="N",
        help=f"sign an audit checkpoint (and send it to {witness}) as soon as N events were"
        " added since the last one, besides every minute (default 1000)",
    )


def print_table(rows: Sequence[Sequence[str]]) -> None:
    """Print rows (the first is the header) as aligned columns."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def add_identity(parser: argparse.ArgumentParser) -> None:
    add_pki(parser)
    parser.add_argument(
        "--as",
        dest="identity",
        required=True,
        metavar="IDENTITY",
        help="whose certificate to use: practitioner-<RPPS>, patient-<INS>, node-<region>...",
    )


def credentials(args: argparse.Namespace) -> Credentials:
    parse_identity(args.identity)
    return load_credentials(args.pki, args.identity)


def add_emergency(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--emergency",
        metavar="REASON",
        help="break-the-glass: access in an emergency, for this reason (audited as such)",
    )


def assertion(
    creds: Credentials,
    patient_ins: str,
    emergency: str | None = None,
    *,
    operation: access_pb2.Operation.ValueType,
    record_id: str = "",
) -> tuple[tuple[str, bytes], ...]:
    """Metadata with a fresh access assertion signed with our own key, for one call: it
    allows `operation` only (on `record_id`, for a record read)."""
    signer = Signer(creds)
    if emergency is not None:
        if signer.principal.role is not Role.PRACTITIONER:
            raise CommandError("--emergency is for professionals")
        return sign_assertion(
            signer,
            patient_ins,
            access_pb2.PURPOSE_EMERGENCY,
            emergency,
            operation=operation,
            record_id=record_id,
        )
    return sign_assertion(signer, patient_ins, operation=operation, record_id=record_id)


def channel(target: str, creds: Credentials) -> grpc.Channel:
    return secure_channel(target, creds)


def parse_date(value: str) -> datetime:
    """A date (YYYY-MM-DD) or an ISO 8601 instant, as an aware UTC datetime."""
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), datetime.min.time(), UTC)
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidArgument(f"{value!r} is not a date (YYYY-MM-DD) or ISO 8601 instant") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
