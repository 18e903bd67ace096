"""The reconciliation against real backends, in-process, on a ledger of its own:
orphans, in-flight mints, vanished and re-revoked credentials, the sweep record,
one sweep at a time, the API and the CLI, and revocation failures."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from app.core.db import session_scope
from app.core.models import AuditEntry, CredState, Sweep
from schedules.reconcile import LOCK_KEY, reconcile
from tests.support.api import auth
from tests.support.isolated import (
    PG,
    PROXIED,
    Driver,
    TcpProxy,
    credential,
    issuer,
    mint_request,
    private_ledger,
    remove_installation_objects,
)
from tests.support.procs import stop_process, wait_until
from tests.support.world import DATA_DB, LEDGER_DB, ROOT
from workers.mint import extend, mint
from workers.revoke import RevokeFailed, revoke

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")


@pytest.fixture(scope="module")
def proxy() -> Iterator[TcpProxy]:
    proxy = TcpProxy(5432).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def inst(proxy: TcpProxy) -> Iterator[str]:
    profiles = PROXIED.format(port=proxy.port, data_db=DATA_DB)
    env = {"LEASEHOLD_BACKEND_TIMEOUT": "1", "LEASEHOLD_REVOKE_ALERT_AFTER": "2"}
    with private_ledger("rec", profiles, env) as inst:
        yield inst


@pytest.fixture(scope="module")
def driver(inst: str) -> Driver:
    return Driver()


@pytest.fixture(scope="module")
def api(inst: str) -> TestClient:
    """Requests only: no lifespan, whose notification listener is one per process
    (the session's app client may hold it)."""
    from app.api import create_app

    return TestClient(create_app())


def name() -> str:
    return f"rec/{uuid.uuid4().hex[:10]}"


def audit(action: str, cred_id: str | None = None) -> list[AuditEntry]:
    with session_scope() as session:
        query = select(AuditEntry).where(AuditEntry.action == action)
        if cred_id is not None:
            query = query.where(AuditEntry.credential_id == cred_id)
        return list(session.exec(query))


def age(cred_ids: Any, column: str, minutes: int = 10) -> None:
    """Let time pass for these rows (only rows minted before a listing are judged vanished)."""
    with psycopg.connect(os.environ["LEASEHOLD_DATABASE_URL"], autocommit=True) as conn:
        conn.execute(
            f"UPDATE credentials SET {column} = {column} - make_interval(mins => %s) "
            "WHERE id = ANY(%s)",
            (minutes, list(cred_ids)),
        )


def quiet_sweep(**kw: Any) -> Any:
    """A sweep whose re-drive goes nowhere (no worker serves this ledger)."""
    with mock.patch("schedules.sweep.enqueue_mint"), mock.patch("schedules.sweep.enqueue_revoke"):
        report = reconcile(trigger="test", **kw)
    assert not report.skipped
    return report


def test_orphans_are_revoked_and_other_installations_kept(
    inst: str, api: TestClient, driver: Driver
) -> None:
    other = uuid.uuid4().hex
    lookalike = inst[:12] + uuid.uuid4().hex[12:]  # shares our 12-character role prefix
    mine, theirs = {}, []
    try:
        for profile in ("reports-readonly", "kv-reader", "task-cache"):
            cred_id = f"orphan{uuid.uuid4().hex[:10]}"
            minted = issuer(profile, inst).mint(
                mint_request(cred_id, f"lh_{inst[:12]}_{cred_id}", inst)
            )
            mine[profile] = (cred_id, minted.ref)
            for foreign in (other, lookalike):
                cid = f"foreign{uuid.uuid4().hex[:10]}"
                if profile != "reports-readonly" and foreign is lookalike:
                    continue  # redis users carry no comment: a shared prefix is one installation
                theirs.append(
                    (
                        profile,
                        foreign,
                        issuer(profile, foreign)
                        .mint(mint_request(cid, f"lh_{foreign[:12]}_{cid}", foreign))
                        .ref,
                    )
                )

        report = quiet_sweep()
        assert report.orphans_revoked == 3, report.detail
        assert report.errors == 0, report.detail
        found = {o["credential"] for o in report.detail["orphans"]}
        assert found == {cred_id for cred_id, _ in mine.values()}
        for profile, (cred_id, ref) in mine.items():
            assert not issuer(profile, inst).exists(ref), profile
            entry = audit("orphan_revoked", cred_id)
            assert entry and entry[0].reason == "orphan" and entry[0].actor == "reconcile"
        for profile, foreign, ref in theirs:
            assert issuer(profile, foreign).exists(ref), (profile, foreign)

        # Stored: GET /v1/sweeps (admin) shows it, newest first, with the contract's fields.
        listed = api.get("/v1/sweeps", headers=auth(driver.admin_secret))
        assert listed.status_code == 200
        top = listed.json()["items"][0]
        assert top["id"] == report.id and top["orphans_revoked"] == 3
        assert {
            "id",
            "started_at",
            "finished_at",
            "checked",
            "orphans_revoked",
            "vanished",
            "rerevoked",
            "redriven",
            "errors",
        } <= set(top)
        one = api.get(f"/v1/sweeps/{report.id}", headers=auth(driver.admin_secret)).json()
        assert len(one["detail"]["orphans"]) == 3

        # Level-triggered: the next sweep finds nothing left to do.
        again = quiet_sweep()
        assert again.orphans_revoked == 0 and again.errors == 0
    finally:
        remove_installation_objects(other)
        remove_installation_objects(lookalike)


def test_held_and_in_flight_are_left_alone(inst: str, driver: Driver) -> None:
    task = name()
    creds = driver.start(task, {"db": "reports-readonly", "kv": "kv-reader"})
    assert mint(creds["db"]) == "active"
    # A worker half-way: minted in the backend, not yet recorded (the row is young).
    row = credential(creds["kv"])
    in_flight = issuer("kv-reader", inst).mint(mint_request(row.id, row.backend_name, inst))

    report = quiet_sweep()
    assert report.orphans_revoked == 0 and report.vanished == 0, report.detail
    assert report.detail["in_flight"] >= 1
    assert issuer("kv-reader", inst).exists(in_flight.ref)
    assert issuer("reports-readonly", inst).exists(credential(creds["db"]).backend_ref)

    # Much later the mint has still not been recorded: its worker died. The object goes,
    # and the re-drive mints the credential again.
    with (
        mock.patch("schedules.sweep.enqueue_mint") as enqueued,
        mock.patch("schedules.sweep.enqueue_revoke"),
    ):
        late = reconcile(trigger="test", pending_grace=timedelta(0), redrive_after=timedelta(0))
    assert late.orphans_revoked == 1, late.detail
    assert late.detail["orphans"][0]["why"] == "minted but never recorded"
    assert not issuer("kv-reader", inst).exists(in_flight.ref)
    assert creds["kv"] in enqueued.call_args.args[0]
    assert mint(creds["kv"]) == "active"
    assert quiet_sweep().orphans_revoked == 0

    for cred_id in driver.end(task):
        assert revoke(cred_id) == "revoked"
    assert {c.state for c in driver.credentials(task)} == {CredState.revoked}


def test_second_token_of_a_retried_mint_is_an_orphan(inst: str, driver: Driver) -> None:
    task = name()
    cred_id = driver.start(task, {"kv": "kv-reader"})["kv"]
    row = credential(cred_id)
    # The first attempt minted and died; the retried mint made a second token.
    first = issuer("kv-reader", inst).mint(mint_request(row.id, row.backend_name, inst))
    assert mint(cred_id) == "active"
    kept = credential(cred_id).backend_ref
    assert kept != first.ref

    report = quiet_sweep()
    assert report.orphans_revoked == 1, report.detail
    assert report.detail["orphans"][0]["ref"] == first.ref
    assert not issuer("kv-reader", inst).exists(first.ref)
    assert issuer("kv-reader", inst).exists(kept)
    assert credential(cred_id).state == CredState.active
    for revoke_id in driver.end(task):
        revoke(revoke_id)


def test_vanished_is_marked_and_said(inst: str, driver: Driver) -> None:
    task = name()
    creds = driver.start(task, {"db": "reports-readonly", "cache": "task-cache"})
    for cred_id in creds.values():
        assert mint(cred_id) == "active"
    # Minted a while ago; then someone drops the role by hand. The redis user stays.
    age(creds.values(), "minted_at")
    issuer("reports-readonly", inst).revoke(credential(creds["db"]).backend_ref)

    report = quiet_sweep()
    assert report.vanished == 1 and report.orphans_revoked == 0, report.detail
    assert report.detail["vanished"][0]["credential"] == creds["db"]
    gone = credential(creds["db"])
    assert gone.state == CredState.revoked and gone.revoke_reason == "vanished"
    assert "vanished" in gone.last_error and gone.sealed_secret is None
    assert [e.reason for e in audit("vanished", creds["db"])] == ["vanished"]
    assert credential(creds["cache"]).state == CredState.active
    assert quiet_sweep().vanished == 0  # said once
    for cred_id in driver.end(task):
        revoke(cred_id)


def test_revoked_but_present_is_revoked_again(inst: str, driver: Driver) -> None:
    from app import ledger
    from app.core.models import utcnow

    task = name()
    creds = driver.start(task, {"db": "reports-readonly", "cache": "task-cache"})
    refs = {}
    for grant, cred_id in creds.items():
        mint(cred_id)
        refs[grant] = credential(cred_id).backend_ref
    # A revoke recorded but lost on its way to the backend.
    for cred_id in driver.end(task):
        with session_scope() as session:
            _, rows = ledger.take_revokes(session, cred_id, now=utcnow(), limit=1)
            assert [r.id for r in ledger.mark_revoked_many(session, rows, now=utcnow())] == [
                cred_id
            ]
    assert issuer("reports-readonly", inst).exists(refs["db"])

    report = quiet_sweep()
    assert report.rerevoked == 2 and report.orphans_revoked == 0, report.detail
    assert not issuer("reports-readonly", inst).exists(refs["db"])
    assert not issuer("task-cache", inst).exists(refs["cache"])
    assert audit("revoked_again", creds["db"])


def test_token_of_a_mint_that_died_is_found_after_the_task_ended(inst: str, driver: Driver) -> None:
    task = name()
    cred_id = driver.start(task, {"kv": "kv-reader"})["kv"]
    row = credential(cred_id)
    # The worker minted the token and died; the task ended; the revoke found no
    # accessor in the ledger and had nothing to revoke.
    token = issuer("kv-reader", inst).mint(mint_request(row.id, row.backend_name, inst))
    for revoke_id in driver.end(task):
        assert revoke(revoke_id) == "revoked"
    assert issuer("kv-reader", inst).exists(token.ref)

    report = quiet_sweep()
    assert report.orphans_revoked == 1, report.detail
    assert report.detail["orphans"][0]["why"] == "another object of a revoked credential"
    assert not issuer("kv-reader", inst).exists(token.ref)


def test_one_sweep_at_a_time(inst: str, api: TestClient, driver: Driver) -> None:
    url = os.environ["LEASEHOLD_DATABASE_URL"]
    with psycopg.connect(url, autocommit=True) as other:
        assert other.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone() == (True,)
        with session_scope() as session:
            before = len(session.exec(select(Sweep.id)).all())
        assert reconcile(trigger="test").skipped
        answer = api.post("/v1/sweeps", headers=auth(driver.admin_secret))
        assert answer.status_code == 409 and answer.json()["skipped"] is True
        with session_scope() as session:
            assert len(session.exec(select(Sweep.id)).all()) == before  # a skip stores nothing
        other.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    answer = api.post("/v1/sweeps", headers=auth(driver.admin_secret))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["finished_at"] and body["errors"] == 0
    assert body["detail"]["trigger"].startswith("api:")


def test_sweeps_are_for_admins(api: TestClient, driver: Driver) -> None:
    from app.api.auth import create_key
    from app.core.models import Role

    with session_scope() as session:
        _, operator = create_key(
            session, name=f"op-{uuid.uuid4().hex[:6]}", role=Role.operator, tenant="t1"
        )
    assert api.get("/v1/sweeps").status_code == 401
    assert api.post("/v1/sweeps").status_code == 401
    for secret in (operator,):
        assert api.get("/v1/sweeps", headers=auth(secret)).status_code == 403
        assert api.post("/v1/sweeps", headers=auth(secret)).status_code == 403
    assert api.get("/v1/sweeps/nope", headers=auth(driver.admin_secret)).status_code == 404
    page = api.get("/v1/sweeps?limit=1", headers=auth(driver.admin_secret)).json()
    assert len(page["items"]) == 1 and page["next"]
    more = api.get(
        f"/v1/sweeps?limit=1&cursor={page['next']}", headers=auth(driver.admin_secret)
    ).json()
    assert more["items"][0]["id"] < page["items"][0]["id"]


def test_lost_extend_is_redriven(inst: str, driver: Driver) -> None:
    task = name()
    cred_id = driver.start(task, {"db": "reports-readonly"}, max_duration=60)["db"]
    mint(cred_id)
    # A heartbeat moves the deadline in the ledger; its extend message is lost.
    assert driver.apply("task.heartbeat", task, {"max_duration": 3000}).to_extend == [cred_id]
    age([cred_id], "minted_at", 1)
    with mock.patch("schedules.reconcile.enqueue_extend") as extends:
        report = quiet_sweep()
    assert extends.call_args_list == [mock.call([cred_id])], report.detail
    assert extend(cred_id) == "extended"
    with mock.patch("schedules.reconcile.enqueue_extend") as extends:
        quiet_sweep()
    assert not extends.called
    for revoke_id in driver.end(task):
        revoke(revoke_id)


def test_temporary_revoke_failures_count_and_show(
    inst: str, driver: Driver, proxy: TcpProxy
) -> None:
    from app.core.settings import get_settings

    task = name()
    cred_id = driver.start(task, {"db": "db-proxied"})["db"]
    assert mint(cred_id) == "active"
    ref = credential(cred_id).backend_ref
    driver.end(task)
    proxy.stop()
    try:
        alert_after = get_settings().revoke_alert_after
        for attempt in range(1, alert_after + 1):
            with pytest.raises(RevokeFailed) as failed:
                revoke(cred_id)
            assert failed.value.attempts == attempt
    finally:
        proxy.start()
    row = credential(cred_id)
    # What the dashboard, the metrics and Sentry count as failing: still revoking, and
    # LEASEHOLD_REVOKE_ALERT_AFTER attempts or more.
    assert row.state == CredState.revoking and row.attempts == alert_after
    assert row.last_error.startswith("postgres revoke")
    assert _eventually(lambda: revoke(cred_id) == "revoked")
    assert not issuer("reports-readonly", inst).exists(ref)


def _eventually(check: Any, tries: int = 20) -> bool:
    import time

    for _ in range(tries):
        try:
            if check():
                return True
        except RevokeFailed:
            pass
        time.sleep(0.5)
    return False


def test_permanent_revoke_failure_is_recorded_not_retried(inst: str, driver: Driver) -> None:
    task = name()
    cred_id = driver.start(task, {"db": "reports-readonly"})["db"]
    mint(cred_id)
    ref = credential(cred_id).backend_ref
    # The row names an object that is not this installation's: the issuer refuses it for good.
    url = os.environ["LEASEHOLD_DATABASE_URL"]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE credentials SET backend_ref = 'lh_notours_x' WHERE id = %s", (cred_id,)
        )
    driver.end(task)
    assert revoke(cred_id) == "failed"
    row = credential(cred_id)
    assert row.state == CredState.failed and row.attempts == 1
    assert row.last_error.startswith("permanent:")
    assert audit("revoke_failed", cred_id)
    assert revoke(cred_id) == "skipped"  # not retried
    # The backend still shows the real object: the ledger holds it for no running task.
    report = quiet_sweep()
    assert any(o["ref"] == ref for o in report.detail.get("orphans", [])), report.detail
    assert not issuer("reports-readonly", inst).exists(ref)


