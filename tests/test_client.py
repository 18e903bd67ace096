"""leasehold-client against a real `leasehold api` and worker: from a virtualenv that
holds only the client, the task block's PostgreSQL credential works inside and is
revoked when the block ends, with the block's fate; retries are counted once."""

from __future__ import annotations

import http.server
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
from leasehold_client import Client, LeaseholdError
from sqlmodel import select

from app.core.db import session_scope
from app.core.models import Event, Task
from tests.support.api import credentials_of
from tests.support.client import leasehold_api
from tests.support.procs import read_until, wait_until
from tests.support.world import HOME, ROOT, RUN

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")


@pytest.fixture(scope="module")
def api_url(worker: Path) -> Iterator[str]:
    with leasehold_api() as url:
        yield url


CONSTRAINTS = ROOT / "constraints.txt"


@pytest.fixture(scope="module")
def client_python() -> Path:
    """A virtualenv with leasehold-client installed from sdk/ (and psycopg, for the
    script to log in), none of the server's packages."""
    venv = HOME / "client-venv"
    sdk = HOME / "client-sdk"
    shutil.copytree(ROOT / "sdk", sdk, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        # The versions the rest of the suite runs with (CI's constraints), not the latest.
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "-c",
            str(CONSTRAINTS),
            str(sdk),
            "psycopg[binary]",
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    return python


def tasks_events(task: str, type_: str) -> list[Event]:
    with session_scope() as session:
        return list(session.exec(select(Event).where(Event.subject == task, Event.type == type_)))


def role_exists(username: str) -> bool:
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres") as conn:
        row = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (username,)).fetchone()
    return row is not None


def test_the_client_installs_without_the_server(client_python: Path) -> None:
    probe = (
        "import importlib.util as u, pathlib, leasehold_client as c;"
        "print([m for m in ('fastapi', 'sqlmodel', 'app', 'celery') if u.find_spec(m)]);"
        "print((pathlib.Path(c.__file__).parent / 'py.typed').exists())"
    )
    out = subprocess.run(
        [str(client_python), "-c", probe],
        cwd=HOME,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split("\n")[:2] == ["[]", "True"], out.stdout + out.stderr


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("ok", "succeeded"),
        ("raise", "failed"),
        ("sigint", "cancelled"),
        ("async-ok", "succeeded"),
        ("async-cancel", "cancelled"),
    ],
)
def test_task_block_credential_lives_as_long_as_the_block(
    client_python: Path, api_url: str, keys: dict[str, str], mode: str, reason: str
) -> None:
    task = f"client/{mode}/{RUN}/{uuid.uuid4().hex[:8]}/try-1"
    env = {"LEASEHOLD_URL": api_url, "LEASEHOLD_KEY": keys["emitter"], "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        [str(client_python), str(ROOT / "tests" / "sdk_script.py"), mode, task],
        env=env,
        cwd=HOME,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        inside = read_until(proc, "inside ")[-1].split()
        username = inside[1]
        assert inside[2] == "q3"  # the credential logged in and read, inside the block
        # The script holds the block open until told: the role is live inside it (a
        # revoke after the block's end may otherwise win the race to this check).
        assert role_exists(username)
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        if mode == "sigint":
            read_until(proc, "waiting")

            def extended() -> bool:
                with session_scope() as session:
                    t = session.exec(select(Task).where(Task.name == task)).one()
                    assert t.deadline and t.started_at
                    return t.deadline - t.started_at > timedelta(seconds=120)

            # heartbeat_every keeps the deadline max_duration ahead of now
            wait_until(extended, timeout=10, interval=0.2)
            assert len(tasks_events(task, "task.heartbeat")) >= 1
            proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)  # stdout belongs to read_until's reader
        assert proc.stderr is not None
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    expected_rc = {"raise": 1, "sigint": -signal.SIGINT}.get(mode, 0)
    assert proc.returncode == expected_rc, err
    if mode == "raise":
        assert "RuntimeError: the block failed" in err  # re-raised
    if mode == "sigint":
        assert "KeyboardInterrupt" in err

    def revoked() -> bool:
        creds = credentials_of("t1", task)
        return len(creds) == 1 and creds[0].state == "revoked"

    wait_until(revoked, timeout=15)
    (cred,) = credentials_of("t1", task)
    assert cred.revoke_reason == reason
    assert not role_exists(username)
    assert len(tasks_events(task, f"task.{reason}")) == 1


