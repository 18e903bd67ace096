"""Real processes, real faults: a worker killed between mint and record, a sweep
during a storm of mints, a flushed broker, an unreachable backend during a revoke,
and the ledger going away under a stream of events.

The faults happen to another installation (its own ledger database, queues,
API and worker processes) sharing PostgreSQL, Redis and OpenBao with the
session's, so nothing here can disturb the rest of the suite.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import hvac
import psycopg
import pytest
import redis

from tests.support.api import auth, credentials_of, event, started, states, task_path, unique
from tests.support.isolated import (
    PROXIED,
    TcpProxy,
    create_ledger,
    drop_ledger,
    flush_broker,
    installation_of,
    island_env,
    remove_installation_objects,
    sql_rows,
    vault_admin,
    write_profiles,
)
from tests.support.procs import signal_group, start_api, start_worker, stop_process, wait_until
from tests.support.world import DATA_DB, HOME, REDIS_URL, ROOT

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

POSTGRES = ("reports-readonly", "short-lived", "db-proxied")


@dataclass
class Island:
    """Another installation: its ledger, its queues, its keys."""

    db: str
    url: str  # the ledger, directly
    inst: str
    env: dict[str, str]
    backend_proxy: TcpProxy  # in front of PostgreSQL for the db-proxied profile
    ledger_proxy: TcpProxy  # in front of PostgreSQL for the ledger, when a test wants it
    emitter: str = ""
    admin: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def log(self, name: str) -> Path:
        return HOME / f"island-{name}-{uuid.uuid4().hex[:6]}.log"

    def api(self, env: dict[str, str] | None = None) -> str:
        proc, url = start_api(self.log("api"), env or self.env, group=True)
        self.procs.append(proc)
        return url

    def worker(
        self, concurrency: int = 2, env: dict[str, str] | None = None, beat: bool = False
    ) -> subprocess.Popen[bytes]:
        args = ["--concurrency", str(concurrency), *(["--beat"] if beat else [])]
        # In a process group of its own, so a kill takes its pool too.
        proc = start_worker(self.log("worker"), *args, env=env or self.env, group=True)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        while self.procs:
            stop_process(self.procs.pop())

    def rows(self, task: str) -> list[dict[str, Any]]:
        rows = sql_rows(
            self.url,
            "SELECT c.id, c.grant, c.profile, c.state, c.backend_name, c.backend_ref, "
            "c.attempts, c.last_error, c.revoke_reason FROM credentials c "
            "JOIN tasks t ON t.id = c.task_id WHERE t.tenant = 't1' AND t.name = %s",
            task,
        )
        keys = (
            "id",
            "grant",
            "profile",
            "state",
            "backend_name",
            "backend_ref",
            "attempts",
            "last_error",
            "revoke_reason",
        )
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def states(self, task: str) -> dict[str, str]:
        return {r["grant"]: r["state"] for r in self.rows(task)}

    def age(self, minutes: int = 10) -> int:
        """Let time pass for whatever is pending or revoking (the re-drive's threshold)."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(
                "UPDATE credentials SET updated_at = updated_at - make_interval(mins => %s) "
                "WHERE state IN ('pending', 'revoking')",
                (minutes,),
            ).rowcount


@pytest.fixture(scope="module")
def island() -> Iterator[Island]:
    from app.api.auth import create_key
    from app.core.models import Role

    backend_proxy = TcpProxy(5432).start()
    ledger_proxy = TcpProxy(5432).start()
    db, url = create_ledger("isl")
    inst = installation_of(url)
    profiles = write_profiles(
        HOME / "profiles-island.toml", PROXIED.format(port=backend_proxy.port, data_db=DATA_DB)
    )
    env = island_env(
        "isl", url, profiles, LEASEHOLD_REVOKE_ALERT_AFTER="2", LEASEHOLD_BACKEND_TIMEOUT="2"
    )
    isl = Island(db, url, inst, env, backend_proxy, ledger_proxy)
    from sqlmodel import Session

    from app.core.db import get_engine

    with Session(get_engine("postgresql+psycopg" + url[len("postgresql") :])) as session:
        isl.emitter = create_key(session, name="emitter", role=Role.emitter, tenant="t1")[1]
        isl.admin = create_key(session, name="admin", role=Role.admin, tenant=None)[1]
        session.commit()
    try:
        yield isl
    finally:
        isl.stop_all()
        backend_proxy.stop()
        ledger_proxy.stop()
        flush_broker(env["LEASEHOLD_BROKER_KEY_PREFIX"])
        drop_ledger(db)
        remove_installation_objects(inst)


