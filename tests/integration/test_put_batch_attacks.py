"""Issue 15, attacks on shared PutRecord commits (dmp/shared_commit.py).

Over real mutual TLS, on SQLite files and on PostgreSQL: a client that cancels while its
put waits in a batch, and an IngestRecords stream racing a put batch on the same patient
with crossed supersedes (the lock order the author named as a deadlock risk). Every caller
gets an answer (OK, or a clear error to retry on); nothing half-written; each stored write
audited OK exactly once.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from sqlalchemy import text

from dmp.db import make_engine
from dmp.shared_commit import SharedCommit
from dmp.v1 import node_service_pb2 as npb
from dmp.v1 import record_pb2
from node.app import RunningNode
from tests.federation import DOCTOR, PATIENT, client, draft, identity_of, logged_events
from tests.integration.test_put_group_commit import (
    new_version,
    node,  # noqa: F401
    put_request,
    race,
    until,
    write_lock_held,
)

DOC = f"practitioner-{DOCTOR}"
ROUNDS = 4
CROSSED = 4
#: What a caller that lost may be told: the record was replaced first, or the database
#: broke a lock cycle (retry).
LOST = {"FAILED_PRECONDITION", "UNAVAILABLE", "ABORTED"}


def stored_rows(db_url: str) -> dict[str, tuple[str, str | None]]:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, status, supersedes FROM records")).all()
            return {r[0]: (r[1], r[2]) for r in rows}
    finally:
        engine.dispose()


def ok_writes(db_url: str) -> Counter[str]:
    """How many OK write events name each record id as the one written."""
    counted: Counter[str] = Counter()
    for e in logged_events(db_url):
        if e.get("event_type") == "write" and str(e.get("status_code")) == "OK":
            ids = e.get("participant_object_record_ids") or []
            assert isinstance(ids, list)
            for record_id in ids:
                counted[str(record_id)] += 1
    return counted


def test_a_put_cancelled_while_it_waits_in_a_batch_is_stored_and_audited_once_or_not_at_all(
    pki_dir: Path,
    db_url: str,
    node: RunningNode,  # noqa: F811
) -> None:
    shared = node.puts
    assert isinstance(shared, SharedCommit)
    doctor = client(pki_dir, DOC, node.port)
    try:
        kept = draft(record_id=str(uuid.uuid4()), title="Attendu")
        cancelled = draft(record_id=str(uuid.uuid4()), title="Annulé")
        with ThreadPoolExecutor(1) as pool:
            with write_lock_held(db_url):
                waiting = pool.submit(
                    lambda: doctor.node.PutRecord(put_request(kept), timeout=60).record.id
                )
                gone = doctor.node.PutRecord.future(put_request(cancelled), timeout=60)
                until(lambda: shared.stats.writing + shared.waiting() == 2, "both puts waiting")
                gone.cancel()
                until(gone.done, "the cancelled call ended at the client")
            assert waiting.result(timeout=60) == kept.id
        # The cancelled put was never acknowledged; stored or not, the node is consistent:
        # its retry answers the same record, and it is audited once for the shared write.
        again = doctor.node.PutRecord(put_request(cancelled), timeout=10).record
        assert again.id == cancelled.id
    finally:
        doctor.close()
    rows = stored_rows(db_url)
    assert {kept.id, cancelled.id} <= rows.keys()
    writes = ok_writes(db_url)
    assert writes[kept.id] == 1
    # The first (cancelled) write and the retry: one or two OK events, never more, and
    # none for a write that was not stored.
    assert writes[cancelled.id] in {1, 2}


def _ingest(doctor_node: object, records: list[record_pb2.Record]) -> str:
    def stream() -> Iterator[npb.IngestRecordsRequest]:
        for record in records:
            yield npb.IngestRecordsRequest(put=put_request(record))

    try:
        doctor_node.IngestRecords(stream(), timeout=60)  # type: ignore[attr-defined]
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"


def _put(doctor_node: object, record: record_pb2.Record) -> str:
    try:
        doctor_node.PutRecord(put_request(record), timeout=60)  # type: ignore[attr-defined]
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"


def _after(barrier: threading.Barrier, call: Callable[..., str], *args: object) -> str:
    barrier.wait()
    return call(*args)


def test_an_ingest_stream_racing_a_put_batch_with_crossed_supersedes_never_half_writes(
    pki_dir: Path,
    db_url: str,
    node: RunningNode,  # noqa: F811
) -> None:
    """The stream replaces R1..Rn in that order, the batch's puts replace Rn..R1: on
    PostgreSQL their row locks cross. Each record ends with exactly one current version;
    every caller is answered OK or told to retry / that it lost; the stream is all or
    nothing; each stored new version has one OK event."""
    doctor = client(pki_dir, DOC, node.port)
    codes: Counter[str] = Counter()
    written: list[str] = []
    try:
        for round_ in range(ROUNDS):
            base = [
                doctor.node.PutRecord(
                    put_request(draft(record_id=str(uuid.uuid4()), title=f"R{round_}.{i}")),
                    timeout=10,
                ).record
                for i in range(CROSSED)
            ]
            by_stream = [new_version(r, "par le flux") for r in base]
            by_puts = [new_version(r, "par un put") for r in reversed(base)]
            barrier = threading.Barrier(1 + len(by_puts))

            with ThreadPoolExecutor(1 + len(by_puts)) as pool:
                streamed = pool.submit(_after, barrier, _ingest, doctor.node, by_stream)
                put_futures = [pool.submit(_after, barrier, _put, doctor.node, r) for r in by_puts]
                puts = [f.result(timeout=120) for f in put_futures]
                stream_code = streamed.result(timeout=120)
            codes.update([f"stream:{stream_code}"] + [f"put:{c}" for c in puts])
            assert stream_code in {"OK"} | LOST, stream_code
            assert all(c in {"OK"} | LOST for c in puts), puts
            rows = stored_rows(db_url)
            stream_stored = [r.id in rows for r in by_stream]
            assert all(stream_stored) or not any(stream_stored), "a stream half-written"
            assert all(stream_stored) == (stream_code == "OK")
            for record, code in zip(by_puts, puts, strict=True):
                assert (record.id in rows) == (code == "OK"), (record.id, code)
            for original in base:
                versions = [
                    i for i, (status, sup) in rows.items() if i == original.id or sup == original.id
                ]
                current = [i for i in versions if rows[i][0] == "current"]
                assert len(current) == 1, (original.id, versions, rows)
            written += [r.id for r in by_stream + by_puts if r.id in rows]
    finally:
        doctor.close()
    writes = ok_writes(db_url)
    # A new version's event names it and the version it retired: one OK event each.
    assert all(writes[i] == 1 for i in written), {i: writes[i] for i in written}
    assert codes  # what happened, for the report when it fails


def test_a_batch_with_a_patient_identity_conflict_refuses_that_put_only(
    pki_dir: Path,
    db_url: str,
    node: RunningNode,  # noqa: F811
) -> None:
    """One put of a batch gives traits that contradict the patient's stored ones: it is
    refused on its own (FAILED_PRECONDITION), the others of its batch are stored, each
    audited once, and the stored identity is unchanged."""
    doctor = client(pki_dir, DOC, node.port)
    try:
        first = npb.PutRecordRequest(
            record=draft(record_id=str(uuid.uuid4())), content=b"cr", patient=identity_of(PATIENT)
        )
        doctor.node.PutRecord(first, timeout=10)
        good = [
            npb.PutRecordRequest(
                record=draft(record_id=str(uuid.uuid4())),
                content=b"cr",
                patient=identity_of(PATIENT),
            )
            for _ in range(3)
        ]
        liar = npb.PutRecordRequest(
            record=draft(record_id=str(uuid.uuid4())),
            content=b"cr",
            patient=identity_of(PATIENT, family="AUTRE", given=("PIERRE",)),
        )
        calls = [(doctor, r) for r in good[:2]] + [(doctor, liar)] + [(doctor, good[2])]
        answers = race(db_url, node, calls)
    finally:
        doctor.close()
    assert answers[:2] + answers[3:] == [r.record.id for r in good]
    assert answers[2] == "FAILED_PRECONDITION"
    rows = stored_rows(db_url)
    assert liar.record.id not in rows
    writes = ok_writes(db_url)
    assert all(writes[r.record.id] == 1 for r in good)
    assert writes[liar.record.id] == 0
