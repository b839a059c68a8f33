"""The audit trail on a real database: transactions, failures, concurrency, and tampering
with a SQLite file from outside (sqlite3) detected and located by `dmp audit verify`."""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, Table, func, insert, select
from sqlalchemy.orm import Session

from dmp.audit.checkpoints import sign_checkpoint
from dmp.audit.events import AuditEvent, EventType, outcome_for_status
from dmp.audit.log import AuditLog
from dmp.audit.merkle import event_leaf_hash
from dmp.audit.tables import audit_tables
from dmp.audit.verify import VerifyReport, verify_log
from dmp.cli import audit as audit_cli
from dmp.cli.common import CommandError
from dmp.db import make_engine, new_metadata, sqlite_url, writer
from dmp.errors import DataLoss, Unavailable
from dmp.ins import make_ins
from dmp.pki import Credentials, Pki, load_credentials
from dmp.purposes import Purpose

NODE = "urn:dmp:node:11"
DOCTOR = "urn:dmp:practitioner:10000000001"
INS = make_ins("1850275123456")
EVENTS = 50
EMERGENCY_SEQ = 14  # every 7th event is an emergency read


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pki = Pki.init(tmp_path_factory.mktemp("audit-pki"))
    pki.issue_node("11")
    pki.issue_node("53")
    return pki


@pytest.fixture(scope="module")
def node11(pki: Pki) -> Credentials:
    return load_credentials(pki.directory, "node-11")


def _event(i: int) -> AuditEvent:
    kind = [EventType.VIEW, EventType.READ_RECORD, EventType.READ_CONTENT, EventType.WRITE][i % 4]
    emergency = i % 7 == 0
    refused = i % 5 == 0
    status = "PERMISSION_DENIED" if refused else "OK"
    return AuditEvent(
        event_type=kind,
        event_outcome_indicator=outcome_for_status(status),
        purpose_of_use=Purpose.EMERGENCY if emergency else Purpose.CARE,
        emergency_reason="patient inconscient" if emergency else "",
        active_participant_user_id=DOCTOR,
        active_participant_user_name="Dr Claire MARTIN",
        active_participant_role="doctor",
        relaying_participant="urn:dmp:directory",
        participant_object_patient_ins=INS,
        participant_object_record_ids=() if kind == EventType.VIEW else (f"rec-{i}",),
        status_code=status,
        request_id=f"req-{i // 3}",
    )


@dataclass
class Log:
    path: Path
    engine: Engine
    log: AuditLog
    ca_pem: bytes
    metadata: MetaData

    def verify(self) -> VerifyReport:
        return verify_log(
            self.engine, self.log.events_table, self.log.checkpoints_table, self.ca_pem
        )

    def sql(self, statement: str, *params: object) -> None:
        """Tamper from outside, as an operator with sqlite3 would."""
        with closing(sqlite3.connect(self.path)) as raw:
            raw.execute(statement, params)
            raw.commit()

    def row(self, seq: int) -> tuple[str, bytes]:
        with closing(sqlite3.connect(self.path)) as raw:
            found = raw.execute(
                "SELECT event_json, leaf_hash FROM audit_events WHERE seq = ?", (seq,)
            ).fetchone()
        return found[0], found[1]


def _new_log(path: Path, node11: Credentials, pki: Pki, interval: float = 60.0) -> Log:
    metadata = new_metadata()
    events, checkpoints = audit_tables(metadata)
    Table("things", metadata, Column("id", Integer, primary_key=True))
    engine = make_engine(sqlite_url(path))
    metadata.create_all(engine)
    log = AuditLog(
        engine,
        events,
        checkpoints,
        source_id=NODE,
        region="11",
        signer=node11,
        checkpoint_interval=interval,
    )
    return Log(path, engine, log, pki.ca_pem_path.read_bytes(), metadata)


@pytest.fixture
def audit(tmp_path: Path, node11: Credentials, pki: Pki) -> Iterator[Log]:
    """A node's log of 50 events on a SQLite file, with a checkpoint over all of them."""
    setup = _new_log(tmp_path / "node.db", node11, pki)
    for i in range(1, EVENTS + 1):
        assert setup.log.record(_event(i)) == i
    checkpoint = setup.log.checkpoint()
    assert checkpoint is not None and checkpoint.tree_size == EVENTS
    yield setup
    setup.engine.dispose()


def test_an_untouched_log_verifies(audit: Log) -> None:
    report = audit.verify()
    assert report.ok, report.problems
    assert (report.events, report.checkpoints, report.checkpoints_verified) == (EVENTS, 1, 1)
    assert report.source_id == NODE and report.unsigned_events == 0


# -- tampering -----------------------------------------------------------------------------


