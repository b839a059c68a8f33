"""E-prescription at the node that holds it, over real mutual TLS, on SQLite and PostgreSQL:
create (signature checked, idempotent), read, claim and release, dispense (every rule and
refusal reason), cancel and find."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from dmp.clock import to_us
from dmp.errors import InvalidArgument
from dmp.pki import CRL_FILE, Pki
from dmp.prescriptions import (
    ALREADY_DISPENSED,
    CANCELLED,
    HELD_BY_ANOTHER_PHARMACY,
    PRESCRIPTION_EXPIRED,
    QUANTITY_EXCEEDED,
    RENEWAL_NOT_YET_DUE,
    prescription_bytes,
    verify_prescription,
)
from dmp.revocation import RevocationList
from dmp.signing import SignatureVerifier
from dmp.v1 import node_service_pb2, record_pb2
from dmp.v1 import prescription_pb2 as P
from tests.federation import DOCTOR, NURSE, OTHER_DOCTOR, OTHER_PATIENT, PATIENT, draft
from tests.integration.prescription_helpers import (
    DENTIST,
    DISPENSE,
    MIDWIFE,
    PHARMACISTS,
    READ,
    Actor,
    Clock,
    actor_pool,
    make_rx_pki,
    patient,
    practitioner,
    refusal,
    rx_id,
    rx_node,
)

PD = grpc.StatusCode.PERMISSION_DENIED
FP = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(scope="module")
def rx_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("rx-pki")
    make_rx_pki(directory)
    return directory


@pytest.fixture
def node(rx_pki: Path, db_url: str) -> Iterator[tuple[int, Clock]]:
    with rx_node(rx_pki, db_url) as (running, clock):
        yield running.port, clock


@pytest.fixture
def clock(node: tuple[int, Clock]) -> Clock:
    return node[1]


@pytest.fixture
def actor(rx_pki: Path, node: tuple[int, Clock]) -> Iterator[Callable[[str], Actor]]:
    with actor_pool(rx_pki, node[0]) as make:
        yield make


@pytest.fixture
def doctor(actor: Callable[[str], Actor]) -> Actor:
    return actor(practitioner(DOCTOR))


@pytest.fixture
def pharmacists(actor: Callable[[str], Actor]) -> list[Actor]:
    return [actor(practitioner(rpps)) for rpps in PHARMACISTS]


def verifier(pki_dir: Path) -> SignatureVerifier:
    ca = Pki.load(pki_dir).ca_certificate
    return SignatureVerifier(ca, RevocationList(pki_dir / CRL_FILE, ca, check_interval=0))


def remaining(stored: P.StoredPrescription) -> list[int]:
    return [r.quantity for r in stored.state.remaining]


# -- creating ---------------------------------------------------------------------------------


def test_created_signed_and_verifiable_by_anyone(rx_pki: Path, doctor: Actor) -> None:
    stored = doctor.prescribe(renewals=1)
    prescription, signer = verify_prescription(stored.signed, verifier(rx_pki))
    assert signer.key == DOCTOR and prescription.prescriber.rpps == DOCTOR
    assert stored.region == "11" and prescription.id.startswith("RX-11-")
    assert stored.state.status == P.PRESCRIPTION_STATUS_ACTIVE
    assert remaining(stored) == [2, 1] and stored.state.renewals_remaining == 1
    assert not stored.state.dispensations


def test_create_is_idempotent_on_the_id(doctor: Actor) -> None:
    signed = doctor.signed(renewals=1)
    first = doctor.create(signed)
    assert doctor.create(signed) == first
    other = P.Prescription.FromString(signed.prescription)
    other.renewals = 3  # the same id, another act, validly signed
    changed = P.SignedPrescription(
        prescription=prescription_bytes(other),
        signature=doctor.signer.sign(prescription_bytes(other)),
        certificate=signed.certificate,
    )
    answer = refusal(lambda: doctor.create(changed))
    assert answer.code == grpc.StatusCode.ALREADY_EXISTS
    assert "already exists with other content" in answer.message
    assert doctor.get(rx_id(first)).signed == signed


def test_a_tampered_line_is_detected_at_create(doctor: Actor, pharmacists: list[Actor]) -> None:
    signed = doctor.signed()
    tampered = P.Prescription.FromString(signed.prescription)
    tampered.lines[0].quantity = 30
    signed.prescription = prescription_bytes(tampered)
    answer = refusal(lambda: doctor.create(signed))
    assert answer.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "signature does not verify" in answer.message
    assert refusal(lambda: pharmacists[0].get(tampered.id)).code == grpc.StatusCode.NOT_FOUND


def test_a_tampered_stored_copy_is_detected_by_whoever_verifies_it(
    rx_pki: Path, doctor: Actor, pharmacists: list[Actor]
) -> None:
    stored = pharmacists[0].get(rx_id(doctor.prescribe()))
    verify_prescription(stored.signed, verifier(rx_pki))
    copy = P.Prescription.FromString(stored.signed.prescription)
    copy.lines[1].medication.code.code = "3400939999999"
    stored.signed.prescription = prescription_bytes(copy)
    with pytest.raises(InvalidArgument, match="signature does not verify"):
        verify_prescription(stored.signed, verifier(rx_pki))


@pytest.mark.parametrize("rpps", [MIDWIFE, DENTIST])
def test_midwives_and_dentists_prescribe(actor: Callable[[str], Actor], rpps: str) -> None:
    stored = actor(practitioner(rpps)).prescribe()
    assert P.Prescription.FromString(stored.signed.prescription).prescriber.rpps == rpps


@pytest.mark.parametrize("rpps", [PHARMACISTS[0], NURSE])
def test_others_do_not_prescribe(actor: Callable[[str], Actor], rpps: str) -> None:
    writer = actor(practitioner(rpps))
    prescription = P.Prescription.FromString(actor(practitioner(DOCTOR)).signed().prescription)
    prescription.prescriber.rpps = rpps
    prescription.prescriber.name = writer.principal.name
    prescription.prescriber.profession = writer.principal.profession
    payload = prescription_bytes(prescription)
    signed = P.SignedPrescription(
        prescription=payload,
        signature=writer.signer.sign(payload),
        certificate=writer.signer.certificate_der,
    )
    answer = refusal(lambda: writer.create(signed))
    assert answer.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "only dentist, doctor, midwife prescribe" in answer.message


def test_a_prescription_is_stored_by_its_prescriber_only(
    actor: Callable[[str], Actor], doctor: Actor
) -> None:
    signed = doctor.signed()
    answer = refusal(lambda: actor(practitioner(OTHER_DOCTOR)).create(signed))
    assert answer.code == PD and "with their own certificate" in answer.message


def test_a_node_holds_only_the_prescriptions_of_its_region(doctor: Actor) -> None:
    answer = refusal(lambda: doctor.prescribe(region="84"))
    assert answer.code == FP and answer.reason == "WRONG_REGION"
    assert "belongs to region 84 (Auvergne-Rhône-Alpes)" in answer.message
    assert "send it to the node of region 84" in answer.message


# -- reading ----------------------------------------------------------------------------------


def test_who_reads_a_prescription(actor: Callable[[str], Actor], doctor: Actor) -> None:
    rx = rx_id(doctor.prescribe())
    me = actor(patient(PATIENT))
    assert rx_id(me.get(rx)) == rx  # the patient, without naming themselves
    assert rx_id(me.get(rx, ins=PATIENT)) == rx
    for rpps in (PHARMACISTS[1], NURSE, OTHER_DOCTOR, DOCTOR):
        assert rx_id(actor(practitioner(rpps)).get(rx)) == rx
    answer = refusal(lambda: actor(patient(OTHER_PATIENT)).get(rx))
    assert answer.code == PD and "only their own" in answer.message


def test_a_patient_named_otherwise_learns_nothing_of_the_id(
    pharmacists: list[Actor], doctor: Actor
) -> None:
    rx = rx_id(doctor.prescribe())
    missing = rx[:-4] + ("AAAA" if not rx.endswith("AAAA") else "BBBB")
    wrong = refusal(lambda: pharmacists[0].get(rx, ins=OTHER_PATIENT))
    unknown = refusal(lambda: pharmacists[0].get(missing, ins=OTHER_PATIENT))
    assert wrong.code == unknown.code == PD
    assert wrong.message.replace(rx, "ID") == unknown.message.replace(missing, "ID")
    assert refusal(lambda: pharmacists[0].get(missing)).code == grpc.StatusCode.NOT_FOUND


def test_an_assertion_allows_one_operation_on_one_prescription(
    pharmacists: list[Actor], doctor: Actor
) -> None:
    rx, other = rx_id(doctor.prescribe()), rx_id(doctor.prescribe())
    pharmacist = pharmacists[0]
    request = P.GetPrescriptionRequest(prescription_id=rx)
    for metadata in (pharmacist.md(READ, other), pharmacist.md(DISPENSE, rx)):
        answer = refusal(
            lambda md=metadata: pharmacist.stub.GetPrescription(request, metadata=md, timeout=10)
        )
        assert answer.code == PD
    once = pharmacist.md(READ, rx)
    pharmacist.stub.GetPrescription(request, metadata=once, timeout=10)
    replay = refusal(lambda: pharmacist.stub.GetPrescription(request, metadata=once, timeout=10))
    assert replay.code == grpc.StatusCode.UNAUTHENTICATED


# -- dispensing -------------------------------------------------------------------------------


def test_first_dispensing_then_renewal_then_already_dispensed(
    doctor: Actor, pharmacists: list[Actor]
) -> None:
    rx = rx_id(doctor.prescribe(renewals=1))
    first = pharmacists[0].dispense(rx)
    assert first.dispensation.dispensing == 0
    assert first.dispensation.pharmacist_rpps == PHARMACISTS[0]
    assert first.prescription.state.status == P.PRESCRIPTION_STATUS_PARTIALLY_DISPENSED
    assert first.prescription.state.renewals_remaining == 0
    second = pharmacists[1].dispense(rx, (1, 1))
    assert second.dispensation.dispensing == 1
    assert second.prescription.state.status == P.PRESCRIPTION_STATUS_COMPLETED
    assert remaining(second.prescription) == [0, 0]
    assert [d.id for d in second.prescription.state.dispensations] == [
        first.dispensation.id,
        second.dispensation.id,
    ]
    answer = refusal(lambda: pharmacists[2].dispense(rx))
    assert (answer.code, answer.reason) == (FP, ALREADY_DISPENSED)
    assert "as often as it allows" in answer.message


def test_a_renewal_waits_for_its_interval(
    doctor: Actor, pharmacists: list[Actor], clock: Clock
) -> None:
    rx = rx_id(doctor.prescribe(renewals=1, interval=20))
    after = pharmacists[0].dispense(rx).prescription.state
    assert to_us(after.next_dispensing_after) > to_us(after.dispensations[0].time)
    same_day = refusal(lambda: pharmacists[1].dispense(rx))
    assert (same_day.code, same_day.reason) == (FP, ALREADY_DISPENSED)
    clock.advance(2)
    early = refusal(lambda: pharmacists[1].dispense(rx))
    assert (early.code, early.reason) == (FP, RENEWAL_NOT_YET_DUE)
    assert "not due before" in early.message
    clock.advance(18.1)
    assert pharmacists[1].dispense(rx).dispensation.dispensing == 1


def test_the_first_dispensing_must_come_before_its_validity(
    doctor: Actor, pharmacists: list[Actor], clock: Clock
) -> None:
    soon = datetime.now(UTC) + timedelta(days=1)
    rx = rx_id(doctor.prescribe(dispense_before=soon))
    clock.advance(1.5)
    answer = refusal(lambda: pharmacists[0].dispense(rx))
    assert (answer.code, answer.reason) == (FP, PRESCRIPTION_EXPIRED)
    assert "needs a new prescription" in answer.message
    assert pharmacists[0].get(rx).state.status == P.PRESCRIPTION_STATUS_EXPIRED


def test_nothing_is_dispensed_after_the_treatment_end(
    doctor: Actor, pharmacists: list[Actor], clock: Clock
) -> None:
    end = datetime.now(UTC) + timedelta(days=10)
    rx = rx_id(doctor.prescribe(renewals=2, treatment_end=end))
    pharmacists[0].dispense(rx)
    clock.advance(11)
    answer = refusal(lambda: pharmacists[0].dispense(rx))
    assert (answer.code, answer.reason) == (FP, PRESCRIPTION_EXPIRED)
    assert "treatment ended" in answer.message


def test_a_line_beyond_its_quantity_dispenses_nothing(
    doctor: Actor, pharmacists: list[Actor]
) -> None:
    rx = rx_id(doctor.prescribe())
    answer = refusal(lambda: pharmacists[0].dispense(rx, (3, 1)))
    assert (answer.code, answer.reason) == (FP, QUANTITY_EXCEEDED)
    assert "at most 2" in answer.message
    assert not pharmacists[0].get(rx).state.dispensations
    partial = pharmacists[0].dispense(
        rx,
        lines=[
            P.DispensedLine(line=0, quantity=1),
            P.DispensedLine(line=1, quantity=0, not_delivered_reason="rupture de stock"),
        ],
    )
    assert partial.prescription.state.status == P.PRESCRIPTION_STATUS_COMPLETED
    assert partial.dispensation.lines[1].not_delivered_reason == "rupture de stock"


def test_a_hold_keeps_other_pharmacies_out_until_its_holder_dispenses(
    doctor: Actor, pharmacists: list[Actor]
) -> None:
    rx = rx_id(doctor.prescribe(renewals=1))
    a, b = pharmacists[0], pharmacists[1]
    held = a.claim(rx)
    assert held.state.held_by_caller and held.state.HasField("held_until")
    for call in (lambda: b.claim(rx), lambda: b.dispense(rx)):
        answer = refusal(call)
        assert (answer.code, answer.reason) == (FP, HELD_BY_ANOTHER_PHARMACY)
        assert a.principal.key not in answer.message and "Pharmacie" not in answer.message
    seen = b.get(rx).state
    assert seen.HasField("held_until") and not seen.held_by_caller
    done = a.dispense(rx)
    assert not done.prescription.state.HasField("held_until")
    assert b.claim(rx).state.held_by_caller  # the hold ended with the holder's dispensing


def test_release_and_lapse_of_a_hold(doctor: Actor, pharmacists: list[Actor], clock: Clock) -> None:
    rx = rx_id(doctor.prescribe())
    a, b = pharmacists[0], pharmacists[1]
    a.claim(rx)
    answer = refusal(lambda: b.release(rx))
    assert (answer.code, answer.reason) == (FP, HELD_BY_ANOTHER_PHARMACY)
    assert not a.release(rx).state.HasField("held_until")
    b.claim(rx, hold_seconds=60)
    clock.advance(61 / 86400)
    assert a.claim(rx).state.held_by_caller  # b's hold lapsed
    too_long = refusal(lambda: b.claim(rx, hold_seconds=901))
    assert too_long.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("rpps", [DOCTOR, NURSE])
def test_only_pharmacists_dispense(actor: Callable[[str], Actor], doctor: Actor, rpps: str) -> None:
    rx = rx_id(doctor.prescribe())
    someone = actor(practitioner(rpps))
    for call in (lambda: someone.claim(rx), lambda: someone.dispense(rx)):
        answer = refusal(call)
        assert answer.code == PD and "only pharmacists" in answer.message
    answer = refusal(lambda: actor(patient(PATIENT)).dispense(rx))
    assert answer.code == PD


def test_a_retry_with_the_same_key_answers_the_first_outcome(
    doctor: Actor, pharmacists: list[Actor]
) -> None:
    rx = rx_id(doctor.prescribe(renewals=2))
    first = pharmacists[0].dispense(rx, key="caisse-3-ticket-0042")
    again = pharmacists[0].dispense(rx, key="caisse-3-ticket-0042")
    assert again.dispensation == first.dispensation
    assert len(again.prescription.state.dispensations) == 1
    assert again.prescription.state.renewals_remaining == 1
    taken = refusal(lambda: pharmacists[1].dispense(rx, key="caisse-3-ticket-0042"))
    assert taken.code == grpc.StatusCode.ALREADY_EXISTS
    short = refusal(lambda: pharmacists[0].dispense(rx, key="short"))
    assert short.code == grpc.StatusCode.INVALID_ARGUMENT and "8 to 64" in short.message


# -- cancelling -------------------------------------------------------------------------------


def test_cancelled_by_its_prescriber_only(
    actor: Callable[[str], Actor], doctor: Actor, pharmacists: list[Actor]
) -> None:
    rx = rx_id(doctor.prescribe())
    for rpps in (OTHER_DOCTOR, PHARMACISTS[0]):
        answer = refusal(lambda r=rpps: actor(practitioner(r)).cancel(rx))
        assert answer.code == PD and "by its prescriber only" in answer.message
    cancelled = doctor.cancel(rx, "allergie signalée")
    assert cancelled.state.status == P.PRESCRIPTION_STATUS_CANCELLED
    assert cancelled.state.HasField("cancelled_time")
    answer = refusal(lambda: pharmacists[0].dispense(rx))
    assert (answer.code, answer.reason) == (FP, CANCELLED)
    claim = refusal(lambda: pharmacists[0].claim(rx))
    assert claim.reason == CANCELLED


def test_cancelling_the_remaining_renewals(doctor: Actor, pharmacists: list[Actor]) -> None:
    rx = rx_id(doctor.prescribe(renewals=2))
    pharmacists[0].dispense(rx)
    cancelled = doctor.cancel(rx)
    assert cancelled.state.status == P.PRESCRIPTION_STATUS_CANCELLED
    assert len(cancelled.state.dispensations) == 1
    assert refusal(lambda: pharmacists[1].dispense(rx)).reason == CANCELLED
    done = rx_id(doctor.prescribe())
    pharmacists[0].dispense(done)
    answer = refusal(lambda: doctor.cancel(done))
    assert (answer.code, answer.reason) == (FP, ALREADY_DISPENSED)


# -- finding ----------------------------------------------------------------------------------


def test_a_patients_prescriptions_newest_first(
    actor: Callable[[str], Actor], doctor: Actor, pharmacists: list[Actor]
) -> None:
    older = rx_id(doctor.prescribe())
    newer = rx_id(doctor.prescribe(renewals=1))
    gone = rx_id(doctor.prescribe())
    doctor.cancel(gone)
    rx_id(doctor.prescribe(patient=OTHER_PATIENT))
    pharmacists[0].dispense(newer)
    me = actor(patient(PATIENT))
    assert [rx_id(s) for s in me.find()] == [newer, older]
    assert [rx_id(s) for s in pharmacists[1].find()] == [newer, older]
    assert [rx_id(s) for s in me.find(statuses=[P.PRESCRIPTION_STATUS_CANCELLED])] == [gone]
    active = me.find(statuses=[P.PRESCRIPTION_STATUS_ACTIVE])
    assert [rx_id(s) for s in active] == [older]
    every = me.find(statuses=[P.PRESCRIPTION_STATUS_UNSPECIFIED])
    assert [rx_id(s) for s in every] == [gone, newer, older]
    unknown = refusal(lambda: me.find(statuses=[42]))
    assert unknown.code == grpc.StatusCode.INVALID_ARGUMENT
    answer = refusal(lambda: actor(patient(OTHER_PATIENT)).find(PATIENT))
    assert answer.code == PD


def test_a_prescription_authored_in_the_future_is_refused(doctor: Actor) -> None:
    answer = refusal(lambda: doctor.prescribe(now=datetime.now(UTC) + timedelta(hours=1)))
    assert answer.code == grpc.StatusCode.INVALID_ARGUMENT and "future" in answer.message


def test_a_writer_cannot_link_a_record_to_a_prescription(doctor: Actor) -> None:
    """Record.prescription_id is the node's to set, for the records it writes."""
    rx = rx_id(doctor.prescribe())
    record = draft(kind=record_pb2.RECORD_KIND_DISPENSATION, code="60593-1")
    record.prescription_id = rx
    stored = doctor.records.PutRecord(
        node_service_pb2.PutRecordRequest(record=record, content=b"x"), timeout=10
    ).record
    assert stored.prescription_id == ""
    linked = [r for r in doctor.records_of() if r.prescription_id == rx]
    assert [r.kind for r in linked] == [record_pb2.RECORD_KIND_PRESCRIPTION]


def test_the_directory_relays_a_pharmacists_own_assertion(
    actor: Callable[[str], Actor], doctor: Actor, pharmacists: list[Actor]
) -> None:
    """The directory carries the pharmacist's signed assertion; its certificate alone
    dispenses nothing."""
    rx = rx_id(doctor.prescribe())
    directory = actor("directory")
    request = P.DispensePrescriptionRequest(
        dispensation=P.Dispensation(
            prescription_id=rx,
            lines=[P.DispensedLine(line=0, quantity=2), P.DispensedLine(line=1, quantity=1)],
            pharmacy="Pharmacie de la Gare",
            idempotency_key="relayed-0000001",
        )
    )
    alone = refusal(
        lambda: directory.stub.DispensePrescription(
            request, timeout=30, metadata=directory.md(DISPENSE, rx)
        )
    )
    assert alone.code == grpc.StatusCode.UNAUTHENTICATED
    relayed = directory.stub.DispensePrescription(
        request, timeout=30, metadata=pharmacists[0].md(DISPENSE, rx)
    )
    assert relayed.dispensation.pharmacist_rpps == PHARMACISTS[0]
    assert relayed.prescription.state.status == P.PRESCRIPTION_STATUS_COMPLETED
