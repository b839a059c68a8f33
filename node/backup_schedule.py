"""Scheduled backups of a serving node: every DURATION, one backup, verified, the N newest kept.

Each backup is written to DIR (0700) as node-REGION-YYYYmmddTHHMMSSZ.dmpbackup (0600),
sealed to the node's own certificate, then verified by restoring it into a scratch
database (node/restore.py), sealed contents opened with the node's KEK when it has one.
The node's gRPC health says how the last one went, under the service name
`BACKUP_HEALTH`: UNKNOWN before the first, SERVING after a verified one, NOT_SERVING
after a failure, which is also logged as an error naming the problem. The record
services stay SERVING: a failed backup is the operator's alarm, not a reason to stop
serving patients. A backup that fails verification is kept as ….dmpbackup.failed for
inspection and never counts among the N kept.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from grpc_health.v1 import health, health_pb2
from sqlalchemy import Engine

from dmp.certificates import load_private_key
from dmp.dbfile import private_directory
from dmp.envelope import KeyEncryptionKey
from dmp.pki import Credentials
from node.backup import BackupError, write_backup
from node.handover_state import handed_over
from node.restore import verify_backup

log = logging.getLogger("dmp.node.backup")

#: The health service name that reports the scheduled backups.
BACKUP_HEALTH = "dmp.node.Backup"
SUFFIX = ".dmpbackup"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str) -> float:
    """Seconds in '90s', '15m', '6h', '1d' (a bare number is seconds)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{value!r} is not a duration such as 90s, 15m, 6h or 1d")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


class BackupScheduler:
    """A thread that backs the node up every `every` seconds into `directory`."""

    def __init__(
        self,
        engine: Engine,
        credentials: Credentials,
        directory: Path,
        *,
        every: float,
        keep: int,
        health_servicer: health.HealthServicer | None = None,
        kek: KeyEncryptionKey | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError("--backup-keep must be at least 1")
        self._engine = engine
        self._credentials = credentials
        self._directory = directory
        self._every = every
        self._keep = keep
        self._health = health_servicer
        self._kek = kek
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backup", daemon=True)
        self._region = credentials.principal.key
        self.last_ok: Path | None = None
        self.last_problem = ""
        self.runs = 0
        #: The region was handed over: backups stopped.
        self.region_gone = False
        private_directory(directory)
        self._status(health_pb2.HealthCheckResponse.UNKNOWN)

    def _status(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        if self._health is not None:
            self._health.set(BACKUP_HEALTH, status)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.run_once()

    def backups(self) -> list[Path]:
        """The kept backups, oldest first."""
        return sorted(self._directory.glob(f"node-{self._region}-*{SUFFIX}"))

    def run_once(self) -> bool:
        """One backup, verified, then the retention; True when it verified; none
        once this node handed its region over: the outgoing host keeps no copy."""
        if handed_over(self._engine):
            self.runs += 1
            if not self.region_gone:
                self.region_gone = True
                log.warning(
                    "region %s was handed over to its successor: no more scheduled backups",
                    self._region,
                )
            return False
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        path = self._directory / f"node-{self._region}-{stamp}{SUFFIX}"
        started = time.monotonic()
        try:
            summary = write_backup(self._engine, self._credentials, path)
            ca = x509.load_pem_x509_certificate(self._credentials.ca_pem)
            key = load_private_key(self._credentials.key_pem)
            verify_backup(path, key, ca, self._credentials.ca_pem, kek=self._kek)
        except (BackupError, OSError, ValueError) as exc:
            return self._failed(path, str(exc))
        except Exception as exc:  # a database error: still the operator's alarm
            return self._failed(path, f"{type(exc).__name__}: {exc}")
        finally:
            self.runs += 1
        log.info(
            "backup %s written and verified: %d records, %d bytes in %.1f s",
            path.name,
            summary.records,
            summary.file_bytes,
            time.monotonic() - started,
        )
        self.last_ok, self.last_problem = path, ""
        self._status(health_pb2.HealthCheckResponse.SERVING)
        for old in self.backups()[: -self._keep]:
            old.unlink(missing_ok=True)
        return True

    def _failed(self, path: Path, problem: str) -> bool:
        self.last_problem = problem
        if path.exists():
            path.replace(path.with_name(path.name + ".failed"))
        log.error(
            "SCHEDULED BACKUP FAILED: %s: %s (health %s is NOT_SERVING until a backup verifies)",
            path.name,
            problem,
            BACKUP_HEALTH,
        )
        self._status(health_pb2.HealthCheckResponse.NOT_SERVING)
        return False
