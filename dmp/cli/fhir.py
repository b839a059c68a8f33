"""`dmp fhir`: FHIR R4 for hospital and practice software."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path
from typing import Any

from dmp.cli.common import CommandError, add_identity, credentials
from dmp.identity import Role, parse_identity
from dmp.tls import MiB


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser("fhir", help="FHIR R4 for hospital and practice software")
    fsub = parser.add_subparsers(dest="fhir_command", metavar="SUBCOMMAND", required=True)
    serve = fsub.add_parser(
        "serve",
        help="a local FHIR R4 gateway acting as one professional or patient",
        description="Serve FHIR R4 JSON (IHE MHD find and retrieve, FR Core identifiers) next"
        " to the professional's software, turning every FHIR request into calls of the"
        " federation signed with the --as identity's key: GET /metadata, /Patient,"
        " /Patient/ID/$everything, /DocumentReference, /MedicationRequest, /Binary/ID,"
        " /AuditEvent; with --node, POST / (transaction Bundles, IHE MHD ITI-65).",
    )
    add_identity(serve)
    serve.set_defaults(handler=_serve)
    serve.add_argument("--directory", required=True, metavar="HOST:PORT")
    serve.add_argument(
        "--node",
        metavar="HOST:PORT",
        help="the node of your region: POST / stores transaction Bundles there (without it"
        " the gateway is read only)",
    )
    serve.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="where to serve (default 127.0.0.1:8080; port 0 picks a free one)",
    )
    serve.add_argument(
        "--tls",
        action="store_true",
        help="serve HTTPS and require a client certificate of the --as identity from the"
        " federation CA (its software on another host); needs --tls-cert and --tls-key",
    )
    serve.add_argument(
        "--tls-cert", type=Path, metavar="PEM", help="the gateway's server certificate"
    )
    serve.add_argument("--tls-key", type=Path, metavar="PEM", help="its private key")
    serve.add_argument(
        "--max-body-mib",
        type=int,
        default=20,
        metavar="MIB",
        help="largest request body accepted (default 20 MiB); larger ones get 413",
    )
    serve.add_argument(
        "--timeout", type=float, default=10.0, help="deadline of each federation call (s)"
    )

    imp = fsub.add_parser(
        "import",
        help="store transaction Bundles from hospital software at a node",
        description="Check each transaction Bundle (a FILE.json, or every *.json under DIR)"
        " and store its records at the node, all or nothing per Bundle, as the gateway's"
        " POST / does. Idempotent: importing the same files again stores nothing. Prints what"
        " was stored, already stored (skipped) and refused with the reason; exit 1 when a"
        " Bundle was refused.",
    )
    imp.add_argument("path", type=Path, metavar="FILE.json|DIR")
    add_identity(imp)
    imp.add_argument("--node", required=True, metavar="HOST:PORT", help="the node to store at")
    imp.add_argument(
        "--directory",
        metavar="HOST:PORT",
        help="also register each Bundle's patient (its Patient entry) at the directory",
    )
    imp.set_defaults(handler=_import)

    exp = fsub.add_parser(
        "export",
        help="a patient's whole record as one FHIR Bundle, content inline",
        description="Write the patient's $everything (every record you may see, each as its"
        " natural resource, and each content inline as a Binary) to --out, mode 0600.",
    )
    add_identity(exp)
    exp.add_argument("--directory", required=True, metavar="HOST:PORT")
    exp.add_argument("--patient", required=True, metavar="INS")
    exp.add_argument("--out", required=True, type=Path, metavar="FILE.json")
    exp.set_defaults(handler=_export)


def _import(args: argparse.Namespace) -> int:
    from dmp.client import DirectoryClient, NodeClient
    from dmp.fhir.files import Progress, bundle_files, import_bundles

    try:
        paths = bundle_files(args.path)
    except FileNotFoundError as exc:
        raise CommandError(str(exc)) from None
    if not paths:
        raise CommandError(f"{args.path}: no *.json file there")
    creds = credentials(args)
    directory = DirectoryClient(args.directory, creds) if args.directory else None
    try:
        with NodeClient(args.node, creds) as node:
            register = (
                (lambda identity: directory.register_patient(identity, timeout=10))
                if directory is not None
                else None
            )
            summary = import_bundles(paths, node, register=register, progress=Progress(len(paths)))
    finally:
        if directory is not None:
            directory.close()
    for line in summary.lines():
        print(line)
    return 1 if summary.refused else 0


def _export(args: argparse.Namespace) -> int:
    from dmp.fhir.errors import FhirError
    from dmp.fhir.files import export_patient
    from dmp.ins import normalize_ins

    ins = normalize_ins(args.patient, "--patient")
    try:
        done = export_patient(credentials(args), args.directory, ins, args.out)
    except FhirError as exc:
        raise CommandError(exc.diagnostics) from None
    print(
        f"wrote {args.out}: {done.records} records as {done.resources} entries,"
        f" {done.content_bytes} bytes of content inline"
    )
    for missing in done.missing:
        print(f"partial: {missing}", file=sys.stderr)
    return 1 if done.missing else 0


def _loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve(args: argparse.Namespace) -> int:
    from dmp.fhir.serve import TlsFiles, serve

    role, _ = parse_identity(args.identity)
    if role not in (Role.PRACTITIONER, Role.PATIENT):
        raise CommandError(
            "the FHIR gateway acts for a person: --as practitioner-<RPPS> or patient-<INS>"
        )
    host, colon, port = args.listen.rpartition(":")
    if not colon or not port.isdigit() or not host:
        raise CommandError(f"--listen {args.listen!r} must be HOST:PORT")
    if not args.tls and not _loopback(host):
        raise CommandError(
            f"--listen {args.listen}: without --tls the gateway serves only loopback"
            " (127.0.0.1, ::1, localhost): anyone reaching it acts as "
            f"{args.identity}; use --tls for software on another host"
        )
    tls = None
    if args.tls:
        if args.tls_cert is None or args.tls_key is None:
            raise CommandError(
                "--tls needs --tls-cert and --tls-key (the gateway's server certificate)"
            )
        for path in (args.tls_cert, args.tls_key):
            if not path.is_file():
                raise CommandError(f"{path}: no such file")
        tls = TlsFiles(args.tls_cert, args.tls_key, args.pki / "ca.pem", args.pki / "crl.pem")
    elif args.tls_cert or args.tls_key:
        raise CommandError("--tls-cert and --tls-key go with --tls")
    if args.max_body_mib < 1:
        raise CommandError("--max-body-mib must be at least 1")
    return serve(
        credentials(args),
        args.directory,
        args.listen,
        tls=tls,
        max_body=args.max_body_mib * MiB,
        node=args.node,
        timeout=args.timeout,
    )
