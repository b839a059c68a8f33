"""The audit log's group commit keeps its connection between batches.

Reads' events (each with its assertion nonce) race from several threads; their batches
reuse one connection, yet every event commits gapless with its nonce and a replayed nonce
is still refused. A batch whose transaction failed never leaves its connection to the next
one, and the log's close returns the connection it keeps to the pool.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError

from dmp.audit.events import AuditEvent, EventType
from dmp.audit.log import AuditLog
from dmp.audit.tables import audit_tables
from dmp.db import make_engine, new_metadata
from dmp.errors import DmpError, Unauthenticated, Unavailable
from dmp.ins import make_ins
from dmp.nonces import StoredNonces, nonce_table

NODE = "urn:dmp:node:11"
INS = make_ins("1850275123456")
READERS, PER_READER = 6, 30
KEEP_UNTIL = 2**62


@pytest.fixture
def rig(db_url: str) -> Iterator[tuple[Engine, AuditLog]]:
    metadata = new_metadata()
    events, checkpoints = audit_tables(metadata)
    seen = nonce_table(metadata)
    engine = make_engine(db_url)
    metadata.create_all(engine)
    log = AuditLog(
        engine,
        events,
        checkpoints,
        source_id=NODE,
        region="11",
        nonces=StoredNonces(engine, seen),
    )
    try:
        yield engine, log
    finally:
        log.close()
        engine.dispose()


def _read() -> AuditEvent:
    return AuditEvent(event_type=EventType.VIEW, participant_object_patient_ins=INS)


def test_racing_reads_share_one_kept_connection_and_commit_gapless(
    rig: tuple[Engine, AuditLog],
) -> None:
    engine, log = rig
    errors: list[BaseException] = []
    seqs: list[int] = []
    replays: list[DmpError] = []
    used = [os.urandom(16) for _ in range(READERS)]
    start = threading.Barrier(READERS)

    def reader(worker: int) -> None:
        try:
            start.wait()
            for i in range(PER_READER):
                nonce = used[worker] if i == 0 else os.urandom(16)
                seqs.append(log.record(_read(), (nonce, KEEP_UNTIL)))
            try:  # the first nonce again: a replay, refused without its event
                log.record(_read(), (used[worker], KEEP_UNTIL))
            except Unauthenticated as exc:
                replays.append(exc)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(w,)) for w in range(READERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(replays) == READERS
    assert sorted(seqs) == list(range(1, READERS * PER_READER + 1))
    with engine.connect() as conn:
        count = conn.execute(select(func.count()).select_from(log.events_table)).scalar()
    assert count == READERS * PER_READER
    # Batches came one after another: all but the first took the kept connection.
    assert log._kept.reused > 0
    assert log._kept.checked_out < log._kept.reused


def test_a_failed_batch_never_hands_its_connection_on(
    rig: tuple[Engine, AuditLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    _engine, log = rig
    log.record(_read(), (os.urandom(16), KEEP_UNTIL))
    kept = log._kept._held
    assert kept is not None
    driver = kept.connection.driver_connection
    real = log._insert_nonces

    def refuse(conn: object, nonces: object, **kwargs: object) -> set[bytes]:
        raise OperationalError("INSERT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(log, "_insert_nonces", refuse)
    with pytest.raises(Unavailable):
        log.record(_read(), (os.urandom(16), KEEP_UNTIL))
    assert kept.closed and log._kept._held is None
    monkeypatch.setattr(log, "_insert_nonces", real)
    assert log.record(_read(), (os.urandom(16), KEEP_UNTIL)) == 2
    # A fresh connection: the failed one went neither to this batch nor back to the pool.
    held = log._kept._held
    assert held is not None and held is not kept
    assert held.connection.driver_connection is not driver


def test_close_returns_the_kept_connection_to_the_pool(rig: tuple[Engine, AuditLog]) -> None:
    engine, log = rig
    log.record(_read(), (os.urandom(16), KEEP_UNTIL))
    assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    log.close()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    log.record(_read(), (os.urandom(16), KEEP_UNTIL))  # after close: not kept
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_batch_larger_than_one_insert_is_written_whole_and_in_order(
    rig: tuple[Engine, AuditLog],
) -> None:
    engine, log = rig
    events = [
        AuditEvent(event_type=EventType.VIEW, participant_object_patient_ins=INS, request_id=str(i))
        for i in range(1201)  # three INSERTs of the driver statement
    ]
    assert log.record_many(events) == list(range(1, 1202))
    t = log.events_table
    with engine.connect() as conn:
        rows = conn.execute(select(t.c.seq, t.c.request_id).order_by(t.c.seq)).all()
    assert [(seq, int(rid)) for seq, rid in rows] == [(i + 1, i) for i in range(1201)]
