"""Capture of the rows changed while a hand-over streams: triggers that write the key of
every inserted, updated or deleted row of a handed-over table into ``handover_changes``.

They exist only while a hand-over runs (created by `dmp node handover start`, dropped when
it is aborted or done), so that a node pays nothing for them otherwise. Creating them is
what makes the snapshot safe: once they are committed, every later change is captured, so
the successor takes a snapshot (which may or may not hold a change) then every captured
change (applied again: the row's current state). On SQLite their creation takes the write
lock, after every writer before it committed. On PostgreSQL the tables are locked first
(SHARE ROW EXCLUSIVE, waited for a bounded time and retried, never deadlocking a writer),
so that no transaction that wrote a row before the triggers existed commits after them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy import Engine, Table, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from dmp.db import writer
from dmp.errors import Unavailable
from node.handover_rows import handed_tables, is_bytes, key_columns

log = logging.getLogger("dmp.node.handover")

_OPS = ("INSERT", "UPDATE", "DELETE")


def _trigger(table: Table, op: str) -> str:
    return f"dmp_handover_{table.name}_{op.lower()}"


def _sqlite_key(table: Table, row: str) -> str:
    parts = [
        f'hex({row}."{name}")' if is_bytes(table, name) else f'{row}."{name}"'
        for name in key_columns(table)
    ]
    return f"json_array({', '.join(parts)})"


def _create_sqlite(conn: Connection) -> None:
    for table in handed_tables():
        for op in _OPS:
            row = "OLD" if op == "DELETE" else "NEW"
            conn.exec_driver_sql(
                f'CREATE TRIGGER IF NOT EXISTS {_trigger(table, op)} AFTER {op} ON "{table.name}"'
                f" BEGIN INSERT INTO handover_changes (tbl, pk) VALUES"
                f" ('{table.name}', {_sqlite_key(table, row)}); END"
            )


def _pg_key(table: Table, row: str) -> str:
    parts = [
        f"encode({row}.\"{name}\", 'hex')" if is_bytes(table, name) else f'{row}."{name}"'
        for name in key_columns(table)
    ]
    return f"jsonb_build_array({', '.join(parts)})::text"


def _create_postgresql(conn: Connection) -> None:
    names = ", ".join(f'"{t.name}"' for t in handed_tables())
    conn.exec_driver_sql(f"LOCK TABLE {names} IN SHARE ROW EXCLUSIVE MODE")
    # Created where missing (a DROP would take an ACCESS EXCLUSIVE lock, blocking reads).
    present = {
        str(name)
        for (name,) in conn.exec_driver_sql(
            "SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
            " WHERE t.tgname = 'dmp_handover'"
        )
    }
    for table in handed_tables():
        if table.name in present:
            continue
        # One function a table, naming the key columns: the row itself (a content of
        # megabytes) is never converted.
        insert = f"INSERT INTO handover_changes (tbl, pk) VALUES ('{table.name}', "
        conn.exec_driver_sql(
            f"CREATE OR REPLACE FUNCTION {_function(table)}() RETURNS trigger"
            " LANGUAGE plpgsql AS $$ BEGIN"
            f" IF TG_OP = 'DELETE' THEN {insert}{_pg_key(table, 'OLD')});"
            f" ELSE {insert}{_pg_key(table, 'NEW')}); END IF; RETURN NULL; END $$"
        )
        conn.exec_driver_sql(
            f'CREATE TRIGGER dmp_handover AFTER INSERT OR UPDATE OR DELETE ON "{table.name}"'
            f" FOR EACH ROW EXECUTE FUNCTION {_function(table)}()"
        )


def _function(table: Table) -> str:
    return f"dmp_handover_{table.name}"


def _retrying(engine: Engine, work: Callable[[Connection], None], what: str) -> None:
    """`work` in one write transaction, again while PostgreSQL's locks time out (a
    bounded wait each time: never a writer stuck behind us for long, never a deadlock)."""
    for attempt in range(100):
        try:
            with writer(engine).begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.exec_driver_sql("SET LOCAL lock_timeout = '300ms'")
                work(conn)
            return
        except OperationalError as exc:
            if "lock" not in str(exc).lower():
                raise
            log.info("%s: tables busy, retrying (%d)", what, attempt + 1)
            time.sleep(0.05)
    raise Unavailable(f"the node's tables stayed busy: could not {what}; retry")


def start_capture(engine: Engine) -> None:
    """Create the capture triggers (idempotent), waiting for in-flight writers."""

    def create(conn: Connection) -> None:
        if conn.dialect.name == "postgresql":
            _create_postgresql(conn)
        else:
            _create_sqlite(conn)

    _retrying(engine, create, "start capturing changes")


def stop_capture(engine: Engine) -> None:
    """Drop the capture triggers and forget the captured changes."""
    _retrying(engine, _drop, "stop capturing changes")


def _drop(conn: Connection) -> None:
    for table in handed_tables():
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f'DROP TRIGGER IF EXISTS dmp_handover ON "{table.name}"')
        else:
            for op in _OPS:
                conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {_trigger(table, op)}")
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {_function(table)}()")
    conn.execute(text("DELETE FROM handover_changes"))


def capturing(conn: Connection) -> bool:
    """Whether the capture triggers exist."""
    if conn.dialect.name == "postgresql":
        found = conn.execute(
            text("SELECT 1 FROM pg_trigger WHERE tgname = 'dmp_handover' LIMIT 1")
        ).first()
    else:
        found = conn.execute(
            text(
                "SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'dmp_handover_%'"
            )
        ).first()
    return found is not None
