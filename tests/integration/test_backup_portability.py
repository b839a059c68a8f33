"""A backup is table-wise: a SQLite node's backup restores into PostgreSQL and the other way
round, and the node started on the copy serves the same records, contents included."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dmp.certificates import load_private_key
from dmp.db import make_engine
from dmp.pki import Pki, load_credentials
from dmp.v1 import node_service_pb2 as pb
from node.backup import write_backup
from node.restore import restore_backup
from tests.federation import DOCTOR, PATIENT, READ_CONTENT, Client, client, draft, running_node


def _served(c: Client) -> dict[str, tuple[bytes, bytes]]:
    """Every record of PATIENT the node serves: its metadata and its content."""
    page = c.node.ListRecords(
        pb.ListRecordsRequest(patient_ins=PATIENT), timeout=30, metadata=c.md()
    )
    out = {}
    for record in page.records:
        chunks = c.node.GetRecordContent(
            pb.GetRecordContentRequest(record_id=record.id),
            timeout=30,
            metadata=c.md(op=READ_CONTENT, record_id=record.id),
        )
        out[record.id] = (record.SerializeToString(), b"".join(x.chunk for x in chunks))
    return out


@pytest.mark.parametrize(("source", "target"), [("sqlite", "postgresql"), ("postgresql", "sqlite")])
def test_a_backup_restores_across_database_engines(
    pki_dir: Path, databases: Callable[[str, str], str], tmp_path: Path, source: str, target: str
) -> None:
    origin, copy = databases(source, "origin"), databases(target, "copy")
    out = tmp_path / "node-11.dmpbackup"
    with running_node(pki_dir, "11", origin) as node:
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        try:
            for n in range(12):
                content = bytes(range(256)) * n + f"compte rendu {n}".encode()
                doctor.node.PutRecord(
                    pb.PutRecordRequest(record=draft(), content=content), timeout=30
                )
            before = _served(doctor)
        finally:
            doctor.close()
        engine = make_engine(origin, pool_size=2)
        try:
            write_backup(engine, load_credentials(pki_dir, "node-11"), out)
        finally:
            engine.dispose()
    key = load_private_key((pki_dir / "node-11.key").read_bytes())
    restored = restore_backup(out, key, Pki.load(pki_dir).ca_certificate, copy)
    assert restored.records == 12
    with running_node(pki_dir, "11", copy) as node:
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        try:
            assert _served(doctor) == before
            doctor.node.PutRecord(pb.PutRecordRequest(record=draft(), content=b"after"), timeout=30)
            assert len(_served(doctor)) == 13  # the keys go on past the restored ones
        finally:
            doctor.close()