@pytest.fixture
def fresh(island: Island) -> Iterator[Island]:
    """Each test starts its own processes; none survive it."""
    try:
        yield island
    finally:
        island.stop_all()
        island.backend_proxy.stop()
        island.backend_proxy.start()
        island.ledger_proxy.stop()
        island.ledger_proxy.start()


# --- backends, as a user would check them ----------------------------------------------


def role_exists(name: str) -> bool:
    return bool(
        sql_rows(
            "postgresql://postgres@127.0.0.1:5432/postgres",
            "SELECT 1 FROM pg_roles WHERE rolname = %s",
            name,
        )
    )


def token_exists(accessor: str) -> bool:
    try:
        vault_admin().auth.token.lookup_accessor(accessor)
    except hvac.exceptions.InvalidRequest:  # invalid accessor
        return False
    return True


def user_exists(name: str) -> bool:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return client.execute_command("ACL", "GETUSER", name) is not None
    finally:
        client.close()


def object_exists(row: dict[str, Any]) -> bool:
    ref = row["backend_ref"] or row["backend_name"]
    if row["profile"] in POSTGRES:
        return role_exists(ref)
    if row["profile"] == "task-cache":
        return user_exists(ref)
    return row["backend_ref"] is not None and token_exists(ref)


def tokens_of(inst: str, cred_id: str) -> list[str]:
    client = vault_admin()
    found = []
    for accessor in client.auth.token.list_accessors()["data"]["keys"]:
        try:
            meta = client.auth.token.lookup_accessor(accessor)["data"].get("meta") or {}
        except hvac.exceptions.InvalidRequest:  # revoked meanwhile
            meta = {}
        if meta.get("leasehold") == inst and meta.get("credential") == cred_id:
            found.append(accessor)
    return found