class Flaky(http.server.ThreadingHTTPServer):
    """Forwards to the real API; the requests numbered in `faults` get a fault instead:
    "lost" forwards but answers 503 (the answer was lost), "429" answers 429 at once."""

    def __init__(self, upstream: str, faults: dict[int, str]) -> None:
        self.upstream, self.faults, self.seen = upstream, faults, 0
        super().__init__(("127.0.0.1", 0), FlakyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    server: Flaky

    def do_POST(self) -> None:
        self.server.seen += 1
        fault = self.server.faults.get(self.server.seen)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if fault == "429":
            return self._answer(429, b'{"error": "slow down"}', {"Retry-After": "1"})
        answer = httpx.post(
            self.server.upstream + self.path,
            content=body,
            headers={k: v for k, v in self.headers.items() if k.lower() != "host"},
            timeout=10,
        )
        if fault == "lost":
            return self._answer(503, b'{"error": "unavailable"}', {"Retry-After": "0"})
        return self._answer(answer.status_code, answer.content, {})

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky(api_url: str) -> Iterator[Flaky]:
    server = Flaky(api_url, {})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_retries_are_one_event_and_heartbeats_are_two(flaky: Flaky, keys: dict[str, str]) -> None:
    task = f"client/retry/{RUN}/{uuid.uuid4().hex[:8]}/try-1"
    # The first call reaches the server, but its answer is lost (503): the retry is
    # the same event, a duplicate.
    flaky.faults = {1: "lost", 4: "429"}
    with Client(flaky.url, keys["emitter"], source="pytest://client-retry") as lh:
        answer = lh.started(task, grants={"db": "reports-readonly"}, max_duration=60)
        assert flaky.seen == 2
        assert answer.duplicate is True and answer.claim_token and answer.deadline
        assert len(tasks_events(task, "task.started")) == 1

        lh.heartbeat(task)
        began = time.monotonic()
        lh.heartbeat(task, max_duration=90)  # answered 429 first: waits its Retry-After
        assert time.monotonic() - began >= 1.0
        assert flaky.seen == 5
        assert len(tasks_events(task, "task.heartbeat")) == 2

        secret = lh.claim(task, "db", answer.claim_token, wait=15)["secret"]
        assert secret["username"].startswith("lh_")

        with pytest.raises(LeaseholdError) as refused:
            lh.claim(task, "db", answer.claim_token)  # a second claim
        assert refused.value.status == 410 and refused.value.state == "claimed"
        lh.succeeded(task)

    with pytest.raises(LeaseholdError) as bad:
        Client(flaky.url, keys["emitter"]).started(
            task + "-bad", grants={"db": "no-such-profile"}, max_duration=60
        )
    assert 400 <= bad.value.status < 500 and "no-such-profile" in bad.value.reason


def test_task_ids_are_one_path_segment(api_url: str, keys: dict[str, str]) -> None:
    task = f"client/odd id/{RUN}/a?b#c%2F/try-1"
    with (
        Client(api_url, keys["emitter"]) as lh,
        lh.task(task, grants={"db": "reports-readonly"}, max_duration=60) as t,
    ):
        assert t.credential("db")["username"].startswith("lh_")
    assert [c.grant for c in credentials_of("t1", task)] == ["db"]


def test_rotate_gives_a_fresh_credential(api_url: str, keys: dict[str, str]) -> None:
    task = f"client/rotate/{RUN}/{uuid.uuid4().hex[:8]}/try-1"
    with Client(api_url, keys["emitter"]) as lh:
        token = lh.started(task, grants={"db": "reports-readonly"}, max_duration=60).claim_token
        assert token
        first = lh.claim(task, "db", token, wait=15)["secret"]
        fresh = lh.rotate(task, "db")
        assert fresh != token
        with pytest.raises(LeaseholdError) as old:
            lh.claim(task, "db", token)
        assert old.value.status == 403
        second = lh.claim(task, "db", fresh, wait=15)["secret"]
        assert second["username"] != first["username"]
        lh.succeeded(task)
    reasons = sorted(c.revoke_reason or "" for c in credentials_of("t1", task))
    assert "rotated" in reasons
