"""Apply the Alembic migrations (`leasehold db upgrade`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from app.core.settings import get_settings

MIGRATIONS = Path(__file__).parent.parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # Alembic's config is a ConfigParser: a percent-encoded password ("%40") would be
    # read as interpolation, so every "%" is doubled; get_main_option undoes it.
    cfg.set_main_option("sqlalchemy.url", (url or get_settings().sqlalchemy_url).replace("%", "%%"))
    return cfg


def upgrade(url: str | None = None) -> None:
    command.upgrade(alembic_config(url), "head")