def test_a_changed_byte_is_found_at_its_event(audit: Log) -> None:
    event_json, _ = audit.row(EMERGENCY_SEQ)
    assert '"purpose_of_use":"EMERGENCY"' in event_json
    # Hide a break-the-glass access: one byte less... and a different purpose.
    audit.sql(
        "UPDATE audit_events SET event_json = replace(event_json, 'EMERGENCY', 'EMERGENCz')"
        " WHERE seq = ?",
        EMERGENCY_SEQ,
    )
    report = audit.verify()
    assert not report.ok
    first = report.problems[0]
    assert (first.kind, first.seq) == ("changed", EMERGENCY_SEQ)
    assert DOCTOR in first.message and "read-content" in first.message
    assert "for EMERGENCz ('patient inconscient')" in first.message
    assert [p.kind for p in report.problems] == ["changed"]  # the stored hashes still hold


def test_a_change_with_its_hash_recomputed_breaks_the_signed_root(audit: Log) -> None:
    event_json, _ = audit.row(20)
    forged = event_json.replace('"status_code":"PERMISSION_DENIED"', '"status_code":"OK"')
    assert forged != event_json
    audit.sql(
        "UPDATE audit_events SET event_json = ?, leaf_hash = ? WHERE seq = 20",
        forged,
        event_leaf_hash(20, forged.encode()),
    )
    report = audit.verify()
    assert [(p.kind, p.seq) for p in report.problems] == [("checkpoint-root-mismatch", EVENTS)]
    assert f"events 1..{EVENTS}" in report.problems[0].message


def test_a_deleted_event_is_found_at_its_seq(audit: Log) -> None:
    audit.sql("DELETE FROM audit_events WHERE seq = 23")
    report = audit.verify()
    assert [(p.kind, p.seq) for p in report.problems] == [("deleted", 23)]
    assert "event 23 deleted" in report.problems[0].message
    assert report.events == EVENTS - 1


def test_two_swapped_events_are_found_moved(audit: Log) -> None:
    ten, thirty = audit.row(10), audit.row(30)
    for seq, (event_json, leaf) in ((10, thirty), (30, ten)):
        audit.sql(
            "UPDATE audit_events SET event_json = ?, leaf_hash = ? WHERE seq = ?",
            event_json,
            leaf,
            seq,
        )
    report = audit.verify()
    moved = [p for p in report.problems if p.kind == "moved"]
    assert [(p.seq, p.message.split(":")[0]) for p in moved] == [
        (10, "the event of seq 30 was moved to seq 10"),
        (30, "the event of seq 10 was moved to seq 30"),
    ]
    # The reordered leaves no longer make the signed root either.
    assert ("checkpoint-root-mismatch", EVENTS) in [(p.kind, p.seq) for p in report.problems]


def test_swapped_contents_alone_are_found_moved(audit: Log) -> None:
    five, six = audit.row(5)[0], audit.row(6)[0]
    audit.sql("UPDATE audit_events SET event_json = ? WHERE seq = 5", six)
    audit.sql("UPDATE audit_events SET event_json = ? WHERE seq = 6", five)
    report = audit.verify()
    assert [(p.kind, p.seq) for p in report.problems] == [("moved", 5), ("moved", 6)]


def test_truncation_behind_a_checkpoint_is_found(audit: Log) -> None:
    audit.sql("DELETE FROM audit_events WHERE seq > 40")
    report = audit.verify()
    assert [(p.kind, p.seq) for p in report.problems] == [("truncated", 41)]
    assert "events 41..50 were removed" in report.problems[0].message


def test_a_changed_query_column_is_found(audit: Log) -> None:
    # Hiding an event from the patient's history without touching the JSON.
    audit.sql("UPDATE audit_events SET participant_object_patient_ins = 'x' WHERE seq = 8")
    report = audit.verify()
    assert [(p.kind, p.seq) for p in report.problems] == [("changed", 8)]
    assert "query columns" in report.problems[0].message


def test_a_flipped_signature_byte_is_a_bad_checkpoint(audit: Log) -> None:
    with closing(sqlite3.connect(audit.path)) as raw:
        (signature,) = raw.execute("SELECT signature FROM audit_checkpoints").fetchone()
    flipped = bytearray(signature)
    flipped[-3] ^= 0x01
    audit.sql("UPDATE audit_checkpoints SET signature = ?", bytes(flipped))
    report = audit.verify()
    assert [(p.kind, p.seq) for p in report.problems] == [("bad-checkpoint-signature", EVENTS)]
    assert "does not verify" in report.problems[0].message