def post(url: str, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/v1/events", json=body, headers=auth(key), timeout=15)


def sweep(island: Island, url: str) -> dict[str, Any]:
    answer = httpx.post(f"{url}/v1/sweeps", headers=auth(island.admin), timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def quiet(island: Island, seconds: float = 1.5, timeout: float = 30) -> None:
    """Wait until the ledger's credentials stop changing."""

    def snapshot() -> list[tuple[Any, ...]]:
        return sql_rows(island.url, "SELECT id, state, attempts FROM credentials ORDER BY id")

    end = time.monotonic() + timeout
    last, since = snapshot(), time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.25)
        now = snapshot()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            return
    raise AssertionError("the ledger did not settle")


def converged(island: Island, ended: list[str], running: list[str]) -> bool:
    for task in ended:
        rows = island.rows(task)
        if any(r["state"] != "revoked" or object_exists(r) for r in rows):
            return False
    for task in running:
        rows = island.rows(task)
        if not rows or any(r["state"] != "active" or not object_exists(r) for r in rows):
            return False
    return True


# --- the tests ----------------------------------------------------------------------------


def test_worker_killed_between_mint_and_record(
    fresh: Island, app_client: Any, keys: dict[str, str]
) -> None:
    island = fresh
    url = island.api()
    # The session's installation shares PostgreSQL and OpenBao: its running task's
    # credentials must survive this installation's reconciliation.
    neighbour = unique("neighbour")
    answer = app_client.post(
        "/v1/events",
        headers=auth(keys["emitter"]),
        json=started(neighbour, {"db": "reports-readonly", "kv": "kv-reader"}),
    )
    assert answer.status_code == 202
    wait_until(lambda: states("t1", neighbour) == {"db": "active", "kv": "active"})
    theirs = {c.grant: c.backend_ref for c in credentials_of("t1", neighbour)}

    task = f"crash/{uuid.uuid4().hex[:8]}"
    grants = {"db": "reports-readonly", "kv": "kv-reader"}
    assert post(url, island.emitter, started(task, grants)).status_code == 202
    rows = {r["grant"]: r for r in island.rows(task)}
    ids = [r["id"] for r in rows.values()]
    with psycopg.connect(island.url) as lock:
        # Hold the rows: each mint reaches its backend, then blocks recording the result.
        lock.execute("SELECT id FROM credentials WHERE id = ANY(%s) FOR UPDATE", (ids,))
        worker = island.worker(concurrency=2)
        wait_until(
            lambda: (
                sql_rows(
                    island.url,
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                    "AND wait_event_type = 'Lock'",
                    island.db,
                )[0][0]
                >= 2
            ),
            timeout=20,
        )
        assert role_exists(rows["db"]["backend_name"])
        orphan_tokens = tokens_of(island.inst, rows["kv"]["id"])
        assert len(orphan_tokens) == 1
        signal_group(worker, signal.SIGKILL)
        worker.wait(10)
        lock.rollback()
    assert island.states(task) == {"db": "pending", "kv": "pending"}

    # Later (past the grace for in-flight mints) the reconciliation runs.
    island.age()
    report = sweep(island, url)
    assert report["orphans_revoked"] == 2 and report["errors"] == 0, report
    found = {o["credential"]: o["why"] for o in report["detail"]["orphans"]}
    assert found == {i: "minted but never recorded" for i in ids}
    assert report["redriven"] == 2  # and their mints are enqueued again
    assert not role_exists(rows["db"]["backend_name"])
    assert not token_exists(orphan_tokens[0])
    # The other installation's credentials are untouched.
    assert role_exists(theirs["db"]) and token_exists(theirs["kv"])
    assert states("t1", neighbour) == {"db": "active", "kv": "active"}
    listed = httpx.get(f"{url}/v1/sweeps", headers=auth(island.admin)).json()["items"]
    assert listed[0]["id"] == report["id"] and listed[0]["orphans_revoked"] == 2

    # A new worker mints the re-driven credentials afresh; nothing is left over.
    island.worker()
    wait_until(lambda: island.states(task) == {"db": "active", "kv": "active"}, timeout=20)
    assert all(object_exists(r) for r in island.rows(task))
    again = sweep(island, url)
    assert again["orphans_revoked"] == 0 and again["vanished"] == 0, again
    assert post(url, island.emitter, event("succeeded", task)).status_code == 202
    wait_until(lambda: converged(island, [task], []), timeout=20)
    app_client.post("/v1/events", json=event("succeeded", neighbour), headers=auth(keys["emitter"]))


def test_reconciliation_during_a_storm_of_mints_revokes_none(fresh: Island) -> None:
    island = fresh
    url = island.api()
    grants = {"db": "reports-readonly", "kv": "kv-reader"}
    blocked = f"storm/{uuid.uuid4().hex[:8]}/blocked"
    assert post(url, island.emitter, started(blocked, grants)).status_code == 202
    blocked_ids = [r["id"] for r in island.rows(blocked)]
    names = [f"storm/{uuid.uuid4().hex[:8]}/{i}" for i in range(24)]
    reports: list[dict[str, Any]] = []
    with psycopg.connect(island.url) as lock:
        # Two mints will be in flight (minted, not recorded) for as long as we like.
        lock.execute("SELECT id FROM credentials WHERE id = ANY(%s) FOR UPDATE", (blocked_ids,))
        island.worker(concurrency=4)
        done = threading.Event()

        def sweeps() -> None:
            while not done.is_set():
                reports.append(sweep(island, url))

        sweeper = threading.Thread(target=sweeps)
        sweeper.start()
        try:
            with ThreadPoolExecutor(8) as pool:
                answers = list(
                    pool.map(lambda n: post(url, island.emitter, started(n, grants)), names)
                )
            assert {a.status_code for a in answers} == {202}
            wait_until(
                lambda: all(island.states(n) == {"db": "active", "kv": "active"} for n in names),
                timeout=60,
                interval=0.2,
            )
            wait_until(lambda: role_exists(island.rows(blocked)[0]["backend_name"]), timeout=20)
            n = len(reports)
            wait_until(lambda: len(reports) >= n + 2, timeout=30)  # sweeps with the two in flight
        finally:
            done.set()
            sweeper.join(60)
        lock.rollback()
    wait_until(lambda: island.states(blocked) == {"db": "active", "kv": "active"}, timeout=20)
    reports.append(sweep(island, url))
    assert len(reports) >= 3
    for report in reports:
        assert (report["orphans_revoked"], report["vanished"], report["errors"]) == (0, 0, 0), (
            report
        )
    assert max(r["detail"].get("in_flight", 0) for r in reports) >= 2
    assert converged(island, [], [*names, blocked])

    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(lambda n: post(url, island.emitter, event("succeeded", n)), [*names, blocked])
        )
    wait_until(lambda: converged(island, [*names, blocked], []), timeout=60, interval=0.5)


