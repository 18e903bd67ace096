"""The test run's own world: a ledger database, a data database, a Redis key
prefix, an OpenBao dev server and a profiles file.

Everything is named with a random run id and removed at the end, so runs never
see each other's data. The names and the environment are fixed at import (cheap;
module-level code may read them); the services start only when a test asks for
them (`start()`, through the `services` fixture), so pure tests need neither
PostgreSQL nor OpenBao.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

import psycopg

from tests.support.procs import free_port

RUN = secrets.token_hex(4)
HOME = Path(tempfile.mkdtemp(prefix=f"leasehold-test-{RUN}-"))
PG = "postgresql://postgres@127.0.0.1:5432"
PG_ADMIN = f"{PG}/postgres"
LEDGER_DB = f"lh_test_{RUN}"
DATA_DB = f"lh_test_{RUN}_data"
REDIS_URL = "redis://127.0.0.1:6379/0"
PREFIX = f"lhtest{RUN}:"
ROOT = Path(__file__).resolve().parent.parent.parent
PROFILES_FILE = HOME / "profiles.toml"

# On PostgreSQL < 16 pg_hba cannot match /^lh_; .ci/pg-setup.sh adds a
# scram-sha-256 line for members of leasehold_scram_login, which the test
# profiles' group roles join, so logins below really check the password.
PROFILES = """
[profiles.reports-readonly]
issuer = "postgres"
dsn = "postgresql://postgres@127.0.0.1:5432/{data_db}"
grants = ["GRANT CONNECT ON DATABASE {data_db} TO {{role}}",
          "GRANT SELECT ON reports TO {{role}}",
          "GRANT leasehold_scram_login TO {{role}}"]
max_ttl = 3600

[profiles.short-lived]
issuer = "postgres"
dsn = "postgresql://postgres@127.0.0.1:5432/{data_db}"
grants = ["GRANT CONNECT ON DATABASE {data_db} TO {{role}}",
          "GRANT leasehold_scram_login TO {{role}}"]
max_ttl = 60

[profiles.kv-reader]
issuer = "vault-token"
policies = ["reports-read"]
max_ttl = 900

[profiles.task-cache]
issuer = "redis"
url = "{redis_url}"
acl = "~task:{{task}}:* +get +set"
max_ttl = 1800

[profiles.old]
issuer = "vault-token"
policies = ["reports-read"]
max_ttl = 900
retired = true

[profiles.jwt-only]
issuer = "vault-token"
policies = ["reports-read"]
max_ttl = 900
claim = "jwt"

[profiles.approved-db]
issuer = "postgres"
dsn = "postgresql://postgres@127.0.0.1:5432/{data_db}"
grants = ["GRANT CONNECT ON DATABASE {data_db} TO {{role}}",
          "GRANT leasehold_scram_login TO {{role}}"]
max_ttl = 900
approval = true

[profiles.other-tenant-only]
issuer = "vault-token"
policies = ["reports-read"]
max_ttl = 900
tenants = ["t2"]
"""

SESSION_ENV: dict[str, str] = {}  # os.environ as configure() left it (and start() fixed it)


def admin_sql(*statements: str, dbname: str = "postgres") -> None:
    with psycopg.connect(f"{PG}/{dbname}", autocommit=True) as c:
        for sql in statements:
            c.execute(sql)  # type: ignore[arg-type]


def configure() -> None:
    """The run's LEASEHOLD_* environment, before any test module is imported.

    OpenBao's address and root token are chosen here and used by start()."""
    PROFILES_FILE.write_text(PROFILES.format(data_db=DATA_DB, redis_url=REDIS_URL))
    os.environ.update(
        {
            "LEASEHOLD_HOME": str(HOME),
            "LEASEHOLD_DATABASE_URL": f"{PG}/{LEDGER_DB}",
            "LEASEHOLD_BROKER_URL": REDIS_URL,
            "LEASEHOLD_BROKER_KEY_PREFIX": PREFIX,
            "LEASEHOLD_SECRET_KEY": secrets.token_urlsafe(32),
            "LEASEHOLD_PROFILES_FILE": str(PROFILES_FILE),
            "LEASEHOLD_VAULT_ADDR": f"http://127.0.0.1:{free_port()}",
            "LEASEHOLD_VAULT_TOKEN": f"lh-test-{secrets.token_urlsafe(24)}",
            "LEASEHOLD_SWEEP_INTERVAL": "0.5",
            # Tests run the reconciliation themselves; a scheduled one would race them.
            "LEASEHOLD_RECONCILE_INTERVAL": "3600",
            "LEASEHOLD_LOG_LEVEL": "INFO",
            # Where tests/test_proxy.py runs `leasehold proxy`; the worker names it in claims.
            "LEASEHOLD_PROXY_PUBLIC_URL": f"http://127.0.0.1:{free_port()}",
        }
    )
    from app.core.settings import get_settings

    get_settings.cache_clear()
    SESSION_ENV.clear()
    SESSION_ENV.update(os.environ)


