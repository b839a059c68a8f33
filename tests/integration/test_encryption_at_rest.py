"""Encryption at rest, over real mTLS, on SQLite and PostgreSQL: the database holds no
title or content in clear, a ciphertext moved between rows is detected, the KEK rotates
(also after a kill -9 in the middle), a shredded patient's content is unreadable while
others' stays intact, and a node holding clear records is encrypted in place, resumably.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from dmp.db import make_engine, writer
from dmp.dbfile import sqlite_file
from dmp.envelope import FileKek, init_kek_file, load_kek_file
from dmp.errors import FailedPrecondition
from dmp.ins import make_ins
from dmp.patients import Traits
from dmp.server import error_reason
from dmp.v1 import node_service_pb2 as pb
from dmp.v1 import patient_pb2, record_pb2
from node.key_admin import encrypt_in_place, rotate_kek, shred_patient
from node.keys import Sealer, open_traits
from node.models import PatientRow
from node.outbox import LocatorOutbox
from tests.federation import (
    DOCTOR,
    OTHER_PATIENT,
    PATIENT,
    READ_CONTENT,
    READ_RECORD,
    Client,
    client,
    dmp_process,
    draft,
    identity_of,
    running_node,
    wait_for,
)

TITLE = "Zorglub titre confidentiel"
CONTENT = b"Zorglub contenu clinique: diabete de type 2"
PHRASES = (b"Zorglub", TITLE.encode(), b"diabete de type 2", b"CHU de Rennes")
#: A patient's identity traits: their birth name, given name and birthplace (Ajaccio).
FAMILY, GIVEN, BIRTHPLACE = "ZORGLUBIEN", "ZORGLUBETTE", "2A004"
TRAIT_PHRASES = (FAMILY.encode(), GIVEN.encode(), BIRTHPLACE.encode())


def identity(family: str = FAMILY, given: str = GIVEN) -> patient_pb2.PatientIdentity:
    found = identity_of(PATIENT, family=family, given=(given,))
    found.birthplace_code = BIRTHPLACE
    return found


@pytest.fixture
def kek_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "kek"
    init_kek_file(path)
    return path


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def put(
    c: Client,
    record: record_pb2.Record,
    content: bytes = CONTENT,
    patient: patient_pb2.PatientIdentity | None = None,
) -> record_pb2.Record:
    request = pb.PutRecordRequest(record=record, content=content, patient=patient)
    return c.node.PutRecord(request, timeout=10).record


def get(c: Client, record_id: str, ins: str = PATIENT) -> record_pb2.Record:
    return c.node.GetRecord(
        pb.GetRecordRequest(record_id=record_id),
        timeout=10,
        metadata=c.md(ins, op=READ_RECORD, record_id=record_id),
    ).record


def content(c: Client, record_id: str, ins: str = PATIENT) -> bytes:
    request = pb.GetRecordContentRequest(record_id=record_id)
    calls = c.node.GetRecordContent(
        request, timeout=10, metadata=c.md(ins, op=READ_CONTENT, record_id=record_id)
    )
    return b"".join(r.chunk for r in calls)


def listed(c: Client, ins: str = PATIENT) -> list[record_pb2.Record]:
    request = pb.ListRecordsRequest(patient_ins=ins)
    return list(c.node.ListRecords(request, timeout=10, metadata=c.md(ins)).records)


def stored_bytes(db_url: str, engine: Engine) -> bytes:
    """Everything the database holds: the SQLite file and its -wal, or for PostgreSQL
    every record column and content as raw bytes."""
    path = sqlite_file(db_url)
    if path is not None:
        parts = [path.read_bytes()]
        wal = Path(f"{path}-wal")
        if wal.exists():
            parts.append(wal.read_bytes())
        return b"".join(parts)
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT convert_to(r.title || r.type_display || r.organization || r.author_name,"
                " 'UTF8'), coalesce(r.sealed, ''::bytea), c.content FROM records r"
                " JOIN record_contents c ON c.record_id = r.id"
            )
        ).all()
        events = connection.execute(text("SELECT event_json FROM audit_events")).scalars().all()
        patients = connection.execute(
            text(
                "SELECT convert_to(birth_family_name || given_names || birthplace_code,"
                " 'UTF8') || coalesce(sealed, ''::bytea) FROM patients"
            )
        ).scalars()
        traits = b"".join(bytes(p) for p in patients)
    return (
        b"".join(bytes(a) + bytes(b) + bytes(c) for a, b, c in rows)
        + "".join(events).encode()
        + traits
    )


def assert_clear_of_phrases(db_url: str, engine: Engine) -> None:
    held = stored_bytes(db_url, engine)
    assert held  # something was read
    for phrase in (*PHRASES, *TRAIT_PHRASES):
        assert phrase not in held, phrase


def stored_traits(engine: Engine, kek_file: Path) -> Traits:
    """The patient's identity traits as a node with its KEK reads them (node/keys.py)."""
    with Session(engine) as session:
        row = session.get(PatientRow, PATIENT)
        assert row is not None
        connection = session.connection()
        key = Sealer(load_kek_file(kek_file)).keys_for_read(connection, [PATIENT])
        return open_traits(key[PATIENT].key, row)


