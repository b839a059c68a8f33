"""Backups of a serving node: taken during concurrent writes, verified, restored, served.

On SQLite and on PostgreSQL (db_factory): writers race over mutual TLS while the backup
is taken; the backup verifies; restored into a fresh database, a node started on it
serves exactly the records (metadata and content bytes) the backup's snapshot held. A
flipped bit, a wrong signature, a wrong recipient key and a non-empty target are refused,
each by name, by the library and by the CLI (one `dmp:` line, exit status 1).
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, text

from dmp.certificates import load_private_key
from dmp.cli.main import main
from dmp.db import make_engine
from dmp.envelope import init_kek_file, load_kek_file
from dmp.pki import Pki, load_credentials
from dmp.sealed import SealedWriter, open_sealed
from dmp.signing import Signer
from dmp.v1 import node_service_pb2 as pb
from dmp.v1 import record_pb2
from node.backup import BackupError, write_backup
from node.backup_format import MANIFEST, SIGNATURE, FrameReader, frame
from node.key_admin import shred_patient
from node.models import RecordContentRow
from node.restore import restore_backup, verify_backup
from tests.federation import (
    DOCTOR,
    OTHER_PATIENT,
    PATIENT,
    READ_CONTENT,
    Client,
    client,
    draft,
    running_node,
)

WRITERS = 4


def _put(c: Client, patient: str, n: int) -> str:
    record = draft(patient, title=f"Compte rendu {n}", record_id=str(uuid.uuid4()))
    content = f"compte rendu {n} ".encode() * (1 + n % 50)
    return c.node.PutRecord(
        pb.PutRecordRequest(record=record, content=content), timeout=30
    ).record.id


def _list(c: Client, patient: str) -> list[record_pb2.Record]:
    out: list[record_pb2.Record] = []
    request = pb.ListRecordsRequest(patient_ins=patient)
    while True:
        page = c.node.ListRecords(request, timeout=30, metadata=c.md(patient))
        out.extend(page.records)
        if not page.next_page_token:
            return out
        request.page_token = page.next_page_token


def _content(c: Client, record: record_pb2.Record) -> bytes:
    chunks = c.node.GetRecordContent(
        pb.GetRecordContentRequest(record_id=record.id),
        timeout=30,
        metadata=c.md(record.patient_ins, op=READ_CONTENT, record_id=record.id),
    )
    return b"".join(chunk.chunk for chunk in chunks)


def _ca(pki_dir: Path) -> tuple[object, bytes]:
    pki = Pki.load(pki_dir)
    return pki.ca_certificate, (pki_dir / "ca.pem").read_bytes()


def _key(pki_dir: Path, identity: str = "node-11") -> object:
    return load_private_key((pki_dir / f"{identity}.key").read_bytes())


@pytest.fixture(params=["clear", "encrypted"])
def kek_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path | None:
    """Nodes storing in clear, and nodes with a KEK (records sealed at rest)."""
    if request.param == "clear":
        return None
    path = tmp_path / "node-11.kek"
    init_kek_file(path)
    return path


@pytest.fixture
def backed_up(
    pki_dir: Path, db_factory: Callable[[str], str], tmp_path: Path, kek_file: Path | None
) -> Iterator[tuple[str, Path, dict[str, object]]]:
    """A node's database written to while its backup was taken: (url, file, manifest)."""
    source = db_factory("source")
    out = tmp_path / "node-11.dmpbackup"
    with running_node(pki_dir, "11", source, kek_file=kek_file) as node:
        writers = [client(pki_dir, f"practitioner-{DOCTOR}", node.port) for _ in range(WRITERS)]
        for n in range(20):
            _put(writers[0], PATIENT if n % 2 else OTHER_PATIENT, n)
        stop = threading.Event()
        written = [0] * WRITERS
        failures: list[BaseException] = []

        def write(i: int) -> None:
            try:
                while not stop.is_set():
                    _put(writers[i], PATIENT if i % 2 else OTHER_PATIENT, 100 + written[i])
                    written[i] += 1
            except BaseException as exc:  # reported below
                failures.append(exc)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(WRITERS)]
        for thread in threads:
            thread.start()
        engine = make_engine(source, pool_size=2)
        try:
            while sum(written) < 2 * WRITERS:  # writers are under way
                stop.wait(0.01)
            summary = write_backup(engine, load_credentials(pki_dir, "node-11"), out)
            after = sum(written)
            while sum(written) < after + WRITERS and not failures:  # and go on after it
                stop.wait(0.01)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            engine.dispose()
            for w in writers:
                w.close()
        assert not failures, failures
        yield source, out, summary.manifest


