"""The successor holds exactly what the predecessor held: every handed-over row the same
(but how each host's KEK wraps the data keys), with supersedes and reveals made while it
streamed, each host with its own KEK; and a successor without a KEK is refused."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dmp.cli.main import main
from dmp.client import NodeClient
from dmp.db import make_engine
from dmp.envelope import load_kek_file
from dmp.errors import FailedPrecondition
from dmp.pki import load_credentials
from dmp.v1 import node_service_pb2 as npb
from node.app import NodeConfig, start_node
from node.handover_cli import open_node_database
from node.handover_receive import receive
from node.handover_rows import DATA_KEYS, handed_tables
from tests.federation import DOCTOR, PATIENT, draft, identity_of
from tests.handover_rig import REGION, Acked, Hosts, handover_cli, read_back
from tests.integration.test_handover_faults import _state

#: What differs by design: each host wraps the data keys with its own KEK.
_WRAPPING = frozenset({"wrapped", "kek_id"})


def _rows(url: str) -> dict[str, set[tuple[Any, ...]]]:
    engine = make_engine(url)
    out: dict[str, set[tuple[Any, ...]]] = {}
    try:
        with engine.connect() as conn:
            for table in handed_tables():
                columns = [
                    c for c in table.columns if table.name != DATA_KEYS or c.name not in _WRAPPING
                ]
                out[table.name] = {
                    tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
                    for row in conn.execute(table.select().with_only_columns(*columns))
                }
    finally:
        engine.dispose()
    return out


def _writes(address: str, pki: Path, prefix: str) -> list[Acked]:
    """A record, a new version of it, a hidden one then revealed: what was acknowledged."""
    acked = []
    with NodeClient(address, load_credentials(pki, f"practitioner-{DOCTOR}")) as client:
        first = client.put_record(draft(title=f"{prefix} v1"), b"v1", patient=identity_of(PATIENT))
        newer = draft(title=f"{prefix} v2")
        newer.supersedes = first.id
        second = client.put_record(newer, b"v2", patient=identity_of(PATIENT))
        hidden = draft(title=f"{prefix} hidden")
        hidden.hidden_from_patient = True
        third = client.put_record(hidden, b"hidden", patient=identity_of(PATIENT))
        client.stub.RevealRecord(npb.RevealRecordRequest(record_id=third.id), timeout=30)
        for record, content in ((first, b"v1"), (second, b"v2"), (third, b"hidden")):
            acked.append(Acked(record.id, record.sha256, content, address))
    return acked


def _kek(path: Path) -> Path:
    assert main(["node", "init-kek", str(path)]) == 0
    return path


@pytest.mark.parametrize("successor", ["sqlite", "postgresql"])
def test_the_successor_holds_every_row_of_the_predecessor_with_its_own_kek(
    successor: str, tmp_path: Path, db_url: str, databases: Callable[[str, str], str]
) -> None:
    hosts = Hosts.make(tmp_path)
    a_kek, b_kek = _kek(tmp_path / "a.kek"), _kek(tmp_path / "b.kek")
    b_url = databases(successor, "successor")
    node = start_node(NodeConfig(pki_dir=hosts.a, region=REGION, db_url=db_url, kek_file=a_kek))
    try:
        a_addr = f"127.0.0.1:{node.port}"
        acked = _writes(a_addr, hosts.national, "before")
        assert handover_cli("start", hosts.a, db_url, "--to", str(hosts.b / "node-53.pem")) == 0
        acked += _writes(a_addr, hosts.national, "during")
        credentials = load_credentials(hosts.b, f"node-{REGION}")
        engine = open_node_database(b_url, create=True)
        try:
            with pytest.raises(FailedPrecondition) as no_kek:
                receive(engine, credentials, a_addr, kek=None)
            assert no_kek.value.reason == "KEK_REQUIRED"
            acked += _writes(a_addr, hosts.national, "after-refusal")
            result: list[int] = []
            completing = threading.Thread(
                target=lambda: result.append(handover_cli("complete", hosts.a, db_url))
            )
            completing.start()
            receive(engine, credentials, a_addr, kek=load_kek_file(b_kek))
            completing.join(timeout=90)
            assert result == [0]
        finally:
            engine.dispose()
    finally:
        node.stop(grace=None)
    a_rows, b_rows = _rows(db_url), _rows(b_url)
    extra = {name: b_rows[name] - a_rows[name] for name in b_rows if b_rows[name] - a_rows[name]}
    assert all(a_rows[name] <= b_rows[name] for name in a_rows)
    # B added only its proof of the hand-over and the event that names it.
    assert sorted((name, len(rows)) for name, rows in extra.items()) == [
        ("audit_events", 1),
        ("handover_proofs", 1),
    ]
    assert '"event_type":"handover"' in next(iter(extra["audit_events"]))[1]
    assert a_rows["records"] and a_rows["data_keys"]
    assert _state(b_url) == "in_charge"
    b = start_node(NodeConfig(pki_dir=hosts.b, region=REGION, db_url=b_url, kek_file=b_kek))
    try:
        assert read_back(hosts.national, f"127.0.0.1:{b.port}", acked) == []
        # B's own writes next: its keys (PostgreSQL sequences) are past A's.
        at_b = _writes(f"127.0.0.1:{b.port}", hosts.national, "at-b")
        assert read_back(hosts.national, f"127.0.0.1:{b.port}", acked + at_b) == []
    finally:
        b.stop(grace=None)
    # B's KEK alone opens what B holds: without it, B refuses to serve.
    with pytest.raises(FailedPrecondition) as wrong:
        start_node(NodeConfig(pki_dir=hosts.b, region=REGION, db_url=b_url, kek_file=a_kek))
    assert wrong.value.reason == "WRONG_KEK"


def test_large_records_written_while_streaming_still_reach_the_successor(
    tmp_path: Path,
) -> None:
    """The snapshot and the changes go in batches within the message size both ends
    accept: records near the node's largest content, before and while the hand-over
    streams, must not make one answer too large to send (the successor would ask for it
    again forever, and neither node would accept writes once A froze)."""
    hosts = Hosts.make(tmp_path)
    a_url, b_url = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    limit = 2 << 20
    node = start_node(NodeConfig(pki_dir=hosts.a, region=REGION, db_url=a_url, max_content=limit))
    try:
        a_addr = f"127.0.0.1:{node.port}"
        acked: list[Acked] = []
        doctor = load_credentials(hosts.national, f"practitioner-{DOCTOR}")
        with NodeClient(a_addr, doctor) as c:

            def put(n: int, size: int) -> None:
                content = bytes([n]) * size
                record = c.put_record(
                    draft(title=f"large {n}"), content, patient=identity_of(PATIENT)
                )
                acked.append(Acked(record.id, record.sha256, content, a_addr))

            # In the snapshot: a batch three quarters full, then a row as large as allowed.
            put(0, limit * 3 // 4)
            put(1, limit - 1000)
            assert handover_cli("start", hosts.a, a_url, "--to", str(hosts.b / "node-53.pem")) == 0
            for n in range(2, 5):  # then as changes: three such rows
                put(n, limit - 1000)
        result: list[int] = []
        completing = threading.Thread(
            target=lambda: result.append(handover_cli("complete", hosts.a, a_url))
        )
        completing.start()
        engine = open_node_database(b_url, create=True)
        try:
            receive(engine, load_credentials(hosts.b, f"node-{REGION}"), a_addr, kek=None,
                    max_content=limit + (1 << 20))  # fmt: skip
        finally:
            engine.dispose()
        completing.join(timeout=90)
        assert result == [0]
    finally:
        node.stop(grace=None)
    b = start_node(NodeConfig(pki_dir=hosts.b, region=REGION, db_url=b_url, max_content=limit))
    try:
        assert read_back(hosts.national, f"127.0.0.1:{b.port}", acked) == []
    finally:
        b.stop(grace=None)
