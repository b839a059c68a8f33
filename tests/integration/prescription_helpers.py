"""Helpers for the e-prescription tests at a node: a PKI with prescribers and several
pharmacies, actors over real mutual TLS (raw stubs, each call with its own assertion), a
node whose clock a test moves, and building and signing prescriptions."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc

from dmp.client import Assertions, open_channel
from dmp.clock import now_us
from dmp.pki import Pki, load_credentials
from dmp.prescriptions import build_prescription, new_prescription_id, parse_line, sign_prescription
from dmp.server import error_reason
from dmp.signing import Signer
from dmp.v1 import (
    access_pb2,
    node_service_pb2,
    node_service_pb2_grpc,
    prescription_pb2_grpc,
    record_pb2,
)
from dmp.v1 import prescription_pb2 as P
from node.app import RunningNode
from tests.federation import (
    DOCTOR,
    NURSE,
    OTHER_DOCTOR,
    PATIENT,
    PHARMACIST,
    make_pki,
    running_node,
)

#: Pharmacists of five pharmacies (the race uses them all).
PHARMACISTS = (PHARMACIST, "10000000031", "10000000032", "10000000033", "10000000034")
MIDWIFE = "10000000035"
DENTIST = "10000000036"
PHYSIO = "10000000037"
LINES = ("3400930000001|2|1 comprimé|3 fois par jour|7 jours", "3400930000002|1|1 sachet")

FIND = access_pb2.OPERATION_FIND_PRESCRIPTIONS
READ = access_pb2.OPERATION_READ_PRESCRIPTION
DISPENSE = access_pb2.OPERATION_DISPENSE
CANCEL = access_pb2.OPERATION_CANCEL_PRESCRIPTION
DAY_US = 24 * 3600 * 1_000_000

__all__ = [
    "DENTIST",
    "DOCTOR",
    "MIDWIFE",
    "NURSE",
    "OTHER_DOCTOR",
    "PATIENT",
    "PHYSIO",
]


def make_rx_pki(directory: Path) -> Pki:
    pki = make_pki(directory)
    for index, rpps in enumerate(PHARMACISTS[1:], start=2):
        pki.issue_practitioner(rpps, "pharmacist", f"Pharmacien NUMERO{index}")
    pki.issue_practitioner(MIDWIFE, "midwife", "Anne SAGE")
    pki.issue_practitioner(DENTIST, "dentist", "Dr Luc DENT")
    pki.issue_practitioner(PHYSIO, "physiotherapist", "Eric KINE")
    return pki


class Clock:
    """The node's clock: real time moved forward by what a test says."""

    def __init__(self) -> None:
        self.offset_us = 0

    def __call__(self) -> int:
        return now_us() + self.offset_us

    def advance(self, days: float) -> None:
        self.offset_us += int(days * DAY_US)


@contextmanager
def rx_node(
    pki_dir: Path, db_url: str, region: str = "11", **kwargs: object
) -> Iterator[tuple[RunningNode, Clock]]:
    clock = Clock()
    with running_node(pki_dir, region, db_url, clock=clock, **kwargs) as node:
        yield node, clock


@dataclass
class Refused:
    code: grpc.StatusCode
    reason: str | None
    message: str


def refusal(call: object) -> Refused:
    """What a call that must fail answered."""
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return Refused(exc.code(), error_reason(exc), exc.details() or "")
    raise AssertionError("the call succeeded")


