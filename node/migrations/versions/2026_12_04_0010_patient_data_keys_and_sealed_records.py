"""patient data keys and sealed records

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 04:00:00

Encryption at rest (node/keys.py): one data key per patient, stored wrapped by the node's
KEK (the key id of the KEK that wraps it beside it, so that a rotation resumes), and
records.sealed, the encrypted free-text metadata of a record (empty for every existing
record, whose integrity hash is unchanged: node/integrity.py hashes it only when set).
Existing records stay readable in clear until `dmp node encrypt` seals them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("records", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sealed", sa.LargeBinary(), nullable=True))
    op.create_table(
        "data_keys",
        sa.Column("patient_ins", sa.String(length=15), nullable=False),
        sa.Column("kek_id", sa.String(length=100), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=True),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("shredded_us", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("patient_ins", name=op.f("pk_data_keys")),
    )


def downgrade() -> None:
    op.drop_table("data_keys")
    with op.batch_alter_table("records", schema=None) as batch_op:
        batch_op.drop_column("sealed")