def test_a_checkpoint_signed_with_another_key_is_bad(audit: Log, tmp_path: Path, pki: Pki) -> None:
    with closing(sqlite3.connect(audit.path)) as raw:
        (root,) = raw.execute("SELECT root_hash FROM audit_checkpoints").fetchone()
    other = Pki.init(tmp_path / "rogue-pki")
    other.issue_node("11")
    rogue = load_credentials(other.directory, "node-11")
    node53 = load_credentials(pki.directory, "node-53")
    cases = [(rogue, "not issued by the federation CA"), (node53, "not by the log's owner")]
    for signer, why in cases:
        forged = sign_checkpoint(signer, EVENTS, root, source_id=NODE)
        audit.sql(
            "UPDATE audit_checkpoints SET signature = ?, signer_cert_pem = ?, signed_at_us = ?",
            forged.signature,
            forged.signer_cert_pem.decode(),
            forged.signed_at_us,
        )
        report = audit.verify()
        assert [(p.kind, p.seq) for p in report.problems] == [("bad-checkpoint-signature", EVENTS)]
        assert why in report.problems[0].message


def test_a_gap_stops_further_checkpoints(audit: Log, node11: Credentials) -> None:
    audit.sql("DELETE FROM audit_events WHERE seq = 3")
    fresh = AuditLog(
        audit.engine,
        audit.log.events_table,
        audit.log.checkpoints_table,
        source_id=NODE,
        signer=node11,
    )
    fresh.record(_event(99))
    with pytest.raises(DataLoss, match="no event 3"):
        fresh.checkpoint()


# -- transactions and failures --------------------------------------------------------------


def test_an_event_commits_or_rolls_back_with_the_callers_write(audit: Log) -> None:
    things = audit.metadata.tables["things"]
    with Session(writer(audit.engine)) as session, session.begin():
        session.execute(insert(things).values(id=1))
        assert audit.log.append(session, _event(51)) == 51
    with pytest.raises(RuntimeError), Session(writer(audit.engine)) as session, session.begin():
        session.execute(insert(things).values(id=2))
        audit.log.append(session, _event(52))
        raise RuntimeError("the write failed after its event was appended")
    with writer(audit.engine).begin() as conn:
        assert audit.log.append_many(conn, [_event(53), _event(54)]) == [52, 53]
        conn.rollback()
    with audit.engine.connect() as conn:
        assert conn.execute(select(things.c.id)).scalars().all() == [1]
    assert audit.log.size() == 51
    assert audit.log.record(_event(55)) == 52
    assert audit.verify().ok


def test_record_fails_unavailable_when_the_table_is_gone(
    audit: Log, caplog: pytest.LogCaptureFixture
) -> None:
    audit.sql("DROP TABLE audit_events")
    # The caller is told where the operator finds the cause; the log names it.
    with pytest.raises(
        Unavailable, match=r"^audit trail unavailable: .*ref ([0-9a-f]{12})$"
    ) as err:
        audit.log.record(_event(1))
    ref = err.value.message.rsplit(" ", 1)[1]
    assert any(
        ref in r.getMessage() and "no such table: audit_events" in r.getMessage()
        for r in caplog.records
    )


def test_record_fails_unavailable_when_the_database_cannot_be_opened(
    tmp_path: Path, audit: Log, node11: Credentials
) -> None:
    engine = make_engine(sqlite_url(tmp_path / "no-such-dir" / "node.db"))
    log = AuditLog(engine, audit.log.events_table, audit.log.checkpoints_table, source_id=NODE)
    with pytest.raises(Unavailable, match=r"^audit trail unavailable"):
        log.record(_event(1))


# -- checkpoints over time ------------------------------------------------------------------


def test_checkpoints_are_taken_in_the_background_and_at_close(
    tmp_path: Path, node11: Credentials, pki: Pki
) -> None:
    setup = _new_log(tmp_path / "bg.db", node11, pki, interval=0.05)
    log = setup.log
    log.start()
    for i in range(1, 6):
        log.record(_event(i))
    deadline = time.monotonic() + 10
    while _max_checkpoint(setup) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _max_checkpoint(setup) == 5
    for i in range(6, 9):
        log.record(_event(i))
    log.close()
    assert _max_checkpoint(setup) == 8
    assert log.checkpoint() is None  # nothing new
    report = setup.verify()
    assert report.ok and report.checkpoints_verified == report.checkpoints >= 2
    setup.engine.dispose()


def _max_checkpoint(setup: Log) -> int:
    with setup.engine.connect() as conn:
        return int(
            conn.execute(select(func.max(setup.log.checkpoints_table.c.tree_size))).scalar() or 0
        )


def test_a_restarted_service_continues_the_same_tree(audit: Log, node11: Credentials) -> None:
    restarted = AuditLog(
        audit.engine,
        audit.log.events_table,
        audit.log.checkpoints_table,
        source_id=NODE,
        signer=node11,
    )
    assert restarted.checkpoint() is None
    restarted.record(_event(51))
    checkpoint = restarted.checkpoint()
    assert checkpoint is not None and checkpoint.tree_size == EVENTS + 1
    report = audit.verify()
    assert report.ok and report.checkpoints_verified == 2


