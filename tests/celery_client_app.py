"""A team's own Celery app with the Leasehold integration installed, for
tests/test_celery_integration.py: its own Redis database and key prefix.

CLIENT_APP_SEEN names a file where the tasks note the passwords they were given,
so the test's broker tap knows what must never appear (a test-only channel)."""

from __future__ import annotations

import os
from typing import Any

import psycopg
from celery import Celery, Task
from leasehold_client.celery import current_credentials, install

BROKER = "redis://127.0.0.1:6379/5"
PREFIX = os.environ.get("CLIENT_APP_PREFIX", "lhclient:")
LEASEHOLD = {"grants": {"db": "reports-readonly"}, "max_duration": 300}

app = Celery("reports", broker=BROKER, backend=BROKER)
app.conf.update(
    broker_transport_options={"global_keyprefix": PREFIX},
    result_backend_transport_options={"global_keyprefix": PREFIX},
    task_default_queue="reports",
    broker_connection_retry_on_startup=True,
)
install(app)


def _read() -> dict[str, Any]:
    secret = current_credentials()["db"]
    seen = os.environ.get("CLIENT_APP_SEEN")
    if seen:
        with open(seen, "a") as f:
            f.write(secret["password"] + "\n")
    with psycopg.connect(secret["dsn"], connect_timeout=5) as conn:
        row = conn.execute("SELECT title FROM reports").fetchone()
    return {"title": row[0] if row else None, "user": secret["username"]}


@app.task(leasehold=LEASEHOLD)
def read_report() -> dict[str, Any]:
    return _read()


@app.task(leasehold=LEASEHOLD)
def broken_report() -> None:
    _read()
    raise ValueError("the report is broken")


@app.task(bind=True, max_retries=1, leasehold=LEASEHOLD)
def flaky_report(self: Task) -> dict[str, Any]:
    read = _read()
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return read
