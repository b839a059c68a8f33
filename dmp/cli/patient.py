"""`dmp patient`: patients' identities in the national index."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from dmp.cli.common import (
    CommandError,
    add_identity,
    add_pki,
    credentials,
    directory_client,
)
from dmp.client import DirectoryClient
from dmp.directives import PatientDirectives
from dmp.errors import InvalidArgument
from dmp.identity import Role, check_rpps, parse_identity
from dmp.patients import SEX_VALUES
from dmp.pki import Credentials
from dmp.printing import print_history, print_view
from dmp.records import check_record_id
from dmp.v1 import access_pb2, patient_pb2
from dmp.v1 import directory_service_pb2 as pb


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser("patient", help="patient identities and the patient's own commands")
    psub = parser.add_subparsers(dest="patient_command", metavar="SUBCOMMAND", required=True)
    reg = psub.add_parser(
        "register",
        help="register (or confirm) a patient's identity in the national index",
        description="Register a patient's identity. Traits that contradict the identity"
        " already known for the INS are refused (identity conflict) and kept for review.",
    )
    add_identity(reg)
    reg.add_argument("--directory", required=True, metavar="HOST:PORT")
    reg.add_argument("--ins", required=True)
    reg.add_argument("--family-name", required=True, help="birth family name")
    reg.add_argument("--given-names", required=True, help="given names, space separated")
    reg.add_argument("--birth-date", required=True, metavar="YYYY-MM-DD")
    reg.add_argument("--sex", required=True, choices=sorted(SEX_VALUES))
    reg.add_argument("--birthplace", required=True, metavar="INSEE", help="birth place code")
    reg.set_defaults(handler=_register)
    register_patient_commands(psub)


def _register(args: argparse.Namespace) -> int:
    if not args.given_names.strip():
        raise InvalidArgument("--given-names must not be empty")
    identity = patient_pb2.PatientIdentity(
        ins=args.ins,
        birth_family_name=args.family_name,
        given_names=args.given_names.split(),
        birth_date=args.birth_date,
        sex=SEX_VALUES[args.sex],
        birthplace_code=args.birthplace,
    )
    with directory_client(args) as directory:
        answer = directory.register_patient(identity, timeout=10)
    verb = "registered" if answer.created else "already registered, identity confirmed"
    print(f"{answer.patient.ins}: {verb}")
    return 0


def _patient_parser(
    psub: argparse._SubParsersAction[Any], name: str, help_text: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = psub.add_parser(name, help=help_text, description=help_text)
    add_pki(parser)
    parser.add_argument(
        "--as", dest="identity", required=True, metavar="patient-INS", help="your own identity"
    )
    parser.add_argument("--directory", required=True, metavar="HOST:PORT")
    return parser


def register_patient_commands(psub: argparse._SubParsersAction[Any]) -> None:
    """The patient's own commands: directives, and their own consolidated record."""
    for name, help_text, argument in (
        (
            "mask",
            "mask a record from professionals (but its author and your treating physician)",
            "RECORD",
        ),
        ("unmask", "unmask a record", "RECORD"),
        ("block", "refuse a professional every access to your record", "RPPS"),
        ("unblock", "lift a block", "RPPS"),
        ("set-treating", "designate your treating physician ('none' to clear)", "RPPS"),
    ):
        parser = _patient_parser(psub, name, help_text)
        parser.add_argument("target", metavar=argument)
        parser.set_defaults(handler=_directive, change=name)
    emergency = _patient_parser(
        psub, "emergency", "allow or refuse emergency (break-the-glass) access"
    )
    emergency.add_argument("target", choices=["allow", "refuse"])
    emergency.set_defaults(handler=_directive, change="emergency")
    for name, help_text in (
        ("oppose", "oppose your record: no professional access at all"),
        ("close", "close your record: nothing new is written; it stays readable"),
        ("reopen", "make your record active again"),
    ):
        parser = _patient_parser(psub, name, help_text)
        parser.set_defaults(handler=_directive, change=name, target="")
    show = _patient_parser(psub, "directives", "show your directives in force")
    show.set_defaults(handler=_show_directives)
    history = _patient_parser(
        psub, "history", "who accessed your record: where, when, why, from every region"
    )
    history.add_argument("--without-own", action="store_true", help="leave out your own accesses")
    history.add_argument("--limit", type=int, default=100)
    history.set_defaults(handler=_history)
    view = _patient_parser(psub, "view", "your own consolidated record, from every region")
    view.add_argument("--limit", type=int, default=500)
    view.set_defaults(handler=_view)


