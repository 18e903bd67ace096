"""audit.exported_seq and audit.export_hash: the audit export's marker in the ledger

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("audit", sa.Column("exported_seq", sa.BigInteger(), nullable=True))
    op.add_column("audit", sa.Column("export_hash", sa.String(64), nullable=True))
    # The exporter reads what is not yet exported (NULL) and the highest seq; unique:
    # one entry per line of the chain.
    op.create_index("ix_audit_exported_seq", "audit", ["exported_seq"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_audit_exported_seq", table_name="audit")
    with op.batch_alter_table("audit") as batch:
        batch.drop_column("export_hash")
        batch.drop_column("exported_seq")
