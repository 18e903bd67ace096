"""The test run's own world: a ledger database, a data database, a Redis key
prefix, an OpenBao dev server, a profiles file and a real Celery worker.

Everything is named with a random run id and removed at the end, so runs
never see each other's data.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

RUN = secrets.token_hex(4)
HOME = Path(tempfile.mkdtemp(prefix=f"leasehold-test-{RUN}-"))
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
LEDGER_DB = f"lh_test_{RUN}"
DATA_DB = f"lh_test_{RUN}_data"
REDIS_URL = "redis://127.0.0.1:6379/0"
PREFIX = f"lhtest{RUN}:"
ROOT = Path(__file__).resolve().parent.parent

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


def _admin_sql(*statements: str, dbname: str = "postgres") -> None:
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{dbname}", autocommit=True) as c:
        for sql in statements:
            c.execute(sql)  # type: ignore[arg-type]


_bao: Any = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pytest_configure(config: pytest.Config) -> None:
    global _bao
    if hasattr(config, "workerinput"):
        return
    from app.local.openbao_dev import start_dev_server

    _bao = start_dev_server(log_path=HOME / "openbao.log")
    import hvac

    client = hvac.Client(url=_bao.addr, token=_bao.token, timeout=5)
    client.sys.create_or_update_policy(
        "reports-read", 'path "secret/data/reports/*" { capabilities = ["read"] }'
    )
    client.secrets.kv.v2.create_or_update_secret(path="reports/q3", secret={"total": "42"})

    _admin_sql(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = "
        "'leasehold_scram_login') THEN CREATE ROLE leasehold_scram_login NOLOGIN; END IF; END $$",
        f"CREATE DATABASE {LEDGER_DB}",
        f"CREATE DATABASE {DATA_DB}",
        # Every statement on the data database reaches the server log, so the leak
        # check can show that role DDL carries no plaintext password.
        f"ALTER DATABASE {DATA_DB} SET log_statement = 'all'",
    )
    _admin_sql(
        "CREATE TABLE reports (id int, title text)",
        "INSERT INTO reports VALUES (1, 'q3')",
        "CREATE TABLE payroll (id int, amount int)",
        "REVOKE ALL ON DATABASE " + DATA_DB + " FROM PUBLIC",
        dbname=DATA_DB,
    )
    profiles = HOME / "profiles.toml"
    profiles.write_text(PROFILES.format(data_db=DATA_DB, redis_url=REDIS_URL))
    os.environ.update(
        {
            "LEASEHOLD_HOME": str(HOME),
            "LEASEHOLD_DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{LEDGER_DB}",
            "LEASEHOLD_BROKER_URL": REDIS_URL,
            "LEASEHOLD_BROKER_KEY_PREFIX": PREFIX,
            "LEASEHOLD_SECRET_KEY": secrets.token_urlsafe(32),
            "LEASEHOLD_PROFILES_FILE": str(profiles),
            "LEASEHOLD_VAULT_ADDR": _bao.addr,
            "LEASEHOLD_VAULT_TOKEN": _bao.token,
            "LEASEHOLD_SWEEP_INTERVAL": "0.5",
            # Tests run the reconciliation themselves; a scheduled one would race them.
            "LEASEHOLD_RECONCILE_INTERVAL": "3600",
            "LEASEHOLD_LOG_LEVEL": "INFO",
            # Where tests/test_proxy.py runs `leasehold proxy`; the worker names it in claims.
            "LEASEHOLD_PROXY_PUBLIC_URL": f"http://127.0.0.1:{free_port()}",
        }
    )
    from app.core.migrate import upgrade
    from app.core.settings import get_settings

    get_settings.cache_clear()
    upgrade()
    SESSION_ENV.update(os.environ)


def pytest_unconfigure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    from app.core.db import dispose_engines
    from app.issuers import close_all

    close_all()
    dispose_engines()
    if _bao is not None:
        _bao.stop()
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        prefix = "lh_"
        for db in (LEDGER_DB, DATA_DB):
            c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (db,)
            )
            c.execute(f"DROP DATABASE IF EXISTS {db}")  # type: ignore[arg-type]
        # Roles minted by this run (its installation's mark), then its group roles.
        rows = c.execute(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE %s AND "
            "shobj_description(oid, 'pg_authid') LIKE %s ORDER BY rolcanlogin DESC",
            (prefix + "%", f"%installation={INSTALLATION.get('id', '-')}%"),
        ).fetchall()
        for (role,) in rows:
            c.execute(f'DROP ROLE IF EXISTS "{role}"')  # type: ignore[arg-type]
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    for key in r.scan_iter(match=f"{PREFIX}*"):
        r.delete(key)
    inst = INSTALLATION.get("id", "-").replace("-", "")[:12]
    for user in r.acl_users():
        if user.startswith(f"lh_{inst}_"):
            r.acl_deluser(user)
    # The run's logs stay behind only when something failed, to be read.
    if getattr(config, "_leasehold_passed", False):
        shutil.rmtree(HOME, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config._leasehold_passed = exitstatus == 0  # type: ignore[attr-defined]


INSTALLATION: dict[str, str] = {}
SESSION_ENV: dict[str, str] = {}  # os.environ as pytest_configure left it


@pytest.fixture(scope="session")
def installation_id() -> str:
    # The session ledger by name: a module's private ledger may hold os.environ when a
    # session fixture is first asked for.
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{LEDGER_DB}") as conn:
        row = conn.execute("SELECT id FROM installation").fetchone()
    assert row is not None
    INSTALLATION["id"] = str(row[0])
    return INSTALLATION["id"]


@pytest.fixture(scope="session")
def data_db() -> str:
    return DATA_DB


@pytest.fixture(scope="session")
def home() -> Path:
    return HOME


def start_worker(
    name: str, log: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", *extra],
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={**(env if env is not None else os.environ)},
    )
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"worker {name} exited: {log.read_text()[-2000:]}")
        if "ready." in log.read_text():
            return proc
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"worker {name} not ready: {log.read_text()[-2000:]}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def worker(installation_id: str) -> Iterator[Path]:
    """A real Celery worker (two processes, the scheduler inside) on the real broker."""
    log = HOME / "worker.log"
    # The session's own environment, whenever this is first asked for.
    proc = start_worker("main", log, "--concurrency", "2", "--beat", env=SESSION_ENV)
    yield log
    stop_process(proc)


@pytest.fixture(scope="session")
def app_client(worker: Path) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from app.api import create_app

    with TestClient(create_app()) as client:
        yield client


@pytest.fixture(scope="session")
def keys(installation_id: str) -> dict[str, str]:
    from app.api.auth import create_key
    from app.core.db import session_scope
    from app.core.models import Role

    made: dict[str, str] = {}
    with session_scope() as session:
        for name, role, tenant in (
            ("emitter", Role.emitter, "t1"),
            ("emitter-b", Role.emitter, "t1"),
            ("operator", Role.operator, "t1"),
            ("admin", Role.admin, None),
            ("emitter-t2", Role.emitter, "t2"),
            ("operator-t2", Role.operator, "t2"),
        ):
            made[name] = create_key(session, name=f"{name}-{RUN}", role=role, tenant=tenant)[1]
    return made


def wait_until(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll until check() is truthy; fail with the last value."""
    end = time.monotonic() + timeout
    value = None
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met in {timeout}s (last: {value!r})")
