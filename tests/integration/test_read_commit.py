"""A read pays one durable commit: its assertion's nonce is inserted in the transaction of
its audit event (dmp/audit/log.py), not in one of its own before it. On SQLite and on
PostgreSQL: a replay is still refused, across processes and restarts (the database has the
last word), and a refused read leaves no allowed-access event."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from sqlalchemy import Engine, event, func, select

from dmp.audit.events import AuditEvent, EventType
from dmp.audit.log import AuditLog
from dmp.db import make_engine, upgrade
from dmp.errors import Unauthenticated
from dmp.nonces import StoredNonces
from dmp.v1 import node_service_pb2 as npb
from node.app import MIGRATIONS
from node.models import audit_checkpoints, audit_events, seen_nonces
from tests.federation import DOCTOR, PATIENT, client, draft, running_node

DOC = f"practitioner-{DOCTOR}"
KEEP = 2**62


def _event(i: int) -> AuditEvent:
    return AuditEvent(
        event_type=EventType.VIEW,
        active_participant_user_id=f"urn:dmp:practitioner:{i}",
        participant_object_patient_ins=PATIENT,
        request_id=f"r{i}",
    )


@pytest.fixture
def ledger(db_url: str) -> Iterator[tuple[Engine, AuditLog, StoredNonces]]:
    engine = make_engine(db_url)
    upgrade(engine, MIGRATIONS, "alembic_version_node")
    nonces = StoredNonces(engine, seen_nonces)
    log = AuditLog(
        engine, audit_events, audit_checkpoints, source_id="urn:dmp:node:11", nonces=nonces
    )
    yield engine, log, nonces
    engine.dispose()


def _count(engine: Engine, table: object) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)  # type: ignore[arg-type]


def test_racing_reads_with_the_same_nonces_record_one_event_each(
    ledger: tuple[Engine, AuditLog, StoredNonces],
) -> None:
    engine, log, _ = ledger

    # 24 reads race with 6 distinct nonces, sharing group commits: one winner a nonce.
    def read(i: int) -> bool:
        try:
            log.record(_event(i), (bytes([i % 6]) * 16, KEEP))
        except Unauthenticated as exc:
            assert "already used" in exc.message
            return False
        return True

    with ThreadPoolExecutor(max_workers=24) as pool:
        won = [i for i, ok in enumerate(pool.map(read, range(24))) if ok]
    assert sorted(i % 6 for i in won) == list(range(6))
    assert _count(engine, audit_events) == 6  # no event for a refused read
    assert _count(engine, seen_nonces) == 6


def test_a_nonce_stored_by_another_process_refuses_the_read_and_writes_no_event(
    ledger: tuple[Engine, AuditLog, StoredNonces], db_url: str
) -> None:
    engine, log, _ = ledger
    # Another process (a directory replica, or this one before a restart) stored it.
    other = make_engine(db_url)
    assert StoredNonces(other, seen_nonces).first_time(b"n" * 16, KEEP, 0)
    other.dispose()
    with pytest.raises(Unauthenticated):
        log.record(_event(1), (b"n" * 16, KEEP))
    with pytest.raises(Unauthenticated):
        log.start_record(_event(2), (b"n" * 16, KEEP)).result()
    assert _count(engine, audit_events) == 0
    assert log.record(_event(3), (b"m" * 16, KEEP)) == 1


def test_one_read_is_one_commit(ledger: tuple[Engine, AuditLog, StoredNonces]) -> None:
    engine, log, _ = ledger
    commits: list[int] = []
    event.listen(engine, "commit", lambda _conn: commits.append(1))
    log.record(_event(1), (os.urandom(16), KEEP))
    assert len(commits) == 1


def test_a_node_list_commits_once_and_a_replay_after_restart_is_refused(
    pki_dir: Path, db_url: str
) -> None:
    with running_node(pki_dir, "11", db_url) as node:
        doctor = client(pki_dir, DOC, node.port)
        doctor.node.PutRecord(npb.PutRecordRequest(record=draft(), content=b"x"), timeout=10)
        engine = node.store._engine
        commits: list[int] = []
        event.listen(engine, "commit", lambda _conn: commits.append(1))
        metadata = doctor.md(PATIENT)
        answer = doctor.node.ListRecords(
            npb.ListRecordsRequest(patient_ins=PATIENT), metadata=metadata, timeout=10
        )
        assert len(answer.records) == 1
        assert len(commits) == 1  # the nonce and the audit event, together
        with pytest.raises(grpc.RpcError) as err:  # the same process: refused from memory
            doctor.node.ListRecords(
                npb.ListRecordsRequest(patient_ins=PATIENT), metadata=metadata, timeout=10
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        doctor.close()
    with running_node(pki_dir, "11", db_url) as node:  # a restart: the database remembers
        doctor = client(pki_dir, DOC, node.port)
        with pytest.raises(grpc.RpcError) as err:
            doctor.node.ListRecords(
                npb.ListRecordsRequest(patient_ins=PATIENT), metadata=metadata, timeout=10
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "already used" in (err.value.details() or "")
        doctor.close()
