"""indexes for the retention purge and the dashboard's interceptions

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_ended", "tasks", ["ended_at"])
    op.create_index("ix_audit_action_at", "audit", ["action", "at"])


def downgrade() -> None:
    op.drop_index("ix_audit_action_at", table_name="audit")
    op.drop_index("ix_tasks_ended", table_name="tasks")
