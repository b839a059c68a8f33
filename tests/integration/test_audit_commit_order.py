"""The audit log's "up to a seq" readers never skip a late commit.

Checkpoints advance the tree with the events of seq > its size, as the locator outbox once
forgot rows up to a seq. That is sound only because an event's seq is taken under the lock
that orders commits (PostgreSQL: a transaction-scoped advisory lock, SQLite: the write
lock), so no lower seq can commit after a higher one was read. This races writes shaped
like the node's (other rows first, then the audit append, in one transaction) against a
checkpointing thread: a late-committing lower seq would show as a gap (DataLoss) or as a
signed head that the final log does not extend.
"""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import Column, Integer, String, Table, insert
from sqlalchemy.orm import Session

from dmp.audit.events import AuditEvent, EventType
from dmp.audit.log import AuditLog
from dmp.audit.tables import audit_tables
from dmp.audit.verify import verify_log
from dmp.db import make_engine, new_metadata, writer
from dmp.ins import make_ins
from dmp.pki import Pki, load_credentials

NODE = "urn:dmp:node:11"
INS = make_ins("1850275123456")
WRITERS, PER_WRITER = 6, 40


def test_checkpoints_racing_writers_never_skip_an_event(
    db_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pki = Pki.init(tmp_path_factory.mktemp("order-pki"))
    pki.issue_node("11")
    signer = load_credentials(pki.directory, "node-11")
    metadata = new_metadata()
    events, checkpoints = audit_tables(metadata)
    # A table written before the audit append, as records and the outbox are.
    other = Table("other", metadata, Column("seq", Integer, primary_key=True), Column("v", String))
    engine = make_engine(db_url)
    metadata.create_all(engine)
    log = AuditLog(engine, events, checkpoints, source_id=NODE, region="11", signer=signer)
    errors: list[BaseException] = []
    done = threading.Event()
    signed: list[int] = []

    def write(worker: int) -> None:
        try:
            for i in range(PER_WRITER):
                with Session(writer(engine)) as session, session.begin():
                    session.execute(insert(other).values(v=f"{worker}-{i}"))
                    log.append(
                        session,
                        AuditEvent(event_type=EventType.WRITE, participant_object_patient_ins=INS),
                    )
        except BaseException as exc:
            errors.append(exc)

    def checkpoint() -> None:
        try:
            while not done.is_set():
                taken = log.checkpoint()  # raises DataLoss on a gap
                if taken is not None:
                    signed.append(taken.tree_size)
        except BaseException as exc:
            errors.append(exc)

    checkpointer = threading.Thread(target=checkpoint)
    checkpointer.start()
    writers = [threading.Thread(target=write, args=(w,)) for w in range(WRITERS)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    done.set()
    checkpointer.join()
    final = log.checkpoint()
    if final is not None:
        signed.append(final.tree_size)
    try:
        assert not errors, errors
        assert signed == sorted(set(signed)) and signed[-1] == WRITERS * PER_WRITER
        report = verify_log(engine, events, checkpoints, pki.ca_pem_path.read_bytes())
        assert report.ok, report.problems  # every head signed mid-race is a prefix
        assert report.checkpoints_verified == report.checkpoints == len(signed)
    finally:
        engine.dispose()
