"""leasehold_client.celery in a team's own Celery app (tests/celery_client_app.py, Redis
database 5, its own key prefix) with real workers (solo, then threads) against a real
`leasehold api`: each attempt is a task whose credential works inside and is revoked
with the attempt's fate, and a broker tap never sees a secret."""

from __future__ import annotations

import base64
import binascii
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from leasehold_client import Client

from tests.support.api import credentials_of
from tests.support.client import leasehold_api
from tests.support.procs import stop_process, wait_for_line, wait_until
from tests.support.world import HOME, ROOT, RUN

PREFIX = f"lhclient{RUN}:"
os.environ["CLIENT_APP_PREFIX"] = PREFIX  # read when the app module is imported below
from tests import celery_client_app as capp  # noqa: E402

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

SEEN = HOME / "celery-client-seen.txt"


@pytest.fixture(scope="module")
def api_url(worker: Path) -> Iterator[str]:
    with leasehold_api() as url:
        yield url


@pytest.fixture(scope="module")
def tap() -> Iterator[Path]:
    """Everything Redis is told while the app runs (MONITOR: every database)."""
    out = HOME / "celery-client-monitor.txt"
    proc = subprocess.Popen(
        ["redis-cli", "-h", "127.0.0.1", "monitor"], stdout=out.open("wb"), stderr=subprocess.STDOUT
    )
    yield out
    stop_process(proc)
    r = redis.Redis.from_url(capp.BROKER)
    for key in r.scan_iter(match=f"{PREFIX}*"):
        r.delete(key)


def start_app_worker(api_url: str, emitter: str, name: str, *args: str) -> subprocess.Popen[bytes]:
    log = HOME / f"celery-client-{name}.log"
    since = log.stat().st_size if log.exists() else 0
    env = {
        **os.environ,
        "LEASEHOLD_URL": api_url,
        "LEASEHOLD_KEY": emitter,
        "CLIENT_APP_SEEN": str(SEEN),
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.celery_client_app",
            "worker",
            "-n",
            f"{name}-{RUN}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            "INFO",
            *args,
        ],
        cwd=ROOT,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    wait_for_line(proc, log, "ready.", since=since)
    return proc


@pytest.fixture(scope="module")
def solo(api_url: str, keys: dict[str, str], tap: Path) -> Iterator[None]:
    proc = start_app_worker(api_url, keys["emitter"], "solo", "--pool", "solo", "-Q", "reports")
    yield
    stop_process(proc)


def attempt(task: object, celery_id: str, n: int) -> str:
    return f"reports/{task.name}/{celery_id}/try-{n}"  # type: ignore[attr-defined]


def revoked_as(task: str, reason: str) -> None:
    """Wait for the attempt's one credential to be revoked; its username."""

    def done() -> bool:
        creds = credentials_of("t1", task)
        return len(creds) == 1 and creds[0].state == "revoked"

    wait_until(done, timeout=20)
    (cred,) = credentials_of("t1", task)
    assert cred.revoke_reason == reason


def role_exists(username: str) -> bool:
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres") as conn:
        row = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (username,)).fetchone()
    return row is not None


def test_a_task_reads_through_its_credential_which_is_gone_after(solo: None) -> None:
    result = capp.read_report.delay()
    answer = result.get(timeout=60)
    assert answer["title"] == "q3"  # logged in with the credential, inside the task
    revoked_as(attempt(capp.read_report, result.id, 1), "succeeded")
    assert not role_exists(answer["user"])


def test_a_failing_task_credential_is_revoked_failed(solo: None) -> None:
    result = capp.broken_report.delay()
    with pytest.raises(ValueError, match="broken"):
        result.get(timeout=60)
    revoked_as(attempt(capp.broken_report, result.id, 1), "failed")


def test_each_retry_is_a_new_task_with_a_fresh_credential(solo: None) -> None:
    result = capp.flaky_report.delay()
    answer = result.get(timeout=60)
    assert answer["title"] == "q3"
    first = credentials_of("t1", attempt(capp.flaky_report, result.id, 1))
    second = credentials_of("t1", attempt(capp.flaky_report, result.id, 2))
    assert len(first) == 1 and len(second) == 1 and first[0].id != second[0].id
    revoked_as(attempt(capp.flaky_report, result.id, 1), "failed")
    revoked_as(attempt(capp.flaky_report, result.id, 2), "succeeded")
    assert not role_exists(answer["user"])


def test_threads_pool_keeps_each_execution_own_credentials(
    api_url: str, keys: dict[str, str], tap: Path
) -> None:
    proc = start_app_worker(
        api_url, keys["emitter"], "threads", "--pool", "threads", "-c", "3", "-Q", "threads"
    )
    try:
        results = [capp.read_report.apply_async(queue="threads") for _ in range(3)]
        answers = [r.get(timeout=60) for r in results]
    finally:
        stop_process(proc)
    assert {a["title"] for a in answers} == {"q3"}
    assert len({a["user"] for a in answers}) == 3  # no execution saw another's credential
    for r in results:
        revoked_as(attempt(capp.read_report, r.id, 1), "succeeded")


def test_a_redelivered_attempt_recovers_its_claimed_credential_by_rotation(
    api_url: str, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first delivery started the attempt and claimed its credential, then its
    # worker died (no end sent). The same message runs again, in this process.
    celery_id = str(uuid.uuid4())
    name = attempt(capp.read_report, celery_id, 1)
    with Client(api_url, keys["emitter"], source="celery://reports") as lh:
        token = lh.started(name, grants={"db": "reports-readonly"}, max_duration=300).claim_token
        assert token
        lost = lh.claim(name, "db", token, wait=15)["secret"]["username"]
    monkeypatch.setenv("LEASEHOLD_URL", api_url)
    monkeypatch.setenv("LEASEHOLD_KEY", keys["emitter"])
    capp.app._leasehold._clients = {}  # type: ignore[attr-defined]
    try:
        answer = capp.read_report.apply(task_id=celery_id).get(timeout=60)
    finally:
        capp.app._leasehold._clients = {}  # type: ignore[attr-defined]
    assert answer["title"] == "q3" and answer["user"] != lost
    wait_until(lambda: not role_exists(lost), timeout=20)
    reasons = sorted(c.revoke_reason or "" for c in credentials_of("t1", name))
    assert "rotated" in reasons


def _decoded(text: str) -> str:
    """The tap's text plus every base64 run decoded (kombu sends bodies base64)."""
    found = [text]
    for run in re.findall(r"[A-Za-z0-9+/]{16,}={0,2}", text):
        try:
            found.append(base64.b64decode(run + "=" * (-len(run) % 4)).decode("utf-8", "replace"))
        except (binascii.Error, ValueError):
            continue
    return "\n".join(found)


def test_zz_broker_tap_never_sees_a_secret(solo: None, tap: Path) -> None:
    """Runs last in this module: everything above went over the tapped Redis."""
    passwords = [p for p in SEEN.read_text().split() if p]
    assert len(passwords) >= 5
    seen = _decoded(tap.read_bytes().decode("utf-8", "replace"))
    assert "read_report" in seen and PREFIX in seen  # the tap saw the app's messages
    for password in passwords:
        assert password not in seen
