"""Damaged record metadata is never served: DATA_LOSS naming the record, on every read.

A byte changed in a stored row with plain SQL (as a torn page or a bad disk would) must
stop the node serving that row, over real mTLS, on SQLite and on PostgreSQL; the node's
own updates (a new version, a reveal) keep the rows readable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from dmp.db import make_engine, upgrade, writer
from dmp.errors import DataLoss
from dmp.identity import Principal, Role
from dmp.policy import Grant, ReadScope
from dmp.v1 import node_service_pb2 as pb
from dmp.v1 import record_pb2
from node.app import MIGRATIONS, RunningNode
from node.store import RecordStore
from tests.federation import (
    DOCTOR,
    OTHER_DOCTOR,
    PATIENT,
    READ_CONTENT,
    READ_RECORD,
    Client,
    client,
    draft,
    running_node,
)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """Plain SQL on the node's database, as a damaged disk or a careless hand would."""
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def node(pki_dir: Path, db_url: str) -> Iterator[RunningNode]:
    with running_node(pki_dir, "11", db_url) as running:
        yield running


@pytest.fixture
def doctor(pki_dir: Path, node: RunningNode) -> Iterator[Client]:
    c = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
    yield c
    c.close()


@pytest.fixture
def patient(pki_dir: Path, node: RunningNode) -> Iterator[Client]:
    c = client(pki_dir, f"patient-{PATIENT}", node.port)
    yield c
    c.close()


def put(c: Client, record: record_pb2.Record) -> record_pb2.Record:
    return c.node.PutRecord(pb.PutRecordRequest(record=record, content=b"x"), timeout=10).record


def get(c: Client, record_id: str) -> record_pb2.Record:
    return c.node.GetRecord(
        pb.GetRecordRequest(record_id=record_id),
        timeout=10,
        metadata=c.md(op=READ_RECORD, record_id=record_id),
    ).record


def content(c: Client, record_id: str) -> bytes:
    request = pb.GetRecordContentRequest(record_id=record_id)
    return b"".join(
        r.chunk
        for r in c.node.GetRecordContent(
            request, timeout=10, metadata=c.md(op=READ_CONTENT, record_id=record_id)
        )
    )


def listed(c: Client) -> list[str]:
    request = pb.ListRecordsRequest(patient_ins=PATIENT)
    return [r.id for r in c.node.ListRecords(request, timeout=10, metadata=c.md()).records]


def reads(c: Client, record_id: str) -> dict[str, Any]:
    """Each read path on `record_id`: its answer, or the gRPC error it raised."""
    outcomes: dict[str, Any] = {}
    for name, call in (
        ("get", lambda: get(c, record_id)),
        ("content", lambda: content(c, record_id)),
        ("list", lambda: listed(c)),
    ):
        try:
            outcomes[name] = call()
        except grpc.RpcError as exc:
            outcomes[name] = exc
    return outcomes


def assert_data_loss(c: Client, record_id: str) -> None:
    for name, outcome in reads(c, record_id).items():
        assert isinstance(outcome, grpc.RpcError), f"{name} served a damaged row: {outcome}"
        assert outcome.code() == grpc.StatusCode.DATA_LOSS, (name, outcome.details())
        assert record_id in (outcome.details() or ""), (name, outcome.details())
        assert "backup" in (outcome.details() or "")


def flip(engine: Engine, record_id: str, column: str) -> None:
    """Change one stored value of a record behind the node's back."""
    with engine.begin() as connection:
        value = connection.execute(
            text(f"SELECT {column} FROM records WHERE id = :id"), {"id": record_id}
        ).scalar_one()
        if isinstance(value, bool):
            damaged: object = not value
        elif isinstance(value, int):
            damaged = value ^ 1
        else:
            damaged = value[:-1] + chr(ord(value[-1]) ^ 1)
        connection.execute(
            text(f"UPDATE records SET {column} = :v WHERE id = :id"),
            {"v": damaged, "id": record_id},
        )


