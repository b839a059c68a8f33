"""`dmp node export --format fhir-ndjson` and `dmp node import`: the reversibility package
(node/fhir_export.py, node/fhir_import.py)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from dmp.cli.common import CommandError, add_pki
from dmp.db import sqlite_url
from dmp.envelope import load_kek_file
from dmp.pki import CRL_FILE, Pki, load_credentials
from dmp.regions import check_region

EXPORT_HELP = (
    "Write the node's whole content as a FHIR R4 Bulk Data NDJSON package, readable"
    " without this software: one file per resource type (Patient, DocumentReference,"
    " Observation..., MedicationRequest, MedicationDispense, Binary for contents,"
    " AuditEvent), the audit log's rows as JSON lines, and manifest.json signed by the"
    " node's key (manifest.json.sig, with its certificate). Sealed records are opened"
    " with --kek-file; crypto-shredded patients' records leave as metadata only."
)
IMPORT_HELP = (
    "Import a package written by `dmp node export --format fhir-ndjson` into an EMPTY node"
    " database, after checking the manifest's signature against the federation CA and"
    " every file's SHA-256. With --kek-file the records are sealed at rest. Appends one"
    " event to the node's audit log saying what was imported."
)


def register(node_sub: argparse._SubParsersAction[Any]) -> None:
    export = node_sub.add_parser(
        "export", help="write the node's reversibility package (FHIR NDJSON)",
        description=EXPORT_HELP,
    )  # fmt: skip
    export.add_argument("--format", required=True, choices=["fhir-ndjson"])
    export.add_argument("--out", required=True, type=Path, metavar="DIR", help="a new directory")
    _database(export)
    export.set_defaults(handler=_export)

    imported = node_sub.add_parser(
        "import", help="import a reversibility package into an empty node database",
        description=IMPORT_HELP,
    )  # fmt: skip
    imported.add_argument("directory", type=Path, metavar="DIR")
    _database(imported)
    imported.add_argument("--operator", default="", help="who imports, for the audit event")
    imported.set_defaults(handler=_import)


def _database(parser: argparse.ArgumentParser) -> None:
    add_pki(parser)
    parser.add_argument("--region", required=True, help="the node's region (INSEE code)")
    parser.add_argument(
        "--db",
        metavar="URL",
        help="the node's database URL; default: the SQLite file of --data-dir",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=Path("data"), help="where the default SQLite file lives"
    )
    parser.add_argument(
        "--kek-file",
        type=Path,
        metavar="FILE",
        help="the node's key-encryption key: opens its sealed records (export), seals the"
        " imported ones (import)",
    )


def _url(args: argparse.Namespace) -> str:
    if args.db:
        return str(args.db)
    return sqlite_url(args.data_dir / f"node-{args.region}.db")


def _sealer(args: argparse.Namespace) -> Any:
    from node.keys import Sealer

    return None if args.kek_file is None else Sealer(load_kek_file(args.kek_file))


def _export(args: argparse.Namespace) -> int:
    from dmp.db import make_engine
    from dmp.dbfile import sqlite_file
    from node.fhir_export import export_node

    region = check_region(args.region)
    url = _url(args)
    path = sqlite_file(url)
    if path is not None and not path.exists():
        raise CommandError(f"no database at {path}")
    os.umask(0o077)
    credentials = load_credentials(args.pki, f"node-{region}")
    engine = make_engine(url, pool_size=2)
    try:
        summary = export_node(engine, region, credentials, args.out, sealer=_sealer(args))
    finally:
        engine.dispose()
    files = ", ".join(f"{name} {count}" for name, count in sorted(summary.counts.items()))
    print(
        f"exported node {region} to {args.out}: {summary.records} records"
        f" ({summary.shredded_records} shredded, metadata only), {summary.prescriptions}"
        f" prescriptions, {summary.dispensations} dispensations, {summary.audit_events} audit"
        f" events; manifest sha256 {summary.manifest_sha256}, signed by node-{region}"
    )
    print(f"files: {files}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from node.fhir_import import import_package

    region = check_region(args.region)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    os.umask(0o077)
    pki = Pki.load(args.pki)
    summary = import_package(
        args.directory,
        _url(args),
        pki.ca_certificate,
        args.pki / CRL_FILE,
        sealer=_sealer(args),
        operator=args.operator,
        region=region,
    )
    print(
        f"imported node {summary.region}'s package into an empty database: {summary.records}"
        f" records ({summary.shredded_records} shredded), {summary.patients} patients,"
        f" {summary.prescriptions} prescriptions, {summary.dispensations} dispensations;"
        f" manifest sha256 {summary.manifest_sha256}, one audit event appended"
    )
    return 0
