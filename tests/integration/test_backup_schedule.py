"""Scheduled backups of a serving node (`--backup-every`): written, verified, kept, and a
failed verification in the node's gRPC health, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dmp.certificates import load_private_key
from dmp.pki import Pki, load_credentials
from dmp.tls import secure_channel
from dmp.v1 import node_service_pb2 as pb
from node import backup_schedule
from node.backup import BackupError
from node.backup_schedule import BACKUP_HEALTH, parse_duration
from node.restore import verify_backup
from tests.federation import DOCTOR, client, draft, running_node, wait_for


def _backup_health(pki_dir: Path, port: int) -> int:
    channel = secure_channel(
        f"127.0.0.1:{port}", load_credentials(pki_dir, f"practitioner-{DOCTOR}")
    )
    try:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=BACKUP_HEALTH), timeout=10
        )
        return int(answer.status)
    finally:
        channel.close()


def test_durations() -> None:
    assert [parse_duration(v) for v in ("90s", "15m", "6h", "1d", "2")] == [
        90,
        900,
        21600,
        86400,
        2,
    ]
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


def test_scheduled_backups_are_verified_and_the_newest_kept(
    pki_dir: Path, db_url: str, tmp_path: Path
) -> None:
    directory = tmp_path / "backups"
    with running_node(
        pki_dir, "11", db_url, backup_every=0.2, backup_keep=2, backup_dir=directory
    ) as node:
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        try:
            doctor.node.PutRecord(pb.PutRecordRequest(record=draft(), content=b"cr"), timeout=30)
        finally:
            doctor.close()
        assert node.backups is not None
        scheduler = node.backups
        wait_for(lambda: scheduler.runs >= 3 and scheduler.last_ok, "three scheduled backups")
        assert _backup_health(pki_dir, node.port) == health_pb2.HealthCheckResponse.SERVING
    kept = sorted(directory.glob("node-11-*.dmpbackup"))
    assert len(kept) == 2
    assert directory.stat().st_mode & 0o777 == 0o700
    pki = Pki.load(pki_dir)
    for path in kept:
        assert path.stat().st_mode & 0o777 == 0o600
        verified = verify_backup(
            path,
            load_private_key((pki_dir / "node-11.key").read_bytes()),
            pki.ca_certificate,
            (pki_dir / "ca.pem").read_bytes(),
        )
        assert verified.records == 1


def test_a_failed_verification_is_logged_and_in_health(
    pki_dir: Path,
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise BackupError("the file is damaged at chunk 0")

    monkeypatch.setattr(backup_schedule, "verify_backup", broken)
    with running_node(pki_dir, "11", db_url, backup_every=3600, backup_dir=tmp_path / "b") as node:
        assert node.backups is not None
        assert _backup_health(pki_dir, node.port) == health_pb2.HealthCheckResponse.UNKNOWN
        with caplog.at_level(logging.ERROR, logger="dmp.node.backup"):
            assert node.backups.run_once() is False
        assert "SCHEDULED BACKUP FAILED" in caplog.text and "damaged at chunk 0" in caplog.text
        assert _backup_health(pki_dir, node.port) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert list((tmp_path / "b").glob("*.dmpbackup")) == []
        assert len(list((tmp_path / "b").glob("*.dmpbackup.failed"))) == 1
        # The records themselves are still served.
        channel = secure_channel(f"127.0.0.1:{node.port}", load_credentials(pki_dir, "node-53"))
        try:
            overall = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
        finally:
            channel.close()
        assert overall.status == health_pb2.HealthCheckResponse.SERVING
