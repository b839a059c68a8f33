"""Database engines for nodes and directory: SQLite (WAL, synchronous=FULL) or PostgreSQL.

Reads run in ordinary transactions. Writes go through `writer(engine)`: on SQLite their
transaction starts with BEGIN IMMEDIATE, so a read-then-write use case waits for the
write lock instead of failing when another writer committed first.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, MetaData, create_engine, event
from sqlalchemy.engine import Connection

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

_WRITE = "dmp_write"


def new_metadata() -> MetaData:
    return MetaData(naming_convention=NAMING_CONVENTION)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite would delay it).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get(_WRITE, False)
    # Straight to the driver: exec_driver_sql would run SQLAlchemy's whole execution path
    # for every transaction.
    conn.connection.driver_connection.execute(  # type: ignore[union-attr]
        "BEGIN IMMEDIATE" if immediate else "BEGIN"
    )


def rows_insert_sql(
    conn: Connection, table: str, columns: Sequence[str], rows: int, suffix: str = ""
) -> str:
    """`INSERT INTO table (columns) VALUES (...), ...` of `rows` rows in the driver's own
    parameter style, `suffix` after (ON CONFLICT ..., RETURNING ...): for hot statements run
    with exec_driver_sql, whose SQLAlchemy compilation would cost about what they do."""
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    row = "(" + ", ".join([mark] * len(columns)) + ")"
    text = f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([row] * rows)}"
    return f"{text} {suffix}" if suffix else text


def make_engine(url: str, *, pool_size: int = 16) -> Engine:
    """An engine for a database URL (sqlite:///path or postgresql+psycopg://...)."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size,
            max_overflow=pool_size,
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def writer(engine: Engine) -> Engine:
    """The same engine (and pool), marked so that its transactions take the write lock."""
    return engine.execution_options(**{_WRITE: True})


def upgrade(engine: Engine, script_location: Path, version_table: str) -> None:
    """Bring the schema to the latest Alembic revision of a migration tree."""
    config = Config()
    config.set_main_option("script_location", str(script_location))
    config.attributes["version_table"] = version_table
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # A migration that rebuilds a table (SQLite's "batch" ALTER) drops it while other
            # tables reference it: foreign keys off for the migration, as SQLite's ALTER TABLE
            # procedure says (outside a transaction, where the pragma takes effect), then
            # checked and back on.
            _driver(connection).execute("PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
            if sqlite:
                broken = _driver(connection).execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"migration left broken foreign keys: {broken[:5]}")
        finally:
            if sqlite:
                _driver(connection).execute("PRAGMA foreign_keys=ON")


def _driver(connection: Connection) -> Any:
    return connection.connection.driver_connection
