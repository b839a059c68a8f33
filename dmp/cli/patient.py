"""`dmp patient`: patients' identities in the national index."""

from __future__ import annotations

import argparse
from typing import Any

from dmp.cli.common import add_identity, channel, credentials
from dmp.errors import InvalidArgument
from dmp.patients import SEX_VALUES
from dmp.v1 import directory_service_pb2 as pb
from dmp.v1 import directory_service_pb2_grpc, patient_pb2


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
    with channel(args.directory, credentials(args)) as ch:
        stub = directory_service_pb2_grpc.DirectoryServiceStub(ch)
        answer = stub.RegisterPatient(pb.RegisterPatientRequest(patient=identity), timeout=10)
    verb = "registered" if answer.created else "already registered, identity confirmed"
    print(f"{answer.patient.ins}: {verb}")
    return 0
