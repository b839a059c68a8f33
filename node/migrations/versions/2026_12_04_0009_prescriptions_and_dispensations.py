"""prescriptions and dispensations

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 03:00:00

A node holds the prescriptions written in its region (the signed act and its progress)
and their dispensings; a record written from e-prescription names its prescription
(records.prescription_id, empty for every existing record, whose integrity hash is
unchanged: node/integrity.py hashes that column only when it is set).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("records", schema=None) as batch_op:
        batch_op.add_column(sa.Column("prescription_id", sa.String(length=32), nullable=True))
    op.create_table(
        "prescriptions",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("patient_ins", sa.String(length=15), nullable=False),
        sa.Column("prescriber_rpps", sa.String(length=11), nullable=False),
        sa.Column("authored_us", sa.BigInteger(), nullable=False),
        sa.Column("signed", sa.LargeBinary(), nullable=False),
        sa.Column("payload_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("dispensed", sa.Integer(), nullable=False),
        sa.Column("last_dispensed_us", sa.BigInteger(), nullable=True),
        sa.Column("cancelled_us", sa.BigInteger(), nullable=True),
        sa.Column("cancel_reason", sa.String(length=500), nullable=True),
        sa.Column("holder", sa.String(length=100), nullable=True),
        sa.Column("holder_pharmacy", sa.String(length=200), nullable=True),
        sa.Column("held_until_us", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prescriptions")),
    )
    op.create_index(
        "ix_prescriptions_patient_ins_authored_us",
        "prescriptions",
        ["patient_ins", "authored_us"],
    )
    op.create_table(
        "dispensations",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("prescription_id", sa.String(length=32), nullable=False),
        sa.Column("dispensing", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=64), nullable=False),
        sa.Column("pharmacist_identity", sa.String(length=100), nullable=False),
        sa.Column("created_us", sa.BigInteger(), nullable=False),
        sa.Column("message", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["prescription_id"],
            ["prescriptions.id"],
            name=op.f("fk_dispensations_prescription_id_prescriptions"),
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_dispensations")),
        sa.UniqueConstraint("id", name=op.f("uq_dispensations_id")),
        sa.UniqueConstraint(
            "prescription_id",
            "dispensing",
            name=op.f("uq_dispensations_prescription_id_dispensing"),
        ),
        sa.UniqueConstraint(
            "prescription_id",
            "idempotency_key",
            name=op.f("uq_dispensations_prescription_id_idempotency_key"),
        ),
    )


def downgrade() -> None:
    op.drop_table("dispensations")
    op.drop_index("ix_prescriptions_patient_ins_authored_us", table_name="prescriptions")
    op.drop_table("prescriptions")
    with op.batch_alter_table("records", schema=None) as batch_op:
        batch_op.drop_column("prescription_id")
