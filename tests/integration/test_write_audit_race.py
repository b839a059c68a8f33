"""Every write call is audited, the ones that lose a race too.

Writers racing to store the same record id (a hospital's software retrying on several
connections) all get the stored record back. On PostgreSQL the losers' insert fails on the
id's key at commit and they are answered as retries; their audit event, appended in the
transaction that rolled back, went with it, and nothing recorded that they wrote.
"""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import text

from dmp.db import make_engine
from dmp.v1 import node_service_pb2 as npb
from dmp.v1 import record_pb2
from tests.federation import DOCTOR, client, draft, running_node

#: Fewer than the calls one certificate may have waiting for their request (8).
WRITERS = 6
ROUNDS = 8


def _write_events(db_url: str, record_id: str) -> list[dict[str, object]]:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT event_json FROM audit_events")).scalars().all()
    finally:
        engine.dispose()
    events = [json.loads(row) for row in rows]
    return [
        e
        for e in events
        if e.get("event_type") == "write"
        and record_id in (e.get("participant_object_record_ids") or [])
    ]


def test_writers_racing_on_one_record_id_are_each_audited(pki_dir: Path, db_url: str) -> None:
    with running_node(pki_dir, "11", db_url) as node:
        writers = [client(pki_dir, f"practitioner-{DOCTOR}", node.port) for _ in range(WRITERS)]
        try:
            for _ in range(ROUNDS):
                record = draft(record_id=str(uuid.uuid4()))
                start = threading.Barrier(WRITERS)

                def put(
                    i: int, record: record_pb2.Record = record, start: threading.Barrier = start
                ) -> str:
                    start.wait()
                    request = npb.PutRecordRequest(record=record, content=b"compte rendu")
                    return writers[i].node.PutRecord(request, timeout=30).record.id

                with ThreadPoolExecutor(WRITERS) as pool:
                    answers = list(pool.map(put, range(WRITERS)))
                assert answers == [record.id] * WRITERS
                events = _write_events(db_url, record.id)
                assert len(events) == WRITERS, (
                    f"{WRITERS} writes of {record.id} answered OK, {len(events)} audited"
                )
                assert {e.get("status_code") for e in events} == {"OK"}
        finally:
            for writer in writers:
                writer.close()