def test_the_database_holds_no_title_or_content_in_clear(
    pki_dir: Path, db_url: str, kek_file: Path, engine: Engine
) -> None:
    with running_node(pki_dir, "11", db_url, kek_file=kek_file) as node:
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        try:
            written = put(doctor, draft(title=TITLE), patient=identity())
            assert written.title == TITLE and written.organization == "CHU de Rennes"
            # The sealed traits are still checked: a contradicting identity is refused.
            with pytest.raises(grpc.RpcError) as refused:
                put(doctor, draft(title=TITLE), patient=identity(family="MARTIN"))
            assert error_reason(refused.value) == "IDENTITY_CONFLICT"
            put(doctor, draft(title="autre"), b"autre", patient=identity())  # same: accepted
            traits = stored_traits(engine, kek_file)
            assert (traits.birth_family_name, traits.given_names) == (FAMILY, GIVEN)
            assert (traits.birthplace_code, traits.birth_date) == (BIRTHPLACE, "1985-02-14")
            again = put(doctor, draft(title=TITLE, record_id=written.id))  # a retry
            assert again.title == TITLE
            assert get(doctor, written.id).title == TITLE
            assert get(doctor, written.id).type_code.display == "Consultation note"
            assert content(doctor, written.id) == CONTENT
            assert sorted(r.title for r in listed(doctor)) == sorted([TITLE, "autre"])
            newer = draft(title=TITLE + " v2")
            newer.supersedes = written.id
            v2 = put(doctor, newer, CONTENT + b" v2")
            assert content(doctor, v2.id) == CONTENT + b" v2"
            assert get(doctor, written.id).status == record_pb2.RECORD_STATUS_SUPERSEDED
            assert PATIENT.encode() in stored_bytes(db_url, engine) or sqlite_file(db_url) is None
            assert_clear_of_phrases(db_url, engine)
        finally:
            doctor.close()


def test_a_ciphertext_moved_to_another_row_is_detected(
    pki_dir: Path, db_url: str, kek_file: Path, engine: Engine
) -> None:
    with running_node(pki_dir, "11", db_url, kek_file=kek_file) as node:
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        try:
            a = put(doctor, draft(title="A"), b"content of a")
            b = put(doctor, draft(title="B"), b"content of b")
            with engine.begin() as connection:
                blobs: dict[str, bytes] = dict(
                    connection.execute(text("SELECT record_id, content FROM record_contents")).all()
                )
                for record_id, other in ((a.id, b.id), (b.id, a.id)):
                    connection.execute(
                        text("UPDATE record_contents SET content = :c WHERE record_id = :id"),
                        {"c": blobs[other], "id": record_id},
                    )
            with pytest.raises(grpc.RpcError) as caught:
                content(doctor, a.id)
            assert caught.value.code() == grpc.StatusCode.DATA_LOSS
            assert a.id in (caught.value.details() or "")
            assert "moved from another record" in (caught.value.details() or "")
        finally:
            doctor.close()


