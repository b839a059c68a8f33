"""Issue 15: kill -9 of a node while racing clients share its put commits.

The node runs as its own process on a SQLite file or a PostgreSQL database; clients race
PutRecord and the node is killed while they do. After a restart every acknowledged put is
readable, and every stored record has exactly one OK write event: a write's record and
its audit event commit together, and nothing acknowledged was lost.
"""

from __future__ import annotations

import signal
import threading
import uuid
from collections import Counter
from pathlib import Path

import grpc
from sqlalchemy import text

from dmp.db import make_engine
from dmp.v1 import node_service_pb2 as npb
from tests.federation import (
    DOCTOR,
    PATIENT,
    READ_RECORD,
    client,
    dmp_process,
    draft,
    logged_events,
    running_node,
    wait_listening,
)
from tests.integration.test_put_group_commit import put_request

DOC = f"practitioner-{DOCTOR}"
WRITERS = 8
#: Kill once this many puts were acknowledged (few: the node's log pipe is not drained).
ACKED_BEFORE_KILL = 24
#: Each writer stops after this many puts, killed or not (bounds the test).
MAX_PUTS = 40


def test_every_put_acknowledged_before_a_kill_9_is_there_after_it_audited_once(
    pki_dir: Path, db_url: str
) -> None:
    args = ["node", "serve", "--pki", str(pki_dir), "--region", "11", "--db", db_url]
    process = dmp_process(*args)
    acked: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()
    try:
        port = int(wait_listening(process).rsplit(":", 1)[1])
        doctor = client(pki_dir, DOC, port)

        def write() -> None:
            for _ in range(MAX_PUTS):
                record = draft(record_id=str(uuid.uuid4()))
                try:
                    doctor.node.PutRecord(put_request(record), timeout=20)
                except grpc.RpcError:
                    return  # the node is gone
                with lock:
                    acked.append(record.id)
                    if len(acked) >= ACKED_BEFORE_KILL:
                        enough.set()

        writers = [threading.Thread(target=write) for _ in range(WRITERS)]
        for thread in writers:
            thread.start()
        enough.wait(timeout=60)
        process.send_signal(signal.SIGKILL)
        process.wait()
        for thread in writers:
            thread.join(timeout=60)
        doctor.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    with lock:
        acknowledged = list(acked)
    assert len(acknowledged) >= ACKED_BEFORE_KILL

    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            stored = set(conn.execute(text("SELECT id FROM records")).scalars())
    finally:
        engine.dispose()
    assert set(acknowledged) <= stored
    writes: Counter[str] = Counter()
    for e in logged_events(db_url):
        if e.get("event_type") == "write" and str(e.get("status_code")) == "OK":
            ids = e.get("participant_object_record_ids") or []
            assert isinstance(ids, list)
            writes.update(str(i) for i in ids)
    assert {i: writes[i] for i in stored} == dict.fromkeys(stored, 1)

    with running_node(pki_dir, "11", db_url) as node:
        reader = client(pki_dir, DOC, node.port)
        try:
            for record_id in acknowledged:
                md = reader.md(op=READ_RECORD, record_id=record_id)
                got = reader.node.GetRecord(
                    npb.GetRecordRequest(record_id=record_id), metadata=md, timeout=10
                )
                assert got.record.id == record_id
        finally:
            reader.close()


def test_every_read_answered_before_a_kill_9_has_its_event_after_it(
    pki_dir: Path, db_url: str
) -> None:
    """Racing reads, then kill -9: a read's nonce and event commit before it answers, so
    the trail after the restart holds at least one OK event per answered read."""
    with running_node(pki_dir, "11", db_url) as node:
        writer = client(pki_dir, DOC, node.port)
        try:
            writer.node.PutRecord(put_request(draft()), timeout=10)
        finally:
            writer.close()
    before = _ok_views(db_url)
    args = ["node", "serve", "--pki", str(pki_dir), "--region", "11", "--db", db_url]
    process = dmp_process(*args)
    answered = [0]
    lock = threading.Lock()
    enough = threading.Event()
    try:
        port = int(wait_listening(process).rsplit(":", 1)[1])
        doctor = client(pki_dir, DOC, port)

        def read() -> None:
            for _ in range(MAX_PUTS):
                try:
                    doctor.node.ListRecords(
                        npb.ListRecordsRequest(patient_ins=PATIENT),
                        metadata=doctor.md(),
                        timeout=20,
                    )
                except grpc.RpcError:
                    return  # the node is gone
                with lock:
                    answered[0] += 1
                    if answered[0] >= ACKED_BEFORE_KILL:
                        enough.set()

        readers = [threading.Thread(target=read) for _ in range(WRITERS)]
        for thread in readers:
            thread.start()
        enough.wait(timeout=60)
        process.send_signal(signal.SIGKILL)
        process.wait()
        for thread in readers:
            thread.join(timeout=60)
        doctor.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    with lock:
        reads = answered[0]
    assert reads >= ACKED_BEFORE_KILL
    assert _ok_views(db_url) - before >= reads


def _ok_views(db_url: str) -> int:
    return sum(
        1
        for e in logged_events(db_url)
        if e.get("event_type") == "view" and str(e.get("status_code")) == "OK"
    )
