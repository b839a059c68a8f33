"""records carry an integrity hash of their metadata

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 15:55:00.000000

Every existing row gets its `row_hash`, computed here as node/integrity.py computes it
(tag dmp-record-row-v1). The function is copied, not imported: this migration must keep
hashing the way v1 did whatever the application does later.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_TAG = "dmp-record-row-v1"
_COLUMNS: dict[str, Any] = {
    "id": sa.String,
    "patient_ins": sa.String,
    "kind": sa.String,
    "type_system": sa.String,
    "type_code": sa.String,
    "type_display": sa.String,
    "title": sa.String,
    "author_identity": sa.String,
    "author_name": sa.String,
    "author_profession": sa.String,
    "organization": sa.String,
    "created_us": sa.BigInteger,
    "effective_us": sa.BigInteger,
    "status": sa.String,
    "version": sa.Integer,
    "supersedes": sa.String,
    "root_id": sa.String,
    "confidentiality": sa.String,
    "hidden_from_patient": sa.Boolean,
    "revealed_us": sa.BigInteger,
    "content_type": sa.String,
    "size": sa.BigInteger,
    "sha256": sa.String,
    "fingerprint": sa.String,
}
_BATCH = 1000


def _row_hash(row: Any) -> str:
    values = [getattr(row, name) for name in _COLUMNS]
    values[list(_COLUMNS).index("hidden_from_patient")] = bool(row.hidden_from_patient)
    return hashlib.sha256(json.dumps([_TAG, *values]).encode("ascii")).hexdigest()


def upgrade() -> None:
    with op.batch_alter_table("records", schema=None) as batch_op:
        batch_op.add_column(sa.Column("row_hash", sa.String(length=64), nullable=True))
    records = sa.table(
        "records",
        sa.column("seq", sa.BigInteger),
        sa.column("row_hash", sa.String),
        *(sa.column(name, kind) for name, kind in _COLUMNS.items()),
    )
    bind = op.get_bind()
    after = None
    while True:
        query = sa.select(records).order_by(records.c.seq).limit(_BATCH)
        if after is not None:
            query = query.where(records.c.seq > after)
        rows = bind.execute(query).all()
        if not rows:
            break
        bind.execute(
            records.update()
            .where(records.c.seq == sa.bindparam("b_seq"))
            .values(row_hash=sa.bindparam("b_hash")),
            [{"b_seq": row.seq, "b_hash": _row_hash(row)} for row in rows],
        )
        after = rows[-1].seq
    with op.batch_alter_table("records", schema=None) as batch_op:
        batch_op.alter_column("row_hash", existing_type=sa.String(length=64), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("records", schema=None) as batch_op:
        batch_op.drop_column("row_hash")
