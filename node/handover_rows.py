"""The rows a hand-over carries: which tables, how a changed row is named, how batches of
rows are packed (sealed to the successor) and applied at the successor.

Every table of the node's schema goes across but the hand-over's own state and change
log. A batch is the framing of node backups (node/backup_format.py) sealed to the
successor's certificate (dmp/sealed.py): per table a ``T`` frame (JSON: name, columns,
the keys of rows deleted), then ``R`` frames of typed rows. Data keys travel unwrapped
from the predecessor's KEK (inside the sealed batch only), marked with an empty
``kek_id``: the successor wraps them with its own KEK before they touch its disk.

Applying is idempotent: a row is updated where its key exists and inserted where not, a
deleted key deleted, so that a batch applied twice (a successor that died before it
acknowledged) leaves the same database.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import LargeBinary, Table, and_, bindparam, delete, select, tuple_, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from dmp.envelope import KeyEncryptionKey
from dmp.errors import FailedPrecondition
from dmp.sealed import SealedWriter, open_sealed
from node.backup_format import ROWS, TABLE, FrameReader, decode_rows, encode_rows, frame
from node.models import NodeBase

#: Not handed over: the hand-over's own state and change log.
LOCAL_TABLES: Final = frozenset({"handover", "handover_changes"})
DATA_KEYS: Final = "data_keys"
#: A batch holds at most about this many bytes of rows, or one row alone: so that it
#: fits in one message of any node (whose limit is its largest content plus 1 MiB).
BATCH_BYTES: Final = 960 << 10
BATCH_ROWS: Final = 2000
#: At most this many keys of one table are read in one statement.
_GROUP_KEYS: Final = 500


def handed_tables() -> list[Table]:
    """The tables a hand-over carries, parents before children (foreign keys)."""
    return [t for t in NodeBase.metadata.sorted_tables if t.name not in LOCAL_TABLES]


TABLES: Final[dict[str, Table]] = {t.name: t for t in handed_tables()}


def key_columns(table: Table) -> list[str]:
    return [c.name for c in table.primary_key.columns]


def is_bytes(table: Table, column: str) -> bool:
    return isinstance(table.c[column].type, LargeBinary)


def decode_key(table: Table, pk_json: str) -> tuple[Any, ...]:
    """A change's key (JSON array as the capture triggers write it) as column values."""
    values = json.loads(pk_json)
    key = []
    for column, value in zip(key_columns(table), values, strict=True):
        if is_bytes(table, column) and isinstance(value, str):
            key.append(bytes.fromhex(value.removeprefix("\\x")))
        else:
            key.append(value)
    return tuple(key)


def _encode_key(key: Sequence[Any]) -> list[Any]:
    return [value.hex() if isinstance(value, bytes) else value for value in key]


def _key_filter(table: Table, keys: Sequence[tuple[Any, ...]]) -> Any:
    columns = [table.c[name] for name in key_columns(table)]
    if len(columns) == 1:
        return columns[0].in_([key[0] for key in keys])
    return tuple_(*columns).in_(keys)


def _value(value: Any) -> Any:
    return bytes(value) if isinstance(value, memoryview) else value


class Unwrapper:
    """Data keys out of the predecessor's KEK (None: a node without encryption at rest)."""

    def __init__(self, unwrap: Callable[[str, bytes], bytes] | None) -> None:
        self._unwrap = unwrap

    def row(self, columns: list[str], row: Sequence[Any]) -> tuple[Any, ...]:
        values = dict(zip(columns, (_value(v) for v in row), strict=True))
        if values["wrapped"] is not None:
            if self._unwrap is None:
                raise FailedPrecondition(
                    "this node holds data keys and was given no --kek-file: the hand-over"
                    " needs the KEK to pass the patients' data keys on",
                    reason="KEK_REQUIRED",
                )
            values["wrapped"] = self._unwrap(values["kek_id"], values["wrapped"])
            values["kek_id"] = ""
        return tuple(values[c] for c in columns)


