"""Alembic environment: the URL and engine come from Leasehold's settings."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import app.core.models  # noqa: F401  (registers the tables)
from app.core.db import get_engine

target_metadata = SQLModel.metadata


def run_migrations_online() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    engine = get_engine(url)
    with engine.begin() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