def test_flushed_broker_is_redriven(fresh: Island) -> None:
    island = fresh
    url = island.api()
    worker = island.worker(concurrency=2)
    prefix = island.env["LEASEHOLD_BROKER_KEY_PREFIX"]
    grants = {"kv": "kv-reader", "cache": "task-cache"}
    first = [f"flush/{uuid.uuid4().hex[:8]}/{i}" for i in range(10)]
    for name in first:
        assert post(url, island.emitter, started(name, grants)).status_code == 202
    wait_until(
        lambda: all(island.states(n) == {"kv": "active", "cache": "active"} for n in first),
        timeout=30,
    )

    # Tasks end and start while the broker loses its queues (a Redis restart without
    # persistence): once with the worker paused, so the loss is certain, once under way.
    second = [f"flush/{uuid.uuid4().hex[:8]}/b{i}" for i in range(5)]
    third = [f"flush/{uuid.uuid4().hex[:8]}/c{i}" for i in range(3)]
    signal_group(worker, signal.SIGSTOP)
    try:
        for name in first[:5]:
            assert post(url, island.emitter, event("succeeded", name)).status_code == 202
        for name in second:
            assert post(url, island.emitter, started(name, grants)).status_code == 202
        assert flush_broker(prefix) > 0
    finally:
        signal_group(worker, signal.SIGCONT)
    for name in first[5:7]:
        assert post(url, island.emitter, event("cancelled", name)).status_code == 202
    for name in third:
        assert post(url, island.emitter, started(name, grants)).status_code == 202
    flush_broker(prefix)
    quiet(island)
    stuck = sql_rows(
        island.url, "SELECT count(*) FROM credentials WHERE state IN ('pending', 'revoking')"
    )
    assert stuck[0][0] > 0

    # The re-drive's threshold passes; `leasehold sweep` re-drives what was lost.
    island.age()
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "sweep"],
        cwd=ROOT,
        env=island.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    redriven = int(re.search(r"re-driven\s+(\d+)", done.stdout).group(1))  # type: ignore[union-attr]
    assert redriven >= stuck[0][0], done.stdout
    ended, running = first[:7], [*first[7:], *second, *third]
    wait_until(lambda: converged(island, ended, running), timeout=60, interval=0.5)

    for name in running:
        post(url, island.emitter, event("succeeded", name))
    wait_until(lambda: converged(island, [*ended, *running], []), timeout=60, interval=0.5)


def test_lost_messages_are_found_again_from_the_ledger(fresh: Island) -> None:
    """Default sweep interval, no reconciliation: a revoke whose message the broker lost
    still happens within 30 s, and a lost mint is minted."""
    island = fresh
    url = island.api()
    env = {**island.env, "LEASEHOLD_SWEEP_INTERVAL": "5", "LEASEHOLD_RECONCILE_INTERVAL": "3600"}
    worker = island.worker(env=env, beat=True)
    prefix = island.env["LEASEHOLD_BROKER_KEY_PREFIX"]
    grants = {"kv": "kv-reader", "cache": "task-cache"}
    ending, starting = f"lost/{uuid.uuid4().hex[:8]}/end", f"lost/{uuid.uuid4().hex[:8]}/start"
    assert post(url, island.emitter, started(ending, grants)).status_code == 202
    wait_until(lambda: island.states(ending) == {"kv": "active", "cache": "active"}, timeout=30)
    sweeps_before = sql_rows(island.url, "SELECT count(*) FROM sweeps")[0][0]

    # No worker holds a message in its socket while the broker loses them: the loss is
    # certain. Then a worker and beat come back.
    signal_group(worker, signal.SIGKILL)
    worker.wait(10)
    assert post(url, island.emitter, event("succeeded", ending)).status_code == 202
    ended_at = time.monotonic()
    assert post(url, island.emitter, started(starting, grants)).status_code == 202
    assert flush_broker(prefix) > 0
    island.worker(env=env, beat=True)
    wait_until(
        lambda: island.states(ending) == {"kv": "revoked", "cache": "revoked"},
        timeout=40,
        interval=0.2,
    )
    took = time.monotonic() - ended_at
    assert took <= 30, f"revoked {took:.1f}s after the terminal event"
    assert not any(object_exists(r) for r in island.rows(ending))
    wait_until(lambda: island.states(starting) == {"kv": "active", "cache": "active"}, timeout=60)
    # The reconciliation had no part in it.
    assert sql_rows(island.url, "SELECT count(*) FROM sweeps")[0][0] == sweeps_before
    assert post(url, island.emitter, event("succeeded", starting)).status_code == 202
    wait_until(lambda: converged(island, [ending, starting], []), timeout=40, interval=0.5)


