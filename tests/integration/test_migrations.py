"""The Alembic migrations produce exactly the models' schema, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData

from directory.app import MIGRATIONS as DIRECTORY_MIGRATIONS
from directory.models import DirectoryBase
from dmp.db import make_engine, upgrade
from node.app import MIGRATIONS as NODE_MIGRATIONS
from node.models import NodeBase


def schema_differences(
    url: str, migrations: object, version_table: str, metadata: MetaData
) -> list[object]:
    engine = make_engine(url)
    try:
        upgrade(engine, migrations, version_table)  # type: ignore[arg-type]
        upgrade(engine, migrations, version_table)  # type: ignore[arg-type]  # idempotent
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": version_table})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def test_node_migrations_match_models(db_url: str) -> None:
    assert (
        schema_differences(db_url, NODE_MIGRATIONS, "alembic_version_node", NodeBase.metadata) == []
    )


def test_directory_migrations_match_models(db_url: str) -> None:
    differences = schema_differences(
        db_url, DIRECTORY_MIGRATIONS, "alembic_version_directory", DirectoryBase.metadata
    )
    assert differences == []
