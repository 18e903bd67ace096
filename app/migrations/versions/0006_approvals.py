"""credentials.approved_at: an approved grant's task keeps the deadline it was approved for

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from app.core.models import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "credentials", sa.Column("approved_at", UTCDateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("credentials", "approved_at")
