"""IngestRecords with several records a message (`IngestRecordsRequest.puts`), and the
batch inserts under it (node/bulk.py: executemany on SQLite, COPY on PostgreSQL), on real
SQLite files and a real PostgreSQL database, over real mutual TLS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dmp.client import ingest_messages
from dmp.db import make_engine, upgrade, writer
from dmp.ins import make_ins
from dmp.v1 import node_service_pb2 as pb
from dmp.v1 import record_pb2
from node.app import MIGRATIONS, RunningNode
from node.bulk import insert_rows
from node.models import OutboxRow
from node.store import CONTENTS, RECORDS
from tests.federation import (
    DOCTOR,
    OTHER_PATIENT,
    PATIENT,
    Client,
    client,
    draft,
    running_node,
)


@pytest.fixture
def node(pki_dir: Path, db_url: str) -> Iterator[RunningNode]:
    with running_node(pki_dir, "11", db_url) as running:
        yield running


@pytest.fixture
def doctor(pki_dir: Path, node: RunningNode) -> Iterator[Client]:
    c = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
    yield c
    c.close()


def puts(records: list[record_pb2.Record]) -> list[pb.PutRecordRequest]:
    return [pb.PutRecordRequest(record=r, content=r.id.encode()) for r in records]


def listed(c: Client, ins: str = PATIENT) -> list[str]:
    ids: list[str] = []
    token = ""
    while True:
        request = pb.ListRecordsRequest(patient_ins=ins, page_size=1000, page_token=token)
        page = c.node.ListRecords(request, timeout=10, metadata=c.md(ins))
        ids.extend(r.id for r in page.records)
        token = page.next_page_token
        if not token:
            return sorted(ids)


def test_several_records_a_message_are_stored_and_counted(doctor: Client) -> None:
    records = [draft(record_id=f"m{i:04d}", effective_s=i + 1) for i in range(2300)]
    messages = list(ingest_messages(puts(records), records=150))
    assert len(messages) == 16 and all(not m.HasField("put") for m in messages)
    answer = doctor.node.IngestRecords(iter(messages), timeout=60)
    assert answer.stored_count == 2300
    assert listed(doctor) == [r.id for r in records]
    # Sent again (records, then their retries in other shapes): stored once, all counted.
    again = [pb.IngestRecordsRequest(put=p) for p in puts(records[:5])]
    again.append(pb.IngestRecordsRequest(puts=puts(records[5:300])))
    answer = doctor.node.IngestRecords(iter(again), timeout=60)
    assert answer.stored_count == 300
    assert listed(doctor) == [r.id for r in records]


def test_a_message_gives_put_then_puts_in_order(doctor: Client) -> None:
    """The index a failure names counts records across messages: `put` first, then `puts`."""
    first = [draft(record_id=f"o{i}", effective_s=i + 1) for i in range(3)]
    second = [draft(record_id=f"p{i}", effective_s=i + 1) for i in range(4)]
    second[2].title = ""  # the 6th record sent: index 5
    one, *rest = puts(first)
    messages = [
        pb.IngestRecordsRequest(put=one, puts=rest),
        pb.IngestRecordsRequest(puts=puts(second)),
    ]
    with pytest.raises(grpc.RpcError) as err:
        doctor.node.IngestRecords(iter(messages), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "record #5 (5 stored before it)" in err.value.details()
    assert "title" in err.value.details()
    assert listed(doctor) == ["o0", "o1", "o2", "p0", "p1"]


def test_an_invalid_record_after_a_committed_batch_names_its_index(doctor: Client) -> None:
    """A bad record inside a message, after a batch of 1,000 committed: what came before
    it is stored (both batches), nothing after it."""
    records = [draft(record_id=f"q{i:04d}", effective_s=i + 1) for i in range(1600)]
    records[1234].type_code.code = ""
    with pytest.raises(grpc.RpcError) as err:
        doctor.node.IngestRecords(ingest_messages(puts(records), records=200), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "record #1234 (1234 stored before it)" in err.value.details()
    assert listed(doctor) == [r.id for r in records[:1234]]
    # The whole stream again, fixed: the stored ones are retries, the rest new.
    records[1234].type_code.code = "11488-4"
    answer = doctor.node.IngestRecords(ingest_messages(puts(records)), timeout=60)
    assert answer.stored_count == 1600
    assert listed(doctor) == [r.id for r in records]


def test_the_same_id_twice_in_a_message_is_one_record(doctor: Client) -> None:
    same = draft(record_id="twice", effective_s=5)
    other = draft(record_id="twice", effective_s=5)
    other.title = "another title"
    answer = doctor.node.IngestRecords(
        iter([pb.IngestRecordsRequest(puts=puts([same, draft(record_id="x1"), same]))]),
        timeout=30,
    )
    assert answer.stored_count == 3
    assert listed(doctor) == ["twice", "x1"]
    with pytest.raises(grpc.RpcError) as err:
        doctor.node.IngestRecords(
            iter([pb.IngestRecordsRequest(puts=puts([draft(record_id="x2"), other]))]),
            timeout=30,
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert listed(doctor) == ["twice", "x1"]  # the batch with the conflict: none of it


def test_each_patient_gets_one_outbox_row_a_batch(doctor: Client, db_url: str) -> None:
    records = [
        draft(record_id=f"r{i:03d}", patient=PATIENT if i % 2 else OTHER_PATIENT)
        for i in range(400)
    ]
    engine = make_engine(db_url)
    try:
        answer = doctor.node.IngestRecords(ingest_messages(puts(records)), timeout=30)
        assert answer.stored_count == 400
        with engine.connect() as connection:
            # No directory here: the outbox is not delivered.
            rows = connection.execute(select(OutboxRow.patient_ins)).scalars().all()
    finally:
        engine.dispose()
    assert sorted(rows) == sorted([PATIENT, OTHER_PATIENT])
    assert listed(doctor, OTHER_PATIENT) == sorted(r.id for r in records[::2])


# -- node/bulk.py: the rows COPY and executemany store are those SQLAlchemy stores -------


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    made = make_engine(db_url)
    upgrade(made, MIGRATIONS, "alembic_version_node")
    yield made
    made.dispose()


def _row(record_id: str, **changed: Any) -> dict[str, Any]:
    values: dict[str, Any] = dict(
        id=record_id,
        patient_ins=PATIENT,
        kind="document",
        type_system="http://loinc.org",
        type_code="11488-4",
        type_display='tab\tnewline\nbackslash\\ quote\' "double" é 漢字 \U0001f600',
        title="\\N null-looking, \\. end-of-copy-looking, \r carriage return",
        author_identity="urn:dmp:practitioner:1",
        author_name="Dr Zoé",
        author_profession="doctor",
        organization="",
        created_us=1_700_000_000_000_000,
        effective_us=-1_000_000,
        status="current",
        version=1,
        supersedes=None,
        root_id=record_id,
        confidentiality="normal",
        hidden_from_patient=False,
        revealed_us=None,
        content_type="application/pdf",
        size=0,
        sha256="0" * 64,
        fingerprint="f" * 64,
        row_hash="a" * 64,
        prescription_id=None,
        sealed=None,
    )
    values.update(changed)
    return values


def _variants(prefix: str) -> list[dict[str, Any]]:
    return [
        _row(f"{prefix}-plain"),
        _row(
            f"{prefix}-full",
            supersedes="older",
            hidden_from_patient=True,
            revealed_us=123,
            prescription_id="rx-1",
            sealed=b"\x00\\\x01\t\n\xff sealed bytes",
            organization="Hôpital \\ Nord",
        ),
        _row(f"{prefix}-empty", title="", type_display="", author_name=""),
    ]


def _stored(session: Session, prefix: str) -> list[tuple[Any, ...]]:
    records = session.execute(
        select(RECORDS).where(RECORDS.c.id.like(f"{prefix}-%")).order_by(RECORDS.c.id)
    ).all()
    contents = session.execute(
        select(CONTENTS)
        .where(CONTENTS.c.record_id.like(f"{prefix}-%"))
        .order_by(CONTENTS.c.record_id)
    ).all()
    out: list[tuple[Any, ...]] = []
    for row in [*records, *contents]:
        values = row._asdict()
        values.pop("seq", None)
        out.append(
            tuple(
                value.replace(prefix, "*") if isinstance(value, str) else value
                for value in values.values()
            )
        )
    return out


def test_bulk_rows_are_those_sqlalchemy_stores(engine: Engine) -> None:
    blobs = [b"", b"\x00\\N\\.\n\r\t" * 100, bytes(range(256)) * 40]
    with Session(writer(engine)) as session, session.begin():
        bulk = _variants("bulk")
        insert_rows(session, RECORDS, bulk)
        insert_rows(
            session,
            CONTENTS,
            [{"record_id": r["id"], "content": b} for r, b in zip(bulk, blobs, strict=True)],
        )
        core = _variants("core")
        session.execute(insert(RECORDS), core)
        session.execute(
            insert(CONTENTS),
            [{"record_id": r["id"], "content": b} for r, b in zip(core, blobs, strict=True)],
        )
    with Session(engine) as session:
        by_bulk, by_core = _stored(session, "bulk"), _stored(session, "core")
    assert len(by_bulk) == 6
    assert by_bulk == by_core
    assert {type(v) for row in by_bulk for v in row if isinstance(v, bytes | memoryview)} <= {bytes}


def test_bulk_rows_of_mixed_shapes_are_all_stored(engine: Engine) -> None:
    rows = _variants("mixed")
    del rows[1]["sealed"]  # another shape, between two of the first
    with Session(writer(engine)) as session, session.begin():
        insert_rows(session, RECORDS, rows)
    with Session(engine) as session:
        assert len(_stored(session, "mixed")) == 3


def test_a_bulk_insert_failure_is_sqlalchemys_and_stores_nothing(engine: Engine) -> None:
    with Session(writer(engine)) as session, session.begin():
        insert_rows(session, RECORDS, [_row("dup")])
    with pytest.raises(IntegrityError), Session(writer(engine)) as session, session.begin():
        insert_rows(session, RECORDS, [_row("new-1"), _row("dup"), _row("new-2")])
    with Session(engine) as session:
        ids = session.scalars(select(RECORDS.c.id).order_by(RECORDS.c.id)).all()
    assert ids == ["dup"]


def test_each_batch_audits_one_event_per_patient_naming_their_records(
    doctor: Client, node: RunningNode
) -> None:
    """Batches are written while the next is read (node/ingest_batches.py): each batch's
    events name its patients and their records only, whatever the reader meanwhile (which
    names each record's patient as it reads it, for a refusal's event)."""
    patients = [make_ins(f"18502751{n:05d}") for n in range(600)]
    records = [
        draft(record_id=f"a{i:04d}", patient=patients[i % len(patients)]) for i in range(3000)
    ]
    answer = doctor.node.IngestRecords(ingest_messages(puts(records)), timeout=60)
    assert answer.stored_count == 3000
    assert node.audit is not None
    for ins in patients:
        events = [
            e.event
            for e in node.audit.events_for_patient(ins, limit=100)
            if e.event.event_type == "write"
        ]
        assert len(events) == 3  # one a batch of 1,000 records
        assert all(e.participant_object_patient_ins == ins for e in events)
        named = sorted(i for e in events for i in e.participant_object_record_ids)
        assert named == sorted(r.id for r in records if r.patient_ins == ins)
