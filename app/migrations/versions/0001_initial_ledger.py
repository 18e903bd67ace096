"""initial ledger

Revision ID: 0001
Revises:
Create Date: 2026-11-28 12:51:46.669132
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
import sqlmodel
from alembic import op

from app.core.models import UTCDateTime
from app.core.settings import get_settings

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("role", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("tenant", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("key_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "audit",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("tenant", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("actor", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("action", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("task_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
        sa.Column("credential_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
        sa.Column("reason", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit", schema=None) as batch_op:
        batch_op.create_index("ix_audit_credential", ["credential_id"], unique=False)
        batch_op.create_index("ix_audit_task", ["task_id"], unique=False)

    op.create_table(
        "events",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("tenant", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("source", sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
        sa.Column("event_id", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.Column("type", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("subject", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.Column("body_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("key_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("time", UTCDateTime(timezone=True), nullable=True),
        sa.Column("received_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant", "source", "event_id", name="uq_events_key"),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index("ix_events_received", ["received_at"], unique=False)

    op.create_table(
        "installation",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("label", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "tasks",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("tenant", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
        sa.Column("owner_key_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("source", sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
        sa.Column("workload", sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True),
        sa.Column("parent_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("state", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("max_ttl", sa.Integer(), nullable=True),
        sa.Column("started_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("deadline", UTCDateTime(timezone=True), nullable=True),
        sa.Column("ended_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant", "name", name="uq_tasks_tenant_name"),
    )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.create_index("ix_tasks_parent", ["parent_id"], unique=False)
        batch_op.create_index("ix_tasks_state_deadline", ["state", "deadline"], unique=False)

    op.create_table(
        "credentials",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("tenant", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("task_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("grant", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("profile", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("issuer", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("state", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column("backend_name", sqlmodel.sql.sqltypes.AutoString(length=63), nullable=False),
        sa.Column("backend_ref", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
        sa.Column("expires_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("minted_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("claimed_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("revoke_reason", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
        sa.Column("revoke_requested_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("sealed_secret", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["tasks.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("task_id", "grant", "generation", name="uq_credentials_grant"),
    )
    with op.batch_alter_table("credentials", schema=None) as batch_op:
        batch_op.create_index("ix_credentials_state_updated", ["state", "updated_at"], unique=False)
        batch_op.create_index("ix_credentials_task", ["task_id"], unique=False)

    op.create_table(
        "sweeps",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("started_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("checked", sa.Integer(), nullable=False),
        sa.Column("orphans_revoked", sa.Integer(), nullable=False),
        sa.Column("vanished", sa.Integer(), nullable=False),
        sa.Column("rerevoked", sa.Integer(), nullable=False),
        sa.Column("redriven", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    # The installation id is made once, when the ledger is created.
    installation = sa.table(
        "installation",
        sa.column("id", sa.String),
        sa.column("label", sa.String),
        sa.column("created_at", UTCDateTime()),
    )
    op.bulk_insert(
        installation,
        [
            {
                "id": uuid.uuid4().hex,
                "label": get_settings().instance,
                "created_at": datetime.now(UTC),
            }
        ],
    )


def downgrade() -> None:
    op.drop_table("sweeps")
    with op.batch_alter_table("credentials", schema=None) as batch_op:
        batch_op.drop_index("ix_credentials_task")
        batch_op.drop_index("ix_credentials_state_updated")

    op.drop_table("credentials")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tasks_state_deadline")
        batch_op.drop_index("ix_tasks_parent")

    op.drop_table("tasks")
    op.drop_table("installation")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_received")

    op.drop_table("events")
    with op.batch_alter_table("audit", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_task")
        batch_op.drop_index("ix_audit_credential")

    op.drop_table("audit")
    op.drop_table("api_keys")
