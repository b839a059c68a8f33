"""Concurrent PutRecord calls share one durable commit (node/service.py, dmp/shared_commit.py),
on SQLite and on PostgreSQL, and each still gets its own answer.

Sixteen real clients (two doctors, eight calls each: fewer than the calls one certificate
may have waiting for their request) race on one node while the test holds the database's
write lock, so that the calls pile up behind the first transaction and the next one takes
them all. In the pile: good writes, the same put sent twice, a record id another doctor
used, a supersede of another doctor's record, and two new versions of one record. Every
acknowledged record is readable and named by exactly one audit event per acknowledged
call; the refused ones get their own error and fail nobody else; and the calls took at
most two commits.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.engine import Connection

from dmp.db import make_engine
from dmp.shared_commit import SharedCommit
from dmp.v1 import node_service_pb2 as npb
from dmp.v1 import record_pb2
from node.app import RunningNode
from tests.federation import (
    DOCTOR,
    OTHER_DOCTOR,
    READ_RECORD,
    Client,
    client,
    draft,
    logged_events,
    running_node,
)

PER_DOCTOR = 8
CALLS = 2 * PER_DOCTOR


@contextmanager
def write_lock_held(db_url: str) -> Iterator[None]:
    """Hold what a put's transaction needs (SQLite's write lock; PostgreSQL's records
    table against inserts) until the block ends."""
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                conn.connection.driver_connection.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]
            else:
                conn.begin()
                conn.execute(text("LOCK TABLE records IN EXCLUSIVE MODE"))
            try:
                yield
            finally:
                conn.rollback() if conn.dialect.name != "sqlite" else None
                if conn.dialect.name == "sqlite":
                    conn.connection.driver_connection.execute("ROLLBACK")  # type: ignore[union-attr]
    finally:
        engine.dispose()


def until(condition: Callable[[], bool], what: str) -> None:
    """Poll (not a timing assertion: the bound only stops a broken test hanging)."""
    for _ in range(3000):
        if condition():
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"never happened: {what}")


def put_request(
    record: record_pb2.Record, content: bytes = b"compte rendu"
) -> npb.PutRecordRequest:
    return npb.PutRecordRequest(record=record, content=content)


def new_version(of: record_pb2.Record, title: str) -> record_pb2.Record:
    record = draft(record_id=str(uuid.uuid4()), title=title)
    record.supersedes = of.id
    return record


@pytest.fixture
def node(pki_dir: Path, db_url: str) -> Iterator[RunningNode]:
    with running_node(pki_dir, "11", db_url) as running:
        yield running


def race(
    db_url: str, node: RunningNode, calls: list[tuple[Client, npb.PutRecordRequest]]
) -> list[str]:
    """Send every call at once while the write lock is held; release it once all of them
    wait on a shared transaction. Each call's answer: its record id or its status."""
    shared = node.puts
    assert isinstance(shared, SharedCommit)

    def call(pair: tuple[Client, npb.PutRecordRequest]) -> str:
        writer, request = pair
        try:
            return writer.node.PutRecord(request, timeout=60).record.id
        except grpc.RpcError as exc:
            return str(exc.code().name)

    with ThreadPoolExecutor(len(calls)) as pool:
        with write_lock_held(db_url):
            futures = [pool.submit(call, pair) for pair in calls]
            until(
                lambda: shared.stats.writing + shared.waiting() == len(calls),
                "every call waiting on the shared transaction",
            )
        return [f.result(timeout=60) for f in futures]


def test_racing_puts_share_commits_and_each_get_their_own_answer(
    pki_dir: Path, db_url: str, node: RunningNode
) -> None:
    doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
    other = client(pki_dir, f"practitioner-{OTHER_DOCTOR}", node.port)
    try:
        # Before the race: the other doctor's record (its id, and a version to supersede)
        # and one of the doctor's, which the race supersedes twice.
        theirs = draft(record_id=str(uuid.uuid4()))
        other.node.PutRecord(put_request(theirs), timeout=10)
        mine = draft(record_id=str(uuid.uuid4()))
        doctor.node.PutRecord(put_request(mine), timeout=10)

        twice = draft(record_id=str(uuid.uuid4()), title="Envoyé deux fois")
        taken = draft(record_id=theirs.id, title="Un id déjà pris")
        forbidden = new_version(theirs, "Pas la mienne")
        first, second = new_version(mine, "Version A"), new_version(mine, "Version B")
        good = [draft(record_id=str(uuid.uuid4()), title=f"Bon {n}") for n in range(CALLS - 6)]
        doctor_calls = [twice, twice, taken, forbidden, first, second, *good[:2]]
        calls = [(doctor, put_request(r)) for r in doctor_calls]
        calls += [(other, put_request(r)) for r in good[2:]]
        assert len(calls) == CALLS and len(doctor_calls) == PER_DOCTOR

        shared = node.puts
        assert isinstance(shared, SharedCommit)
        before = shared.stats.batches
        answers = race(db_url, node, calls)

        assert answers[:4] == [twice.id, twice.id, "ALREADY_EXISTS", "FAILED_PRECONDITION"]
        # Two new versions of one record: one is written, the other refused (it would
        # fork the record's history).
        versions = answers[4:6]
        winner = first if first.id in versions else second
        assert sorted(versions) == sorted([winner.id, "FAILED_PRECONDITION"]), versions
        assert answers[6:] == [r.id for r in good]
        # The sixteen calls took at most two commits: the one the lock held, and the one
        # that took every call waiting behind it.
        assert shared.stats.batches - before <= 2
        assert shared.stats.one_by_one >= 1  # the refusals were rolled back on their own

        acknowledged = [twice, twice, winner, *good]
        for record in acknowledged:
            got = doctor.node.GetRecord(
                npb.GetRecordRequest(record_id=record.id),
                timeout=10,
                metadata=doctor.md(op=READ_RECORD, record_id=record.id),
            ).record
            assert got.title == record.title
        old = doctor.node.GetRecord(
            npb.GetRecordRequest(record_id=mine.id),
            timeout=10,
            metadata=doctor.md(op=READ_RECORD, record_id=mine.id),
        ).record
        assert old.status == record_pb2.RECORD_STATUS_SUPERSEDED
    finally:
        doctor.close()
        other.close()

    written = Counter(
        str(e["participant_object_record_ids"][0])  # type: ignore[index]
        for e in logged_events(db_url)
        if e.get("event_type") == "write" and e.get("status_code") == "OK"
    )
    wanted = Counter(r.id for r in acknowledged) + Counter([theirs.id, mine.id])
    assert written == wanted  # one event per acknowledged call, none for a refused one
    ids = {r.id for r in [*acknowledged, theirs, mine]}
    loser = second if winner is first else first
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            stored = set(conn.execute(text("SELECT id FROM records")).scalars())
    finally:
        engine.dispose()
    assert stored == ids
    assert loser.id not in stored and forbidden.id not in stored


