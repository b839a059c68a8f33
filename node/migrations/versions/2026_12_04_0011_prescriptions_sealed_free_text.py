"""prescriptions sealed free text

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 05:00:00

Encryption at rest (node/prescription_store.py): prescriptions.sealed, a prescription's
free text (its cancellation reason and its holder's pharmacy) sealed with the patient's
data key and bound to the prescription's id and version, those clear columns then empty.
Existing rows stay readable in clear until `dmp node encrypt` seals them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("prescriptions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sealed", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("prescriptions", schema=None) as batch_op:
        batch_op.drop_column("sealed")
