"""handover to a successor host

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04 18:20:00

Hand-over of a region to a successor host (node/handover_*.py): `handover`, this node's one
row of hand-over state (as the predecessor that streams, or as the successor that
receives); `handover_changes`, the keys of the rows changed since the hand-over started,
filled by triggers that only exist while a hand-over runs, emptied as the successor
acknowledges them; `handover_proofs`, every hand-over this region's log went through, with
both nodes' signatures over what was handed over (kept and passed on with the data).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "handover",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("peer_cert_pem", sa.Text(), nullable=False),
        sa.Column("peer_address", sa.String(300), nullable=False),
        sa.Column("snapshot_done", sa.Boolean(), nullable=False),
        sa.Column("final_record_seq", sa.BigInteger(), nullable=True),
        sa.Column("final_audit_seq", sa.BigInteger(), nullable=True),
        sa.Column("final_root_hash", sa.LargeBinary(32), nullable=True),
        sa.Column("statement", sa.Text(), nullable=True),
        sa.Column("predecessor_signature", sa.LargeBinary(), nullable=True),
        sa.Column("successor_signature", sa.LargeBinary(), nullable=True),
        sa.Column("started_us", sa.BigInteger(), nullable=False),
        sa.Column("updated_us", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "handover_changes",
        sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
        sa.Column("tbl", sa.String(64), nullable=False),
        sa.Column("pk", sa.Text(), nullable=False),
    )
    op.create_table(
        "handover_proofs",
        sa.Column("statement_sha256", sa.String(64), primary_key=True),
        sa.Column("statement", sa.Text(), nullable=False),
        sa.Column("predecessor_cert_pem", sa.Text(), nullable=False),
        sa.Column("predecessor_signature", sa.LargeBinary(), nullable=False),
        sa.Column("successor_cert_pem", sa.Text(), nullable=False),
        sa.Column("successor_signature", sa.LargeBinary(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("handover_proofs")
    op.drop_table("handover_changes")
    op.drop_table("handover")