def test_cli_sweep_prints_what_it_found(inst: str) -> None:
    cred_id = f"cli{uuid.uuid4().hex[:10]}"
    orphan = issuer("task-cache", inst).mint(
        mint_request(cred_id, f"lh_{inst[:12]}_{cred_id}", inst)
    )
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "sweep"],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "orphans revoked  1" in done.stdout, done.stdout
    assert orphan.ref in done.stdout
    assert not issuer("task-cache", inst).exists(orphan.ref)


def test_beat_runs_the_reconciliation(worker: Path, tmp_path: Path) -> None:
    """A real `leasehold beat` with a 2 s interval makes the session worker record sweeps.

    The session worker's own beat reconciles once an hour (conftest), so the
    scheduled sweeps in this window come from this beat. They land in the session
    worker's ledger, which this module's private ledger (`inst`) may be hiding from
    os.environ: both the beat and the check name the session ledger outright.
    """
    import signal

    session_ledger = f"{PG}/{LEDGER_DB}"
    with psycopg.connect(session_ledger) as conn:
        row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    since = row[0]
    log = tmp_path / "beat.log"
    env = {
        **os.environ,
        "LEASEHOLD_DATABASE_URL": session_ledger,
        "LEASEHOLD_RECONCILE_INTERVAL": "2",
        "LEASEHOLD_HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "beat"],
        cwd=tmp_path,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )

    def finished() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        with psycopg.connect(session_ledger) as conn:
            row = conn.execute(
                "SELECT count(*) FROM sweeps WHERE started_at >= %s AND finished_at IS NOT NULL"
                " AND detail::jsonb ->> 'trigger' = 'schedule'",
                (since,),
            ).fetchone()
        return bool(row and row[0] >= 2)

    try:
        wait_until(finished, timeout=60, interval=0.5)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            stop_process(proc)


