"""Alembic environment of the node: run from dmp.db.upgrade with a live connection."""

from __future__ import annotations

from alembic import context

from node.models import NodeBase

config = context.config
connection = config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=NodeBase.metadata,
    version_table=config.attributes.get("version_table", "alembic_version_node"),
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