def test_backup_during_writes_verifies_restores_and_serves_the_snapshot(
    pki_dir: Path,
    db_factory: Callable[[str], str],
    backed_up: tuple[str, Path, dict[str, object]],
    kek_file: Path | None,
) -> None:
    source, out, manifest = backed_up
    assert out.stat().st_mode & 0o777 == 0o600
    assert b"compte rendu" not in out.read_bytes()  # sealed: nothing in clear
    ca, ca_pem = _ca(pki_dir)
    verified = verify_backup(out, _key(pki_dir), ca, ca_pem)  # type: ignore[arg-type]
    last_seq = int(manifest["last_record_seq"])  # type: ignore[call-overload]
    count = verified.records
    # On PostgreSQL a seq is taken before commit: the snapshot may miss a lower one.
    assert 0 < count <= last_seq and count == verified.contents_checked
    tables = {part["name"] for part in manifest["tables"]}  # type: ignore[attr-defined]
    if kek_file is None:
        assert verified.contents.clear == count
    else:
        assert "data_keys" in tables  # the wrapped data keys travel with the data
        assert verified.contents.sealed == count  # without the KEK: not opened
        kek = load_kek_file(kek_file)
        opened = verify_backup(out, _key(pki_dir), ca, ca_pem, kek=kek)  # type: ignore[arg-type]
        assert opened.contents.opened == count
        assert kek_file.read_bytes() not in out.read_bytes()
    assert verified.audit_events == manifest["last_audit_seq"]
    restored = db_factory("restored")
    restore_backup(out, _key(pki_dir), ca, restored)  # type: ignore[arg-type]
    copied = _stored(restored)
    assert len(copied) == count
    source_contents = _stored(source)
    assert len(source_contents) > count  # writes went on after the snapshot
    for record_id, content in copied.items():  # stored bytes as they were (ciphertext too)
        assert source_contents[record_id] == content
    # One snapshot: every record in it comes with the audit event written in its transaction.
    engine = make_engine(restored, pool_size=2)
    with engine.connect() as conn:
        events = [
            json.loads(e)
            for e in conn.execute(text("SELECT event_json FROM audit_events")).scalars()
        ]
    engine.dispose()
    written = {
        record_id
        for event in events
        if event.get("event_type") == "write"
        for record_id in event.get("participant_object_record_ids") or []
    }
    assert set(copied) <= written
    contents = copied
    in_backup = set(copied)
    with (
        running_node(pki_dir, "11", source, kek_file=kek_file) as original,
        running_node(pki_dir, "11", restored, kek_file=kek_file) as copy,
    ):
        a = client(pki_dir, f"practitioner-{DOCTOR}", original.port)
        b = client(pki_dir, f"practitioner-{DOCTOR}", copy.port)
        try:
            served = 0
            for patient in (PATIENT, OTHER_PATIENT):
                originals = {r.id: r for r in _list(a, patient)}
                copies = _list(b, patient)
                assert {r.id for r in copies} == {i for i in in_backup if i in originals}
                for record in copies:
                    assert record == originals[record.id]  # every metadata field
                    body = _content(b, record)
                    assert body == _content(a, record)
                    if kek_file is None:
                        assert body == contents[record.id]
                    assert hashlib.sha256(body).hexdigest() == record.sha256
                    served += 1
            assert served == len(in_backup)
            # The restored node goes on: new records after the restored ones.
            assert _put(b, PATIENT, 9999)
        finally:
            a.close()
            b.close()