# --- lost messages, leases, failures (issue 7) -------------------------------------------


def _works(issuer_kind: str, secret: dict[str, Any]) -> bool:
    """The handed-out secret still logs in."""
    import redis

    try:
        if issuer_kind == "postgres":
            with psycopg.connect(secret["dsn"], connect_timeout=5) as conn:
                conn.execute("SELECT 1")
        else:
            client = redis.Redis.from_url(secret["url"], socket_timeout=5)
            try:
                client.ping()
            finally:
                client.close()
    except (psycopg.OperationalError, redis.RedisError):
        return False
    return True


def test_a_second_mint_delivery_never_replaces_a_live_password(inst: str, driver: Driver) -> None:
    from app import ledger
    from app.core import sealing
    from app.core.models import utcnow

    task = name()
    creds = driver.start(task, {"db": "reports-readonly", "cache": "task-cache"})
    kinds = {"db": "postgres", "cache": "redis"}
    for grant, cred_id in creds.items():
        row = credential(cred_id)
        # Delivery A is minting (it holds the lease); a re-driven delivery B arrives.
        with session_scope() as session:
            assert ledger.begin_mint(session, cred_id, token="A", now=utcnow())
        assert mint(cred_id, token="B") == "busy"
        assert not issuer(row.profile, inst).exists(row.backend_name), grant  # B did nothing
        assert mint(cred_id, token="A") == "active"  # A's retry keeps its lease
        secret = sealing.unseal(credential(cred_id).sealed_secret)
        assert _works(kinds[grant], secret), grant
        # Any later delivery of the live credential leaves it alone.
        assert mint(cred_id, token="B") == "skipped"
        assert mint(cred_id) == "skipped"
        assert _works(kinds[grant], secret), grant
    for cred_id in driver.end(task):
        assert revoke(cred_id) == "revoked"


