"""No minted password, token or claim token escapes: not into logs, the events
or audit tables, the Celery messages that crossed the broker, Redis keys,
PostgreSQL's server log, or any API answer other than the claim."""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import text

from app.core.db import session_scope
from tests.support.api import (
    auth,
    claim_url,
    credentials_of,
    event,
    started,
    states,
    task_path,
    unique,
)
from tests.support.procs import wait_until
from tests.support.world import PREFIX, REDIS_URL

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")


def server_log() -> Path:
    """The running server's log file, found by asking it (any version, any layout).

    The collector's current file (pg_current_logfile), else Debian's per-cluster
    stderr file (pg_lsclusters, matched by data directory). Fails, never skips:
    a leak check that cannot read the log proves nothing.
    """
    import shutil
    import subprocess

    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres") as conn:
        row = conn.execute(
            "SELECT pg_current_logfile(), current_setting('data_directory')"
        ).fetchone()
    assert row is not None
    current, data_dir = row
    if current:
        found = Path(current) if Path(current).is_absolute() else Path(data_dir) / current
    else:
        assert shutil.which("pg_lsclusters"), "no logging collector and no pg_lsclusters"
        listing = subprocess.run(
            ["pg_lsclusters", "--no-header"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
        logs = [
            fields[6]
            for fields in (line.split() for line in listing.splitlines())
            if len(fields) >= 7 and fields[5] == data_dir
        ]
        assert logs, f"pg_lsclusters names no log file for {data_dir}"
        found = Path(logs[0])
    with found.open("rb"):  # readable, or the test fails here
        pass
    return found


class Monitor:
    """Every command the Redis server executes while it runs (broker traffic included)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._conn = redis.Redis.from_url(REDIS_URL)
        self._monitor = self._conn.monitor()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        self._ready.wait(5)
        return self

    def _run(self) -> None:
        with self._monitor as m:
            self._ready.set()
            for cmd in m.listen():
                self.lines.append(str(cmd["command"]))
                if self._stop.is_set():
                    return

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._conn.ping()  # one more command wakes the listener
        self._thread.join(5)


def _with_bodies(text_: str) -> str:
    """Celery message bodies travel base64-encoded: decode them so the search sees them."""
    bodies = re.findall(r'"body": "([A-Za-z0-9+/=]+)"', text_)
    decoded = [base64.b64decode(b).decode(errors="replace") for b in bodies]
    return text_ + "\n" + "\n".join(decoded)


def _dump(session: Any, table: str) -> str:
    rows = session.execute(text(f"SELECT * FROM {table}")).mappings().all()
    return json.dumps([dict(r) for r in rows], default=str)


def test_no_secret_escapes(
    app_client: Any, keys: dict[str, str], worker: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pg_log_file = server_log()
    pg_log_start = pg_log_file.stat().st_size
    worker_log_start = worker.stat().st_size
    name = unique("leak")
    grants = {"db": "reports-readonly", "kv": "kv-reader", "cache": "task-cache"}
    other_answers: list[str] = []
    with Monitor() as monitor:
        start = app_client.post(
            "/v1/events", json=started(name, grants), headers=auth(keys["emitter"])
        )
        token = start.json()["claim_token"]
        secrets: list[str] = [token]
        role = ""
        for grant in grants:
            claimed = app_client.post(claim_url(name, grant, wait=15), headers=auth(token))
            assert claimed.status_code == 200
            secret = claimed.json()["secret"]
            secrets += [v for k, v in secret.items() if k in ("password", "token", "dsn", "url")]
            role = secret.get("username", role) if grant == "db" else role
        path = f"/v1/tasks/{task_path(name)}"
        other_answers.append(app_client.get(path, headers=auth(keys["operator"])).text)
        other_answers.append(
            app_client.get("/v1/credentials?limit=500", headers=auth(keys["operator"])).text
        )
        beat = app_client.post(
            "/v1/events",
            json=event("heartbeat", name, {"max_duration": 90}),
            headers=auth(keys["emitter"]),
        )
        other_answers.append(beat.text)
        end = app_client.post(
            "/v1/events", json=event("succeeded", name), headers=auth(keys["emitter"])
        )
        other_answers.append(end.text)
        wait_until(lambda: set(states("t1", name).values()) == {"revoked"})
        other_answers.append(app_client.get(path, headers=auth(keys["operator"])).text)
        second = app_client.post(claim_url(name, "db"), headers=auth(token))
        other_answers.append(second.text)
        other_answers.append(app_client.get("/openapi.json").text)
    assert len(secrets) == 1 + 2 + 2 + 1  # claim token, pg password+dsn, redis password+url, token

    with session_scope() as session:
        tables = {t: _dump(session, t) for t in ("events", "audit", "credentials", "tasks")}
    broker_keys = redis.Redis.from_url(REDIS_URL)
    stored = []
    for key in broker_keys.scan_iter(match=f"{PREFIX}*"):
        kind = broker_keys.type(key).decode()
        if kind == "list":
            stored += [v.decode(errors="replace") for v in broker_keys.lrange(key, 0, -1)]
        elif kind == "string":
            stored.append((broker_keys.get(key) or b"").decode(errors="replace"))
        elif kind == "hash":
            stored.append(
                json.dumps(
                    {
                        k.decode(): v.decode(errors="replace")
                        for k, v in broker_keys.hgetall(key).items()
                    }
                )
            )
    worker_log = worker.read_text()[worker_log_start:]
    with pg_log_file.open("rb") as fh:
        fh.seek(pg_log_start)
        pg_log = fh.read().decode(errors="replace")

    places = {
        "api logs": caplog.text,
        "worker log": worker_log,
        "broker traffic": _with_bodies("\n".join(monitor.lines)),
        "redis keys": _with_bodies("\n".join(stored)),
        "postgres server log": pg_log,
        "other api answers": "\n".join(other_answers),
        **{f"table {t}": dump for t, dump in tables.items()},
    }
    # The checks see real traffic: the mint and the revoke crossed the broker, and
    # the role's DDL reached the server log.
    assert "workers.mint.mint_credential" in places["broker traffic"]
    assert "workers.revoke.revoke_credential" in places["broker traffic"]
    cred_ids = {c.id for c in credentials_of("t1", name)}
    assert all(i in places["broker traffic"] for i in cred_ids)  # decoded bodies: ids only
    assert role and role in pg_log, "statement logging is not on; the check would be empty"
    for secret in secrets:
        for place, content in places.items():
            assert secret not in content, f"a secret leaked into {place}"
