"""Backups of a node's database: one sealed, signed file, taken while the node serves.

`write_backup` exports every table of the database (whatever tables it has: reflected,
not listed here) in ONE read-only snapshot: on PostgreSQL a REPEATABLE READ READ ONLY
transaction, on SQLite a read transaction of the WAL database, which sees one consistent
state while writers go on. Rows are streamed in primary-key order in batches, never the
whole database in memory, into the framed format of node/backup_format.py, sealed to a
recipient's certificate (dmp/sealed.py) and signed by the node's key. What is stored
encrypted (record contents under their data keys, the wrapped data keys) stays so: the
backup copies rows, and never holds a key-encryption key, which lives outside the database.

`read_backup` opens such a file, streams its rows into a sink and then checks what it
read: every part present, every count and SHA-256 the manifest states, and the manifest's
signature by a node certificate of the federation CA. Restore and verify build on it
(node/restore.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, MetaData, Table, func, select
from sqlalchemy.engine import Connection

from dmp.clock import now_us
from dmp.errors import Unauthenticated
from dmp.identity import Role
from dmp.pki import Credentials, certificate_from_pem, principal_from_certificate
from dmp.sealed import SealedWriter, SealError, open_sealed
from dmp.signing import Signer
from node.backup_format import (
    END,
    FORMAT,
    HEADER,
    MANIFEST,
    ROWS,
    SIGNATURE,
    TABLE,
    FormatError,
    FrameReader,
    decode_rows,
    encode_rows,
    frame,
)

#: Alembic's record of the node schema's revision: exported, checked, not restored as rows.
VERSION_TABLE = "alembic_version_node"
_BATCH_ROWS = 500
_BATCH_BYTES = 1 << 20

Progress = Callable[[int, int], None]


class BackupError(Exception):
    """A backup that cannot be written, read or trusted; the message names the problem."""


@dataclass
class BackupSummary:
    region: str
    tables: dict[str, int]
    file_bytes: int
    last_record_seq: int
    last_audit_seq: int
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(self.tables.values())

    @property
    def records(self) -> int:
        return self.tables.get("records", 0)


def snapshot_connection(engine: Engine) -> Connection:
    """A connection whose next transaction is one consistent read-only snapshot."""
    connection = engine.connect()
    if engine.dialect.name == "postgresql":
        connection = connection.execution_options(
            isolation_level="REPEATABLE READ", postgresql_readonly=True
        )
    return connection


def _tables(conn: Connection) -> list[Table]:
    metadata = MetaData()
    metadata.reflect(bind=conn)
    return list(metadata.sorted_tables)


def _order(table: Table) -> list[Any]:
    keys = list(table.primary_key.columns)
    return keys or list(table.columns)


def _value(value: Any) -> Any:
    return bytes(value) if isinstance(value, memoryview) else value


def _latest_checkpoint(conn: Connection, tables: dict[str, Table]) -> dict[str, Any] | None:
    t = tables.get("audit_checkpoints")
    if t is None:
        return None
    row = conn.execute(select(t).order_by(t.c.tree_size.desc()).limit(1)).mappings().first()
    if row is None:
        return None
    return {
        "tree_size": int(row["tree_size"]),
        "root_hash": bytes(row["root_hash"]).hex(),
        "signed_at_us": int(row["signed_at_us"]),
        "signature": bytes(row["signature"]).hex(),
        "signer_cert_pem": str(row["signer_cert_pem"]),
    }


def _max_seq(conn: Connection, tables: dict[str, Table], name: str) -> int:
    t = tables.get(name)
    if t is None:
        return 0
    return int(conn.execute(select(func.max(t.c.seq))).scalar() or 0)


def _revision(conn: Connection, tables: dict[str, Table]) -> str:
    t = tables.get(VERSION_TABLE)
    if t is None:
        return ""
    return str(conn.execute(select(t.c.version_num)).scalar() or "")


class _Out:
    """The sealed stream, with the running SHA-256 of each table's part."""

    def __init__(self, sealed: SealedWriter) -> None:
        self.sealed = sealed

    def put(self, tag: bytes, payload: bytes, digest: Any = None) -> None:
        if digest is not None:
            digest.update(payload)
        self.sealed.write(frame(tag, payload))