def _stored(url: str) -> dict[str, bytes]:
    """Every record's stored content bytes, by record id, straight from the database."""
    engine = make_engine(url, pool_size=2)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(RecordContentRow.record_id, RecordContentRow.content))
            return {record_id: bytes(content) for record_id, content in rows}
    finally:
        engine.dispose()


def _rewrite(
    out: Path, pki_dir: Path, change: Callable[[bytes, bytes], tuple[bytes, bytes]]
) -> None:
    """Decrypt a backup, let `change` alter its manifest and signature, seal it again."""
    key = _key(pki_dir)
    with out.open("rb") as source:
        frames = list(FrameReader(open_sealed(source, key)))  # type: ignore[arg-type]
    manifest = next(p for t, p in frames if t == MANIFEST)
    signature = next(p for t, p in frames if t == SIGNATURE)
    manifest, signature = change(manifest, signature)
    buffer = io.BytesIO()
    creds = load_credentials(pki_dir, "node-11")
    from dmp.pki import certificate_from_pem

    sealed = SealedWriter(buffer, certificate_from_pem(creds.cert_pem), "node-11")
    for tag, payload in frames:
        payload = manifest if tag == MANIFEST else signature if tag == SIGNATURE else payload
        sealed.write(frame(tag, payload))
    sealed.close()
    out.write_bytes(buffer.getvalue())


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_refusals_name_the_problem(
    pki_dir: Path,
    db_factory: Callable[[str], str],
    backed_up: tuple[str, Path, dict[str, object]],
    kek_file: Path | None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source, out, _ = backed_up
    ca, ca_pem = _ca(pki_dir)
    pki = str(pki_dir)
    status, line, _ = _cli(capsys, "node", "backup", "verify", str(out), "--pki", pki)
    assert status == 0 and " OK: node 11" in line
    if kek_file is not None:
        assert "sealed, not opened (no --kek-file)" in line
        kek = ("--kek-file", str(kek_file))
        status, line, _ = _cli(capsys, "node", "backup", "verify", str(out), "--pki", pki, *kek)
        assert status == 0 and "opened with the KEK" in line
        other_kek = kek_file.with_name("other.kek")
        init_kek_file(other_kek)
        args = ("node", "backup", "verify", str(out), "--pki", pki, "--kek-file", str(other_kek))
        status, _, err = _cli(capsys, *args)
        assert status == 1 and "does not unwrap with the KEK given" in err

    # A restore into a non-empty database (the source itself) is refused.
    with pytest.raises(BackupError, match="not empty"):
        restore_backup(out, _key(pki_dir), ca, source)  # type: ignore[arg-type]
    status, _, err = _cli(capsys, "node", "restore", str(out), "--db", source, "--pki", pki)
    assert status == 1 and err.startswith(
        "dmp: refusing to restore into a database that is not empty"
    )

    # A wrong recipient key.
    wrong = str(pki_dir / "node-53.key")
    with pytest.raises(BackupError, match="wrong recipient key"):
        verify_backup(out, _key(pki_dir, "node-53"), ca, ca_pem)  # type: ignore[arg-type]
    status, _, err = _cli(
        capsys, "node", "backup", "verify", str(out), "--pki", pki, "--key", wrong
    )
    assert status == 1 and "wrong recipient key" in err and err.count("\n") == 1

    # One flipped bit, in the middle of the file.
    original = out.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x10
    bad = out.with_name("flipped.dmpbackup")
    bad.write_bytes(bytes(flipped))
    with pytest.raises(BackupError, match="damaged at chunk"):
        verify_backup(bad, _key(pki_dir), ca, ca_pem)  # type: ignore[arg-type]
    status, _, err = _cli(capsys, "node", "backup", "verify", str(bad), "--pki", pki)
    assert status == 1 and err.startswith(
        "dmp: backup flipped.dmpbackup is NOT valid: the file is damaged"
    )
    empty = db_factory("after-flip")
    with pytest.raises(BackupError, match="damaged"):
        restore_backup(bad, _key(pki_dir), ca, empty)  # type: ignore[arg-type]
    engine = make_engine(empty, pool_size=1)
    with engine.connect() as conn:  # nothing half-written
        assert conn.execute(text("SELECT count(*) FROM records")).scalar() == 0
    engine.dispose()

    # A wrong signature: the manifest signed by another node's key, or a changed manifest.
    other = Signer(load_credentials(pki_dir, "node-53"))
    _rewrite(out, pki_dir, lambda m, s: (m, other.sign(m)))
    with pytest.raises(BackupError, match="wrong signature: the manifest's signature is not by"):
        verify_backup(out, _key(pki_dir), ca, ca_pem)  # type: ignore[arg-type]
    status, _, err = _cli(capsys, "node", "backup", "verify", str(out), "--pki", pki)
    assert status == 1 and "wrong signature" in err

    def lie(manifest: bytes, signature: bytes) -> tuple[bytes, bytes]:
        data = json.loads(manifest)
        data["tables"][0]["rows"] += 1
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode(), signature

    out.write_bytes(original)
    _rewrite(out, pki_dir, lie)
    with pytest.raises(BackupError, match="wrong signature"):
        verify_backup(out, _key(pki_dir), ca, ca_pem)  # type: ignore[arg-type]

    # A missing part: the file cut short.
    out.write_bytes(original[: len(original) - 100])
    status, _, err = _cli(capsys, "node", "backup", "verify", str(out), "--pki", pki)
    assert status == 1 and "truncated" in err and err.startswith("dmp: ")


def test_cli_backup_to_another_certificate(
    pki_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dmp node backup --to CERT`: only that certificate's key opens the file."""
    url = f"sqlite:///{tmp_path / 'node.db'}"
    with running_node(pki_dir, "11", url) as node:
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        try:
            _put(doctor, PATIENT, 1)
        finally:
            doctor.close()
        out = tmp_path / "to-53.dmpbackup"
        pki = str(pki_dir)
        to = str(pki_dir / "node-53.pem")
        args = ("node", "backup", "--db", url, "--out", str(out), "--pki", pki, "--as", "node-11")
        status, line, _ = _cli(capsys, *args, "--to", to)
        assert status == 0 and line.startswith("backup of node 11: 1 records")
    assert out.stat().st_mode & 0o777 == 0o600
    status, _, err = _cli(capsys, "node", "backup", "verify", str(out), "--pki", pki)
    assert status == 1 and "give its key with --key" in err
    key = str(pki_dir / "node-11.key")
    status, _, err = _cli(capsys, "node", "backup", "verify", str(out), "--pki", pki, "--key", key)
    assert status == 1 and "wrong recipient key" in err
    key = str(pki_dir / "node-53.key")
    status, line, _ = _cli(capsys, "node", "backup", "verify", str(out), "--pki", pki, "--key", key)
    assert status == 0 and "1 records (1 in clear checked against their SHA-256)" in line
    status, _, err = _cli(capsys, "node", "backup", "--db", url, "--pki", pki, "--as", "node-11")
    assert status == 1 and err.startswith("dmp: dmp node backup needs --db URL, --out FILE")


def test_a_shredded_patient_stays_shredded_in_the_backup(
    pki_dir: Path, db_url: str, tmp_path: Path
) -> None:
    kek_path = tmp_path / "node-11.kek"
    kek = init_kek_file(kek_path)
    with running_node(pki_dir, "11", db_url, kek_file=kek_path) as node:
        doctor = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        try:
            _put(doctor, PATIENT, 1)
            _put(doctor, OTHER_PATIENT, 2)
        finally:
            doctor.close()
    engine = make_engine(db_url, pool_size=2)
    out = tmp_path / "node-11.dmpbackup"
    try:
        shred_patient(engine, kek, "11", OTHER_PATIENT)
        write_backup(engine, load_credentials(pki_dir, "node-11"), out)
    finally:
        engine.dispose()
    ca, ca_pem = _ca(pki_dir)
    verified = verify_backup(out, _key(pki_dir), ca, ca_pem, kek=kek)  # type: ignore[arg-type]
    assert (verified.contents.opened, verified.contents.shredded) == (1, 1)
