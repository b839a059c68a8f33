"""E-prescription at its node under attack, over real mutual TLS, on SQLite and PostgreSQL:
what a careless or hostile caller sends (an INS spelled otherwise, a dispensing that gives
nothing, an idempotency key reused for another dispensing, a new version of the node's
records, a scanned id from who never dispenses) never costs the patient a dispensing, hides
a prescription from them, or leaks content into the audit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from dmp.v1 import node_service_pb2, record_pb2
from dmp.v1 import prescription_pb2 as P
from node.app import RunningNode
from tests.federation import DOCTOR, NURSE, PATIENT, draft
from tests.integration.prescription_helpers import (
    PHARMACISTS,
    Actor,
    actor_pool,
    make_rx_pki,
    patient,
    practitioner,
    refusal,
    rx_id,
    rx_node,
)


@pytest.fixture(scope="module")
def rx_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("rx-attack-pki")
    make_rx_pki(directory)
    return directory


@pytest.fixture
def running(rx_pki: Path, db_url: str) -> Iterator[RunningNode]:
    with rx_node(rx_pki, db_url) as (node, _):
        yield node


@pytest.fixture
def actor(rx_pki: Path, running: RunningNode) -> Iterator[Callable[[str], Actor]]:
    with actor_pool(rx_pki, running.port) as make:
        yield make


@pytest.fixture
def doctor(actor: Callable[[str], Actor]) -> Actor:
    return actor(practitioner(DOCTOR))


@pytest.fixture
def pharmacists(actor: Callable[[str], Actor]) -> list[Actor]:
    return [actor(practitioner(rpps)) for rpps in PHARMACISTS]


def spaced(ins: str) -> str:
    """The INS as printed on a card: groups separated by spaces."""
    return " ".join((ins[0], ins[1:3], ins[3:5], ins[5:7], ins[7:10], ins[10:13], ins[13:]))


def test_an_ins_typed_with_spaces_is_the_patients_own(
    actor: Callable[[str], Actor], doctor: Actor, pharmacists: list[Actor]
) -> None:
    """A prescriber typing the INS as printed (with spaces) writes the patient's own
    prescription: the patient finds it, reads it naming themselves, and sees it held under
    their INS; a node never stores an act under an INS spelled otherwise."""
    stored = doctor.prescribe(patient=spaced(PATIENT))
    rx = rx_id(stored)
    assert P.Prescription.FromString(stored.signed.prescription).patient_ins == PATIENT
    me = actor(patient(PATIENT))
    assert [rx_id(found) for found in me.find()] == [rx]
    assert rx_id(me.get(rx, ins=PATIENT)) == rx
    assert rx_id(pharmacists[0].dispense(rx, ins=PATIENT).prescription) == rx


def test_a_dispensing_that_gives_nothing_costs_no_dispensing(
    doctor: Actor, pharmacists: list[Actor]
) -> None:
    """Every line not delivered (out of stock) is no dispensing: the prescription stays
    whole for the next pharmacy."""
    rx = rx_id(doctor.prescribe())
    nothing = [
        P.DispensedLine(line=0, quantity=0, not_delivered_reason="rupture de stock"),
        P.DispensedLine(line=1, quantity=0, not_delivered_reason="rupture de stock"),
    ]
    answer = refusal(lambda: pharmacists[0].dispense(rx, lines=nothing))
    assert answer.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "gives nothing" in answer.message
    given = pharmacists[1].dispense(rx)
    assert given.dispensation.dispensing == 0
    assert given.prescription.state.status == P.PRESCRIPTION_STATUS_COMPLETED


def test_a_key_reused_for_another_dispensing_is_refused(
    doctor: Actor, pharmacists: list[Actor]
) -> None:
    """A retry is the same dispensing again: a key the pharmacy's software reuses for other
    lines (or another pharmacy's name) is refused, never answered as if those lines were
    recorded."""
    rx = rx_id(doctor.prescribe(renewals=2))
    first = pharmacists[0].dispense(rx, (2, 1), key="caisse-1-ticket-0001")
    other = refusal(lambda: pharmacists[0].dispense(rx, (1, 1), key="caisse-1-ticket-0001"))
    assert other.code == grpc.StatusCode.ALREADY_EXISTS
    assert "another dispensing" in other.message
    again = pharmacists[0].dispense(rx, (2, 1), key="caisse-1-ticket-0001")
    assert again.dispensation == first.dispensation
    assert len(again.prescription.state.dispensations) == 1


def test_the_records_of_e_prescription_are_superseded_by_no_writer(
    doctor: Actor, pharmacists: list[Actor]
) -> None:
    """The prescription and dispensation records are the node's account of the signed act
    and of its dispensings: neither their prescriber nor their pharmacist replaces them
    with a new version (that would retire them from the consolidated view)."""
    rx = rx_id(doctor.prescribe())
    given = pharmacists[0].dispense(rx).dispensation
    linked = {r.kind: r for r in doctor.records_of() if r.prescription_id == rx}
    written = linked[record_pb2.RECORD_KIND_PRESCRIPTION]
    for author, kind, replaced in (
        (doctor, record_pb2.RECORD_KIND_PRESCRIPTION, written.id),
        (pharmacists[0], record_pb2.RECORD_KIND_DISPENSATION, given.id),
    ):
        record = draft(kind=kind, code="57833-6", title="Autre chose")
        record.supersedes = replaced
        request = node_service_pb2.PutRecordRequest(record=record, content=b"x")
        answer = refusal(lambda a=author, r=request: a.records.PutRecord(r, timeout=10))
        assert answer.code == grpc.StatusCode.FAILED_PRECONDITION, replaced
    still = {r.id for r in doctor.records_of() if r.prescription_id == rx}
    assert still == {written.id, given.id}


def test_the_audit_holds_no_medication_nor_free_text_of_the_prescriber(
    running: RunningNode, doctor: Actor, pharmacists: list[Actor]
) -> None:
    """An audit event's detail never holds record content: neither the product of a line
    refused QUANTITY_EXCEEDED nor the prescriber's reason for cancelling."""
    rx = rx_id(doctor.prescribe(renewals=1))
    assert refusal(lambda: pharmacists[0].dispense(rx, (3, 1))).reason == "QUANTITY_EXCEEDED"
    doctor.cancel(rx, "allergie à la pénicilline découverte")
    assert running.audit is not None
    events = [e.event for e in running.audit.events_for_patient(PATIENT, limit=1000)]
    mine = [e for e in events if rx in e.participant_object_record_ids]
    assert {e.event_type for e in mine} >= {"prescription-dispense", "prescription-cancel"}
    for event in mine:
        assert "3400930000001" not in event.detail, event
        assert "pénicilline" not in event.detail, event


def test_who_may_not_dispense_learns_nothing_of_the_id(
    running: RunningNode, actor: Callable[[str], Actor], doctor: Actor
) -> None:
    """Permission before existence: a professional who never dispenses is refused the same
    way whether the scanned id exists or not; the patient still sees the attempt."""
    rx = rx_id(doctor.prescribe())
    missing = rx[:-4] + ("AAAA" if not rx.endswith("AAAA") else "BBBB")
    nurse = actor(practitioner(NURSE))
    for call in (nurse.dispense, nurse.claim, nurse.release):
        known = refusal(lambda c=call: c(rx))
        unknown = refusal(lambda c=call: c(missing))
        assert known.code == unknown.code == grpc.StatusCode.PERMISSION_DENIED
        assert known.message == unknown.message
    assert running.audit is not None
    refused = [
        e.event
        for e in running.audit.events_for_patient(PATIENT, limit=1000)
        if e.event.active_participant_user_id == nurse.principal.uri
    ]
    assert refused and all(e.participant_object_record_ids == (rx,) for e in refused)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_a_prescription_is_no_bigger_than_what_it_may_say(doctor: Actor) -> None:
    """A signed act carries no megabytes in a field the contract does not know (served to
    every reader, every search of the patient swollen by it): a node refuses one larger
    than the largest prescription the limits allow."""
    built = P.Prescription.FromString(doctor.signed().prescription)
    blob = b"x" * (1024 * 1024)
    payload = built.SerializeToString(deterministic=True)
    payload += _varint(99 << 3 | 2) + _varint(len(blob)) + blob
    signed = P.SignedPrescription(
        prescription=payload,
        signature=doctor.signer.sign(payload),
        certificate=doctor.signer.certificate_der,
    )
    answer = refusal(lambda: doctor.create(signed))
    assert answer.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "bytes" in answer.message and "at most" in answer.message
