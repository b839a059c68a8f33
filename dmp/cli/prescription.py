"""`dmp prescription`: write, find, read, hold, dispense and cancel e-prescriptions.

The prescriber writes at their region's node (`create --node`); everyone else goes
through the directory (`--directory`), which relays each act to the node the id names. A
pharmacist needs only the scanned id: the patient's INS is optional everywhere but `find`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dmp.cli.common import CommandError, add_identity, credentials, parse_date
from dmp.errors import DmpError, InvalidArgument
from dmp.prescription_client import PrescriptionClient, federation_verifier, node_region
from dmp.prescriptions import (
    CIP13_SYSTEM,
    STATUS_NAMES,
    parse_line,
    status_value,
    verify_prescription,
)
from dmp.printing import print_prescription, print_prescriptions, state_text
from dmp.regions import check_region
from dmp.v1 import prescription_pb2 as pb
from dmp.v1 import record_pb2

QR_SUFFIXES = (".png", ".svg")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "prescription",
        help="e-prescriptions: write, find, show, claim, dispense, cancel",
        description="Electronic prescriptions. The prescriber writes one at the node of their"
        " region; a pharmacy anywhere reads and dispenses it through the directory by its id"
        " (the QR code carries it), exactly as often as it allows.",
    )
    psub = parser.add_subparsers(dest="prescription_command", metavar="SUBCOMMAND", required=True)

    create = psub.add_parser(
        "create",
        help="write and sign a prescription; prints its id",
        description="Build a prescription, sign it with your own certificate's key and store"
        " it at your region's node; prints its id (and writes its QR code with --qr).",
    )
    add_identity(create)
    create.add_argument("--node", required=True, metavar="HOST:PORT", help="your region's node")
    create.add_argument(
        "--region",
        help="the node's region (default: read from the certificate the node presents)",
    )
    create.add_argument("--patient", required=True, metavar="INS")
    create.add_argument(
        "--line",
        action="append",
        required=True,
        metavar="CIP13|QUANTITY|DOSE|FREQUENCY|DURATION",
        help='one line, e.g. "3400935955838|1|1 comprimé|3 fois par jour|7 jours" (repeat)',
    )
    create.add_argument(
        "--renewals", type=int, default=0, metavar="N", help="renewals after the first (default 0)"
    )
    create.add_argument(
        "--interval-days",
        type=int,
        default=0,
        metavar="D",
        help="minimum days between two dispensings (default 0)",
    )
    create.add_argument("--organization", default="", help="your practice or hospital")
    create.add_argument(
        "--dispense-before", metavar="DATE", help="first dispensing before (default: 3 months)"
    )
    create.add_argument("--treatment-end", metavar="DATE", help="no dispensing after this date")
    create.add_argument(
        "--qr", type=Path, metavar="FILE.png|FILE.svg", help="write the id's QR code there"
    )
    create.set_defaults(handler=_create)

    show = _on_one(psub, "show", "a prescription, its signature verified, and what remains")
    show.set_defaults(handler=_show)

    find = psub.add_parser(
        "find",
        help="a patient's prescriptions across regions",
        description="A patient's prescriptions from every region holding their records,"
        " newest first (by default those still dispensable); regions that did not answer are"
        " named.",
    )
    add_identity(find)
    find.add_argument("--directory", required=True, metavar="HOST:PORT")
    find.add_argument("--patient", required=True, metavar="INS")
    find.add_argument(
        "--status",
        action="append",
        choices=sorted(STATUS_NAMES.values()),
        help="only these statuses (default: active and partially dispensed)",
    )
    find.set_defaults(handler=_find)

    claim = _on_one(psub, "claim", "hold a prescription for your pharmacy while preparing it")
    claim.add_argument("--pharmacy", required=True, metavar="NAME")
    claim.add_argument(
        "--hold", type=int, default=0, metavar="SECONDS", help="default 5 minutes, at most 15"
    )
    claim.set_defaults(handler=_claim)

    release = _on_one(psub, "release", "give up your pharmacy's hold")
    release.set_defaults(handler=_release)

    dispense = _on_one(psub, "dispense", "record one dispensing")
    dispense.add_argument(
        "--line",
        action="append",
        default=[],
        metavar="INDEX:QUANTITY",
        help="what is given of line INDEX (repeat; default: every line, what remains)",
    )
    dispense.add_argument(
        "--substitute",
        action="append",
        default=[],
        metavar="INDEX:CIP13",
        help="line INDEX given as this product (the line must allow substitution)",
    )
    dispense.add_argument(
        "--not-delivered",
        action="append",
        default=[],
        metavar="INDEX:REASON",
        help="line INDEX not given, and why",
    )
    dispense.add_argument("--pharmacy", required=True, metavar="NAME")
    dispense.add_argument(
        "--key",
        default="",
        metavar="IDEMPOTENCY_KEY",
        help="8 to 64 characters; a retry with the same key dispenses nothing more",
    )
    dispense.set_defaults(handler=_dispense)

    cancel = _on_one(psub, "cancel", "cancel your prescription (or its remaining renewals)")
    cancel.add_argument("--reason", required=True)
    cancel.set_defaults(handler=_cancel)


def _on_one(psub: argparse._SubParsersAction[Any], name: str, text: str) -> argparse.ArgumentParser:
    """A command on one prescription, by its id, through the directory (or a node)."""
    parser: argparse.ArgumentParser = psub.add_parser(name, help=text, description=text + ".")
    add_identity(parser)
    parser.add_argument("id", metavar="ID", help="the prescription id (as scanned)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--directory", metavar="HOST:PORT")
    where.add_argument("--node", metavar="HOST:PORT", help="the node holding it, directly")
    parser.add_argument(
        "--patient", default="", metavar="INS", help="the patient, when known (optional)"
    )
    return parser


def _client(args: argparse.Namespace) -> PrescriptionClient:
    return PrescriptionClient(args.directory or args.node, credentials(args))


def _pair(value: str, option: str) -> tuple[int, str]:
    index, sep, rest = value.partition(":")
    if not sep or not index.isdigit() or not rest:
        raise InvalidArgument(f"{option} {value!r} must be INDEX:VALUE, e.g. 0:2")
    return int(index), rest


def _write_qr(path: Path, prescription_id: str) -> None:
    import segno

    if path.suffix.lower() not in QR_SUFFIXES:
        raise CommandError(f"--qr {path}: the file must end in .png or .svg")
    try:
        segno.make_qr(prescription_id, error="m").save(str(path), scale=8, border=4)
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror}") from None


def _create(args: argparse.Namespace) -> int:
    if args.qr is not None and args.qr.suffix.lower() not in QR_SUFFIXES:
        raise CommandError(f"--qr {args.qr}: the file must end in .png or .svg")
    lines = [parse_line(text) for text in args.line]
    creds = credentials(args)
    region = check_region(args.region) if args.region else node_region(args.node, creds)
    with PrescriptionClient(args.node, creds) as client:
        stored = client.create(
            args.patient,
            lines,
            region=region,
            organization=args.organization,
            renewals=args.renewals,
            min_interval_days=args.interval_days,
            dispense_before=parse_date(args.dispense_before) if args.dispense_before else None,
            treatment_end=parse_date(args.treatment_end) if args.treatment_end else None,
        )
    prescription = pb.Prescription.FromString(stored.signed.prescription)
    if args.qr is not None:
        _write_qr(args.qr, prescription.id)
    print(prescription.id)
    return 0


def _show(args: argparse.Namespace) -> int:
    creds = credentials(args)
    with _client(args) as client:
        stored = client.get(args.id, patient_ins=args.patient)
    try:
        prescription, signer = verify_prescription(
            stored.signed, federation_verifier(args.pki, creds), lasting=True
        )
    except DmpError as exc:
        raise CommandError(f"{args.id}: the signature does NOT verify: {exc}") from None
    signature = f"verified: signed by {signer.name or signer.uri} ({signer.uri}), federation CA"
    print_prescription(prescription, stored, signature)
    return 0


def _find(args: argparse.Namespace) -> int:
    with _client(args) as client:
        found = client.find(
            args.patient, statuses=[status_value(name) for name in args.status or ()]
        )
    pairs = [(pb.Prescription.FromString(s.signed.prescription), s) for s in found.prescriptions]
    print_prescriptions(pairs, found.regions)
    return 0


def _claim(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stored = client.claim(
            args.id, args.pharmacy, hold_seconds=args.hold, patient_ins=args.patient
        )
    until = stored.state.held_until.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC")
    print(f"{args.id}: held by {args.pharmacy} until {until}")
    return 0


def _release(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stored = client.release(args.id, patient_ins=args.patient)
    print(f"{args.id}: released; {state_text(stored)}")
    return 0


def dispensed_lines(
    given: list[str],
    substitutes: list[str],
    not_delivered: list[str],
    remaining: dict[int, int] | None = None,
) -> list[pb.DispensedLine]:
    """The lines of a dispensing from the command's options; with no --line, every line
    that remains (`remaining`: line index to quantity) and is not marked not delivered."""
    lines: dict[int, pb.DispensedLine] = {}
    for value in not_delivered:
        index, reason = _pair(value, "--not-delivered")
        lines[index] = pb.DispensedLine(line=index, quantity=0, not_delivered_reason=reason)
    for value in given:
        index, given_text = _pair(value, "--line")
        if index in lines:
            raise InvalidArgument(f"line {index} is both given and not delivered")
        if not given_text.isdigit():
            raise InvalidArgument(f"--line {value!r}: the quantity must be a whole number")
        lines[index] = pb.DispensedLine(line=index, quantity=int(given_text))
    if not given:
        for index, quantity in sorted((remaining or {}).items()):
            if index not in lines and quantity > 0:
                lines[index] = pb.DispensedLine(line=index, quantity=quantity)
    for value in substitutes:
        index, code = _pair(value, "--substitute")
        if index not in lines or lines[index].not_delivered_reason:
            raise InvalidArgument(f"--substitute {value!r}: line {index} is not given")
        lines[index].substitute.code.CopyFrom(record_pb2.Coding(system=CIP13_SYSTEM, code=code))
    return [lines[index] for index in sorted(lines)]


def _dispense(args: argparse.Namespace) -> int:
    with _client(args) as client:
        remaining = None
        current = None
        if not args.line:
            current = client.get(args.id, patient_ins=args.patient)
            remaining = {r.line: r.quantity for r in current.state.remaining}
        lines = dispensed_lines(args.line, args.substitute, args.not_delivered, remaining)
        if not lines:
            where = state_text(current) if current is not None else "nothing to dispense"
            raise CommandError(f"{args.id}: {where}")
        dispensation, stored = client.dispense(
            args.id, lines, pharmacy=args.pharmacy, key=args.key, patient_ins=args.patient
        )
    which = (
        "first dispensing"
        if dispensation.dispensing == 0
        else (f"renewal {dispensation.dispensing}")
    )
    print(f"{args.id}: dispensed ({which}, {dispensation.id}); {state_text(stored)}")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stored = client.cancel(args.id, args.reason, patient_ins=args.patient)
    print(f"{args.id}: {state_text(stored)}")
    return 0
