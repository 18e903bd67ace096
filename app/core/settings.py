"""One Settings object from LEASEHOLD_* environment variables.

`get_settings()` is cached; tests override by setting the environment and
calling `get_settings.cache_clear()`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, SecretStr, computed_field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_OPENBAO_FILE = "openbao-dev.json"  # address and root token of `up`'s dev server
MIN_SECRET_KEY_BYTES = 32  # production: a key an attacker cannot guess
log = logging.getLogger("leasehold")


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
    metrics_port: int | None = Field(None, ge=0, le=65535)  # a worker's own /metrics
    metrics_host: str = "127.0.0.1"
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    sentry_dsn: SecretStr | None = None
    url: str = "http://127.0.0.1:8700"
    key: SecretStr | None = None
    backend_timeout: float = Field(5.0, gt=0)  # every external call is bounded
    event_rate_limit: float | None = Field(None, gt=0)  # events per second per key; None: none
    insecure_backends: bool = False  # production accepts plain-http Vault (with a warning)
    # `leasehold proxy` (PRODUCT.md "Brokered access"): the address claims name, and bounds.
    proxy_public_url: str = "http://127.0.0.1:8701"
    proxy_max_request_bytes: int = Field(64 * 1024 * 1024, ge=0)
    proxy_max_response_bytes: int = Field(1024 * 1024 * 1024, ge=0)
    proxy_timeout: float = Field(30.0, gt=0)  # connect, each read and each write upstream
    # The audit chain's file (PRODUCT.md, "Audit export"); "" means <home>/audit.jsonl, "-" stdout.
    audit_export: str = ""

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
    def _refuse_unsafe_in_production(self) -> Settings:
        """PRODUCT.md guarantee 7: production names every unsafe setting at once,
        by its variable, never by its value (a value may be a secret)."""
        if self.env != "production":
            return self
        problems = [f"{name} ({why})" for name, why in self.production_problems()]
        if problems:
            raise ValueError("LEASEHOLD_ENV=production refuses: " + "; ".join(problems))
        return self

    def production_problems(self) -> list[tuple[str, str]]:
        """(variable, reason) for each setting production refuses; no values."""
        problems: list[tuple[str, str]] = []
        if not self.database_url:
            problems.append(("LEASEHOLD_DATABASE_URL", "unset: the embedded SQLite default"))
        elif self.is_sqlite:
            problems.append(("LEASEHOLD_DATABASE_URL", "refuses SQLite; use PostgreSQL"))
        if not self.broker_url:
            problems.append(("LEASEHOLD_BROKER_URL", "unset: the embedded filesystem broker"))
        elif not self.broker_url.startswith(("redis://", "rediss://")):
            problems.append(("LEASEHOLD_BROKER_URL", "not Redis: needs a Redis URL"))
        if self.secret_key is None:
            problems.append(("LEASEHOLD_SECRET_KEY", "unset: the generated local key"))
        else:
            keys = [k.strip() for k in self.secret_key.get_secret_value().split(",")]
            if not any(keys) or any(len(k.encode()) < MIN_SECRET_KEY_BYTES for k in keys if k):
                problems.append(
                    (
                        "LEASEHOLD_SECRET_KEY",
                        f"every key needs {MIN_SECRET_KEY_BYTES} bytes or more",
                    )
                )
        if not self.vault_addr:
            problems.append(("LEASEHOLD_VAULT_ADDR", "unset: the embedded OpenBao dev server"))
        elif self.vault_addr.lower().startswith("http://") and not self.insecure_backends:
            problems.append(
                (
                    "LEASEHOLD_VAULT_ADDR",
                    "plain http: use https, or set LEASEHOLD_INSECURE_BACKENDS=1",
                )
            )
        if self.vault_addr and self.vault_token is None and not self.vault_role_id:
            problems.append(
                ("LEASEHOLD_VAULT_TOKEN", "unset, and no LEASEHOLD_VAULT_ROLE_ID either")
            )
        if not self.policy_file.is_file():
            problems.append(("LEASEHOLD_POLICY_FILE", "no such file"))
        return problems

    def insecure_warnings(self) -> list[str]:
        """What LEASEHOLD_INSECURE_BACKENDS=1 let through (said at every start)."""
        if not self.insecure_backends or not self.vault_addr:
            return []
        if self.vault_addr.lower().startswith("http://"):
            return [
                "LEASEHOLD_VAULT_ADDR is plain http (allowed by LEASEHOLD_INSECURE_BACKENDS=1): "
                "tokens and secrets cross the network unencrypted"
            ]
        return []

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
    def audit_export_path(self) -> Path | None:
        """The audit chain's file; None when it goes to stdout (`-`)."""
        if self.audit_export == "-":
            return None
        return Path(self.audit_export) if self.audit_export else self.home / "audit.jsonl"

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
    # LEASEHOLD_SECRETS_DIR: a directory of files named like the variables
    # (`leasehold_database_url`, ...), e.g. Docker secrets; a variable still wins.
    secrets_dir = os.environ.get("LEASEHOLD_SECRETS_DIR") or None
    settings = Settings(_secrets_dir=secrets_dir)
    # Once per process, so every start of every process says it.
    for warning in settings.insecure_warnings():
        log.warning(warning)
    return settings
