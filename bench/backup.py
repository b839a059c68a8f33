"""Section i: backup and verify throughput of a node holding many records.

A node process (`dmp node serve --db URL`) is loaded through IngestRecords streams (as
section d does), then stopped; the benchmark then times, in its own process, one
`write_backup` (the snapshot of every table, sealed and signed: node/backup.py) and one
`verify_backup` (decrypt, check, restore into a scratch SQLite database, every content
hash, the audit log: node/restore.py). Figures: MB/s of the backup file and records/s,
for each, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bench.clients import channel, patient_call_metadata, wait_ready
from bench.ingest import _Source
from bench.procs import BenchError
from bench.report import say
from bench.stats import Results
from dmp.certificates import load_private_key
from dmp.client import ingest_messages
from dmp.db import make_engine
from dmp.demo import Service
from dmp.pki import Pki, load_credentials
from dmp.v1 import node_service_pb2_grpc
from node.backup import write_backup
from node.restore import verify_backup

MB = 1_000_000


@dataclass(frozen=True)
class BackupPlan:
    records: int = 100_000
    stream: int = 5000
    seed: int = 0


def _load(
    address: str, pki_dir: Path, writer: str, plan: BackupPlan, *, section: str = "i"
) -> None:
    """Store `plan.records` records at the node at `address` through IngestRecords streams."""
    conn = channel(address, pki_dir, writer)
    try:
        wait_ready(conn)
        stub = node_service_pb2_grpc.NodeServiceStub(conn)
        source = _Source("11", plan.seed)
        stored = 0
        while stored < plan.records:
            count = min(plan.stream, plan.records - stored)
            requests = source.requests(f"bk{stored}", count)

            metadata = patient_call_metadata(pki_dir, writer, None, "WRITE")
            answer = stub.IngestRecords(ingest_messages(requests), timeout=600, metadata=metadata)
            if answer.stored_count != count:
                raise BenchError(f"IngestRecords stored {answer.stored_count} of {count}")
            stored += count
            say(f"{section}: {stored}/{plan.records} records loaded")
    finally:
        conn.close()


def measure_backup(
    engine_name: str,
    db_url: str,
    pki_dir: Path,
    writer: str,
    workdir: Path,
    plan: BackupPlan,
    results: Results,
    *,
    note: str = "",
) -> None:
    """Load a node, then time one backup and one verification of it."""
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    node = Service(
        f"backup node ({engine_name})",
        ["node", "serve", "--pki", str(pki_dir), "--region", "11", "--db", db_url],
        workdir / "logs" / f"backup-node-{engine_name}.log",
    )
    node.start()
    try:
        _load(node.address, pki_dir, writer, plan)
    finally:
        node.stop()
    credentials = load_credentials(pki_dir, "node-11")
    out = workdir / f"node-11-{engine_name}.dmpbackup"
    engine = make_engine(db_url, pool_size=2)
    try:
        say(f"i: {engine_name} backup of {plan.records} records")
        start = time.perf_counter()
        summary = write_backup(engine, credentials, out)
        backup_s = time.perf_counter() - start
    finally:
        engine.dispose()
    if summary.records != plan.records:
        raise BenchError(f"the backup holds {summary.records} records, not {plan.records}")
    say(f"i: {engine_name} verification")
    pki = Pki.load(pki_dir)
    start = time.perf_counter()
    verified = verify_backup(
        out,
        load_private_key(credentials.key_pem),
        pki.ca_certificate,
        credentials.ca_pem,
        scratch=workdir,
    )
    verify_s = time.perf_counter() - start
    if verified.contents_checked != plan.records:
        raise BenchError(f"verify checked {verified.contents_checked} of {plan.records}")
    size = summary.file_bytes
    details = results.detail("i_backup").setdefault(engine_name, {})
    details.update(
        {
            "records": plan.records,
            "rows": summary.rows,
            "file_bytes": size,
            "backup_seconds": round(backup_s, 2),
            "verify_seconds": round(verify_s, 2),
        }
    )
    label = f"{engine_name}, {plan.records} records"
    for what, seconds in (("backup", backup_s), ("verify", verify_s)):
        results.figure(
            f"i.{engine_name}.{what}_mb_s",
            "i",
            f"{label}: {what} throughput",
            "MB/s",
            note=note,
            headline=True,
        ).values.append(size / MB / seconds)
        results.figure(
            f"i.{engine_name}.{what}_records_s",
            "i",
            f"{label}: {what} throughput",
            "rec/s",
            note=note,
        ).values.append(plan.records / seconds)
    out.unlink(missing_ok=True)