def test_sequential_puts_each_commit_on_their_own(
    pki_dir: Path, db_url: str, node: RunningNode
) -> None:
    doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
    shared = node.puts
    assert isinstance(shared, SharedCommit)
    try:
        before = shared.stats.batches
        for n in range(3):
            doctor.node.PutRecord(put_request(draft(title=f"Seul {n}")), timeout=10)
        assert shared.stats.batches - before == 3
        assert shared.stats.one_by_one == 0
    finally:
        doctor.close()


def test_two_new_versions_of_one_record_in_one_batch_never_fork_it(
    pki_dir: Path, db_url: str, node: RunningNode
) -> None:
    """Written together (no other refusal in the batch): the second version of the record
    sees it already retired, as its own transaction would, and is refused."""
    doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
    try:
        mine = draft(record_id=str(uuid.uuid4()))
        doctor.node.PutRecord(put_request(mine), timeout=10)
        first, second = new_version(mine, "Version A"), new_version(mine, "Version B")
        twice = draft(record_id=str(uuid.uuid4()), title="Envoyé deux fois")
        good = [draft(record_id=str(uuid.uuid4()), title=f"Bon {n}") for n in range(4)]
        calls = [(doctor, put_request(r)) for r in [first, second, twice, twice, *good]]
        answers = race(db_url, node, calls)
        winner = first if first.id in answers[:2] else second
        assert sorted(answers[:2]) == sorted([winner.id, "FAILED_PRECONDITION"]), answers
        assert answers[2:] == [twice.id, twice.id, *(r.id for r in good)]
        page = doctor.node.ListRecords(
            npb.ListRecordsRequest(patient_ins=mine.patient_ins), timeout=10, metadata=doctor.md()
        )
        current = {r.id for r in page.records if r.status == record_pb2.RECORD_STATUS_CURRENT}
        assert mine.id not in current and winner.id in current
    finally:
        doctor.close()
    written = Counter(
        str(e["participant_object_record_ids"][0])  # type: ignore[index]
        for e in logged_events(db_url)
        if e.get("event_type") == "write" and e.get("status_code") == "OK"
    )
    assert written == Counter([mine.id, winner.id, twice.id, twice.id, *(r.id for r in good)])


def test_a_shared_commit_that_fails_fails_every_call_of_its_batch(
    pki_dir: Path, db_url: str, node: RunningNode
) -> None:
    """Nothing is acknowledged that is not durable: when the batch's COMMIT fails, each of
    its calls fails (and is audited as failed), and none of its records is stored."""
    failing = [True]

    def fail_commit(conn: Connection) -> None:
        if failing[0] and conn.get_execution_options().get("dmp_commit") == "put-commit":
            raise OSError("the disk went away")

    event.listen(Engine, "commit", fail_commit)
    doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
    try:
        records = [draft(record_id=str(uuid.uuid4()), title=f"Perdu {n}") for n in range(6)]
        answers = race(db_url, node, [(doctor, put_request(r)) for r in records])
        assert answers == ["INTERNAL"] * len(records)
        failing[0] = False
        again = doctor.node.PutRecord(put_request(records[0]), timeout=10).record
        assert again.id == records[0].id
    finally:
        event.remove(Engine, "commit", fail_commit)
        doctor.close()
    statuses = Counter(
        str(e.get("status_code"))
        for e in logged_events(db_url)
        if e.get("event_type") == "write"
        and e.get("participant_object_record_ids") in [[r.id] for r in records]
    )
    # One failure event per call (of ours, audited at once), then the retry's OK.
    assert statuses == Counter({"INTERNAL": len(records), "OK": 1})
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            stored = set(conn.execute(text("SELECT id FROM records")).scalars())
    finally:
        engine.dispose()
    assert stored == {records[0].id}
