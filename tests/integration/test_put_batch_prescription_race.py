"""Issue 15: prescription writes and an IngestRecords stream racing a PutRecord batch on
the same patient (the lock order a shared commit takes: the patients' rows, the records,
then the audit seq). On SQLite and PostgreSQL every caller is answered OK or told to
retry, and what was acknowledged is stored with its OK event."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text

from dmp.db import make_engine
from dmp.v1 import node_service_pb2 as npb
from tests.federation import DOCTOR, OTHER_DOCTOR, PATIENT, draft, identity_of, logged_events
from tests.integration.prescription_helpers import Actor, make_rx_pki, rx_id, rx_node

#: Few calls for each certificate (a practitioner's waiting calls are limited).
PUTS = 8
PRESCRIPTIONS = 2
RETRY = {"UNAVAILABLE", "ABORTED"}


@pytest.fixture(scope="module")
def rx_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("rx-put-race-pki")
    make_rx_pki(directory)
    return directory


def _put(actor: Actor, record_id: str) -> str:
    request = npb.PutRecordRequest(
        record=draft(record_id=record_id), content=b"cr", patient=identity_of(PATIENT)
    )
    try:
        actor.records.PutRecord(request, timeout=60)
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"


def _ingest(actor: Actor, record_ids: list[str]) -> str:
    def stream() -> Iterator[npb.IngestRecordsRequest]:
        for record_id in record_ids:
            yield npb.IngestRecordsRequest(
                put=npb.PutRecordRequest(
                    record=draft(record_id=record_id), content=b"cr", patient=identity_of(PATIENT)
                )
            )

    try:
        actor.records.IngestRecords(stream(), timeout=60)
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"


def _prescribe(actor: Actor, made: list[str]) -> str:
    try:
        made.append(rx_id(actor.prescribe()))
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"


def _after(barrier: threading.Barrier, call: Callable[..., str], *args: object) -> str:
    barrier.wait()
    return call(*args)


def test_prescriptions_and_a_stream_racing_a_put_batch_on_one_patient_all_end_clearly(
    rx_pki: Path, db_url: str
) -> None:
    put_ids = [str(uuid.uuid4()) for _ in range(PUTS)]
    streamed = [str(uuid.uuid4()) for _ in range(PUTS)]
    made: list[str] = []
    with rx_node(rx_pki, db_url) as (node, _):
        doctor = Actor(rx_pki, f"practitioner-{DOCTOR}", node.port)
        colleague = Actor(rx_pki, f"practitioner-{OTHER_DOCTOR}", node.port)
        try:
            barrier = threading.Barrier(PUTS + PRESCRIPTIONS + 1)
            with ThreadPoolExecutor(PUTS + PRESCRIPTIONS + 1) as pool:
                futures = [
                    pool.submit(_after, barrier, _put, doctor if n % 2 else colleague, i)
                    for n, i in enumerate(put_ids)
                ]
                futures += [
                    pool.submit(_after, barrier, _prescribe, doctor, made)
                    for _ in range(PRESCRIPTIONS)
                ]
                futures.append(pool.submit(_after, barrier, _ingest, colleague, streamed))
                codes = [f.result(timeout=120) for f in futures]
        finally:
            doctor.close()
            colleague.close()
    assert all(c == "OK" or c in RETRY for c in codes), " ".join(codes)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            stored = set(conn.execute(text("SELECT id FROM records")).scalars())
            prescriptions = set(conn.execute(text("SELECT id FROM prescriptions")).scalars())
    finally:
        engine.dispose()
    for record_id, code in zip(put_ids, codes[:PUTS], strict=True):
        assert (record_id in stored) == (code == "OK")
    stream_ok = codes[-1] == "OK"
    assert all((i in stored) == stream_ok for i in streamed)  # all or nothing
    assert set(made) <= prescriptions
    ok: Counter[str] = Counter()
    for e in logged_events(db_url):
        if e.get("event_type") == "write" and str(e.get("status_code")) == "OK":
            ids = e.get("participant_object_record_ids") or []
            assert isinstance(ids, list)
            ok.update(str(i) for i in ids)
    assert all(ok[i] == 1 for i in put_ids + streamed if i in stored)
