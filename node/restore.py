"""Restore a node backup into an empty database, and verify a backup by restoring it.

`restore_backup` refuses a database that holds any row, brings it to the node's schema
(its migrations), then inserts every table's rows in ONE transaction, committed only once
the whole file was read and its hashes and signature checked: a damaged or forged backup
leaves the database as empty as it was. Rows go table-wise, by column name, so a backup of
a SQLite node restores into PostgreSQL and the other way round; PostgreSQL's sequences are
then moved past the restored keys.

`verify_backup` restores into a scratch SQLite database (in a private temporary
directory, removed after), then checks every record's content against its SHA-256 and
runs the audit verification (dmp/audit/verify.py) on the restored log. Contents sealed
under their patient's data key (node/keys.py) are opened and checked only when the KEK is
given (`--kek-file`): a backup never holds the KEK, and without it a data key cannot be
unwrapped, so a sealed content cannot be authenticated; it is then checked for its shape
and for its patient's wrapped data key, and the verdict says how many were not opened.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, MetaData, Table, func, select, text
from sqlalchemy.engine import Connection

from dmp.audit.verify import verify_log
from dmp.db import make_engine, sqlite_url, upgrade, writer
from dmp.dbfile import prepare_sqlite, sqlite_file
from dmp.envelope import NONCE_BYTES, KeyEncryptionKey, is_sealed, open_value
from dmp.errors import DmpError
from node.backup import VERSION_TABLE, BackupError, Progress, read_backup
from node.models import audit_checkpoints, audit_events

MIGRATIONS = Path(__file__).parent / "migrations"
_ALEMBIC_TABLES = frozenset({VERSION_TABLE, "alembic_version"})
#: The shortest sealed value: format byte, nonce, GCM tag.
_MIN_SEALED = 1 + NONCE_BYTES + 16


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


def reset_sequences(conn: Connection, tables: dict[str, Table]) -> None:
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


def empty_database(db_url: str, what: str, error: Callable[[str], Exception]) -> Engine:
    """An engine on the database at `db_url` (a missing SQLite file created 0600) once it
    is found to hold no row, migrated to this node's schema; `error` naming a table that
    holds rows otherwise (nothing is ever merged into a node's data)."""
    if sqlite_file(db_url) is not None:
        prepare_sqlite(db_url)
    engine = make_engine(db_url, pool_size=2)
    try:
        busy = _non_empty_table(engine)
        if busy:
            raise error(
                f"refusing to {what} into a database that is not empty (table {busy} holds"
                f" rows): {what} only into a new, empty database"
            )
        upgrade(engine, MIGRATIONS, VERSION_TABLE)
    except BaseException:
        engine.dispose()
        raise
    return engine


def restore_backup(
    path: Path,
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    db_url: str,
    *,
    progress: Progress | None = None,
) -> RestoreSummary:
    """Restore `path` into the empty database at `db_url`; BackupError when it cannot."""
    engine = empty_database(db_url, "restore", BackupError)
    try:
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
                reset_sequences(conn, tables)
    finally:
        engine.dispose()
    return RestoreSummary(manifest)


@dataclass
class ContentCheck:
    """What `check_contents` checked: contents in clear against their SHA-256 (`clear`),
    sealed ones opened with their patient's data key and then checked (`opened`), sealed
    ones only checked for shape and for a data key (`sealed`: without the KEK a data key
    cannot be unwrapped, so a ciphertext cannot be authenticated), and contents of
    shredded patients, unreadable by design (`shredded`)."""

    clear: int = 0
    opened: int = 0
    sealed: int = 0
    shredded: int = 0

    @property
    def total(self) -> int:
        return self.clear + self.opened + self.sealed + self.shredded


def _patient_keys(
    conn: Connection, tables: dict[str, Table], kek: KeyEncryptionKey | None
) -> dict[str, bytes | None]:
    """Each patient with a data key: the key unwrapped (with a KEK), None when shredded
    (or no KEK was given: then b"" for a live key)."""
    keys: dict[str, bytes | None] = {}
    t = tables.get("data_keys")
    if t is None:
        return keys
    for ins, wrapped in conn.execute(select(t.c.patient_ins, t.c.wrapped)):
        if wrapped is None:
            keys[ins] = None
        elif kek is None:
            keys[ins] = b""
        else:
            try:
                keys[ins] = kek.unwrap(bytes(wrapped))
            except (ValueError, DmpError):
                raise BackupError(
                    f"the data key of patient {ins[:5]}... does not unwrap with the KEK given:"
                    " not the KEK of this backup (or the key is damaged)"
                ) from None
    return keys


def check_contents(engine: Engine, kek: KeyEncryptionKey | None = None) -> ContentCheck:
    """Every record's content against its SHA-256 (sealed ones once opened with `kek`);
    what was checked, or BackupError naming the first record that fails."""
    check = ContentCheck()
    metadata = MetaData()
    with engine.connect() as conn:
        metadata.reflect(bind=conn)
        tables = dict(metadata.tables)
        records, contents = tables["records"], tables["record_contents"]
        keys = _patient_keys(conn, tables, kek)
        query = select(
            records.c.id,
            records.c.version,
            records.c.patient_ins,
            records.c.sha256,
            contents.c.content,
        ).join(contents, contents.c.record_id == records.c.id)
        result = conn.execution_options(stream_results=True, yield_per=200).execute(query)
        for record_id, version, ins, sha256, stored in result:
            content = bytes(stored)
            if not is_sealed(content):
                if hashlib.sha256(content).hexdigest() != sha256:
                    raise BackupError(f"record {record_id}: its content does not match its SHA-256")
                check.clear += 1
                continue
            if ins not in keys:
                raise BackupError(f"record {record_id}: sealed, but its patient has no data key")
            key = keys[ins]
            if key is None:
                check.shredded += 1
            elif not key:
                if len(content) < _MIN_SEALED:
                    raise BackupError(f"record {record_id}: its sealed content is cut short")
                check.sealed += 1
            else:
                try:
                    plain = open_value(key, content, record_id, int(version), "content")
                except DmpError as exc:
                    raise BackupError(str(exc)) from None
                if hashlib.sha256(plain).hexdigest() != sha256:
                    raise BackupError(f"record {record_id}: its content does not match its SHA-256")
                check.opened += 1
        total = conn.execute(select(func.count()).select_from(records)).scalar() or 0
    if check.total != total:
        raise BackupError(f"missing part: {total - check.total} records have no content")
    return check


@dataclass
class VerifySummary(RestoreSummary):
    audit_events: int = 0
    contents: ContentCheck = field(default_factory=ContentCheck)

    @property
    def contents_checked(self) -> int:
        return self.contents.total


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
    kek: KeyEncryptionKey | None = None,
    progress: Progress | None = None,
) -> VerifySummary:
    """Prove a backup by restoring it: decrypt, check signature and hashes, restore into a
    scratch database, check every content hash and the audit log; BackupError otherwise."""
    with scratch_database(scratch) as url:
        restored = restore_backup(path, key, ca, url, progress=progress)
        engine = make_engine(url, pool_size=2)
        try:
            contents = check_contents(engine, kek)
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
    return VerifySummary(restored.manifest, audit_events=report.events, contents=contents)
