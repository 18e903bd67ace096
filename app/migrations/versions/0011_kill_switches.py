"""operator controls: kill switches, a task's claim-token generation (rotation), key
expiry and last use

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "kill_switches",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=True),
        sa.Column("profile", sa.String(64), nullable=True),
        sa.Column("workload", sa.String(512), nullable=True),
        sa.Column("source", sa.String(512), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("revoking", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("denied", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("lifted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lifted_by", sa.String(128), nullable=True),
    )
    op.create_index("ix_kill_switches_lifted", "kill_switches", ["lifted_at"])
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(
            sa.Column("claim_generation", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("last_used_at")
        batch.drop_column("expires_at")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("claim_generation")
    op.drop_index("ix_kill_switches_lifted", table_name="kill_switches")
    op.drop_table("kill_switches")