def test_an_expired_lease_lets_the_redrive_in_and_the_loser_is_not_late(
    inst: str, driver: Driver
) -> None:
    from app import ledger
    from app.core.models import utcnow
    from app.observability import metrics

    task = name()
    cred_id = driver.start(task, {"kv": "kv-reader"})["kv"]
    late = metrics.get().mints.labels("vault-token", "kv-reader", "late")
    before = late._value.get()
    real_issuer = __import__("workers.issuing", fromlist=["issuer_for"]).issuer_for

    class Racing:
        """Delivery A's issuer: while A mints, its lease runs out and B mints and records."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def mint(self, req: Any) -> Any:
            with session_scope() as session:  # A's lease, long expired
                session.execute(
                    ledger.update(ledger.MintLease)
                    .where(ledger.col(ledger.MintLease.credential_id) == cred_id)
                    .values(until=utcnow() - timedelta(minutes=5))
                )
            with mock.patch("workers.mint.issuer_for", real_issuer):
                assert mint(cred_id, token="B") == "active"
            return self.inner.mint(req)

        def __getattr__(self, attr: str) -> Any:
            return getattr(self.inner, attr)

    with mock.patch("workers.mint.issuer_for", lambda cred: Racing(real_issuer(cred))):
        assert mint(cred_id, token="A") == "duplicate"
    row = credential(cred_id)
    assert row.state == CredState.active and issuer("kv-reader", inst).exists(row.backend_ref)
    assert late._value.get() == before  # a duplicate is no late mint
    assert quiet_sweep().orphans_revoked == 0  # A removed its own token
    for revoke_id in driver.end(task):
        assert revoke(revoke_id) == "revoked"


def test_revocations_due_are_found_again_from_the_ledger(inst: str, driver: Driver) -> None:
    from app import ledger
    from app.core.models import utcnow
    from schedules.sweep import redrive_due

    task = name()
    creds = driver.start(task, {"cache": "task-cache"})
    assert mint(creds["cache"]) == "active"
    assert credential(creds["cache"]).next_attempt_at is None  # settled: nothing due
    ended = driver.end(task)  # ...and its revoke message is lost
    row = credential(ended[0])
    assert row.next_attempt_at - row.revoke_requested_at == ledger.REVOKE_REDRIVE
    with mock.patch("schedules.sweep.enqueue_revoke") as enqueued:
        assert redrive_due() == (0, 0)  # not due yet
        age(ended, "next_attempt_at", minutes=1)
        assert redrive_due() == (0, 1)
        assert enqueued.call_args.args[0] == ended
        assert redrive_due() == (0, 0)  # pushed to its next due time
    assert credential(ended[0]).next_attempt_at > utcnow()
    assert revoke(ended[0]) == "revoked"
    assert credential(ended[0]).next_attempt_at is None


def test_a_failing_revoke_destroys_the_ciphertext_at_once(
    inst: str, driver: Driver, proxy: TcpProxy
) -> None:
    task = name()
    cred_id = driver.start(task, {"db": "db-proxied"})["db"]
    assert mint(cred_id) == "active"
    assert credential(cred_id).sealed_secret is not None
    proxy.stop()
    try:
        driver.end(task)
        assert credential(cred_id).sealed_secret is None  # at the request, before any revoke
        with pytest.raises(RevokeFailed) as failed:
            revoke(cred_id)
        row = credential(cred_id)
        assert row.state == CredState.revoking and row.sealed_secret is None
        # Due again only after the retry's backoff (should that message be lost too).
        assert row.next_attempt_at >= row.updated_at + timedelta(seconds=failed.value.retry_in)
    finally:
        proxy.start()
    assert _eventually(lambda: revoke(cred_id) == "revoked")


def test_permanent_revoke_failure_shows_as_failing(inst: str, driver: Driver) -> None:
    from app.core.models import utcnow
    from app.core.settings import get_settings
    from app.observability import overview
    from app.observability.metrics import LedgerCollector

    task = name()
    creds = driver.start(task, {"db": "reports-readonly", "kv": "kv-reader"})
    mint(creds["db"])
    with psycopg.connect(os.environ["LEASEHOLD_DATABASE_URL"], autocommit=True) as conn:
        conn.execute(
            "UPDATE credentials SET backend_ref = 'lh_notours_x' WHERE id = %s", (creds["db"],)
        )
        # A mint that failed for good is no failing revocation.
        conn.execute("UPDATE credentials SET profile = 'gone' WHERE id = %s", (creds["kv"],))
    assert mint(creds["kv"]) == "failed"
    alert_after = get_settings().revoke_alert_after

    def failing() -> tuple[int, list[str], float]:
        with session_scope() as session:
            count = overview.summary(
                session, tenant="t1", now=utcnow(), alert_after=alert_after
            ).failing
            rows = overview.failing_revocations(session, tenant="t1", alert_after=alert_after)
        gauge = next(
            m for m in LedgerCollector().collect() if m.name == "leasehold_failing_revocations"
        )
        return count, [r.id for r in rows], gauge.samples[0].value

    count, _, gauge = failing()
    driver.end(task)
    assert revoke(creds["db"]) == "failed"
    assert credential(creds["db"]).state == CredState.failed
    after = failing()
    assert after[0] == count + 1 and after[2] == gauge + 1
    assert creds["db"] in after[1] and creds["kv"] not in after[1]
    assert quiet_sweep().errors == 0  # the real role is revoked as an orphan


def test_a_permanent_extend_failure_is_recorded(inst: str, driver: Driver) -> None:
    task = name()
    cred_id = driver.start(task, {"db": "reports-readonly"})["db"]
    assert mint(cred_id) == "active"
    with psycopg.connect(os.environ["LEASEHOLD_DATABASE_URL"], autocommit=True) as conn:
        conn.execute("UPDATE credentials SET profile = 'gone' WHERE id = %s", (cred_id,))
    assert extend(cred_id) == "failed"
    row = credential(cred_id)
    assert row.state == CredState.active and row.last_error.startswith("extend: ")
    assert audit("extend_failed", cred_id)
    with psycopg.connect(os.environ["LEASEHOLD_DATABASE_URL"], autocommit=True) as conn:
        conn.execute(
            "UPDATE credentials SET profile = 'reports-readonly' WHERE id = %s", (cred_id,)
        )
    for revoke_id in driver.end(task):
        assert revoke(revoke_id) == "revoked"


# --- the revoke step: batches, and a ledger connection lost under it ---------------


def test_a_burst_of_ends_is_revoked_in_one_step(inst: str, driver: Driver) -> None:
    from app.issuers.postgres import PostgresIssuer

    tasks = [name() for _ in range(4)]
    for task in tasks:
        assert mint(driver.start(task, {"db": "reports-readonly"})["db"]) == "active"
    ended = [cred_id for task in tasks for cred_id in driver.end(task)]
    refs = {credential(cred_id).backend_ref for cred_id in ended}
    real = PostgresIssuer.revoke_many
    with mock.patch.object(PostgresIssuer, "revoke_many", autospec=True, side_effect=real) as many:
        assert revoke(ended[0]) == "revoked"
        # The others were taken along: their own messages find them revoked, and no
        # backend call is made for them again.
        for cred_id in ended[1:]:
            assert revoke(cred_id) == "revoked"
    batches = [set(call.args[1]) for call in many.call_args_list]
    assert any(refs <= batch for batch in batches), batches
    assert all(not (refs & batch) for batch in batches[1:]), "revoked twice"
    for cred_id in ended:
        row = credential(cred_id)
        assert row.state == CredState.revoked and row.next_attempt_at is None
        assert not issuer("reports-readonly", inst).exists(row.backend_ref)
        assert len(audit("revoked", cred_id)) == 1


def test_a_failure_in_a_batch_is_counted_and_retried_per_credential(
    inst: str, driver: Driver, proxy: TcpProxy
) -> None:
    tasks = [name() for _ in range(2)]
    mine, other = (driver.start(task, {"db": "db-proxied"})["db"] for task in tasks)
    assert mint(mine) == "active" and mint(other) == "active"
    proxy.stop()
    try:
        driver.end(tasks[0]), driver.end(tasks[1])
        with (
            mock.patch("workers.revoke.revoke_credential.apply_async") as retried,
            pytest.raises(RevokeFailed) as failed,
        ):
            revoke(mine)
        assert failed.value.attempts == 1
        # The one taken along: counted, due again after its backoff, and retried by a
        # message of its own (its first message finds nothing to do).
        row = credential(other)
        assert row.state == CredState.revoking and row.attempts == 1
        assert row.last_error.startswith("postgres revoke")
        assert retried.call_args_list == [mock.call((other,), countdown=mock.ANY)]
        delay = retried.call_args.kwargs["countdown"]
        assert row.next_attempt_at >= row.updated_at + timedelta(seconds=delay)
        # In its backoff it is not taken along by the next step.
        with (
            mock.patch("workers.revoke.revoke_credential.apply_async") as retried,
            pytest.raises(RevokeFailed),
        ):
            revoke(mine)
        assert credential(other).attempts == 1 and not retried.called
    finally:
        proxy.start()
    assert _eventually(lambda: revoke(mine) == "revoked")
    assert _eventually(lambda: revoke(other) == "revoked")


def test_a_dropped_ledger_connection_loses_no_work(inst: str, driver: Driver) -> None:
    """The worker does not ping its pool (app.core.db.pre_ping): a connection the server
    dropped fails one step, which the job retries; nothing is lost or half-recorded."""
    from app.core import db
    from workers.mint import mint_credential
    from workers.revoke import revoke_credential

    def drop_ledger_connection() -> None:
        with session_scope() as session:
            pid = session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with psycopg.connect(os.environ["LEASEHOLD_DATABASE_URL"], autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))

    task = name()
    cred_id = driver.start(task, {"db": "reports-readonly"})["db"]
    db.dispose_engines()
    db.pre_ping(False)
    try:
        drop_ledger_connection()
        with mock.patch("workers.job.log") as logged:
            assert mint_credential.apply(args=(cred_id,)).get() == "active"
        assert "job failed; retrying" in str(logged.warning.call_args_list)
        assert credential(cred_id).state == CredState.active
        assert driver.end(task) == [cred_id]
        drop_ledger_connection()
        with mock.patch("workers.job.log") as logged:
            assert revoke_credential.apply(args=(cred_id,)).get() == "revoked"
        assert "job failed; retrying" in str(logged.warning.call_args_list)
        row = credential(cred_id)
        assert row.state == CredState.revoked
        assert not issuer("reports-readonly", inst).exists(row.backend_ref)
    finally:
        db.pre_ping(True)
        db.dispose_engines()
