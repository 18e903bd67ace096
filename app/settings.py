"""One Settings object from LEASEHOLD_* environment variables.

`get_settings()` is cached; tests override by setting the environment and
calling `get_settings.cache_clear()`.
"""

from __future__ import annotations

import json
import os
import secrets
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, SecretStr, computed_field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_OPENBAO_FILE = "openbao-dev.json"  # address and root token of `up`'s dev server


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LEASEHOLD_", extra="ignore")
    _embedded_vault: bool = PrivateAttr(default=False)

    env: Literal["local", "production"] = "local"
    home: Path = Path("./.leasehold")  # embedded defaults live here
    database_url: str | None = None
    broker_url: str | None = None
    broker_key_prefix: str = ""  # isolates several installations on one Redis
    profiles_file: Path = Path("./profiles.toml")
    policy_file: Path = Path("./policies.cedar")
    vault_addr: str | None = None
    vault_token: SecretStr | None = None
    vault_role_id: str | None = None
    vault_secret_id: SecretStr | None = None
    vault_timeout: float = 5.0
    secret_key: SecretStr | None = None
    sweep_interval: float = Field(5.0, gt=0)
    reconcile_interval: float = Field(60.0, gt=0)
    revoke_alert_after: int = Field(5, ge=1)
    retention_days: int = Field(30, ge=1)
    instance: str = "default"
    jwt_jwks: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # At most one JWKS fetch per this many seconds, however many unknown `kid`s arrive.
    jwt_jwks_refresh: float = Field(60.0, gt=0)
    metrics_token: SecretStr | None = None
    metrics_dir: Path | None = None  # multiprocess metrics files; default <home>/metrics
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    sentry_dsn: SecretStr | None = None
    url: str = "http://127.0.0.1:8700"
    key: SecretStr | None = None
    backend_timeout: float = Field(5.0, gt=0)  # every external call is bounded

    @model_validator(mode="after")
    def _embedded_openbao(self) -> Settings:
        """Locally, find the OpenBao dev server that `leasehold up` started, so other
        commands (`leasehold sweep`, a second worker) reach it too."""
        self._embedded_vault = False
        if self.env == "local" and self.vault_addr is None:
            try:
                found = json.loads((self.home / EMBEDDED_OPENBAO_FILE).read_text())
            except (OSError, ValueError):
                return self
            self.vault_addr, self.vault_token = found["addr"], SecretStr(found["token"])
            self._embedded_vault = True
        return self

    @property
    def embedded_vault(self) -> bool:
        """True when Vault settings came from `leasehold up`'s dev server, not the environment."""
        return self._embedded_vault

    @model_validator(mode="after")
    def _refuse_embedded_in_production(self) -> Settings:
        if self.env != "production":
            return self
        missing = [
            name
            for name, value in (
                ("LEASEHOLD_DATABASE_URL", self.database_url),
                ("LEASEHOLD_BROKER_URL", self.broker_url),
                ("LEASEHOLD_SECRET_KEY", self.secret_key),
                ("LEASEHOLD_VAULT_ADDR", self.vault_addr),
            )
            if not value
        ]
        if missing:
            raise ValueError(
                "LEASEHOLD_ENV=production refuses embedded defaults; set " + ", ".join(missing)
            )
        if self.database_url and self.database_url.startswith("sqlite"):
            raise ValueError("LEASEHOLD_ENV=production refuses SQLite; use PostgreSQL")
        if self.broker_url and not self.broker_url.startswith(("redis://", "rediss://")):
            raise ValueError("LEASEHOLD_ENV=production needs a Redis LEASEHOLD_BROKER_URL")
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def sqlalchemy_url(self) -> str:
        url = self.database_url or f"sqlite:///{(self.home / 'leasehold.db').resolve()}"
        for plain in ("postgresql://", "postgres://"):
            if url.startswith(plain):
                return "postgresql+psycopg://" + url[len(plain) :]
        return url

    @property
    def is_sqlite(self) -> bool:
        return self.sqlalchemy_url.startswith("sqlite")

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return (self.home / "broker").resolve()

    @cached_property
    def secret_keys(self) -> list[bytes]:
        """Secret keys, current first; generated once under `home` in local mode."""
        if self.secret_key is not None:
            raw = self.secret_key.get_secret_value()
        else:
            raw = _generated_secret_key(self.home)
        keys = [k.strip().encode() for k in raw.split(",") if k.strip()]
        if not keys:
            raise ValueError("LEASEHOLD_SECRET_KEY is empty")
        return keys


def _generated_secret_key(home: Path) -> str:
    path = home / "secret_key"
    if path.exists():
        return path.read_text().strip()
    home.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    # O_EXCL: two processes starting together agree on one key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    return key


@lru_cache
def get_settings() -> Settings:
    return Settings()
