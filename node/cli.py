"""`dmp node`: run a regional record node."""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path
from typing import Any

from dmp.cli.common import add_pki, add_service_storage
from dmp.server import host_port, run_until_signalled
from dmp.tls import MiB
from node import backup_cli, export_cli, handover_cli
from node.key_cli import register_keys


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser("node", help="run a regional record node", description=__doc__)
    node_sub = parser.add_subparsers(dest="node_command", metavar="SUBCOMMAND", required=True)
    serve = node_sub.add_parser(
        "serve",
        help="serve a region's records over mutual TLS",
        description="Serve a region's records over mutual TLS. Needs DIR/node-<region>.pem and"
        " .key issued by `dmp pki issue node`. Stops cleanly on SIGTERM.",
    )
    add_pki(serve)
    serve.add_argument("--region", required=True, help="INSEE region code, e.g. 11")
    serve.add_argument(
        "--listen", default="127.0.0.1:0", metavar="HOST:PORT", help="default 127.0.0.1:0"
    )
    serve.add_argument(
        "--db",
        metavar="URL",
        help="database URL (sqlite:///path or postgresql://...);"
        " default: a SQLite file in --data-dir",
    )
    serve.add_argument(
        "--data-dir", type=Path, default=Path("data"), help="where the default SQLite file lives"
    )
    serve.add_argument(
        "--max-content-mib",
        type=int,
        default=20,
        help="largest record content accepted, in MiB (default 20)",
    )
    serve.add_argument(
        "--directory",
        metavar="HOST:PORT",
        help="the national directory: announce this node there (embedded discovery) and"
        " report fragments to its locator",
    )
    serve.add_argument(
        "--consul",
        metavar="URL",
        help="register in Consul (service dmp-node, TTL check) instead of announcing to the"
        " directory, e.g. http://127.0.0.1:8500",
    )
    serve.add_argument(
        "--advertise", metavar="HOST:PORT", help="address to announce (default: the listen address)"
    )
    serve.add_argument(
        "--access-matrix",
        type=Path,
        metavar="FILE",
        help="JSON profession matrix: which kinds and type codes each profession reads"
        " (default: the documented node/access_matrix.json)",
    )
    add_service_storage(serve, witness="the directory")
    serve.add_argument(
        "--accept-missing-audit",
        action="store_true",
        help="serve even though the directory witnessed a longer audit log than this"
        " database holds (records and events lost, e.g. with a -wal file): logged as an"
        " error, and the directory keeps refusing this node's new audit heads",
    )
    serve.add_argument(
        "--backup-every",
        metavar="DURATION",
        help="back the node up every DURATION (90s, 15m, 6h, 1d) while it serves, each backup"
        " verified by a restore; a failure is logged as an error and health service"
        " dmp.node.Backup turns NOT_SERVING",
    )
    serve.add_argument(
        "--backup-keep", type=int, default=7, metavar="N", help="verified backups kept (default 7)"
    )
    serve.add_argument(
        "--backup-dir",
        type=Path,
        metavar="DIR",
        help="where scheduled backups go (0700; default: DATA_DIR/backups)",
    )
    serve.add_argument(
        "--kek-file",
        type=Path,
        metavar="FILE",
        help="the key-encryption key (made by `dmp node init-kek`): records are stored"
        " encrypted with per-patient data keys it wraps. Without it the node stores in"
        " clear, and refuses a database holding encrypted records",
    )
    serve.add_argument(
        "--previous-kek-file",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="during an online `dmp node rotate-kek`: the old KEK, which then only opens"
        " the data keys not yet rewrapped (repeatable; drop it once the rotation is done)",
    )
    serve.add_argument(
        "--successor-of",
        metavar="HOST:PORT",
        help="take the region over from its node at HOST:PORT first (a hand-over its"
        " operator started with `dmp node handover start --to` this node's certificate),"
        " then serve it; resumes after a restart",
    )
    serve.set_defaults(handler=_serve)
    register_keys(node_sub)
    backup_cli.register(node_sub)
    export_cli.register(node_sub)
    handover_cli.register(node_sub)


def _serve(args: argparse.Namespace) -> int:
    from node.app import NodeConfig, start_node
    from node.backup_schedule import parse_duration

    # Databases, their WAL and anything else this process writes: for its user only.
    os.umask(0o077)
    if args.audit_checkpoint_every <= 0:
        raise SystemExit("dmp: --audit-checkpoint-every must be positive")
    every = None
    if args.backup_every:
        try:
            every = parse_duration(args.backup_every)
        except ValueError as exc:
            raise SystemExit(f"dmp: --backup-every: {exc}") from None
    if args.backup_keep < 1:
        raise SystemExit("dmp: --backup-keep must be at least 1")
    config = NodeConfig(
        pki_dir=args.pki,
        region=args.region,
        listen=args.listen,
        db_url=args.db,
        data_dir=args.data_dir,
        max_content=args.max_content_mib * MiB,
        directory=args.directory,
        consul_url=args.consul,
        advertise=args.advertise,
        access_matrix=args.access_matrix,
        initialise=args.initialise,
        audit_checkpoint_every=args.audit_checkpoint_every,
        accept_missing_audit=args.accept_missing_audit,
        backup_every=every,
        backup_keep=args.backup_keep,
        backup_dir=args.backup_dir,
        kek_file=args.kek_file,
        previous_kek_files=tuple(args.previous_kek_file),
    )
    if args.successor_of:
        from node.handover_cli import receive_for

        port = args.listen.rsplit(":", 1)[-1]
        advertise = args.advertise or (args.listen if port not in ("", "0") else "")
        if not advertise:
            print(
                "dmp: warning: no --advertise and --listen on port 0: the predecessor cannot"
                " point its callers to this node's address (the directory still routes here)",
                file=sys.stderr,
            )
        receive_for(
            args.pki,
            args.region,
            config.database_url(),
            args.successor_of,
            args.kek_file,
            advertise,
            max_content=config.max_content + MiB,
        )
    node = start_node(config)
    # What start-up loaded (modules, the gRPC server, the engine's metadata) lives as long
    # as the process: kept out of the collector's full passes, which otherwise walk it all
    # each time a stream's batches of rows and drafts age into the old generation.
    gc.freeze()
    print(f"node {node.region} listening on {host_port(args.listen, node.port)}", flush=True)
    sys.stdout.flush()
    return run_until_signalled(node.server)
