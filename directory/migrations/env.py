"""Alembic environment of the directory: run from dmp.db.upgrade with a live connection."""

from __future__ import annotations

from alembic import context

from directory.models import DirectoryBase

config = context.config
connection = config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=DirectoryBase.metadata,
    version_table=config.attributes.get("version_table", "alembic_version_directory"),
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
