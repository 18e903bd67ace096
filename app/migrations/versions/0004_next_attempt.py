"""re-drive from the ledger: credentials.next_attempt_at, and mint leases

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

from app.core.models import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("credentials", schema=None) as batch_op:
        batch_op.add_column(sa.Column("next_attempt_at", UTCDateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_credentials_next_attempt", ["next_attempt_at"], unique=False)
    # Work left in flight by the previous version is due at once.
    op.execute(
        "UPDATE credentials SET next_attempt_at = updated_at WHERE state IN ('pending', 'revoking')"
    )
    op.create_table(
        "mint_leases",
        sa.Column("credential_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("token", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("until", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("credential_id"),
    )


def downgrade() -> None:
    op.drop_table("mint_leases")
    with op.batch_alter_table("credentials", schema=None) as batch_op:
        batch_op.drop_index("ix_credentials_next_attempt")
        batch_op.drop_column("next_attempt_at")