class BatchWriter:
    """Rows of several tables into one sealed batch."""

    def __init__(self, recipient: x509.Certificate, recipient_name: str, keys: Unwrapper):
        self._recipient, self._name, self._keys = recipient, recipient_name, keys
        self._parts: list[bytes] = []
        self._table: str | None = None
        self._rows: list[tuple[Any, ...]] = []
        self.rows = 0
        self.size = 0

    def _flush_rows(self) -> None:
        if self._rows:
            self._parts.append(frame(ROWS, encode_rows(self._rows)))
            self._rows = []

    def _start(self, table: Table, deleted: Sequence[tuple[Any, ...]] = ()) -> None:
        self._flush_rows()
        header = {
            "name": table.name,
            "columns": [c.name for c in table.columns],
            "deleted": [_encode_key(key) for key in deleted],
        }
        self._parts.append(frame(TABLE, json.dumps(header).encode()))
        self._table = table.name

    def fits(self, row: Sequence[Any]) -> bool:
        """Whether `row` may join this batch (a first row always may)."""
        return not self.rows or self.size + _size(row) <= BATCH_BYTES

    def add(self, table: Table, row: Sequence[Any]) -> None:
        if self._table != table.name:
            self._start(table)
        columns = [c.name for c in table.columns]
        values = (
            self._keys.row(columns, row)
            if table.name == DATA_KEYS
            else tuple(_value(v) for v in row)
        )
        self._rows.append(values)
        self.rows += 1
        self.size += _size(values)
        if len(self._rows) >= 500:
            self._flush_rows()

    def delete(self, table: Table, keys: Sequence[tuple[Any, ...]]) -> None:
        self._start(table, keys)
        self._table = None  # rows after deletions start a new part
        self.rows += len(keys)

    @property
    def full(self) -> bool:
        return self.rows >= BATCH_ROWS or self.size >= BATCH_BYTES

    def seal(self) -> bytes:
        self._flush_rows()
        out = io.BytesIO()
        writer = SealedWriter(out, self._recipient, self._name)
        for part in self._parts:
            writer.write(part)
        writer.close()
        return out.getvalue()


def _size(row: Sequence[Any]) -> int:
    return sum(len(v) if isinstance(v, bytes | str | memoryview) else 8 for v in row)


def snapshot_batches(
    conn: Connection, new_batch: Callable[[], BatchWriter]
) -> Iterator[BatchWriter]:
    """Every handed-over row the connection's snapshot holds, in batches."""
    batch = new_batch()
    for table in handed_tables():
        order = [table.c[name] for name in key_columns(table)]
        rows = conn.execution_options(yield_per=1000).execute(select(table).order_by(*order))
        for row in rows:
            if not batch.fits(row):
                yield batch
                batch = new_batch()
            batch.add(table, row)
            if batch.full:
                yield batch
                batch = new_batch()
    if batch.rows:
        yield batch


def changed_rows(
    conn: Connection, changes: Sequence[tuple[int, str, str]], batch: BatchWriter
) -> list[int]:
    """The current state of the rows named by `changes` (seq, table, key) into `batch`,
    until it is full; the seqs of the changes it carries. A row that no longer exists goes
    as a deleted key. Table by table, parents before children (a record before its
    content, a prescription before its dispensings): what matters is each row's current
    state, and no handed-over row is deleted while rows refer to it."""
    wanted: dict[str, dict[tuple[Any, ...], None]] = {}
    for _seq, name, pk in changes:
        table = TABLES.get(name)
        if table is not None:
            wanted.setdefault(name, {})[decode_key(table, pk)] = None
    carried: set[tuple[str, tuple[Any, ...]]] = set()
    for table in handed_tables():
        if table.name not in wanted:
            continue
        keys = list(wanted[table.name])
        names = key_columns(table)
        present: set[tuple[Any, ...]] = set()
        full = False
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            for row in conn.execute(select(table).where(_key_filter(table, chunk))):
                if not batch.fits(row):  # a batch fits in one message
                    full = True
                    break
                mapping = row._mapping
                key = tuple(_value(mapping[name]) for name in names)
                present.add(key)
                batch.add(table, row)
                carried.add((table.name, key))
            if full:
                break
        if full:
            break
        gone = [key for key in keys if tuple(key) not in present]
        if gone:
            batch.delete(table, gone)
            carried.update((table.name, tuple(key)) for key in gone)
    return [
        seq
        for seq, name, pk in changes
        if name not in TABLES or (name, decode_key(TABLES[name], pk)) in carried
    ]


def _canonical(value: Any) -> bytes:
    """One column value, typed and length-prefixed, the same read from either engine."""
    value = _value(value)
    if value is None:
        return b"N"
    if isinstance(value, bool):
        return b"T" if value else b"F"
    if isinstance(value, int):
        data, tag = str(value).encode(), b"I"
    elif isinstance(value, str):
        data, tag = value.encode("utf-8"), b"S"
    else:
        data, tag = bytes(value), b"B"
    return tag + len(data).to_bytes(8, "big") + data