class World:
    """The started services: OpenBao (seeded), both databases (the ledger migrated)."""

    def __init__(self) -> None:
        from app.local.openbao_dev import DevServerError, start_dev_server

        addr, token = SESSION_ENV["LEASEHOLD_VAULT_ADDR"], SESSION_ENV["LEASEHOLD_VAULT_TOKEN"]
        port = int(addr.rsplit(":", 1)[1])
        log = HOME / "openbao.log"
        try:
            self.bao: Any = start_dev_server(port=port, root_token=token, log_path=log)
        except DevServerError:  # the port chosen at configure was taken meanwhile
            self.bao = start_dev_server(root_token=token, log_path=log)
            for env in (os.environ, SESSION_ENV):
                env["LEASEHOLD_VAULT_ADDR"] = self.bao.addr
        self.installation_id = "-"  # until the ledger says; stop() needs one
        try:
            self._seed_openbao()
            self._create_databases()
            from app.core.migrate import upgrade
            from app.core.settings import get_settings

            get_settings.cache_clear()
            upgrade(_sqlalchemy_url(f"{PG}/{LEDGER_DB}"))
            with psycopg.connect(f"{PG}/{LEDGER_DB}") as conn:
                row = conn.execute("SELECT id FROM installation").fetchone()
            assert row is not None
            self.installation_id = str(row[0])
        except BaseException:
            self.stop()  # a half-made world leaves nothing behind
            raise

    def _seed_openbao(self) -> None:
        import hvac

        client = hvac.Client(url=self.bao.addr, token=self.bao.token, timeout=5)
        client.sys.create_or_update_policy(
            "reports-read", 'path "secret/data/reports/*" { capabilities = ["read"] }'
        )
        client.secrets.kv.v2.create_or_update_secret(path="reports/q3", secret={"total": "42"})

    @staticmethod
    def _create_databases() -> None:
        admin_sql(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = "
            "'leasehold_scram_login') THEN CREATE ROLE leasehold_scram_login NOLOGIN; END IF; "
            "END $$",
            f"CREATE DATABASE {LEDGER_DB}",
            f"CREATE DATABASE {DATA_DB}",
            # Every statement on the data database reaches the server log, so the leak
            # check can show that role DDL carries no plaintext password.
            f"ALTER DATABASE {DATA_DB} SET log_statement = 'all'",
        )
        admin_sql(
            "CREATE TABLE reports (id int, title text)",
            "INSERT INTO reports VALUES (1, 'q3')",
            "CREATE TABLE payroll (id int, amount int)",
            "REVOKE ALL ON DATABASE " + DATA_DB + " FROM PUBLIC",
            dbname=DATA_DB,
        )

    def stop(self) -> None:
        """Remove everything the run made: databases, its roles, keys and ACL users."""
        from app.core.db import dispose_engines
        from app.issuers import close_all

        close_all()
        dispose_engines()
        self.bao.stop()
        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            for db in (LEDGER_DB, DATA_DB):
                c.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (db,),
                )
                c.execute(f"DROP DATABASE IF EXISTS {db}")  # type: ignore[arg-type]
            # Roles minted by this run (its installation's mark), then its group roles.
            rows = c.execute(
                "SELECT rolname FROM pg_roles WHERE rolname LIKE 'lh_%%' AND "
                "shobj_description(oid, 'pg_authid') LIKE %s ORDER BY rolcanlogin DESC",
                (f"%installation={self.installation_id}%",),
            ).fetchall()
            for (role,) in rows:
                c.execute(f'DROP ROLE IF EXISTS "{role}"')  # type: ignore[arg-type]
        import redis

        r = redis.Redis.from_url(REDIS_URL)
        for key in r.scan_iter(match=f"{PREFIX}*"):
            r.delete(key)
        inst = self.installation_id.replace("-", "")[:12]
        for user in r.acl_users():
            if user.startswith(f"lh_{inst}_"):
                r.acl_deluser(user)
        r.close()


def _sqlalchemy_url(url: str) -> str:
    return "postgresql+psycopg" + url[len("postgresql") :]
