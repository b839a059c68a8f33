"""The bytes a write stores for a fixed input: sha256, fingerprint, row values and row hash.

Row hashes and fingerprints are stored and checked later (node/integrity.py, a retry's
same-or-conflict): a change to how a write reads its record must not change one byte of
them. The expected values were computed by the code before the write path read each
record's fields once."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from dmp.errors import InvalidArgument
from dmp.identity import Principal, Role
from dmp.v1 import patient_pb2, record_pb2
from node.store import RecordStore

WRITER = Principal(Role.PRACTITIONER, "10003456789", "Dr Claire Martin", "doctor")
CREATED = 1_767_225_600_000_000


def _record(**changes: object) -> record_pb2.Record:
    record = record_pb2.Record(
        id="pin-1",
        patient_ins="268059913498924",
        kind=record_pb2.RECORD_KIND_DOCUMENT,
        type_code=record_pb2.Coding(
            system="http://loinc.org", code=" 34133-9 ", display="Summary of episode note"
        ),
        title=" Compte rendu de passage aux urgences ",
        organization="Centre hospitalier d'Évry-Courcouronnes",
        confidentiality=record_pb2.CONFIDENTIALITY_RESTRICTED,
        hidden_from_patient=True,
        content_type="application/pdf ",
    )
    record.effective_time.seconds = 1_483_337_749
    record.effective_time.nanos = 123_456_000
    for name, value in changes.items():
        setattr(record, name, value)
    return record


@pytest.fixture
def store() -> Iterator[RecordStore]:
    engine = create_engine("sqlite://")
    yield RecordStore(engine, "11", clock=lambda: CREATED)
    engine.dispose()


def _row(store: RecordStore, record: record_pb2.Record) -> dict[str, object]:
    patient = patient_pb2.PatientIdentity(ins=record.patient_ins, birth_family_name="Durand")
    draft = store.prepare(WRITER, record, b"%PDF-1.7 pinned content", patient)
    with Session(store._engine) as session:
        return store._new_row(session, draft, CREATED)


PINNED = {
    "id": "pin-1",
    "patient_ins": "268059913498924",
    "kind": "document",
    "type_system": "http://loinc.org",
    "type_code": "34133-9",
    "type_display": "Summary of episode note",
    "title": "Compte rendu de passage aux urgences",
    "author_identity": "urn:dmp:practitioner:10003456789",
    "author_name": "Dr Claire Martin",
    "author_profession": "doctor",
    "organization": "Centre hospitalier d'Évry-Courcouronnes",
    "created_us": CREATED,
    "effective_us": 1_483_337_749_123_456,
    "status": "current",
    "version": 1,
    "supersedes": None,
    "root_id": "pin-1",
    "confidentiality": "restricted",
    "hidden_from_patient": True,
    "revealed_us": None,
    "content_type": "application/pdf",
    "size": 23,
    "sha256": "6190766ea3be7909a22dd6fddc61412ef1d956eb56ed1ef4245d38f0e33adc30",
    "fingerprint": "6238cf16d58b24c827be2c4c129fbec3338b31c288a9f2e759d8442451f9da5e",
    "prescription_id": None,
    "row_hash": "bf232256d889110dce4cf641e2541a79ca31d53bc1249041f16624b923c2524d",
}


def test_a_fixed_record_stores_the_same_bytes(store: RecordStore) -> None:
    assert _row(store, _record()) == PINNED


def test_defaults_store_the_same_bytes(store: RecordStore) -> None:
    """No system (LOINC by default), no time (created), normal confidentiality, no id."""
    record = _record()
    record.ClearField("effective_time")
    record.type_code.ClearField("system")
    record.ClearField("confidentiality")
    record.ClearField("hidden_from_patient")
    row = _row(store, record)
    assert (row["type_system"], row["effective_us"], row["confidentiality"]) == (
        "http://loinc.org",
        CREATED,
        "normal",
    )
    assert (row["fingerprint"], row["row_hash"]) == (
        "e669e572f741bd7fc1e21d7b2b3413fc25d8d7435190f82841a82faab2acf6e5",
        "4f70bd4c6be9a1191ee6d8ea94532ede0f01b53a0aed96dc40778a9ec0018196",
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"title": "a\u202eb"}, "record.title holds the control character U+202E at position 1"),
        ({"organization": "x" * 201}, "record.organization is 201 characters long"),
        (
            {"content_type": "text/\x07plain"},
            "record.content_type holds the control character U+0007",
        ),
        ({"title": "   "}, "record.title is required"),
        ({"confidentiality": 9}, "record.confidentiality 9 is not known"),
        ({"kind": 0}, "record.kind is required"),
    ],
)
def test_a_refusal_names_its_field(
    store: RecordStore, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        _row(store, _record(**changes))


def test_the_first_bad_field_is_named(store: RecordStore) -> None:
    """Several bad fields: the one validation checks first is named, as before."""
    record = _record(title="t\x00", organization="o\x01")
    record.type_code.display = "d\x02"
    with pytest.raises(InvalidArgument, match=r"record\.type_code\.display"):
        _row(store, record)