def test_unreachable_backend_during_revoke(fresh: Island) -> None:
    island = fresh
    url = island.api()
    island.worker(concurrency=2)
    task = f"outage/{uuid.uuid4().hex[:8]}"
    assert post(url, island.emitter, started(task, {"db": "db-proxied"})).status_code == 202
    wait_until(lambda: island.states(task) == {"db": "active"}, timeout=20)
    role = island.rows(task)[0]["backend_ref"]

    island.backend_proxy.stop()
    try:
        assert post(url, island.emitter, event("succeeded", task)).status_code == 202
        # It keeps trying; after LEASEHOLD_REVOKE_ALERT_AFTER (2) attempts it counts as failing.
        wait_until(lambda: island.rows(task)[0]["attempts"] >= 2, timeout=40, interval=0.2)
        shown = httpx.get(f"{url}/v1/tasks/{task_path(task)}", headers=auth(island.emitter)).json()
        cred = shown["credentials"][0]
        assert cred["state"] == "revoking" and cred["attempts"] >= 2
        assert cred["last_error"].startswith("postgres revoke")
        metrics = httpx.get(f"{url}/metrics").text
        failing = re.search(r"^leasehold_failing_revocations(?:\{[^}]*\})? (\S+)$", metrics, re.M)
        assert failing and float(failing.group(1)) >= 1, metrics[:2000]
        assert role_exists(role)
    finally:
        island.backend_proxy.start()
    wait_until(lambda: island.states(task) == {"db": "revoked"}, timeout=60, interval=0.2)
    assert not role_exists(role)
    assert island.rows(task)[0]["revoke_reason"] == "succeeded"


def test_ledger_restart_under_a_stream_of_events(fresh: Island) -> None:
    island = fresh
    proxied = island.env | {
        "LEASEHOLD_DATABASE_URL": island.url.replace(":5432/", f":{island.ledger_proxy.port}/")
    }
    url = island.api(proxied)
    island.worker(concurrency=2, env=proxied)
    names = [f"ledger/{uuid.uuid4().hex[:8]}/{i}" for i in range(24)]
    acked: list[dict[str, Any]] = []
    refused: list[httpx.Response] = []
    progress = threading.Semaphore(0)

    def send(body: dict[str, Any]) -> None:
        """As an orchestrator does: again until acknowledged."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                answer = post(url, island.emitter, body)
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            if answer.status_code in (200, 202):
                acked.append(body)
                progress.release()
                return
            assert answer.status_code == 503, answer.text
            refused.append(answer)
            time.sleep(0.2)
        raise AssertionError(f"never acknowledged: {body['id']}")

    def stream() -> None:
        for i, name in enumerate(names):
            send(started(name, {"kv": "kv-reader"}))
            if i % 2:
                send(event("succeeded", name))

    streamer = threading.Thread(target=stream)
    streamer.start()
    for _ in range(6):
        assert progress.acquire(timeout=30)
    island.ledger_proxy.stop()  # the ledger goes away mid-stream
    wait_until(lambda: len(refused) >= 2, timeout=20)
    time.sleep(1)
    island.ledger_proxy.start()
    streamer.join(120)
    assert not streamer.is_alive()

    # While it was down the API answered 503 with a JSON error.
    assert all(r.json()["error"] and r.headers.get("retry-after") for r in refused)
    # Nothing acknowledged is lost.
    stored = {r[0] for r in sql_rows(island.url, "SELECT event_id FROM events")}
    assert {b["id"] for b in acked} <= stored
    # And the end state is right (past the re-drive threshold, for what was interrupted).
    quiet(island)
    island.age()
    report = sweep(island, url)
    assert report["errors"] == 0, report
    ended = [n for i, n in enumerate(names) if i % 2]
    running = [n for i, n in enumerate(names) if not i % 2]
    wait_until(lambda: converged(island, ended, running), timeout=60, interval=0.5)
    final = sweep(island, url)
    assert final["orphans_revoked"] == 0 and final["vanished"] == 0, final

    for name in running:
        post(url, island.emitter, event("succeeded", name))
    wait_until(lambda: converged(island, names, []), timeout=60, interval=0.5)
