"""E-prescription on a node encrypted at rest, on SQLite and PostgreSQL: the signed act and
its dispensings are sealed with the patient's data key (no dosage in the files or the raw
columns), served as before, and unreadable once the patient is shredded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text

from dmp.db import make_engine
from dmp.dbfile import sqlite_file
from dmp.envelope import init_kek_file, load_kek_file
from dmp.errors import DataLoss, FailedPrecondition
from dmp.v1 import prescription_pb2 as P
from node.key_admin import shred_patient
from node.keys import Sealer
from node.prescription_store import FreeText, PrescriptionStore
from tests.federation import DOCTOR, PATIENT
from tests.integration.prescription_helpers import (
    PHARMACISTS,
    Actor,
    make_rx_pki,
    practitioner,
    refusal,
    rx_id,
    rx_node,
)

PHRASE = "Zorglub"
REASON = "Zorglub motif: posologie erronee"


def free_text(db_url: str, kek_file: Path, rx: str) -> tuple[FreeText, list[object]]:
    """What the prescription store opens of a prescription's free text, and its raw
    clear columns."""
    engine = make_engine(db_url)
    try:
        store = PrescriptionStore(engine, "11", Sealer(load_kek_file(kek_file)))
        row = store.find(rx)
        assert row is not None
        return store.free_text_of(row), [row.cancel_reason, row.holder_pharmacy]
    finally:
        engine.dispose()


LINES = (f"3400930000001|2|1 comprimé {PHRASE}|3 fois par jour|7 jours",)


@pytest.fixture(scope="module")
def rx_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("rx-pki-enc")
    make_rx_pki(directory)
    return directory


@pytest.fixture
def kek_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "kek"
    init_kek_file(path)
    return path


@pytest.fixture
def actors(rx_pki: Path, db_url: str, kek_file: Path) -> Iterator[tuple[Actor, Actor]]:
    with rx_node(rx_pki, db_url, kek_file=kek_file) as (node, _):
        doctor = Actor(rx_pki, practitioner(DOCTOR), node.port)
        pharmacist = Actor(rx_pki, practitioner(PHARMACISTS[0]), node.port)
        yield doctor, pharmacist
        doctor.close()
        pharmacist.close()


def held(db_url: str) -> bytes:
    path = sqlite_file(db_url)
    if path is not None:
        wal = Path(f"{path}-wal")
        return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            signed = connection.execute(text("SELECT signed FROM prescriptions")).scalars()
            free = connection.execute(
                text(
                    "SELECT convert_to(coalesce(cancel_reason, '') || coalesce(holder_pharmacy,"
                    " ''), 'UTF8') || coalesce(sealed, ''::bytea) FROM prescriptions"
                )
            ).scalars()
            messages = connection.execute(text("SELECT message FROM dispensations")).scalars()
            contents = connection.execute(text("SELECT content FROM record_contents")).scalars()
            return b"".join(bytes(v) for v in (*signed, *free, *messages, *contents))
    finally:
        engine.dispose()


def test_prescriptions_are_sealed_and_served(
    actors: tuple[Actor, Actor], db_url: str, kek_file: Path
) -> None:
    doctor, pharmacist = actors
    rx = rx_id(doctor.prescribe(lines=LINES))
    dispensed = pharmacist.dispense(rx, (2,))
    assert dispensed.prescription.state.status == P.PRESCRIPTION_STATUS_COMPLETED
    again = pharmacist.get(rx)
    prescription = P.Prescription.FromString(again.signed.prescription)
    assert PHRASE in str(prescription)
    assert [d.id for d in again.state.dispensations] == [dispensed.dispensation.id]
    assert [rx_id(s) for s in pharmacist.find(statuses=[P.PRESCRIPTION_STATUS_COMPLETED])] == [rx]
    # The free text of its progress: the holder's pharmacy, a cancellation's reason.
    held_rx = rx_id(doctor.prescribe(lines=LINES))
    pharmacist.claim(held_rx, hold_seconds=600)
    pharmacy = f"Pharmacie {pharmacist.principal.key}"
    cancelled = rx_id(doctor.prescribe(lines=LINES))
    doctor.cancel(cancelled, reason=REASON)
    assert free_text(db_url, kek_file, held_rx) == (FreeText(None, pharmacy), [None, None])
    assert free_text(db_url, kek_file, cancelled) == (FreeText(REASON, None), [None, None])
    stored = held(db_url)
    assert stored and PHRASE.encode() not in stored
    assert REASON.encode() not in stored and pharmacy.encode() not in stored
    # Bound to its prescription: another's sealed free text moved onto it does not open.
    engine = make_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "UPDATE prescriptions SET sealed = (SELECT sealed FROM prescriptions"
                    " WHERE id = :held) WHERE id = :cancelled"
                ),
                {"held": held_rx, "cancelled": cancelled},
            )
    finally:
        engine.dispose()
    with pytest.raises(DataLoss):
        free_text(db_url, kek_file, cancelled)
    # Shredded: the act can no longer be read by anyone.
    engine = make_engine(db_url)
    try:
        shred_patient(engine, load_kek_file(kek_file), "11", PATIENT)
    finally:
        engine.dispose()
    answer = refusal(lambda: pharmacist.get(rx))
    assert (answer.code, answer.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "RECORD_SHREDDED")


def test_prescriptions_in_clear_are_encrypted_in_place(
    rx_pki: Path, db_url: str, kek_file: Path
) -> None:
    from node.key_admin import encrypt_in_place

    with rx_node(rx_pki, db_url) as (node, _):  # no KEK: in clear
        doctor = Actor(rx_pki, practitioner(DOCTOR), node.port)
        pharmacist = Actor(rx_pki, practitioner(PHARMACISTS[0]), node.port)
        rx = rx_id(doctor.prescribe(lines=LINES))
        pharmacist.dispense(rx, (1,))
        held_rx = rx_id(doctor.prescribe(lines=LINES))
        pharmacist.claim(held_rx, hold_seconds=600)
        pharmacy = f"Pharmacie {pharmacist.principal.key}"
        cancelled = rx_id(doctor.prescribe(lines=LINES))
        doctor.cancel(cancelled, reason=REASON)
        doctor.close()
        pharmacist.close()
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            signed = connection.execute(
                text("SELECT signed FROM prescriptions WHERE id = :id"), {"id": rx}
            ).scalar_one()
            reason = connection.execute(
                text("SELECT cancel_reason FROM prescriptions WHERE id = :id"), {"id": cancelled}
            ).scalar_one()
        assert PHRASE.encode() in bytes(signed) and reason == REASON  # in clear before
        with pytest.raises(FailedPrecondition, match="still stored in clear"):
            shred_patient(engine, load_kek_file(kek_file), "11", PATIENT)
        assert encrypt_in_place(engine, load_kek_file(kek_file)) >= 3  # records, act, dispensing
        assert encrypt_in_place(engine, load_kek_file(kek_file)) == 0
    finally:
        engine.dispose()
    stored = held(db_url)
    assert PHRASE.encode() not in stored
    assert REASON.encode() not in stored and pharmacy.encode() not in stored
    assert free_text(db_url, kek_file, held_rx) == (FreeText(None, pharmacy), [None, None])
    assert free_text(db_url, kek_file, cancelled) == (FreeText(REASON, None), [None, None])
    with rx_node(rx_pki, db_url, kek_file=kek_file) as (node, _):
        pharmacist = Actor(rx_pki, practitioner(PHARMACISTS[0]), node.port)
        try:
            again = pharmacist.get(rx)
            assert PHRASE in str(P.Prescription.FromString(again.signed.prescription))
            assert len(again.state.dispensations) == 1
        finally:
            pharmacist.close()
