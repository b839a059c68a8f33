"""Options and helpers shared by the client commands."""

from __future__ import annotations

import argparse
import os
from datetime import UTC, date, datetime
from pathlib import Path

import grpc

from dmp.client import DirectoryClient, NodeClient, open_channel
from dmp.errors import InvalidArgument
from dmp.identity import parse_identity
from dmp.pki import Credentials, load_credentials


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


def channel(target: str, creds: Credentials) -> grpc.Channel:
    return open_channel(target, creds)


def directory_client(args: argparse.Namespace) -> DirectoryClient:
    """The directory (--directory), as the command's identity (--as)."""
    return DirectoryClient(args.directory, credentials(args))


def node_client(args: argparse.Namespace) -> NodeClient:
    """A node (--node), as the command's identity (--as)."""
    return NodeClient(args.node, credentials(args))


def parse_date(value: str) -> datetime:
    """A date (YYYY-MM-DD) or an ISO 8601 instant, as an aware UTC datetime."""
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), datetime.min.time(), UTC)
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidArgument(f"{value!r} is not a date (YYYY-MM-DD) or ISO 8601 instant") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