def test_a_node_without_its_kek_refuses_an_encrypted_database(
    pki_dir: Path, db_url: str, kek_file: Path, tmp_path: Path
) -> None:
    with running_node(pki_dir, "11", db_url, kek_file=kek_file) as node:
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        put(doctor, draft())
        doctor.close()
    with pytest.raises(FailedPrecondition, match="no --kek-file was given") as caught:
        start(pki_dir, db_url)
    assert caught.value.reason == "KEK_REQUIRED"
    other = tmp_path / "other-kek"
    init_kek_file(other)
    with pytest.raises(FailedPrecondition, match="wrapped by another KEK") as wrong:
        start(pki_dir, db_url, kek_file=other)
    assert wrong.value.reason == "WRONG_KEK"


def start(pki_dir: Path, db_url: str, **kwargs: object) -> None:
    """Start and stop a node (for a start that must be refused)."""
    with running_node(pki_dir, "11", db_url, **kwargs):
        pass


def make_keys(engine: Engine, kek: FileKek, count: int) -> None:
    """`count` patients with a data key (as many first writes would make)."""
    sealer = Sealer(kek)
    with Session(writer(engine)) as session, session.begin():
        for n in range(count):
            sealer.key_for_write(session, make_ins(f"1{n:012d}"), 1)


def key_ids(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(text("SELECT kek_id FROM data_keys")).scalars())


def test_rotating_the_kek_after_a_kill_9_in_the_middle(
    pki_dir: Path, db_url: str, kek_file: Path, tmp_path: Path, engine: Engine
) -> None:
    with running_node(pki_dir, "11", db_url, kek_file=kek_file) as node:
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        records = [put(doctor, draft(title=f"T{n}"), b"c%d" % n) for n in range(3)]
        other = put(doctor, draft(OTHER_PATIENT, title="other"), b"other")
        doctor.close()
    old = load_kek_file(kek_file)
    make_keys(engine, old, 300)
    new_file = tmp_path / "keys" / "kek-2"
    new = init_kek_file(new_file)
    wrapped_before = {
        ins: bytes(w)
        for ins, w in engine.connect().execute(text("SELECT patient_ins, wrapped FROM data_keys"))
    }
    # One key per transaction, killed -9 as soon as some are rewrapped.
    rotation = dmp_process(
        "node", "rotate-kek", "--db", db_url, "--kek-file", str(kek_file),
        "--new-kek-file", str(new_file), "--batch", "1",
    )  # fmt: skip
    wait_for(lambda: new.key_id in key_ids(engine) or rotation.poll() is not None, "a rewrap")
    os.kill(rotation.pid, signal.SIGKILL)
    rotation.wait(timeout=10)
    ids = key_ids(engine)
    assert set(ids) <= {old.key_id, new.key_id} and new.key_id in ids
    if old.key_id in ids:  # killed in the middle: neither KEK serves a half-rotated node
        with pytest.raises(FailedPrecondition, match="finish the rotation"):
            start(pki_dir, db_url, kek_file=new_file)
    assert rotate_kek(engine, old, new) == ids.count(old.key_id)  # the rerun finishes
    assert set(key_ids(engine)) == {new.key_id}
    with engine.connect() as connection:
        for ins, wrapped in connection.execute(text("SELECT patient_ins, wrapped FROM data_keys")):
            assert bytes(wrapped) != wrapped_before[ins]
            assert new.unwrap(bytes(wrapped)) == old.unwrap(wrapped_before[ins])
            with pytest.raises(FailedPrecondition, match="does not open"):
                old.unwrap(bytes(wrapped))  # the old KEK opens nothing
    with pytest.raises(FailedPrecondition, match="wrapped by another KEK"):
        start(pki_dir, db_url, kek_file=kek_file)
    with running_node(pki_dir, "11", db_url, kek_file=new_file) as node:
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        try:
            for n, record in enumerate(records):
                assert get(doctor, record.id).title == f"T{n}"
                assert content(doctor, record.id) == b"c%d" % n
            assert content(doctor, other.id, OTHER_PATIENT) == b"other"
        finally:
            doctor.close()


