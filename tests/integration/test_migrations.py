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


def test_node_upgrades_a_database_that_holds_records(db_url: str) -> None:
    """Migrations that rebuild `records` keep a node's records and their contents."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    engine = make_engine(db_url)
    config = Config()
    config.set_main_option("script_location", str(NODE_MIGRATIONS))
    config.attributes["version_table"] = "alembic_version_node"
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0002")
    columns = (
        "id, patient_ins, kind, type_system, type_code, type_display, title, author_identity,"
        " author_name, author_profession, organization, created_us, effective_us, status,"
        " version, supersedes, confidentiality, masked, hidden_from_patient, content_type,"
        " size, sha256, fingerprint"
    )
    with engine.begin() as connection:
        for record_id, supersedes in (("v1", None), ("v2", "v1"), ("x", None)):
            connection.execute(
                text(
                    f"INSERT INTO records ({columns}) VALUES (:id, '185027512345625', 'document',"
                    " 'l', 'c', 'd', 't', 'a', 'n', 'p', 'o', 1, 1, 'current', 1, :sup, 'normal',"
                    " false, false, 't', 1, 's', 'f')"
                ),
                {"id": record_id, "sup": supersedes},
            )
            connection.execute(
                text("INSERT INTO record_contents (record_id, content) VALUES (:id, :c)"),
                {"id": record_id, "c": b"x"},
            )
    upgrade(engine, NODE_MIGRATIONS, "alembic_version_node")
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT id, root_id FROM records ORDER BY id")).all()
        contents = connection.execute(text("SELECT count(*) FROM record_contents")).scalar()
    engine.dispose()
    assert [tuple(r) for r in rows] == [("v1", "v1"), ("v2", "v1"), ("x", "x")]
    assert contents == 3
