"""seen assertion nonces

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 15:45:00

Access assertions are single-use: their nonces are kept here until the assertion expires,
so that a restart does not make a used assertion valid again.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "seen_nonces",
        sa.Column("nonce", sa.LargeBinary(length=64), nullable=False),
        sa.Column("keep_until_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("nonce", name=op.f("pk_seen_nonces")),
    )
    op.create_index("ix_seen_nonces_keep_until_us", "seen_nonces", ["keep_until_us"])


def downgrade() -> None:
    op.drop_index("ix_seen_nonces_keep_until_us", table_name="seen_nonces")
    op.drop_table("seen_nonces")