def test_a_shredded_patient_is_unreadable_and_others_intact(
    pki_dir: Path, db_url: str, kek_file: Path, engine: Engine
) -> None:
    with running_node(pki_dir, "11", db_url, kek_file=kek_file) as node:
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        try:
            mine = put(doctor, draft(title=TITLE), patient=identity())
            theirs = put(doctor, draft(OTHER_PATIENT, title="Autre"), b"autre contenu")
            assert content(doctor, mine.id) == CONTENT
            # The directory's outbox opens the sealed traits (no directory here: pending).
            outbox = LocatorOutbox(engine, Sealer(load_kek_file(kek_file)))
            (reported,) = [s.traits for s in outbox.pending().summaries if s.traits.ins == PATIENT]
            assert (reported.birth_family_name, reported.birthplace_code) == (FAMILY, BIRTHPLACE)
            done = shred_patient(engine, load_kek_file(kek_file), "11", PATIENT, operator="ops")
            assert done.records == 1 and not done.already
            # While the node serves: the key is read on every call, never kept past a shred.
            with pytest.raises(grpc.RpcError) as caught:
                content(doctor, mine.id)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_reason(caught.value) == "RECORD_SHREDDED"
            assert "crypto-shredded on" in (caught.value.details() or "")
            (still,) = listed(doctor)  # the metadata is still listed, its free text gone
            assert still.id == mine.id and still.title == "" and still.sha256 == mine.sha256
            assert still.shredded_time.ToMicroseconds() == done.shredded_us
            assert not get(doctor, theirs.id, OTHER_PATIENT).HasField("shredded_time")
            with pytest.raises(grpc.RpcError) as refused:
                put(doctor, draft(title="new"))
            assert error_reason(refused.value) == "RECORD_SHREDDED"
            assert content(doctor, theirs.id, OTHER_PATIENT) == b"autre contenu"
            assert get(doctor, theirs.id, OTHER_PATIENT).title == "Autre"
        finally:
            doctor.close()
    again = shred_patient(engine, load_kek_file(kek_file), "11", PATIENT)
    assert again.already and again.shredded_us == done.shredded_us
    with engine.connect() as connection:
        wrapped, shredded = connection.execute(
            text("SELECT wrapped, shredded_us FROM data_keys WHERE patient_ins = :p"),
            {"p": PATIENT},
        ).one()
        events = connection.execute(
            text("SELECT event_json FROM audit_events WHERE participant_object_patient_ins = :p"),
            {"p": PATIENT},
        ).scalars()
        shreds = [e for e in map(json.loads, events) if e["event_type"] == "shred"]
    assert wrapped is None and shredded == done.shredded_us
    # Their sealed identity traits open no more: only birth date and sex, kept in clear.
    (reported,) = [s.traits for s in outbox.pending().summaries if s.traits.ins == PATIENT]
    assert (reported.birth_family_name, reported.given_names, reported.birthplace_code) == (
        "",
        "",
        "",
    )
    assert reported.birth_date == "1985-02-14"
    assert_clear_of_phrases(db_url, engine)
    assert len(shreds) == 1 and shreds[0]["active_participant_user_id"] == "ops"


def test_a_node_in_clear_is_encrypted_in_place_resumably(
    pki_dir: Path, db_url: str, kek_file: Path, engine: Engine
) -> None:
    with running_node(pki_dir, "11", db_url) as node:  # no KEK: stored in clear
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        records = [
            put(doctor, draft(title=f"{TITLE} {n}"), CONTENT + b"%d" % n, patient=identity())
            for n in range(5)
        ]
        doctor.close()
    with engine.connect() as connection:
        titles = connection.execute(text("SELECT title FROM records")).scalars().all()
        family = connection.execute(text("SELECT birth_family_name FROM patients")).scalar_one()
    assert all(TITLE in t for t in titles) and family == FAMILY  # in clear before
    kek = load_kek_file(kek_file)
    with pytest.raises(FailedPrecondition, match="still stored in clear"):
        shred_patient(engine, kek, "11", PATIENT)
    assert encrypt_in_place(engine, kek, batch=1, limit=2) == 2  # interrupted after two
    with running_node(pki_dir, "11", db_url, kek_file=kek_file) as node:
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        try:
            for n, record in enumerate(records):  # half sealed, half in clear: all served
                assert get(doctor, record.id).title == f"{TITLE} {n}"
            # The rest, online, by the command, while the node serves.
            process = dmp_process(
                "node", "encrypt", "--db", db_url, "--kek-file", str(kek_file), "--batch", "2"
            )
            out, err = process.communicate(timeout=60)
            assert process.returncode == 0, err
            assert "encrypted 4 record(s) in place" in out  # 3 records, the traits
            for n, record in enumerate(records):
                assert get(doctor, record.id).title == f"{TITLE} {n}"
                assert content(doctor, record.id) == CONTENT + b"%d" % n
        finally:
            doctor.close()
    assert encrypt_in_place(engine, kek) == 0  # nothing left
    with engine.connect() as connection:
        assert (
            connection.execute(
                text("SELECT count(*) FROM records WHERE sealed IS NULL")
            ).scalar_one()
            == 0
        )
        held = (
            b"".join(
                bytes(c)
                for c in connection.execute(text("SELECT content FROM record_contents")).scalars()
            )
            + "".join(connection.execute(text("SELECT title FROM records")).scalars()).encode()
        )
    assert TITLE.encode() not in held and b"diabete" not in held
    assert_clear_of_phrases(db_url, engine)
    traits = stored_traits(engine, kek_file)
    assert (traits.birth_family_name, traits.given_names, traits.birthplace_code) == (
        FAMILY,
        GIVEN,
        BIRTHPLACE,
    )


