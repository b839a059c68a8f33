"""witnessed audit heads of other services

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 15:55:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The signed audit tree heads of other services this one witnessed (the directory's).
    op.create_table(
        "witnessed_heads",
        sa.Column("signer", sa.String(length=200), nullable=False),
        sa.Column(
            "tree_size",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=False,
            nullable=False,
        ),
        sa.Column("root_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("signed_at_us", sa.BigInteger(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("signer_cert_pem", sa.Text(), nullable=False),
        sa.Column("witnessed_at_us", sa.BigInteger(), nullable=False),
        sa.Column("witness", sa.String(length=200), nullable=False),
        sa.Column("witness_signature", sa.LargeBinary(), nullable=False),
        sa.Column("witness_cert_pem", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("signer", "tree_size", name=op.f("pk_witnessed_heads")),
    )


def downgrade() -> None:
    op.drop_table("witnessed_heads")