def write_backup(
    engine: Engine,
    credentials: Credentials,
    out_path: Path,
    *,
    recipient: x509.Certificate | None = None,
    recipient_name: str = "",
    progress: Progress | None = None,
) -> BackupSummary:
    """Write a backup of `engine`'s database to `out_path` (created 0600, complete or absent),
    signed by `credentials` (the node's), sealed to `recipient` (by default the node's own
    certificate)."""
    me = credentials.principal
    if me.role is not Role.NODE:
        raise BackupError(f"a node backup is signed by a node's key, not by {me.uri}")
    region = me.key
    if recipient is None:
        recipient = certificate_from_pem(credentials.cert_pem)
        recipient_name = f"node-{region}"
    if not recipient_name:
        recipient_name = principal_from_certificate(recipient).uri
    partial = out_path.with_name(out_path.name + ".partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise BackupError(f"cannot create {partial}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as raw:
            os.fchmod(raw.fileno(), 0o600)
            sealed = SealedWriter(raw, recipient, recipient_name)
            summary = _export(engine, credentials, region, _Out(sealed), progress)
            sealed.close()
            raw.flush()
            os.fsync(raw.fileno())
            summary.file_bytes = sealed.written
        os.replace(partial, out_path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return summary


def _export(
    engine: Engine, credentials: Credentials, region: str, out: _Out, progress: Progress | None
) -> BackupSummary:
    started = now_us()
    header = json.dumps({"format": FORMAT, "region": region, "started_us": started}).encode()
    out.put(HEADER, header)
    parts: list[dict[str, Any]] = []
    with snapshot_connection(engine) as conn, conn.begin():
        tables = _tables(conn)
        by_name = {t.name: t for t in tables}
        counts = {
            t.name: int(conn.execute(select(func.count()).select_from(t)).scalar() or 0)
            for t in tables
        }
        total = sum(counts.values())
        done = 0
        for table in tables:
            digest = hashlib.sha256()
            columns = [c.name for c in table.columns]
            out.put(TABLE, json.dumps({"name": table.name, "columns": columns}).encode(), digest)
            rows = 0
            result = conn.execution_options(stream_results=True, yield_per=_BATCH_ROWS).execute(
                select(*table.columns).order_by(*_order(table))
            )
            batch: list[tuple[Any, ...]] = []
            size = 0
            for row in result:
                values = tuple(_value(v) for v in row)
                batch.append(values)
                size += sum(len(v) for v in values if isinstance(v, bytes | str))
                if len(batch) >= _BATCH_ROWS or size >= _BATCH_BYTES:
                    out.put(ROWS, encode_rows(batch), digest)
                    rows += len(batch)
                    done += len(batch)
                    batch, size = [], 0
                    if progress:
                        progress(done, total)
            if batch:
                out.put(ROWS, encode_rows(batch), digest)
                rows += len(batch)
                done += len(batch)
                if progress:
                    progress(done, total)
            out.put(END, b"")
            parts.append(
                {"name": table.name, "columns": columns, "rows": rows, "sha256": digest.hexdigest()}
            )
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "region": region,
            "node": credentials.principal.uri,
            "node_certificate": credentials.cert_pem.decode(),
            "dialect": engine.dialect.name,
            "started_us": started,
            "finished_us": now_us(),
            "schema_revision": _revision(conn, by_name),
            "last_record_seq": _max_seq(conn, by_name, "records"),
            "last_audit_seq": _max_seq(conn, by_name, "audit_events"),
            "audit_tree_head": _latest_checkpoint(conn, by_name),
            "header_sha256": hashlib.sha256(header).hexdigest(),
            "tables": parts,
        }
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    out.put(MANIFEST, manifest_bytes)
    out.put(SIGNATURE, Signer(credentials).sign(manifest_bytes))
    return BackupSummary(
        region=region,
        tables={p["name"]: p["rows"] for p in parts},
        file_bytes=0,
        last_record_seq=manifest["last_record_seq"],
        last_audit_seq=manifest["last_audit_seq"],
        manifest=manifest,
    )


class RowSink(Protocol):
    """Where `read_backup` puts what it reads (a database being restored)."""

    def begin(self, name: str, columns: list[str]) -> None: ...

    def rows(self, name: str, rows: list[tuple[Any, ...]]) -> None: ...

    def end(self, name: str) -> None: ...


def _check_signature(
    manifest: dict[str, Any], raw: bytes, signature: bytes, ca: x509.Certificate
) -> None:
    try:
        cert = certificate_from_pem(str(manifest.get("node_certificate", "")).encode())
        cert.verify_directly_issued_by(ca)
    except (Unauthenticated, ValueError, TypeError, InvalidSignature):
        raise BackupError(
            "wrong signature: the manifest's signer certificate is not a certificate of the"
            " federation CA"
        ) from None
    principal = principal_from_certificate(cert)
    if principal.role is not Role.NODE or principal.key != manifest.get("region"):
        raise BackupError(
            f"wrong signature: signed by {principal.uri}, not by the node of region"
            f" {manifest.get('region')}"
        )
    key = cert.public_key()
    try:
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise InvalidSignature
        key.verify(signature, raw, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise BackupError(
            f"wrong signature: the manifest's signature is not by the key of {principal.uri}"
        ) from None


def read_backup(
    path: Path,
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    sink: RowSink,
    *,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Decrypt `path` with `key`, stream its rows into `sink`, then check every part, count
    and hash against the manifest and the manifest's signature; the manifest, or
    BackupError naming the problem (the sink's work must then be thrown away)."""
    try:
        source = path.open("rb")
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror}") from None
    seen: list[dict[str, Any]] = []
    header = manifest_raw = signature = None
    current: dict[str, Any] | None = None
    digest: Any = None
    total = 0
    try:
        with source:
            for tag, payload in FrameReader(open_sealed(source, key)):
                if signature is not None:
                    raise BackupError("the backup is damaged: data after its signature")
                if tag == HEADER:
                    header = payload
                elif tag == TABLE:
                    info = json.loads(payload)
                    current = {"name": info["name"], "columns": info["columns"], "rows": 0}
                    digest = hashlib.sha256(payload)
                    sink.begin(current["name"], current["columns"])
                elif tag == ROWS and current is not None:
                    digest.update(payload)
                    rows = decode_rows(payload, len(current["columns"]))
                    current["rows"] += len(rows)
                    total += len(rows)
                    sink.rows(current["name"], rows)
                    if progress:
                        progress(total, 0)
                elif tag == END and current is not None:
                    current["sha256"] = digest.hexdigest()
                    sink.end(current["name"])
                    seen.append(current)
                    current = None
                elif tag == MANIFEST:
                    manifest_raw = payload
                elif tag == SIGNATURE:
                    signature = payload
                else:
                    raise BackupError(f"the backup is damaged: frame {tag!r} out of place")
    except SealError as exc:
        raise BackupError(str(exc)) from None
    except (FormatError, ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"the backup is damaged: {exc}") from None
    for what, value in (("header", header), ("manifest", manifest_raw), ("signature", signature)):
        if value is None:
            raise BackupError(f"missing part: the backup has no {what}")
    assert header is not None and manifest_raw is not None and signature is not None
    manifest: dict[str, Any] = json.loads(manifest_raw)
    _check_signature(manifest, manifest_raw, signature, ca)
    _check_parts(manifest, header, seen)
    return manifest


def _check_parts(manifest: dict[str, Any], header: bytes, seen: list[dict[str, Any]]) -> None:
    if manifest.get("format") != FORMAT:
        raise BackupError(f"the backup's format is {manifest.get('format')!r}, not {FORMAT}")
    if manifest.get("header_sha256") != hashlib.sha256(header).hexdigest():
        raise BackupError("hash mismatch: the backup's header is not the one its manifest signed")
    got = {part["name"]: part for part in seen}
    for part in manifest["tables"]:
        name = part["name"]
        found = got.pop(name, None)
        if found is None:
            raise BackupError(f"missing part: table {name} is in the manifest, not in the backup")
        if found["rows"] != part["rows"]:
            raise BackupError(
                f"count mismatch: table {name} holds {found['rows']} rows, the manifest says"
                f" {part['rows']}"
            )
        if found["sha256"] != part["sha256"] or found["columns"] != part["columns"]:
            raise BackupError(f"hash mismatch: table {name} is not what the manifest signed")
    if got:
        raise BackupError(f"unexpected part: table {sorted(got)[0]} is not in the manifest")