@pytest.mark.parametrize(
    "column",
    ["title", "type_code", "kind", "effective_us", "author_identity", "status", "sha256",
     "hidden_from_patient", "confidentiality", "supersedes", "root_id"],
)  # fmt: skip
def test_a_changed_byte_in_a_records_metadata_answers_data_loss(
    doctor: Client, engine: Engine, node: RunningNode, column: str
) -> None:
    put(doctor, draft(record_id="before"))
    target = put(doctor, draft(record_id="damaged", title="Compte rendu opératoire"))
    if column == "supersedes":
        # A new version of "before": its supersedes is stored, so it can be damaged.
        second = draft(record_id="damaged2", title="Compte rendu, version 2")
        second.supersedes = "before"
        target = put(doctor, second)
    elif column == "kind":
        with engine.begin() as connection:  # another known kind, so that only the hash tells
            connection.execute(
                text("UPDATE records SET kind = 'observation' WHERE id = :id"), {"id": target.id}
            )
    if column != "kind":
        flip(engine, target.id, column)
    assert_data_loss(doctor, target.id)


def test_damage_is_logged_and_audited_naming_the_record(
    doctor: Client, engine: Engine, node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    target = put(doctor, draft(record_id="logged", title="Lettre de liaison"))
    flip(engine, target.id, "title")
    with caplog.at_level(logging.ERROR, logger="dmp.node.integrity"), pytest.raises(grpc.RpcError):
        get(doctor, target.id)
    assert any("logged" in r.getMessage() and "backup" in r.getMessage() for r in caplog.records)
    assert not any("Lettre" in r.getMessage() for r in caplog.records)  # no content logged
    assert node.audit is not None
    events = [e.event for e in node.audit.events_for_patient(PATIENT)]
    failed = [e for e in events if e.status_code == "DATA_LOSS"]
    assert failed and "logged" in failed[0].participant_object_record_ids


def test_a_damaged_row_is_not_laundered_by_an_update(doctor: Client, engine: Engine) -> None:
    """Superseding or revealing a damaged row refuses instead of hashing the damage in."""
    put(doctor, draft(record_id="old"))
    flip(engine, "old", "title")
    second = draft(record_id="new")
    second.supersedes = "old"
    with pytest.raises(grpc.RpcError) as err:
        put(doctor, second)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    hidden = draft(record_id="hidden")
    hidden.hidden_from_patient = True
    put(doctor, hidden)
    flip(engine, "hidden", "organization")
    with pytest.raises(grpc.RpcError) as err:
        doctor.node.RevealRecord(pb.RevealRecordRequest(record_id="hidden"), timeout=10)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert_data_loss(doctor, "old")
    assert_data_loss(doctor, "hidden")


def test_honest_updates_keep_every_read_working(doctor: Client, patient: Client) -> None:
    v1 = put(doctor, draft(record_id="v1"))
    second = draft(record_id="v2", title="Compte rendu, version 2")
    second.supersedes = v1.id
    put(doctor, second)
    hidden = draft(record_id="hidden", title="Résultat à annoncer")
    hidden.hidden_from_patient = True
    put(doctor, hidden)
    assert "hidden" not in listed(patient)
    revealed = doctor.node.RevealRecord(pb.RevealRecordRequest(record_id="hidden"), timeout=10)
    assert revealed.record.HasField("revealed_time")
    for record_id in ("v1", "v2", "hidden"):
        outcomes = reads(doctor, record_id)
        assert not [o for o in outcomes.values() if isinstance(o, grpc.RpcError)], outcomes
        assert outcomes["content"] == b"x"
    assert get(doctor, "v1").status == record_pb2.RECORD_STATUS_SUPERSEDED
    assert sorted(listed(doctor)) == ["hidden", "v1", "v2"]
    assert sorted(listed(patient)) == ["hidden", "v1", "v2"]
    # A retry of the same put answers the stored record, checked too.
    assert put(doctor, second).id == "v2"


_COLUMNS = (
    "id, patient_ins, kind, type_system, type_code, type_display, title, author_identity,"
    " author_name, author_profession, organization, created_us, effective_us, status,"
    " version, supersedes, root_id, confidentiality, hidden_from_patient, revealed_us,"
    " content_type, size, sha256, fingerprint"
)


def test_rows_stored_before_the_upgrade_get_their_hash(pki_dir: Path, db_url: str) -> None:
    """The migration hashes existing rows as the node does: they read, damage still shows."""
    engine = make_engine(db_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["version_table"] = "alembic_version_node"
    before = ScriptDirectory.from_config(config).get_revision("0007").down_revision
    assert isinstance(before, str)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, before)
    with engine.begin() as connection:
        for record_id, supersedes, root, status, revealed in (
            ("old1", None, "old1", "superseded", None),
            ("old2", "old1", "old1", "current", None),
            ("old3", None, "old3", "current", 1_700_000_000_000_000),
        ):
            connection.execute(
                text(
                    f"INSERT INTO records ({_COLUMNS}) VALUES (:id, :ins, 'document',"
                    " 'http://loinc.org', '11488-4', 'Consultation note', 'Compte rendu ancien',"
                    f" 'urn:dmp:practitioner:{DOCTOR}', 'Dr Claire MARTIN', 'doctor',"
                    " 'CHU de Rennes', 1700000000000000, 1700000000000000, :status, 1, :sup,"
                    " :root, 'normal', :hidden, :revealed, 'text/plain', 1,"
                    " '2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881', 'f')"
                ),
                {
                    "id": record_id,
                    "ins": PATIENT,
                    "sup": supersedes,
                    "root": root,
                    "status": status,
                    "hidden": revealed is not None,
                    "revealed": revealed,
                },
            )
            connection.execute(
                text("INSERT INTO record_contents (record_id, content) VALUES (:id, :c)"),
                {"id": record_id, "c": b"x"},
            )
    upgrade(engine, MIGRATIONS, "alembic_version_node")
    with running_node(pki_dir, "11", db_url) as node:
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        try:
            for record_id in ("old1", "old2", "old3"):
                outcomes = reads(doctor, record_id)
                assert not [o for o in outcomes.values() if isinstance(o, grpc.RpcError)], outcomes
                assert outcomes["content"] == b"x"
            flip(engine, "old2", "title")
            assert_data_loss(doctor, "old2")
        finally:
            doctor.close()
            engine.dispose()


def test_a_damaged_masked_record_stops_reads_without_naming_it(db_url: str) -> None:
    """The mask of a version covers its others through the masked row's root: a damaged
    root would unmask them, so reads stop; the caller, who may not know of the masked
    record, is not told its id."""
    engine = make_engine(db_url)
    upgrade(engine, MIGRATIONS, "alembic_version_node")
    store = RecordStore(engine, "11")
    author = Principal(Role.PRACTITIONER, DOCTOR, "Dr Claire MARTIN", "doctor")

    def put(record: record_pb2.Record) -> None:  # the repository alone, in a transaction
        with Session(writer(engine)) as session, session.begin():
            store.write(session, [store.prepare(author, record, b"x", None)])

    put(draft(record_id="masked-v1"))
    second = draft(record_id="masked-v2")
    second.supersedes = "masked-v1"
    put(second)
    put(draft(record_id="plain"))
    reader = Principal(Role.PRACTITIONER, OTHER_DOCTOR, "Dr Paul DURAND", "doctor")
    grant = Grant(frozenset({"document"}), frozenset())
    masked = frozenset({"masked-v1"})
    scope = ReadScope(reader, PATIENT, grant, masked, False, masked)
    request = pb.ListRecordsRequest(patient_ins=PATIENT)
    try:
        assert [r.id for r in store.list_records(scope, request).records] == ["plain"]
        flip(engine, "masked-v1", "root_id")
        for read in (lambda: store.list_records(scope, request), lambda: store.get(scope, "plain")):
            with pytest.raises(DataLoss) as err:
                read()
            assert "masked" not in err.value.message
            assert "backup" in err.value.message
    finally:
        engine.dispose()