def _own_ins(args: argparse.Namespace) -> str:
    role, key = parse_identity(args.identity)
    if role is not Role.PATIENT:
        raise CommandError("these commands are the patient's own: use --as patient-<INS>")
    return key


def changed(directives: PatientDirectives, change: str, target: str) -> PatientDirectives:
    """The directives after one of the patient's commands."""
    if change in ("block", "unblock", "set-treating") and not (
        change == "set-treating" and target == "none"
    ):
        check_rpps(target)
    if change in ("mask", "unmask"):
        check_record_id(target, "RECORD")
    masked, blocked = set(directives.masked_record_ids), set(directives.blocked_rpps)
    state, treating, refused = (
        directives.state,
        directives.treating_rpps,
        directives.emergency_refused,
    )
    if change == "mask":
        masked.add(target)
    elif change == "unmask":
        masked.discard(target)
    elif change == "block":
        blocked.add(target)
    elif change == "unblock":
        blocked.discard(target)
    elif change == "set-treating":
        treating = "" if target == "none" else target
    elif change == "emergency":
        refused = target == "refuse"
    elif change == "oppose":
        state = access_pb2.RECORD_STATE_OPPOSED
    elif change == "close":
        state = access_pb2.RECORD_STATE_CLOSED
    elif change == "reopen":
        state = access_pb2.RECORD_STATE_ACTIVE
    return replace(
        directives,
        version=directives.version + 1,
        state=state,
        blocked_rpps=frozenset(blocked),
        treating_rpps=treating,
        masked_record_ids=frozenset(masked),
        emergency_refused=refused,
    )


def _state_name(state: int) -> str:
    return STATE_NAMES.get(access_pb2.RecordState.ValueType(state), "active")


STATE_NAMES = {
    access_pb2.RECORD_STATE_ACTIVE: "active",
    access_pb2.RECORD_STATE_OPPOSED: "opposed",
    access_pb2.RECORD_STATE_CLOSED: "closed",
}


def describe(d: PatientDirectives) -> str:
    return "\n".join(
        [
            f"record state:        {_state_name(d.state)} (directives version {d.version})",
            f"emergency access:    {'refused' if d.emergency_refused else 'allowed'}",
            f"treating physician:  {d.treating_rpps or '-'}",
            f"blocked:             {', '.join(sorted(d.blocked_rpps)) or '-'}",
            f"masked records:      {', '.join(sorted(d.masked_record_ids)) or '-'}",
        ]
    )


def _directive(args: argparse.Namespace) -> int:
    ins = _own_ins(args)
    with directory_client(args) as directory:
        new = changed(directory.directives(ins), args.change, args.target)
        directory.set_directives(new)
    print(describe(new))
    return 0


def _show_directives(args: argparse.Namespace) -> int:
    ins = _own_ins(args)
    with directory_client(args) as directory:
        print(describe(directory.directives(ins)))
    return 0


def _view(args: argparse.Namespace) -> int:
    ins = _own_ins(args)
    with directory_client(args) as directory:
        request = pb.GetConsolidatedViewRequest(patient_ins=ins, page_size=200)
        view = directory.view(request, limit=args.limit, timeout=10.0)
    print_view(view.records, view.regions)
    return 0


def fetch_history(
    creds: Credentials, directory: str, ins: str, *, exclude_own: bool = False, limit: int = 100
) -> pb.GetAccessHistoryResponse:
    with DirectoryClient(directory, creds) as client:
        return client.access_history(ins, exclude_own=exclude_own, limit=limit, timeout=10)


def _history(args: argparse.Namespace) -> int:
    ins = _own_ins(args)
    answer = fetch_history(
        credentials(args), args.directory, ins, exclude_own=args.without_own, limit=args.limit
    )
    print_history(answer)
    return 0