# -- concurrency, on SQLite and PostgreSQL ----------------------------------------------------


def test_concurrent_appends_keep_seq_gapless_and_in_hash_order(
    db_url: str, node11: Credentials, pki: Pki
) -> None:
    metadata = new_metadata()
    events, checkpoints = audit_tables(metadata)
    engine = make_engine(db_url)
    metadata.create_all(engine)
    log = AuditLog(engine, events, checkpoints, source_id=NODE, region="11", signer=node11)
    threads, per_thread = 6, 15
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(per_thread):
                if i % 5 == 4:  # an append whose transaction rolls back
                    with Session(writer(engine)) as session:
                        session.begin()
                        log.append(session, _event(i))
                        session.rollback()
                else:
                    log.record(_event(worker * 100 + i))
                if i == per_thread // 2 and worker == 0:
                    log.checkpoint()
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    assert not errors, errors
    committed = threads * (per_thread - per_thread // 5)
    assert log.size() == committed
    checkpoint = log.checkpoint()
    assert checkpoint is not None and checkpoint.tree_size == committed
    report = verify_log(engine, events, checkpoints, pki.ca_pem_path.read_bytes())
    assert report.ok, report.problems
    assert report.events == committed and report.checkpoints_verified == report.checkpoints
    engine.dispose()


# -- the command line ----------------------------------------------------------------------


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="dmp")
    sub = parser.add_subparsers(dest="command", required=True)
    audit_cli.register(sub)
    args = parser.parse_args(["audit", *argv])
    result: int = args.handler(args)
    return result


def test_cli_verify_passes_then_names_the_row_edited_with_sqlite3(
    audit: Log, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(audit.path)
    assert _cli("verify", "--db", sqlite_url(audit.path), "--pki", str(pki.directory)) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK: the audit log of {NODE} verifies ({EVENTS} events, 1 of 1")

    edit = (
        "UPDATE audit_events SET event_json = replace(event_json, 'doctor', 'nurse')"
        " WHERE seq = 31;"
    )
    sqlite3_cli = shutil.which("sqlite3")
    if sqlite3_cli is not None:
        subprocess.run([sqlite3_cli, db, edit], check=True)
    else:
        audit.sql(edit.rstrip(";"))
    assert _cli("verify", "--db", db, "--pki", str(pki.directory)) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"FAILED: the audit log of {NODE} does not verify")
    assert lines[1].startswith("changed at seq 31: event changed; it now reads ")
    assert "nurse" in lines[1]


def test_cli_checkpoint_signs_as_the_logs_owner_only(
    audit: Log, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--db", str(audit.path), "--pki", str(pki.directory)]
    assert _cli("checkpoint", *common, "--as", "node-11") == 0
    assert "no new events since the last checkpoint (50 events)" in capsys.readouterr().out
    audit.log.record(_event(51))
    assert _cli("checkpoint", *common, "--as", "node-11") == 0
    assert capsys.readouterr().out.startswith(f"checkpoint of 51 events signed by {NODE} at ")
    with pytest.raises(CommandError, match="sign it with --as node-11"):
        _cli("checkpoint", *common, "--as", "node-53")


def test_cli_export_writes_json_lines_and_fhir(
    audit: Log, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli("export", "--db", str(audit.path), "--format", "jsonl") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == EVENTS
    first = json.loads(lines[0])
    assert (first["seq"], first["audit_source_id"], first["active_participant_user_id"]) == (
        1,
        NODE,
        DOCTOR,
    )
    assert _cli("export", "--db", str(audit.path), "--format", "fhir", "--since", "2000-01-01") == 0
    bundle = json.loads(capsys.readouterr().out)
    assert bundle["type"] == "collection" and len(bundle["entry"]) == EVENTS
    emergency = bundle["entry"][EMERGENCY_SEQ - 1]["resource"]
    assert emergency["purposeOfEvent"][0]["coding"][0]["code"] == "ETREAT"
    assert _cli("export", "--db", str(audit.path), "--since", "2999-01-01") == 0
    assert capsys.readouterr().out == ""


def test_cli_refuses_a_missing_database_or_one_without_audit_tables(
    tmp_path: Path, pki: Pki
) -> None:
    with pytest.raises(CommandError, match="no SQLite database"):
        _cli("verify", "--db", str(tmp_path / "nope.db"), "--pki", str(pki.directory))
    assert not (tmp_path / "nope.db").exists()
    with closing(sqlite3.connect(tmp_path / "other.db")) as raw:
        raw.execute("CREATE TABLE t (x)")
    with pytest.raises(CommandError, match="no audit_events or audit_checkpoints table"):
        _cli("export", "--db", str(tmp_path / "other.db"))
