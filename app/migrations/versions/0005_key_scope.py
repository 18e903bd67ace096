"""emitter key scope: sources, workloads and profiles a key may start tasks for

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

COLUMNS = ("sources", "workloads", "profiles")


def upgrade() -> None:
    # Nullable: existing keys keep no limit.
    with op.batch_alter_table("api_keys") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