class Actor:
    """One person's software at a node: raw stubs over the federation's mTLS channel."""

    def __init__(self, pki_dir: Path, identity: str, port: int) -> None:
        credentials = load_credentials(pki_dir, identity)
        self.signer = Signer(credentials)
        self.principal = credentials.principal
        self.channel = open_channel(f"127.0.0.1:{port}", credentials)
        self.stub = prescription_pb2_grpc.PrescriptionServiceStub(self.channel)
        self.records = node_service_pb2_grpc.NodeServiceStub(self.channel)
        self._assertions = Assertions(self.signer)

    def md(self, operation: int, rx_id: str = "", ins: str = "") -> tuple[tuple[str, bytes], ...]:
        return self._assertions.sign(ins, operation=operation, record_id=rx_id)  # type: ignore[arg-type]

    def close(self) -> None:
        self.channel.close()

    # -- the calls

    def prescribe(
        self,
        *,
        renewals: int = 0,
        interval: int = 0,
        lines: Sequence[str] = LINES,
        patient: str = PATIENT,
        region: str = "11",
        **kwargs: object,
    ) -> P.StoredPrescription:
        signed = self.signed(
            renewals=renewals, interval=interval, lines=lines, patient=patient, region=region,
            **kwargs,
        )  # fmt: skip
        return self.create(signed)

    def signed(
        self,
        *,
        renewals: int = 0,
        interval: int = 0,
        lines: Sequence[str] = LINES,
        patient: str = PATIENT,
        region: str = "11",
        **kwargs: object,
    ) -> P.SignedPrescription:
        prescription = build_prescription(
            prescription_id=new_prescription_id(region),
            patient_ins=patient,
            prescriber=self.principal,
            organization="Cabinet médical des Lilas",
            lines=[parse_line(line) for line in lines],
            renewals=renewals,
            min_interval_days=interval,
            **{"now": datetime.now(UTC), **kwargs},  # type: ignore[arg-type]
        )
        return sign_prescription(prescription, self.signer)

    def create(self, signed: P.SignedPrescription) -> P.StoredPrescription:
        request = P.CreatePrescriptionRequest(signed=signed)
        return self.stub.CreatePrescription(request, timeout=30).prescription

    def get(self, rx_id: str, ins: str = "") -> P.StoredPrescription:
        request = P.GetPrescriptionRequest(prescription_id=rx_id)
        return self.stub.GetPrescription(
            request, timeout=30, metadata=self.md(READ, rx_id, ins)
        ).prescription

    def claim(self, rx_id: str, hold_seconds: int = 0, ins: str = "") -> P.StoredPrescription:
        request = P.ClaimPrescriptionRequest(
            prescription_id=rx_id, pharmacy=f"Pharmacie {self.principal.key}",
            hold_seconds=hold_seconds,
        )  # fmt: skip
        return self.stub.ClaimPrescription(
            request, timeout=30, metadata=self.md(DISPENSE, rx_id, ins)
        ).prescription

    def release(self, rx_id: str) -> P.StoredPrescription:
        request = P.ReleasePrescriptionRequest(prescription_id=rx_id)
        return self.stub.ReleasePrescription(
            request, timeout=30, metadata=self.md(DISPENSE, rx_id)
        ).prescription

    def dispense(
        self,
        rx_id: str,
        quantities: Sequence[int] = (2, 1),
        *,
        key: str | None = None,
        ins: str = "",
        lines: Sequence[P.DispensedLine] | None = None,
    ) -> P.DispensePrescriptionResponse:
        given = (
            list(lines)
            if lines is not None
            else [P.DispensedLine(line=i, quantity=q) for i, q in enumerate(quantities)]
        )
        request = P.DispensePrescriptionRequest(
            dispensation=P.Dispensation(
                prescription_id=rx_id,
                lines=given,
                pharmacy=f"Pharmacie {self.principal.key}",
                idempotency_key=key or uuid.uuid4().hex,
            )
        )
        return self.stub.DispensePrescription(
            request, timeout=60, metadata=self.md(DISPENSE, rx_id, ins)
        )

    def cancel(self, rx_id: str, reason: str = "erreur de posologie") -> P.StoredPrescription:
        request = P.CancelPrescriptionRequest(prescription_id=rx_id, reason=reason)
        return self.stub.CancelPrescription(
            request, timeout=30, metadata=self.md(CANCEL, rx_id)
        ).prescription

    def find(self, ins: str = PATIENT, statuses: Sequence[int] = ()) -> list[P.StoredPrescription]:
        request = P.FindPrescriptionsRequest(patient_ins=ins, statuses=statuses)  # type: ignore[arg-type]
        answer = self.stub.FindPrescriptions(request, timeout=30, metadata=self.md(FIND, ins=ins))
        return list(answer.prescriptions)

    def records_of(self, ins: str = PATIENT) -> list[record_pb2.Record]:
        request = node_service_pb2.ListRecordsRequest(patient_ins=ins)
        metadata = self._assertions.sign(ins, operation=access_pb2.OPERATION_VIEW)
        return list(self.records.ListRecords(request, timeout=30, metadata=metadata).records)


@contextmanager
def actor_pool(pki_dir: Path, port: int) -> Iterator[Callable[[str], Actor]]:
    """One Actor an identity at the node on `port`, made on first use, all closed after."""
    made: dict[str, Actor] = {}

    def make(identity: str) -> Actor:
        if identity not in made:
            made[identity] = Actor(pki_dir, identity, port)
        return made[identity]

    try:
        yield make
    finally:
        for one in made.values():
            one.close()


def rx_id(stored: P.StoredPrescription) -> str:
    return P.Prescription.FromString(stored.signed.prescription).id


def practitioner(rpps: str) -> str:
    return f"practitioner-{rpps}"


def patient(ins: str = PATIENT) -> str:
    return f"patient-{ins}"
