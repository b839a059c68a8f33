"""Storage failures get their real status, a message an operator can act on, their log
line and their audit event; the caller never sees SQL or driver internals."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import Pool

from dmp.ins import make_ins
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import node_service_pb2 as npb
from tests.federation import (
    DOCTOR,
    PATIENT,
    client,
    directory_stub,
    draft,
    identity_of,
    running_directory,
    running_node,
)

INTERNALS = ("sqlite", "sql", "psycopg", "operationalerror", "insert", "select", "statement")


def _no_internals(details: str) -> None:
    lowered = details.lower()
    assert not [word for word in INTERNALS if word in lowered], details


_listeners: list[Any] = []


@pytest.fixture(autouse=True)
def _remove_listeners() -> Iterator[None]:
    yield
    while _listeners:
        event.remove(*_listeners.pop())


@contextmanager
def full_storage(db_url: str, table: str) -> Iterator[None]:
    """The database refuses to grow, as on a full disk: on SQLite the file may not gain a
    page (max_page_count on every connection the service checks out, and at every
    transaction's start: a connection kept between transactions, as the shared commits
    keep theirs, is not checked out again), on PostgreSQL inserts into `table` fail with
    SQLSTATE 53100 disk_full, as the server reports it."""
    if db_url.startswith("sqlite"):
        path = db_url.removeprefix("sqlite:///")
        full = [True]

        def limit(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
            if isinstance(dbapi_connection, sqlite3.Connection):
                name = dbapi_connection.execute("PRAGMA database_list").fetchone()[2]
                if name == path:
                    pages = 1 if full[0] else 1_073_741_823
                    dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")

        def limit_kept(connection: Connection) -> None:
            limit(connection.connection.driver_connection, None, None)

        event.listen(Pool, "checkout", limit)
        event.listen(Engine, "begin", limit_kept)
        # Until the test ends: it lifts the limit it set.
        _listeners.extend([(Pool, "checkout", limit), (Engine, "begin", limit_kept)])
        try:
            yield
        finally:
            full[0] = False
        return
    with _pg(db_url) as conn:
        conn.execute(
            text(
                "CREATE FUNCTION dmp_test_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                " RAISE EXCEPTION 'could not extend file \"base/1/2\": No space left on device'"
                " USING ERRCODE = 'disk_full'; END $$"
            )
        )
        conn.execute(
            text(
                f"CREATE TRIGGER dmp_test_full BEFORE INSERT ON {table}"
                " FOR EACH ROW EXECUTE FUNCTION dmp_test_full()"
            )
        )
    try:
        yield
    finally:
        with _pg(db_url) as conn:
            conn.execute(text(f"DROP TRIGGER dmp_test_full ON {table}"))
            conn.execute(text("DROP FUNCTION dmp_test_full()"))


@contextmanager
def _pg(db_url: str) -> Iterator[Any]:
    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()


def _rename(db_url: str, old: str, new: str) -> None:
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as connection:
            connection.execute(f"ALTER TABLE {old} RENAME TO {new}")
        return
    with _pg(db_url) as conn:
        conn.execute(text(f"ALTER TABLE {old} RENAME TO {new}"))


def _call_lines(caplog: pytest.LogCaptureFixture, method: str) -> list[dict[str, Any]]:
    lines = []
    for record in caplog.records:
        if record.name == "dmp.rpc" and record.getMessage().startswith("{"):
            line = json.loads(record.getMessage())
            if line["method"].endswith(method):
                lines.append(line)
    return lines


def _put(c: Any, record_id: str, size: int = 1) -> npb.PutRecordResponse:
    request = npb.PutRecordRequest(record=draft(record_id=record_id), content=b"x" * size)
    return c.node.PutRecord(request, timeout=10)


def test_a_full_disk_at_a_node_is_resource_exhausted_and_says_what_to_do(
    pki_dir: Path, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dmp.rpc")
    with running_node(pki_dir, "11", db_url) as node:
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        _put(doctor, "before")
        with full_storage(db_url, "records"), pytest.raises(grpc.RpcError) as err:
            _put(doctor, "while-full", size=256 * 1024)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "full" in err.value.details() and "space" in err.value.details()
        _no_internals(err.value.details())
        assert [line["code"] for line in _call_lines(caplog, "/PutRecord")] == [
            "OK",
            "RESOURCE_EXHAUSTED",
        ]
        # Once space is freed, the same write succeeds.
        assert _put(doctor, "while-full", size=256 * 1024).record.id == "while-full"
        doctor.close()


def test_a_full_disk_at_the_directory_is_resource_exhausted(
    pki_dir: Path, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dmp.rpc")
    with running_directory(pki_dir, db_url) as directory:
        channel, doctor = directory_stub(pki_dir, f"practitioner-{DOCTOR}", directory.port)
        # Registrations until the database must grow (at once on PostgreSQL, within a few
        # pages' worth on SQLite): the first that cannot is refused as a full disk.
        registered = 0
        with full_storage(db_url, "patients"):
            for i in range(500):
                patient = identity_of(make_ins(f"185027{i:07d}"))
                request = dpb.RegisterPatientRequest(patient=patient)
                try:
                    doctor.RegisterPatient(request, timeout=10)
                except grpc.RpcError as exc:
                    err = exc
                    break
                registered += 1
            else:
                raise AssertionError("500 registrations fitted in a database that may not grow")
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "full" in err.details()
        _no_internals(err.details())
        codes = [line["code"] for line in _call_lines(caplog, "/RegisterPatient")]
        assert codes == ["OK"] * registered + ["RESOURCE_EXHAUSTED"]
        assert doctor.RegisterPatient(request, timeout=10).created
        channel.close()


def test_a_lost_database_connection_is_unavailable(
    pki_dir: Path, postgres_db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dmp.rpc")
    with running_node(pki_dir, "11", postgres_db_url) as node:
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        _put(doctor, "before")
        with _pg(postgres_db_url) as conn:  # the server ends the session of the insert
            conn.execute(
                text(
                    "CREATE FUNCTION dmp_test_drop() RETURNS trigger LANGUAGE plpgsql AS $$"
                    " BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NEW; END $$"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER dmp_test_drop BEFORE INSERT ON records"
                    " FOR EACH ROW EXECUTE FUNCTION dmp_test_drop()"
                )
            )
        with pytest.raises(grpc.RpcError) as err:
            _put(doctor, "dropped")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "database" in err.value.details() and "retry" in err.value.details()
        _no_internals(err.value.details())
        assert _call_lines(caplog, "/PutRecord")[-1]["code"] == "UNAVAILABLE"
        with _pg(postgres_db_url) as conn:
            conn.execute(text("DROP TRIGGER dmp_test_drop ON records"))
        assert _put(doctor, "dropped").record.id == "dropped"
        doctor.close()


def test_an_unexpected_failure_is_internal_logged_and_audited_as_such(
    pki_dir: Path, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dmp.rpc")
    with running_node(pki_dir, "11", db_url) as node:
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        _put(doctor, "before")
        _rename(db_url, "record_contents", "record_contents_gone")
        with pytest.raises(grpc.RpcError) as err:
            _put(doctor, "broken")
        assert err.value.code() == grpc.StatusCode.INTERNAL
        _no_internals(err.value.details())
        assert "record_contents" not in err.value.details()
        assert "log" in err.value.details()
        _rename(db_url, "records", "records_gone")
        with pytest.raises(grpc.RpcError) as err:
            doctor.node.ListRecords(
                npb.ListRecordsRequest(patient_ins=PATIENT), metadata=doctor.md(), timeout=10
            )
        assert err.value.code() == grpc.StatusCode.INTERNAL
        _no_internals(err.value.details())
        assert [line["code"] for line in _call_lines(caplog, "/PutRecord")] == ["OK", "INTERNAL"]
        assert [line["code"] for line in _call_lines(caplog, "/ListRecords")] == ["INTERNAL"]
        assert node.audit is not None
        events = [e.event for e in node.audit.events_for_patient(PATIENT, limit=100)]
        failed = [(e.event_type, e.status_code, e.event_outcome_indicator) for e in events[:2]]
        assert failed == [("view", "INTERNAL", 8), ("write", "INTERNAL", 8)]
        _rename(db_url, "records_gone", "records")
        _rename(db_url, "record_contents_gone", "record_contents")
        assert _put(doctor, "broken").record.id == "broken"
        doctor.close()
