"""Batch inserts straight to the driver, in the caller's transaction: an ingest batch's
rows without SQLAlchemy's per-row parameter processing. And the one lookup every write
makes before its inserts (which of its keys are stored already), straight to the driver
too: SQLAlchemy's execution path cost several times the statement.

- SQLite: one `executemany` of the statement SQLAlchemy compiles for these columns;
- PostgreSQL: `COPY ... FROM STDIN` (psycopg), the fastest way in; COPY fires the
  tables' row triggers as INSERT does (the hand-over's capture triggers,
  node/handover_capture.py);
- any other dialect: SQLAlchemy Core's executemany.

The columns of these tables are plain strings, integers, booleans and bytes, which both
drivers adapt as SQLAlchemy would (tests/integration/test_bulk_insert.py compares the rows
stored both ways).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from operator import itemgetter
from typing import Any

from sqlalchemy import Column, Table, insert, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

#: The compiled INSERT of a (dialect, table, columns): compiled once.
_statements: dict[tuple[str, str, tuple[str, ...]], tuple[str, tuple[str, ...]]] = {}


def insert_rows(session: Session, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert `rows` (column values by name) in the session's transaction, in order; rows
    of several shapes (other columns given) as one statement per run of one shape."""
    if not rows:
        return
    connection = session.connection()
    dialect = connection.dialect.name
    driver_error = connection.dialect.loaded_dbapi.Error
    for columns, run in groupby(rows, key=tuple):
        shaped = list(run)
        try:
            if dialect == "sqlite":
                _executemany(connection, table, columns, shaped)
            elif dialect == "postgresql":
                _copy(connection, table, columns, shaped)
            else:
                session.execute(insert(table), shaped)
        except driver_error as exc:
            raise _as_sqlalchemy(connection, f"bulk insert into {table.name}", exc) from exc


def stored_keys(session: Session, column: Column[str], keys: Sequence[str]) -> list[str]:
    """Which of `keys` (values of a table's string key `column`) are stored, in the
    session's transaction."""
    if not keys:
        return []
    connection = session.connection()
    dialect = connection.dialect.name
    table = column.table.name
    try:
        if dialect == "sqlite":
            sql = f'SELECT "{column.name}" FROM "{table}" WHERE "{column.name}" IN'
            marks = ", ".join("?" * len(keys))
            cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                return [row[0] for row in cursor.execute(f"{sql} ({marks})", tuple(keys))]
            finally:
                cursor.close()
        if dialect == "postgresql":
            sql = f'SELECT "{column.name}" FROM "{table}" WHERE "{column.name}" = ANY(%s)'
            driver = connection.connection.driver_connection
            with driver.cursor() as cursor:  # type: ignore[union-attr]
                cursor.execute(sql, (list(keys),))
                return [row[0] for row in cursor.fetchall()]
    except connection.dialect.loaded_dbapi.Error as exc:
        raise _as_sqlalchemy(connection, f"lookup in {table}", exc) from exc
    return list(session.scalars(select(column).where(column.in_(keys))))


def _as_sqlalchemy(connection: Connection, what: str, exc: Exception) -> sa_exc.StatementError:
    """A driver's error as SQLAlchemy raises it (IntegrityError, OperationalError...),
    without the statement's parameters (patient data)."""
    return sa_exc.DBAPIError.instance(
        what,
        None,
        exc,
        connection.dialect.loaded_dbapi.Error,
        hide_parameters=True,
        dialect=connection.dialect,
    )


def _values(columns: tuple[str, ...], rows: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
    get = itemgetter(*columns)
    if len(columns) == 1:
        return [(get(row),) for row in rows]
    return [get(row) for row in rows]


def _executemany(
    connection: Connection, table: Table, columns: tuple[str, ...], rows: Sequence[dict[str, Any]]
) -> None:
    key = ("sqlite", table.name, columns)
    found = _statements.get(key)
    if found is None:
        compiled = insert(table).compile(dialect=connection.dialect, column_keys=list(columns))
        order = tuple(compiled.positiontup or ())
        if sorted(order) != sorted(columns):  # never: one parameter per column given
            raise ValueError(f"INSERT INTO {table.name}: unexpected parameters")
        found = _statements[key] = (compiled.string, order)
    sql, order = found
    values = _values(order, rows)
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.executemany(sql, values)
    finally:
        cursor.close()


def _copy(
    connection: Connection, table: Table, columns: tuple[str, ...], rows: Sequence[dict[str, Any]]
) -> None:
    values = _values(columns, rows)
    quote = connection.dialect.identifier_preparer.quote
    names = ", ".join(quote(table.c[name].name) for name in columns)
    sql = f"COPY {quote(table.name)} ({names}) FROM STDIN"
    driver = connection.connection.driver_connection
    with driver.cursor() as cursor, cursor.copy(sql) as copy:  # type: ignore[union-attr]
        for row in values:
            copy.write_row(row)
