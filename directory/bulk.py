"""Bulk load of the national patient index: millions of identities at once.

`load_patients` is for a first load (a migration from an existing index, a benchmark),
not for the day-to-day registrations, which go through PatientIndex.register one by one
with their conflict checks. Each row is (ins, birth_family_name, given names separated by
spaces, birth_date, sex, birthplace_code), as `dmp.synth.patient_rows` gives them. The INS
key is checked (InvalidArgument names a bad one) and the names are stored in the
comparable form the index keeps (upper case, no accents), as a registration would.

- PostgreSQL: COPY FROM STDIN. Into an empty table, the load is one transaction that
  truncates the table (so COPY can FREEZE the rows), drops the primary key, copies, and
  builds the primary key again at the end with one sort instead of millions of
  random B-tree insertions.
- SQLite: executemany over an iterator in big batches. Into an empty table, rows go first
  to an unindexed temporary table, then into `patients` in INS order, so that the primary
  key index (an implicit unique index on INS) is built by appending instead of random
  insertions; one transaction. During the load the connection uses a large page cache,
  multi-threaded sorting and synchronous=OFF; synchronous=FULL is restored before the final
  WAL checkpoint, so the loaded data is durable when the function returns.

A failed load into an empty table leaves it empty (one transaction); a load into a
non-empty table inserts batch by batch and refuses an INS already present
(IntegrityError): it never merges identities.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import Engine

from dmp.clock import now_us
from dmp.ins import normalize_ins
from dmp.patients import _fold

PatientTuple = tuple[str, str, str, str, str, str]

COLUMNS = (
    "ins",
    "birth_family_name",
    "given_names",
    "birth_date",
    "sex",
    "birthplace_code",
    "created_us",
)
DEFAULT_BATCH = 100_000
#: Page cache of the loading connection: keeps the staging sort and the index in memory.
SQLITE_CACHE_KIB = 256 * 1024


@functools.lru_cache(maxsize=65536)
def _fold_cached(text: str) -> str:
    return _fold(text)


def _check_ins(ins: str) -> str:
    """The INS if its key is right: a fast path for plain digits, the full check else."""
    if (
        len(ins) == 15
        and ins.isdigit()
        and ins[0] in "123478"
        and 97 - int(ins[:13]) % 97 == int(ins[13:])
    ):
        return ins
    return normalize_ins(ins)  # raises InvalidArgument naming what is wrong


def _prepared(
    rows: Iterable[PatientTuple], created_us: int, validate: bool
) -> Iterator[tuple[str, str, str, str, str, str, int]]:
    fold = _fold_cached
    for ins, family, given, birth_date, sex, place in rows:
        yield (
            _check_ins(ins) if validate else ins,
            fold(family),
            fold(given),
            birth_date,
            sex,
            place,
            created_us,
        )


def load_patients(
    engine: Engine,
    rows: Iterable[PatientTuple],
    batch: int = DEFAULT_BATCH,
    *,
    created_us: int | None = None,
    validate: bool = True,
) -> int:
    """Insert patient identities into the directory's `patients` table; return how many.

    `batch` rows go to the database at a time. The schema must exist (Alembic upgrade).
    """
    if batch <= 0:
        raise ValueError(f"batch must be positive, not {batch}")
    prepared = _prepared(rows, now_us() if created_us is None else created_us, validate)
    dialect = engine.dialect.name
    if dialect == "sqlite":
        return _load_sqlite(engine, prepared, batch)
    if dialect == "postgresql":
        return _load_postgresql(engine, prepared, batch)
    raise ValueError(f"no bulk load for {dialect} databases")


# -- SQLite --------------------------------------------------------------------------------


def _load_sqlite(engine: Engine, rows: Iterator[tuple[Any, ...]], batch: int) -> int:
    names = ", ".join(COLUMNS)
    marks = ", ".join("?" * len(COLUMNS))
    proxy = engine.raw_connection()
    try:
        connection: Any = proxy.driver_connection
        cursor = connection.cursor()
        previous_cache = cursor.execute("PRAGMA cache_size").fetchone()[0]
        cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
        cursor.execute("PRAGMA synchronous=OFF")
        cursor.execute("PRAGMA threads=2")
        loaded = 0
        try:
            empty = cursor.execute("SELECT NOT EXISTS (SELECT 1 FROM patients)").fetchone()[0]
            if empty:
                cursor.execute("BEGIN IMMEDIATE")
                try:
                    cursor.execute(
                        f"CREATE TEMP TABLE bulk_patients ({names})"  # no index, no checks
                    )
                    while chunk := list(itertools.islice(rows, batch)):
                        cursor.executemany(
                            f"INSERT INTO temp.bulk_patients VALUES ({marks})", chunk
                        )
                        loaded += len(chunk)
                    cursor.execute(
                        f"INSERT INTO patients ({names})"
                        f" SELECT {names} FROM temp.bulk_patients ORDER BY ins"
                    )
                    cursor.execute("DROP TABLE temp.bulk_patients")
                    cursor.execute("COMMIT")
                except BaseException:
                    cursor.execute("ROLLBACK")
                    raise
            else:
                while chunk := list(itertools.islice(rows, batch)):
                    cursor.execute("BEGIN IMMEDIATE")
                    try:
                        cursor.executemany(
                            f"INSERT INTO patients ({names}) VALUES ({marks})", chunk
                        )
                        cursor.execute("COMMIT")
                    except BaseException:
                        cursor.execute("ROLLBACK")
                        raise
                    loaded += len(chunk)
        finally:
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA threads=0")
            cursor.execute(f"PRAGMA cache_size={int(previous_cache)}")
        # Durable now: the checkpoint writes the WAL into the database file and syncs it.
        cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        cursor.close()
        return loaded
    finally:
        proxy.close()


# -- PostgreSQL ----------------------------------------------------------------------------

_COPY_SPECIAL = ("\\", "\r")


def _copy_text(chunk: list[tuple[Any, ...]]) -> str | None:
    """The chunk in COPY text format, or None if a value needs escaping (rare)."""
    text = "\n".join("\t".join(map(str, row)) for row in chunk) + "\n"
    fields = len(COLUMNS)
    if (
        text.count("\t") != (fields - 1) * len(chunk)
        or text.count("\n") != len(chunk)
        or any(special in text for special in _COPY_SPECIAL)
    ):
        return None
    return text


def _load_postgresql(engine: Engine, rows: Iterator[tuple[Any, ...]], batch: int) -> int:
    names = ", ".join(COLUMNS)
    proxy = engine.raw_connection()
    try:
        connection: Any = proxy.driver_connection
        loaded = 0
        with connection.transaction(), connection.cursor() as cursor:
            cursor.execute("SELECT NOT EXISTS (SELECT 1 FROM patients)")
            empty = cursor.fetchone()[0]
            copy = f"COPY patients ({names}) FROM STDIN"
            if empty:
                cursor.execute("SET LOCAL maintenance_work_mem = '512MB'")
                cursor.execute("TRUNCATE patients")
                cursor.execute("ALTER TABLE patients DROP CONSTRAINT pk_patients")
                copy += " WITH (FREEZE)"
            with cursor.copy(copy) as out:
                while chunk := list(itertools.islice(rows, batch)):
                    text = _copy_text(chunk)
                    if text is not None:
                        out.write(text)
                    else:
                        for row in chunk:
                            out.write_row(row)
                    loaded += len(chunk)
            if empty:
                cursor.execute("ALTER TABLE patients ADD CONSTRAINT pk_patients PRIMARY KEY (ins)")
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE patients")
        connection.commit()
        return loaded
    finally:
        proxy.close()
