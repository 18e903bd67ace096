"""Full lifecycle per issuer, through the real API, worker, broker and backends:
start -> active -> claim -> the credential works -> end -> revoked, refused, cut off."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import hvac
import psycopg
import pytest
import redis

from tests.support.api import auth, claim_url, credentials_of, event, started, states, unique
from tests.support.procs import wait_until

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

ENDINGS = ["succeeded", "failed", "cancelled", "timeout"]
REASONS = {
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
    "timeout": "timeout",
}
# A task that times out: long enough for its mint, claim and use on a loaded machine
# before the deadline ends it (the backends' own expiry is that deadline too).
TIMES_OUT_AFTER = 6
TASK_STATES = {
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
    "timeout": "timed_out",
}


def run_until_claimed(client: Any, key: str, grants: dict[str, str], max_duration: int = 60):
    name = unique("lifecycle")
    answer = client.post("/v1/events", json=started(name, grants, max_duration), headers=auth(key))
    assert answer.status_code == 202, answer.text
    token = answer.json()["claim_token"]
    secrets = {}
    for grant in grants:
        claimed = client.post(claim_url(name, grant, wait=15), headers=auth(token))
        assert claimed.status_code == 200, claimed.text
        secrets[grant] = claimed.json()
    return name, token, secrets


def end(client: Any, key: str, name: str, ending: str) -> None:
    if ending == "timeout":
        return  # the deadline sweep ends it
    answer = client.post("/v1/events", json=event(ending, name), headers=auth(key))
    assert answer.status_code == 202, answer.text
    assert answer.json()["task"]["state"] == ending


def assert_revoked(client: Any, key: str, name: str, ending: str) -> None:
    wait_until(lambda: set(states("t1", name).values()) == {"revoked"}, timeout=20)
    task = client.get(f"/v1/tasks/{name.replace('/', '%2F')}", headers=auth(key)).json()
    assert task["state"] == TASK_STATES[ending]
    assert {c["revoke_reason"] for c in task["credentials"]} == {REASONS[ending]}
    assert all(c["claimed_at"] for c in task["credentials"])
    # The secret is destroyed once claimed or revoked.
    assert all(c.sealed_secret is None for c in credentials_of("t1", name))


@pytest.mark.parametrize("ending", ENDINGS)
def test_postgres_lifecycle(
    app_client: Any, keys: dict[str, str], data_db: str, ending: str
) -> None:
    duration = TIMES_OUT_AFTER if ending == "timeout" else 60
    name, _, secrets = run_until_claimed(
        app_client, keys["emitter"], {"db": "reports-readonly"}, duration
    )
    secret = secrets["db"]["secret"]
    assert secrets["db"]["issuer"] == "postgres"
    assert secret["username"].startswith("lh_")
    dsn = f"host=127.0.0.1 port=5432 dbname={data_db} user={secret['username']}"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(dsn, password="not-the-password", connect_timeout=5)
    session = psycopg.connect(dsn, password=secret["password"], autocommit=True, connect_timeout=5)
    assert session.execute("SELECT title FROM reports").fetchall() == [("q3",)]
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        session.execute("SELECT * FROM payroll")
    # The DSN handed out works as given.
    with psycopg.connect(secret["dsn"], connect_timeout=5) as c2:
        assert c2.execute("SELECT current_user").fetchone() == (secret["username"],)

    end(app_client, keys["emitter"], name, ending)
    assert_revoked(app_client, keys["emitter"], name, ending)
    with pytest.raises(psycopg.OperationalError):  # the open session was cut off
        session.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):  # and no new login
        psycopg.connect(dsn, password=secret["password"], connect_timeout=5)


@pytest.mark.parametrize("ending", ENDINGS)
def test_vault_token_lifecycle(app_client: Any, keys: dict[str, str], ending: str) -> None:
    from app.core.settings import get_settings

    addr = get_settings().vault_addr
    duration = TIMES_OUT_AFTER if ending == "timeout" else 60
    name, _, secrets = run_until_claimed(app_client, keys["emitter"], {"kv": "kv-reader"}, duration)
    token = secrets["kv"]["secret"]["token"]
    client = hvac.Client(url=addr, token=token, timeout=5)
    admin = hvac.Client(url=addr, token=get_settings().vault_token.get_secret_value(), timeout=5)
    me = admin.auth.token.lookup(token)["data"]
    assert me["policies"] == ["reports-read"]  # no implicit default policy
    assert me["ttl"] <= duration  # never past the deadline
    assert me["explicit_max_ttl"] == 900  # the profile's max_ttl
    read = client.secrets.kv.v2.read_secret_version(
        path="reports/q3", raise_on_deleted_version=True
    )
    assert read["data"]["data"] == {"total": "42"}

    end(app_client, keys["emitter"], name, ending)
    assert_revoked(app_client, keys["emitter"], name, ending)
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.kv.v2.read_secret_version(path="reports/q3", raise_on_deleted_version=True)
    with pytest.raises(hvac.exceptions.Forbidden):
        admin.auth.token.lookup(token)


@pytest.mark.parametrize("ending", ["succeeded", "timeout"])
def test_redis_lifecycle(app_client: Any, keys: dict[str, str], ending: str) -> None:
    duration = TIMES_OUT_AFTER if ending == "timeout" else 60
    name, _, secrets = run_until_claimed(
        app_client, keys["emitter"], {"cache": "task-cache"}, duration
    )
    secret = secrets["cache"]["secret"]
    client = redis.Redis.from_url(secret["url"], socket_timeout=5, decode_responses=True)
    own = f"task:{secret['key_prefix']}:x"
    client.set(own, "1")
    assert client.get(own) == "1"
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.get("someone-else")
    blocked: list[BaseException] = []
    listener = threading.Thread(target=_block_forever, args=(secret["url"], blocked))
    listener.start()
    end(app_client, keys["emitter"], name, ending)
    assert_revoked(app_client, keys["emitter"], name, ending)
    listener.join(10)
    assert blocked, "an open connection of the revoked user was not killed"
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(secret["url"], socket_timeout=5).ping()
    redis.Redis.from_url("redis://127.0.0.1:6379/0").delete(own)


def _block_forever(url: str, seen: list[BaseException]) -> None:
    conn = redis.Redis.from_url(url, socket_timeout=15)
    try:
        conn.execute_command("PING")
        while True:
            conn.execute_command("PING")
    except (redis.ConnectionError, redis.AuthenticationError, redis.ResponseError) as exc:
        seen.append(exc)


def test_many_tasks_same_profile_at_once(app_client: Any, keys: dict[str, str]) -> None:
    """Concurrent mints and revokes of one profile on two worker processes: none lost."""
    names = [unique("storm") for _ in range(24)]

    def fire(build: Callable[[str], dict]) -> None:
        errors: list[str] = []

        def post(n: str) -> None:
            r = app_client.post("/v1/events", json=build(n), headers=auth(keys["emitter"]))
            if r.status_code != 202:
                errors.append(r.text)

        threads = [threading.Thread(target=post, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors

    fire(lambda n: started(n, {"db": "reports-readonly"}))
    wait_until(lambda: all(states("t1", n) == {"db": "active"} for n in names), timeout=30)
    fire(lambda n: event("succeeded", n))
    wait_until(lambda: all(states("t1", n) == {"db": "revoked"} for n in names), timeout=30)
    creds = [c for n in names for c in credentials_of("t1", n)]
    assert len(creds) == len(names)
    assert not [c.last_error for c in creds if c.last_error]
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres") as c:
        left = c.execute(
            "SELECT count(*) FROM pg_roles WHERE rolname = ANY(%s)",
            ([cr.backend_name for cr in creds],),
        ).fetchone()
    assert left == (0,)
