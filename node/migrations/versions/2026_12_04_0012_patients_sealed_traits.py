"""patients sealed traits

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04 05:10:00

Encryption at rest (node/keys.py): patients.sealed, a patient's free-text identity traits
(birth family name, given names, birthplace code) sealed with their data key and bound to
their INS, those clear columns then empty; birth date and sex stay in clear. Existing rows
stay readable in clear until `dmp node encrypt` seals them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("patients", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sealed", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("patients", schema=None) as batch_op:
        batch_op.drop_column("sealed")
