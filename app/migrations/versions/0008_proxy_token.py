"""credentials.token_digest: the SHA-256 of a proxy credential's token, looked up by it

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("credentials", sa.Column("token_digest", sa.String(64), nullable=True))
    # Unique, and the lookup of a token that names no credential (forward mode).
    op.create_index("ix_credentials_token_digest", "credentials", ["token_digest"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_credentials_token_digest", table_name="credentials")
    with op.batch_alter_table("credentials") as batch:
        batch.drop_column("token_digest")