def rows_digest(conn: Connection) -> str:
    """SHA-256 over every handed-over row the connection sees, whatever the engine and
    the order it returns rows in; a data key counts without its wrapping (each host wraps
    with its own KEK). Both nodes sign it: the successor holds exactly these rows."""
    total = hashlib.sha256()
    for table in sorted(handed_tables(), key=lambda t: t.name):
        names = [c.name for c in table.columns]
        hashes = []
        for row in conn.execution_options(yield_per=1000).execute(select(table)):
            values = dict(zip(names, row, strict=True))
            if table.name == DATA_KEYS:
                values["wrapped"] = values["wrapped"] is None
                values["kek_id"] = None
            hashes.append(hashlib.sha256(b"".join(_canonical(values[n]) for n in names)).digest())
        hashes.sort()
        part = hashlib.sha256(table.name.encode() + len(hashes).to_bytes(8, "big"))
        for digest in hashes:
            part.update(digest)
        total.update(part.digest())
    return total.hexdigest()


class Applier:
    """Sealed batches into the successor's database, data keys wrapped with its KEK."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, kek: KeyEncryptionKey | None) -> None:
        self._key = key
        self._kek = kek

    def apply(self, conn: Connection, sealed: bytes) -> int:
        """Apply one batch in the caller's transaction; the number of rows it carried."""
        table: Table | None = None
        columns: list[str] = []
        count = 0
        for tag, payload in FrameReader(open_sealed(io.BytesIO(sealed), self._key)):
            if tag == TABLE:
                header = json.loads(payload)
                table = TABLES.get(header["name"])
                if table is None:
                    raise FailedPrecondition(
                        f"the predecessor sent table {header['name']}, which this node's"
                        " schema does not have: run the same version on both nodes"
                    )
                columns = list(header["columns"])
                missing = set(columns) - set(table.columns.keys())
                if missing:
                    raise FailedPrecondition(
                        f"the predecessor's table {table.name} has columns {sorted(missing)}"
                        " this node's schema does not have: run the same version on both"
                    )
                deleted = [decode_key(table, json.dumps(key)) for key in header["deleted"]]
                if deleted:
                    conn.execute(delete(table).where(_key_filter(table, deleted)))
                    count += len(deleted)
            elif tag == ROWS and table is not None:
                rows = [
                    self._wrapped(table, dict(zip(columns, row, strict=True)))
                    for row in decode_rows(payload, len(columns))
                ]
                upsert_many(conn, table, rows)
                count += len(rows)
        return count

    def _wrapped(self, table: Table, values: dict[str, Any]) -> dict[str, Any]:
        """A data key received in clear, wrapped with this node's KEK."""
        if table.name == DATA_KEYS and values.get("wrapped") is not None and not values["kek_id"]:
            if self._kek is None:
                raise FailedPrecondition(
                    "the predecessor encrypts records at rest and this node was given no"
                    " --kek-file: create one with `dmp node init-kek FILE` and receive with"
                    " --kek-file FILE",
                    reason="KEK_REQUIRED",
                )
            values["wrapped"] = self._kek.wrap(values["wrapped"])
            values["kek_id"] = self._kek.key_id
        return values


def upsert_many(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Rows in by key: inserted in one statement when none is there yet (a snapshot into
    an empty database, new rows of a change batch), else the existing ones updated and
    the others inserted, each in one executemany."""
    if not rows:
        return
    try:
        with conn.begin_nested():
            conn.execute(table.insert(), rows)
        return
    except IntegrityError:
        pass
    names = key_columns(table)
    keys = [tuple(row[name] for name in names) for row in rows]
    existing = {
        tuple(_value(v) for v in found)
        for found in conn.execute(
            select(*(table.c[name] for name in names)).where(_key_filter(table, keys))
        )
    }
    fresh = [row for row, key in zip(rows, keys, strict=True) if key not in existing]
    known = [row for row, key in zip(rows, keys, strict=True) if key in existing]
    if fresh:
        conn.execute(table.insert(), fresh)
    rest = [c.name for c in table.columns if c.name not in names]
    if known and rest:
        statement = (
            update(table)
            .where(and_(*(table.c[name] == bindparam(f"key_{name}") for name in names)))
            .values({name: bindparam(f"new_{name}") for name in rest})
        )
        conn.execute(
            statement,
            [
                {**{f"key_{n}": row[n] for n in names}, **{f"new_{n}": row.get(n) for n in rest}}
                for row in known
            ],
        )
