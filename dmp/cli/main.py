"""The `dmp` command line: one entry point, a subcommand per user's job."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

import grpc

from dmp.cli.common import CommandError
from dmp.client import EmergencyNotAllowed
from dmp.errors import DmpError
from dmp.server import error_reason

Handler = Callable[[argparse.Namespace], int]


#: Where the services' own commands come from (entry points of that group: `dmp node` and
#: `dmp directory`, declared in pyproject.toml), so that the library never imports them.
SERVICE_COMMANDS = "dmp.commands"


def _register_all(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from dmp.cli import audit, demo, fhir, patient, pki, prescription, query, record

    services = {entry.name: entry for entry in entry_points(group=SERVICE_COMMANDS)}
    pki.register(sub)
    for name in ("node", "directory"):
        if name in services:
            services.pop(name).load()(sub)
    for entry in sorted(services.values(), key=lambda e: e.name):
        entry.load()(sub)
    record.register(sub)
    query.register(sub)
    patient.register(sub)
    prescription.register(sub)
    audit.register(sub)
    fhir.register(sub)
    demo.register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmp",
        description="DMP federation: the shared medical record, run as a federation of regions.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _register_all(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    handler: Handler = args.handler
    try:
        return handler(args)
    except EmergencyNotAllowed:
        print("dmp: --emergency is for professionals", file=sys.stderr)
        return 1
    except (DmpError, CommandError) as exc:
        print(f"dmp: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        name = code.name if code is not None else "UNKNOWN"
        reason = error_reason(exc)
        if reason and reason != name:  # a refusal a program acts on: ALREADY_DISPENSED...
            name = f"{name} {reason}"
        print(f"dmp: {name}: {details}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
