"""`dmp directory`: run the national directory."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from dmp.cli.common import add_pki, add_service_storage
from dmp.server import host_port, run_until_signalled


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser("directory", help="run the national directory", description=__doc__)
    dsub = parser.add_subparsers(dest="directory_command", metavar="SUBCOMMAND", required=True)
    serve = dsub.add_parser(
        "serve",
        help="serve the patient index, locator and consolidated view over mutual TLS",
        description="Serve the patient index, the fragment locator and the consolidated view."
        " Needs DIR/directory.pem and .key from `dmp pki issue directory`. Stops cleanly on"
        " SIGTERM.",
    )
    add_pki(serve)
    serve.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    serve.add_argument("--db", metavar="URL", help="database URL (default: SQLite in --data-dir)")
    serve.add_argument("--data-dir", type=Path, default=Path("data"))
    serve.add_argument(
        "--region-deadline",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how long a view waits for each region (default 2; never beyond the caller's)",
    )
    serve.add_argument(
        "--consul",
        metavar="URL",
        help="find nodes through Consul (passing dmp-node instances) instead of the embedded"
        " registry, e.g. http://127.0.0.1:8500",
    )
    add_service_storage(serve, witness="the nodes")
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from directory.app import DirectoryConfig, start_directory

    # Databases, their WAL and anything else this process writes: for its user only.
    os.umask(0o077)
    if args.region_deadline <= 0:
        raise SystemExit("dmp: --region-deadline must be positive")
    if args.audit_checkpoint_every <= 0:
        raise SystemExit("dmp: --audit-checkpoint-every must be positive")
    directory = start_directory(
        DirectoryConfig(
            pki_dir=args.pki,
            listen=args.listen,
            db_url=args.db,
            data_dir=args.data_dir,
            region_deadline=args.region_deadline,
            consul_url=args.consul,
            initialise=args.initialise,
            audit_checkpoint_every=args.audit_checkpoint_every,
        )
    )
    print(f"directory listening on {host_port(args.listen, directory.port)}", flush=True)
    return run_until_signalled(directory.server)
