"""Issue 15, attacks on "one durable commit per read": the assertion's nonce is only
reserved in memory at the check and inserted with the call's audit event.

Over real mutual TLS, on SQLite files and on PostgreSQL: a replay (same node, directory
then node, across restarts), the same assertion raced, a refused or failed call's
assertion replayed after a restart, a stream cancelled by its client, an audit commit the
database refuses. Each must end with the nonce durable or no data answered.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import grpc
import pytest
from sqlalchemy import Engine, event
from sqlalchemy.engine import Connection

from dmp.assertion import Metadata
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import node_service_pb2 as npb
from tests.federation import (
    ACCESS_HISTORY,
    DOCTOR,
    LOOKUP,
    PATIENT,
    READ_CONTENT,
    READ_RECORD,
    VIEW,
    Client,
    client,
    draft,
    identity_of,
    logged_events,
    logged_events_of,
    running_directory,
    running_node,
)
from tests.integration.test_assertion_binding import Fed, _stored, fed  # noqa: F401

DOC = f"practitioner-{DOCTOR}"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
RACERS = 12


def code_of(call: Callable[[], object]) -> str:
    try:
        answer = call()
        if isinstance(answer, Iterator):
            list(answer)
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"


def assert_replay_refused(call: Callable[[], object]) -> None:
    with pytest.raises(grpc.RpcError) as err:
        answer = call()
        if isinstance(answer, Iterator):
            list(answer)
    assert err.value.code() == UNAUTHENTICATED
    assert "already used" in (err.value.details() or "")


def _put(doctor: Client) -> str:
    return doctor.node.PutRecord(
        npb.PutRecordRequest(record=draft(), content=b"compte rendu"), timeout=10
    ).record.id


def test_one_assertion_raced_many_times_answers_data_once(pki_dir: Path, db_url: str) -> None:
    with running_node(pki_dir, "11", db_url) as node:
        doctor = client(pki_dir, DOC, node.port)
        try:
            record_id = _put(doctor)
            md = doctor.md(op=READ_RECORD, record_id=record_id)
            barrier = threading.Barrier(RACERS)

            def read(_: int) -> str:
                barrier.wait()
                return code_of(
                    lambda: doctor.node.GetRecord(
                        npb.GetRecordRequest(record_id=record_id), metadata=md, timeout=30
                    )
                )

            with ThreadPoolExecutor(RACERS) as pool:
                codes = Counter(pool.map(read, range(RACERS)))
        finally:
            doctor.close()
    assert codes == Counter({"OK": 1, "UNAUTHENTICATED": RACERS - 1})
    reads = [e for e in logged_events(db_url) if e.get("event_type") == "read-record"]
    assert Counter(str(e.get("status_code")) for e in reads)["OK"] == 1


def test_a_refused_or_failed_reads_assertion_stays_used_after_a_restart(
    pki_dir: Path, db_url: str
) -> None:
    """A read of a record not there yet (NotFound) and a history asked by a doctor
    (refused) end without an OK audit commit: their nonces are stored on their own. Once
    the record exists, the first assertion replayed after a restart passes every check
    but the nonce, and is refused for it: no data."""
    record_id = str(uuid.uuid4())
    with running_node(pki_dir, "11", db_url) as node:
        doctor = client(pki_dir, DOC, node.port)
        try:
            missing = doctor.md(op=READ_RECORD, record_id=record_id)
            history = doctor.md(op=ACCESS_HISTORY)

            def read_missing() -> object:
                return doctor.node.GetRecord(
                    npb.GetRecordRequest(record_id=record_id), metadata=missing, timeout=10
                )

            def read_history() -> object:
                return doctor.node.ListAccessEvents(
                    npb.ListAccessEventsRequest(patient_ins=PATIENT), metadata=history, timeout=10
                )

            assert code_of(read_missing) == "NOT_FOUND"
            assert code_of(read_history) == "PERMISSION_DENIED"
        finally:
            doctor.close()
    with running_node(pki_dir, "11", db_url) as node:
        doctor = client(pki_dir, DOC, node.port)
        try:
            doctor.node.PutRecord(
                npb.PutRecordRequest(record=draft(record_id=record_id), content=b"cr"),
                timeout=10,
            )
            assert_replay_refused(
                lambda: doctor.node.GetRecord(
                    npb.GetRecordRequest(record_id=record_id), metadata=missing, timeout=10
                )
            )
            assert code_of(read_history) == "PERMISSION_DENIED"
        finally:
            doctor.close()
    ok_reads = [
        e
        for e in logged_events(db_url)
        if e.get("event_type") == "read-record" and str(e.get("status_code")) == "OK"
    ]
    assert ok_reads == []


def test_a_content_stream_cancelled_by_its_client_leaves_its_read_audited_and_used(
    pki_dir: Path, db_url: str
) -> None:
    content = b"x" * (3 * 1024 * 1024)  # several chunks
    with running_node(pki_dir, "11", db_url) as node:
        doctor = client(pki_dir, DOC, node.port)
        try:
            record_id = doctor.node.PutRecord(
                npb.PutRecordRequest(record=draft(), content=content), timeout=30
            ).record.id
            md = doctor.md(op=READ_CONTENT, record_id=record_id)
            stream = doctor.node.GetRecordContent(
                npb.GetRecordContentRequest(record_id=record_id), metadata=md, timeout=30
            )
            first = next(stream)
            assert first.record.id == record_id
            stream.cancel()
        finally:
            doctor.close()
    # The first message was answered: its event and nonce were durable before it.
    reads = [
        e
        for e in logged_events(db_url)
        if e.get("event_type") == "read-content" and str(e.get("status_code")) == "OK"
    ]
    assert len(reads) == 1
    with running_node(pki_dir, "11", db_url) as node:
        doctor = client(pki_dir, DOC, node.port)
        try:
            assert_replay_refused(
                lambda: doctor.node.GetRecordContent(
                    npb.GetRecordContentRequest(record_id=record_id), metadata=md, timeout=10
                )
            )
        finally:
            doctor.close()


def test_a_read_whose_audit_commit_fails_answers_no_data(pki_dir: Path, db_url: str) -> None:
    """The database refuses the audit commit (the nonce's and the event's): the read fails,
    no record is answered, and no OK event is kept."""
    failing = [False]

    def fail_commit(conn: Connection) -> None:
        if failing[0] and conn.get_execution_options().get("dmp_commit") == "audit-commit":
            raise OSError("the disk went away")

    event.listen(Engine, "commit", fail_commit)
    try:
        with running_node(pki_dir, "11", db_url) as node:
            doctor = client(pki_dir, DOC, node.port)
            try:
                record_id = _put(doctor)
                md = doctor.md(op=READ_RECORD, record_id=record_id)
                failing[0] = True
                code = code_of(
                    lambda: doctor.node.GetRecord(
                        npb.GetRecordRequest(record_id=record_id), metadata=md, timeout=10
                    )
                )
                failing[0] = False
                assert code in {"UNAVAILABLE", "INTERNAL", "RESOURCE_EXHAUSTED"}
                # The process still remembers the nonce: no second try with it.
                assert_replay_refused(
                    lambda: doctor.node.GetRecord(
                        npb.GetRecordRequest(record_id=record_id), metadata=md, timeout=10
                    )
                )
            finally:
                doctor.close()
    finally:
        event.remove(Engine, "commit", fail_commit)
    ok_reads = [
        e
        for e in logged_events(db_url)
        if e.get("event_type") == "read-record" and str(e.get("status_code")) == "OK"
    ]
    assert ok_reads == []


# -- through the directory ----------------------------------------------------------------


def _view(doctor: Client, md: Metadata) -> object:
    return doctor.directory.GetConsolidatedView(
        dpb.GetConsolidatedViewRequest(patient_ins=PATIENT), metadata=md, timeout=20
    )


def _list(doctor: Client, md: Metadata) -> object:
    return doctor.node.ListRecords(
        npb.ListRecordsRequest(patient_ins=PATIENT), metadata=md, timeout=10
    )


def test_a_view_assertion_used_at_the_directory_is_refused_everywhere_after(
    fed: Fed,  # noqa: F811
) -> None:
    record_id = _stored(fed)
    at_directory = fed.directory_client(DOC)
    at_node = fed.node_client(DOC)
    try:
        md = at_directory.md(op=VIEW)
        view = _view(at_directory, md)
        assert [r.id for r in view.records] == [record_id]  # type: ignore[attr-defined]
        assert_replay_refused(lambda: _view(at_directory, md))  # the directory's memory
        assert_replay_refused(lambda: _list(at_node, md))  # the node stored it as relayed
    finally:
        at_directory.close()
        at_node.close()
    fed.restart_node()
    at_node = fed.node_client(DOC)
    try:
        assert_replay_refused(lambda: _list(at_node, md))
    finally:
        at_node.close()


def test_a_view_assertion_raced_at_the_directory_and_the_node_answers_once(
    fed: Fed,  # noqa: F811
) -> None:
    _stored(fed)
    at_directory = fed.directory_client(DOC)
    at_node = fed.node_client(DOC)
    try:
        md = at_directory.md(op=VIEW)
        barrier = threading.Barrier(RACERS)

        def attempt(i: int) -> tuple[str, str, int]:
            barrier.wait()
            try:
                answer = _list(at_node, md) if i % 2 else _view(at_directory, md)
            except grpc.RpcError as exc:
                return ("node" if i % 2 else "directory"), str(exc.code().name), 0
            return ("node" if i % 2 else "directory"), "OK", len(answer.records)  # type: ignore[attr-defined]

        with ThreadPoolExecutor(RACERS) as pool:
            outcomes = list(pool.map(attempt, range(RACERS)))
    finally:
        at_directory.close()
        at_node.close()
    # A view the directory answers may hold a region that refused (the node saw the nonce
    # first): what matters is that one caller, and one only, got the record.
    assert sum(1 for _, _, n in outcomes if n) == 1, outcomes
    assert all(code in {"OK", "UNAUTHENTICATED"} for _, code, _ in outcomes), outcomes


def test_a_view_whose_directory_audit_commit_fails_answers_nothing(
    fed: Fed,  # noqa: F811
) -> None:
    """The directory's view event commits while the regions work: if the directory's
    database refuses it, the view fails though the regions answered, and the node's own
    events (sharing the request id) name what it served the directory."""
    record_id = _stored(fed)
    engine = fed.directory.audit._engine
    failing = [True]

    def fail_commit(conn: Connection) -> None:
        if failing[0] and conn.get_execution_options().get("dmp_commit") == "audit-commit":
            raise OSError("the disk went away")

    event.listen(engine, "commit", fail_commit)
    doctor = fed.directory_client(DOC)
    try:
        md = doctor.md(op=VIEW)
        code = code_of(lambda: _view(doctor, md))
        failing[0] = False
        assert code in {"UNAVAILABLE", "INTERNAL", "RESOURCE_EXHAUSTED"}, code
        view = _view(doctor, doctor.md(op=VIEW))  # the database is back
        assert [r.id for r in view.records] == [record_id]  # type: ignore[attr-defined]
    finally:
        event.remove(engine, "commit", fail_commit)
        doctor.close()
    at_directory = [
        e
        for e in logged_events_of(engine)
        if e.get("event_type") == "view" and str(e.get("status_code")) == "OK"
    ]
    at_node = [
        e
        for e in logged_events(fed.node_db)
        if e.get("event_type") == "view" and str(e.get("status_code")) == "OK"
    ]
    assert len(at_directory) == 1  # the answered view only
    # Each view the node served is named there, records and all, under its request id.
    assert at_directory[0]["request_id"] in {e["request_id"] for e in at_node}
    assert all(e.get("participant_object_record_ids") == [record_id] for e in at_node)


def _refused_view(doctor: Client, request: dpb.GetConsolidatedViewRequest) -> object:
    return doctor.directory.GetConsolidatedView(request, metadata=doctor.md(op=VIEW), timeout=20)


def test_a_view_refused_for_its_request_leaves_no_ok_event(
    fed: Fed,  # noqa: F811
) -> None:
    """The view's event commits while the regions work, but only for a request the
    directory will serve: a bad page token or time bound is answered INVALID_ARGUMENT and
    the trail must not say the caller viewed the record."""
    _stored(fed)
    engine = fed.directory.audit._engine
    doctor = fed.directory_client(DOC)
    try:
        bad_token = dpb.GetConsolidatedViewRequest(patient_ins=PATIENT, page_token="not-a-token")
        bad_time = dpb.GetConsolidatedViewRequest(patient_ins=PATIENT)
        bad_time.since.seconds = -(10**12)
        for request in (bad_token, bad_time):
            code = code_of(partial(_refused_view, doctor, request))
            assert code == "INVALID_ARGUMENT"
    finally:
        doctor.close()
    views = [e for e in logged_events_of(engine) if e.get("event_type") == "view"]
    assert [e for e in views if str(e.get("status_code")) == "OK"] == []


def test_one_lookup_assertion_raced_at_two_directory_replicas_answers_once(
    pki_dir: Path, db_factory: Callable[[str], str]
) -> None:
    """Two directories on one database: neither's memory saw the other's reservation, so
    the insert in the audit commit is what refuses the replay."""
    database = db_factory("directory")
    with (
        running_directory(pki_dir, database) as first,
        running_directory(pki_dir, database) as second,
    ):
        clients = [client(pki_dir, DOC, first.port), client(pki_dir, DOC, second.port)]
        try:
            clients[0].directory.RegisterPatient(
                dpb.RegisterPatientRequest(patient=identity_of(PATIENT)), timeout=10
            )
            md = clients[0].md(op=LOOKUP)
            barrier = threading.Barrier(RACERS)

            def lookup(i: int) -> str:
                barrier.wait()
                return code_of(
                    lambda: clients[i % 2].directory.GetPatient(
                        dpb.GetPatientRequest(ins=PATIENT), metadata=md, timeout=30
                    )
                )

            with ThreadPoolExecutor(RACERS) as pool:
                codes = Counter(pool.map(lookup, range(RACERS)))
        finally:
            for c in clients:
                c.close()
    assert codes == Counter({"OK": 1, "UNAUTHENTICATED": RACERS - 1})