def test_kek_files_are_private(tmp_path: Path) -> None:
    process = dmp_process("node", "init-kek", str(tmp_path / "k" / "kek"))
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "mode 0600" in out and oct((tmp_path / "k" / "kek").stat().st_mode)[-3:] == "600"
    again = dmp_process("node", "init-kek", str(tmp_path / "k" / "kek"))
    _, err = again.communicate(timeout=30)
    assert again.returncode != 0 and "never overwritten" in err


def test_racing_first_writes_of_a_patient_share_one_data_key(
    pki_dir: Path, db_url: str, kek_file: Path, engine: Engine
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with running_node(pki_dir, "11", db_url, kek_file=kek_file) as node:
        doctors = [client(pki_dir, f"practitioner-{DOCTOR}", node.port) for _ in range(6)]
        try:
            with ThreadPoolExecutor(max_workers=6) as pool:
                written = list(
                    pool.map(
                        lambda n: put(doctors[n], draft(title=f"race {n}"), b"r%d" % n), range(6)
                    )
                )
            for n, record in enumerate(written):
                assert content(doctors[0], record.id) == b"r%d" % n
                assert get(doctors[0], record.id).title == f"race {n}"
        finally:
            for doctor in doctors:
                doctor.close()
    with engine.connect() as connection:
        keys = connection.execute(text("SELECT count(*) FROM data_keys")).scalar_one()
    assert keys == 1


def test_the_kek_rotates_while_the_node_serves(
    pki_dir: Path, db_url: str, kek_file: Path, tmp_path: Path, engine: Engine
) -> None:
    with running_node(pki_dir, "11", db_url, kek_file=kek_file) as node:
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        mine = put(doctor, draft(title="mine"), b"mine")
        theirs = put(doctor, draft(OTHER_PATIENT, title="theirs"), b"theirs")
        doctor.close()
    old = load_kek_file(kek_file)
    new_file = tmp_path / "keys" / "kek-2"
    new = init_kek_file(new_file)
    # Restarted with the new KEK, the old one opening only what is not yet rewrapped.
    kwargs = {"kek_file": new_file, "previous_kek_files": (kek_file,)}
    with running_node(pki_dir, "11", db_url, **kwargs) as node:
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        try:
            assert rotate_kek(engine, old, new, batch=1, limit=1) == 1  # half way
            assert sorted(key_ids(engine)) == sorted([old.key_id, new.key_id])
            assert content(doctor, mine.id) == b"mine"
            assert content(doctor, theirs.id, OTHER_PATIENT) == b"theirs"
            assert rotate_kek(engine, old, new) == 1
            assert content(doctor, mine.id) == b"mine"
            assert get(doctor, theirs.id, OTHER_PATIENT).title == "theirs"
        finally:
            doctor.close()
    with running_node(pki_dir, "11", db_url, kek_file=new_file) as node:
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        try:
            assert content(doctor, theirs.id, OTHER_PATIENT) == b"theirs"
        finally:
            doctor.close()
