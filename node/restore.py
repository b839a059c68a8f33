"""Restore a node backup into an empty database, and verify a backup by restoring it.

`restore_backup` refuses a database that holds any row, brings it to the node's schema
(its migrations), then inserts every table's rows in ONE transaction, committed only once
the whole file was read and its hashes and signature checked: a damaged or forged backup
leaves the database as empty as it was. Rows go table-wise, by column name, so a backup of
a SQLite node restores into PostgreSQL and the other way round; PostgreSQL's sequences are
then moved past the restored keys.

`verify_backup` restores into a scratch SQLite database (in a private temporary
directory, removed after), then checks every record's content against its SHA-256 and
runs the audit verification (dmp/audit/verify.py) on the restored log.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, MetaData, Table, func, select, text
from sqlalchemy.engine import Connection

from dmp.audit.verify import verify_log
from dmp.db import make_engine, sqlite_url, upgrade, writer
from dmp.dbfile import prepare_sqlite, sqlite_file
from node.backup import VERSION_TABLE, BackupError, Progress, read_backup
from node.models import audit_checkpoints, audit_events

MIGRATIONS = Path(__file__).parent / "migrations"
_ALEMBIC_TABLES = frozenset({VERSION_TABLE, "alembic_version"})


@dataclass
class RestoreSummary:
    manifest: dict[str, Any]

    @property
    def rows(self) -> int:
        return sum(int(part["rows"]) for part in self.manifest["tables"])

    @property
    def records(self) -> int:
        for part in self.manifest["tables"]:
            if part["name"] == "records":
                return int(part["rows"])
        return 0


def _non_empty_table(engine: Engine) -> str:
    """A table of the database holding rows (alembic's version tables aside), or ""."""
    metadata = MetaData()
    with engine.connect() as conn:
        metadata.reflect(bind=conn)
        for table in metadata.sorted_tables:
            if table.name in _ALEMBIC_TABLES:
                continue
            if conn.execute(select(func.count()).select_from(table)).scalar():
                return table.name
    return ""


class _Inserter:
    """Rows of the backup into the restored database, inside the caller's transaction."""

    def __init__(self, conn: Connection, tables: dict[str, Table], revision: str) -> None:
        self._conn = conn
        self._tables = tables
        self._revision = revision
        self._columns: list[str] = []
        self.backup_revision = ""

    def begin(self, name: str, columns: list[str]) -> None:
        self._columns = columns
        if name in _ALEMBIC_TABLES:
            return
        table = self._tables.get(name)
        if table is None:
            raise BackupError(
                f"the backup holds a table {name} that this node's schema (revision"
                f" {self._revision}) does not have: restore with the version that wrote it"
            )
        missing = set(columns) - set(table.columns.keys())
        if missing:
            raise BackupError(
                f"the backup's table {name} has columns {sorted(missing)} this node's schema"
                f" (revision {self._revision}) does not have"
            )

    def rows(self, name: str, rows: list[tuple[Any, ...]]) -> None:
        if name in _ALEMBIC_TABLES:
            if name == VERSION_TABLE and rows:
                self.backup_revision = str(rows[0][self._columns.index("version_num")])
            return
        columns = self._columns
        self._conn.execute(
            self._tables[name].insert(), [dict(zip(columns, row, strict=True)) for row in rows]
        )

    def end(self, name: str) -> None:
        return None


def _reset_sequences(conn: Connection, tables: dict[str, Table]) -> None:
    """PostgreSQL: each serial/identity key's sequence past the largest restored key."""
    for table in tables.values():
        for column in table.primary_key.columns:
            sequence = conn.execute(
                text("SELECT pg_get_serial_sequence(:t, :c)"), {"t": table.name, "c": column.name}
            ).scalar()
            if sequence:
                conn.execute(
                    text(
                        f'SELECT setval(:s, COALESCE(MAX("{column.name}"), 1),'
                        f' MAX("{column.name}") IS NOT NULL) FROM "{table.name}"'
                    ),
                    {"s": sequence},
                )


def restore_backup(
    path: Path,
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    db_url: str,
    *,
    progress: Progress | None = None,
) -> RestoreSummary:
    """Restore `path` into the empty database at `db_url`; BackupError when it cannot."""
    if sqlite_file(db_url) is not None:
        prepare_sqlite(db_url)
    engine = make_engine(db_url, pool_size=2)
    try:
        busy = _non_empty_table(engine)
        if busy:
            raise BackupError(
                f"refusing to restore into a database that is not empty (table {busy} holds"
                " rows): restore only into a new, empty database"
            )
        upgrade(engine, MIGRATIONS, VERSION_TABLE)
        metadata = MetaData()
        with engine.connect() as conn:
            metadata.reflect(bind=conn)
            revision = str(conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar())
        tables = dict(metadata.tables)
        with writer(engine).begin() as conn:
            inserter = _Inserter(conn, tables, revision)
            manifest = read_backup(path, key, ca, inserter, progress=progress)
            backup_revision = manifest.get("schema_revision") or inserter.backup_revision
            if backup_revision != revision:
                raise BackupError(
                    f"the backup is of schema revision {backup_revision}, this node's is"
                    f" {revision}: restore with the version that wrote it"
                )
            if engine.dialect.name == "postgresql":
                _reset_sequences(conn, tables)
    finally:
        engine.dispose()
    return RestoreSummary(manifest)


@dataclass
class VerifySummary(RestoreSummary):
    audit_events: int = 0
    contents_checked: int = 0


def check_contents(engine: Engine) -> int:
    """Every record's content against its SHA-256; the number checked, or BackupError."""
    checked = 0
    metadata = MetaData()
    with engine.connect() as conn:
        metadata.reflect(bind=conn, only=["records", "record_contents"])
        records, contents = metadata.tables["records"], metadata.tables["record_contents"]
        query = select(records.c.id, records.c.sha256, contents.c.content).join(
            contents, contents.c.record_id == records.c.id
        )
        result = conn.execution_options(stream_results=True, yield_per=200).execute(query)
        for record_id, sha256, content in result:
            if hashlib.sha256(bytes(content)).hexdigest() != sha256:
                raise BackupError(f"record {record_id}: its content does not match its SHA-256")
            checked += 1
        total = conn.execute(select(func.count()).select_from(records)).scalar() or 0
    if checked != total:
        raise BackupError(f"missing part: {total - checked} records have no content")
    return checked


@contextmanager
def scratch_database(directory: Path | None = None) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="dmp-verify-", dir=directory) as scratch:
        yield sqlite_url(Path(scratch) / "restored.db")


def verify_backup(
    path: Path,
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    ca_pem: bytes,
    *,
    scratch: Path | None = None,
    progress: Progress | None = None,
) -> VerifySummary:
    """Prove a backup by restoring it: decrypt, check signature and hashes, restore into a
    scratch database, check every content hash and the audit log; BackupError otherwise."""
    with scratch_database(scratch) as url:
        restored = restore_backup(path, key, ca, url, progress=progress)
        engine = make_engine(url, pool_size=2)
        try:
            contents = check_contents(engine)
            report = verify_log(
                engine,
                audit_events,
                audit_checkpoints,
                ca_pem,
                source_id=str(restored.manifest["node"]),
            )
        finally:
            engine.dispose()
    if not report.ok:
        raise BackupError(f"the restored audit log does not verify: {report.problems[0]}")
    head = restored.manifest.get("audit_tree_head")
    if head and report.last_checkpoint_size < int(head["tree_size"]):
        raise BackupError("the restored audit log lacks the tree head its manifest states")
    return VerifySummary(restored.manifest, audit_events=report.events, contents_checked=contents)
