"""The event path's writes (app/ledger.py apply_event): every column of every row it
stores, the audit entries in the order they were decided, its round trips on
PostgreSQL, and the same rows on SQLite (the embedded ledger of `leasehold up`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event as sa_event
from sqlmodel import col, select

from app import ledger
from app.core.db import get_engine, session_scope
from app.core.models import AuditEntry, Credential, CredState, Event, Task, TaskCA, utcnow
from app.issuers.base import mark
from tests.support.isolated import Driver, session_profiles
from tests.support.procs import environment

pytestmark = pytest.mark.usefixtures("services")

PROXY_PROFILE = """
[profiles.upstream-api]
issuer = "proxy"
upstream = "https://api.example.com"
secret = "kv/data/upstream#token"
inject = "Authorization: Bearer {secret}"
max_ttl = 600
"""


def _rows(subject: str, tenant: str) -> tuple[Task, list[Credential], list[AuditEntry]]:
    with session_scope() as s:
        task = s.exec(select(Task).where(Task.tenant == tenant, Task.name == subject)).one()
        creds = list(
            s.exec(
                select(Credential)
                .where(Credential.task_id == task.id)
                .order_by(col(Credential.grant))
            )
        )
        entries = list(
            s.exec(
                select(AuditEntry).where(AuditEntry.task_id == task.id).order_by(col(AuditEntry.id))
            )
        )
        return task, creds, entries


def _check_lifecycle(driver: Driver, *, grants: dict[str, str], proxy: str | None) -> None:
    """Start, repeat, end: the rows as the ORM models define them, nothing left NULL
    that a model fills, the audit trail in the order of the decisions."""
    subject = f"rows-{os.urandom(4).hex()}"
    started = driver.apply(
        "task.started",
        subject,
        {"max_duration": 300, "grants": [{"name": n, "profile": p} for n, p in grants.items()]},
        event_id=f"start-{subject}",
    )
    task, creds, entries = _rows(subject, driver.tenant)
    assert (task.id, task.state, task.claim_generation, task.depth) == (
        started.task.id,
        "running",
        0,
        0,
    )
    assert task.owner_key_id == driver.key.id and task.ended_at is None
    assert task.started_at is not None and task.deadline == task.started_at + timedelta(seconds=300)
    assert sorted(started.to_mint) == sorted(c.id for c in creds)
    inst = ledger.installation_id()
    for cred in creds:
        assert cred.state == CredState.pending and cred.attempts == 0 and cred.generation == 0
        assert cred.backend_name == mark(inst, cred.id)
        assert cred.created_at == cred.updated_at == task.created_at
        assert cred.next_attempt_at == cred.created_at + ledger.MINT_REDRIVE
        assert cred.expires_at is not None and cred.expires_at <= task.deadline
        assert cred.sealed_secret is None and cred.minted_at is None
    assert [e.action for e in entries] == ["task_started", "event"]
    assert entries[1].detail == f"pytest://reconcile start-{subject}"
    with session_scope() as s:
        ca = s.get(TaskCA, task.id)
        stored = s.exec(select(Event).where(Event.event_id == f"start-{subject}")).one()
    assert stored.data == {
        "max_duration": 300,
        "grants": [{"name": n, "profile": p} for n, p in grants.items()],
    }
    assert stored.key_id == driver.key.id and stored.time is not None
    if proxy is None:
        assert ca is None
    else:
        assert ca is not None and ca.sealed_key is not None and ca.hosts == '["api.example.com"]'

    ended = driver.apply("task.succeeded", subject, event_id=f"end-{subject}")
    assert sorted(ended.to_revoke) == sorted(c.id for c in creds)
    task, creds, entries = _rows(subject, driver.tenant)
    assert task.state == "succeeded" and task.ended_at is not None
    for cred in creds:
        assert cred.state == CredState.revoking and cred.revoke_reason == "succeeded"
        assert cred.next_attempt_at == task.ended_at + ledger.REVOKE_REDRIVE
    assert [e.action for e in entries] == [
        "task_started",
        "event",
        "task_ended",
        *["revoke_requested"] * len(creds),
        "event",
    ]
    if proxy is not None:
        with session_scope() as s:
            ca = s.get(TaskCA, task.id)
            assert ca is not None and ca.sealed_key is None  # the CA's key dies with the task

    # A retry is a duplicate, a second end moves nothing; an end before a start makes
    # its task.
    retried = driver.apply("task.succeeded", subject, event_id=f"end-{subject}")
    assert retried.duplicate and retried.task.state == "succeeded"
    again = driver.apply("task.failed", subject)
    assert not again.duplicate and again.to_revoke == [] and again.task.state == "succeeded"
    assert len(_rows(subject, driver.tenant)[2]) == len(entries) + 1  # its event entry only
    early = driver.apply("task.failed", f"early-{subject}")
    assert early.task.state == "failed" and early.task.ended_at is not None


def test_event_rows_hold_every_column() -> None:
    _check_lifecycle(
        Driver(tenant=f"rows-{os.urandom(3).hex()}"),
        grants={"db": "reports-readonly", "cache": "task-cache"},
        proxy=None,
    )


@pytest.fixture
def count_statements() -> Iterator[list[str]]:
    seen: list[str] = []

    def counted(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    engine = get_engine()
    sa_event.listen(engine, "before_cursor_execute", counted)
    try:
        yield seen
    finally:
        sa_event.remove(engine, "before_cursor_execute", counted)


def test_event_round_trips_on_postgresql(count_statements: list[str]) -> None:
    """A start is the lookup and one write (plus the kill switches when one may match);
    an end the lookup, the task's end with its credentials, one write; a duplicate
    only the lookup."""
    driver = Driver(tenant=f"trips-{os.urandom(3).hex()}")
    with session_scope() as s:
        switches = len(ledger.switches_in_force(s, driver.tenant)) > 0
    data = {"max_duration": 60, "grants": [{"name": "db", "profile": "reports-readonly"}]}
    count_statements.clear()
    driver.apply("task.started", "trips", data, event_id="trips-start")
    assert len(count_statements) == 2 + switches, count_statements
    count_statements.clear()
    driver.apply("task.started", "trips", data, event_id="trips-start")
    assert len(count_statements) == 1, count_statements
    count_statements.clear()
    driver.apply("task.succeeded", "trips")
    assert len(count_statements) == 3, count_statements


@pytest.fixture
def sqlite_ledger(tmp_path: Path) -> Iterator[None]:
    """This process pointed at an embedded (SQLite) ledger of its own."""
    from app.core.migrate import upgrade

    profiles = tmp_path / "profiles.toml"
    profiles.write_text(session_profiles() + PROXY_PROFILE)
    ledger_env = {
        "LEASEHOLD_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
        "LEASEHOLD_PROFILES_FILE": str(profiles),
    }
    with environment(ledger_env, settings=True):
        upgrade()
        yield


@pytest.mark.usefixtures("sqlite_ledger")
def test_event_rows_on_sqlite() -> None:
    driver = Driver(tenant="embedded")
    _check_lifecycle(
        driver,
        grants={"api": "upstream-api", "db": "reports-readonly"},
        proxy="upstream-api",
    )
    # A child ends with its parent (the end's statement reports that a child runs).
    data = {"max_duration": 60, "grants": [{"name": "db", "profile": "reports-readonly"}]}
    driver.apply("task.started", "parent", data)
    driver.apply("task.started", "child", {**data, "parent": "parent"})
    ended = driver.apply("task.succeeded", "parent")
    assert len(ended.to_revoke) == 2
    with session_scope() as s:
        child = s.exec(select(Task).where(Task.tenant == "embedded", Task.name == "child")).one()
    assert child.state == "cancelled"


def test_cancel_writes_its_entries_in_one_statement(count_statements: list[str]) -> None:
    """An operator's cancel (an ORM task, outside the event path): the end in one
    statement, its entries (the end, each revoke) in one more, every column set."""
    driver = Driver(tenant=f"cancel-{os.urandom(3).hex()}")
    grants = [{"name": "db", "profile": "reports-readonly"}, {"name": "c", "profile": "task-cache"}]
    driver.apply("task.started", "cancelled", {"max_duration": 60, "grants": grants})
    with session_scope() as s:
        task = s.exec(
            select(Task).where(Task.tenant == driver.tenant, Task.name == "cancelled")
        ).one()
        count_statements.clear()
        revoke = ledger.cancel_task(s, task, actor="operator", now=utcnow())
        assert len(count_statements) == 2, count_statements
        assert task.state == "cancelled" and not s.dirty  # nothing left for a flush
    assert len(revoke) == 2
    _, creds, entries = _rows("cancelled", driver.tenant)
    assert {c.state for c in creds} == {CredState.revoking}
    tail = entries[-3:]
    assert [e.action for e in tail] == ["task_ended", "revoke_requested", "revoke_requested"]
    assert {e.credential_id for e in tail[1:]} == set(revoke)
    assert all(
        (e.actor, e.reason, e.tenant, e.exported_seq)
        == ("operator", "cancelled", driver.tenant, None)
        for e in tail
    )


def test_concurrent_events_are_one_task() -> None:
    """Requests racing with one event, or with several starts of one task: the losers'
    INSERT fails on a unique key, `_apply` retries, and they answer as a duplicate or a
    repeat start. One task, one credential per grant, one row per event."""
    from concurrent.futures import ThreadPoolExecutor

    from app.api.events import _apply
    from app.ledger import EventIn

    driver = Driver(tenant=f"race-{os.urandom(3).hex()}")
    data = {"max_duration": 60, "grants": [{"name": "db", "profile": "reports-readonly"}]}

    def start(subject: str, event_id: str) -> tuple[Any, dict[str, Any]]:
        return _apply(
            driver.key,
            EventIn(
                source="pytest://race",
                id=event_id,
                type="task.started",
                subject=subject,
                time=utcnow(),
                data=data,
                body_hash="race",
            ),
        )

    with ThreadPoolExecutor(8) as pool:
        same = list(pool.map(lambda _: start("same-event", "one-id"), range(8)))
        starts = list(pool.map(lambda i: start("same-task", f"id-{i}"), range(8)))
    assert sorted(r.duplicate for r, _ in same) == [False] + [True] * 7
    assert len({a["claim_token"] for _, a in same}) == 1  # the first answer again
    assert not any(r.duplicate for r, _ in starts)
    assert sum(len(r.to_mint) for r, _ in starts) == 1  # the repeats mint nothing
    for subject, events in (("same-event", 1), ("same-task", 8)):
        _, creds, entries = _rows(subject, driver.tenant)
        assert len(creds) == 1
        assert [e.action for e in entries].count("event") == events
        with session_scope() as s:
            stored = s.exec(
                select(Event).where(Event.tenant == driver.tenant, Event.subject == subject)
            ).all()
        assert len(stored) == events


def _activate_once(driver: Driver, count: list[str] | None) -> tuple[str, int]:
    """A started task's pending credential through begin_mint and activate; returns
    its id and the statements the activation took (when counted)."""
    subject = f"act-{os.urandom(4).hex()}"
    data = {"max_duration": 60, "grants": [{"name": "db", "profile": "reports-readonly"}]}
    started = driver.apply("task.started", subject, data)
    [cred_id] = started.to_mint
    now = utcnow()
    with session_scope() as s:
        assert ledger.begin_mint(s, cred_id, token="tok", now=now)
    args: dict[str, Any] = {"token": "tok", "ref": "the-ref", "sealed_secret": "sealed", "now": now}
    # What the worker passes (read with the mint's inputs): what a kill switch matches.
    subject = (driver.tenant, "reports-readonly", None, "pytest://reconcile")
    with session_scope() as s:
        if count is not None:
            count.clear()
        assert ledger.activate(
            s, cred_id, expires_at=now + timedelta(minutes=1), subject=subject, **args
        )
        taken = len(count) if count is not None else 0
    with session_scope() as s:
        # Its lease is gone with it: a second activation (a stale delivery) finds no
        # pending row, changes nothing and records nothing.
        assert s.get(ledger.MintLease, cred_id) is None
        assert not ledger.activate(s, cred_id, expires_at=now + timedelta(minutes=2), **args)
        cred = s.get(Credential, cred_id)
        assert cred is not None and cred.state == CredState.active
        assert cred.backend_ref == "the-ref" and cred.sealed_secret == "sealed"
        assert cred.minted_at == now and cred.expires_at == now + timedelta(minutes=1)
        minted = list(
            s.exec(
                select(AuditEntry).where(
                    AuditEntry.credential_id == cred_id, AuditEntry.action == "minted"
                )
            )
        )
    assert [(e.actor, e.tenant, e.task_id, e.reason, e.detail, e.at) for e in minted] == [
        ("system", driver.tenant, cred.task_id, None, None, now)
    ]
    return cred_id, taken


def test_activation_is_one_statement_on_postgresql(count_statements: list[str]) -> None:
    """The compare-and-set, its `minted` entry and the lease's release: one round trip."""
    _, taken = _activate_once(Driver(tenant=f"act-{os.urandom(3).hex()}"), count_statements)
    assert taken == 1


@pytest.mark.usefixtures("sqlite_ledger")
def test_activation_on_sqlite() -> None:
    _activate_once(Driver(tenant="embedded"), None)


def _begin_mints(driver: Driver, count: list[str] | None) -> None:
    """begin_mint_with_inputs: the inputs, the lease for one delivery at a time (its
    retries keep it), the row touched; nothing taken for a credential not pending."""
    subject = f"begin-{os.urandom(4).hex()}"
    data = {"max_duration": 60, "grants": [{"name": "db", "profile": "reports-readonly"}]}
    [cred_id] = driver.apply("task.started", subject, data).to_mint
    now = utcnow()
    with session_scope() as s:
        if count is not None:
            count.clear()
        got = ledger.begin_mint_with_inputs(s, cred_id, token="A", now=now)
        if count is not None:
            assert len(count) == 1, count
    assert got is not None
    cred, task, ca, leased = got
    assert (cred.id, cred.state, task.name, ca, leased) == (cred_id, "pending", subject, None, True)
    with session_scope() as s:
        lease = s.get(ledger.MintLease, cred_id)
        assert lease is not None and lease.token == "A"
        assert lease.until == now + ledger.MINT_LEASE
        touched = s.get(Credential, cred_id)
        assert touched is not None and touched.updated_at == now
        assert touched.next_attempt_at == now + ledger.MINT_LEASE
    with session_scope() as s:  # another delivery while A holds a fresh lease: busy
        got = ledger.begin_mint_with_inputs(s, cred_id, token="B", now=now)
        assert got is not None and got[3] is False
    with session_scope() as s:  # A's retry keeps its lease
        got = ledger.begin_mint_with_inputs(s, cred_id, token="A", now=now)
        assert got is not None and got[3] is True
        lease = s.get(ledger.MintLease, cred_id)
        assert lease is not None and lease.token == "A"
    with session_scope() as s:  # not pending any more: read, no lease taken
        args = {"token": "A", "ref": "r", "sealed_secret": "s", "now": now}
        assert ledger.activate(s, cred_id, expires_at=now + timedelta(minutes=1), **args)
    with session_scope() as s:
        got = ledger.begin_mint_with_inputs(s, cred_id, token="C", now=now)
        assert got is not None and got[0].state == "active" and got[3] is False
        assert s.get(ledger.MintLease, cred_id) is None
        assert ledger.begin_mint_with_inputs(s, "no-such-credential", token="C", now=now) is None


def test_begin_mint_with_inputs_is_one_statement_on_postgresql(
    count_statements: list[str],
) -> None:
    _begin_mints(Driver(tenant=f"begin-{os.urandom(3).hex()}"), count_statements)


@pytest.mark.usefixtures("sqlite_ledger")
def test_begin_mint_with_inputs_on_sqlite() -> None:
    _begin_mints(Driver(tenant="embedded"), None)


def _revoke_batch(driver: Driver, count: list[str] | None) -> None:
    """mark_revoked_many: the batch's rows to revoked, the secrets gone, one `revoked`
    entry each (with the row's reason, in the batch's order); a second time nothing."""
    subject = f"gone-{os.urandom(4).hex()}"
    grants = [{"name": f"g{i}", "profile": "reports-readonly"} for i in range(3)]
    driver.apply("task.started", subject, {"max_duration": 60, "grants": grants})
    ended = driver.apply("task.succeeded", subject).to_revoke
    now = utcnow()
    with session_scope() as s:
        state, rows = ledger.take_revokes(s, ended[0], now=now, limit=10)
        assert state == "revoking" and {r.id for r in rows} >= set(ended)
        rows = [r for r in rows if r.id in ended]
        if count is not None:
            count.clear()
        moved = ledger.mark_revoked_many(s, rows, now=now)
        if count is not None:
            assert len(count) == 1, count
    assert [r.id for r in moved] == [r.id for r in rows]
    assert all(r.state == "revoked" and r.revoked_at == now for r in moved)
    with session_scope() as s:
        for cred_id in ended:
            cred = s.get(Credential, cred_id)
            assert cred is not None and cred.state == "revoked" and cred.sealed_secret is None
            assert cred.revoked_at == now and cred.next_attempt_at is None
        entries = list(
            s.exec(
                select(AuditEntry)
                .where(col(AuditEntry.credential_id).in_(ended), AuditEntry.action == "revoked")
                .order_by(col(AuditEntry.id))
            )
        )
        assert [e.credential_id for e in entries] == [r.id for r in rows]
        reasons = {(e.actor, e.tenant, e.reason, e.at) for e in entries}
        assert reasons == {("system", driver.tenant, rows[0].revoke_reason, now)}
        assert rows[0].revoke_reason  # the end's reason, carried into the entry
        assert ledger.mark_revoked_many(s, rows, now=now) == []  # already revoked
    with session_scope() as s:
        again = s.exec(
            select(AuditEntry).where(
                col(AuditEntry.credential_id).in_(ended), AuditEntry.action == "revoked"
            )
        ).all()
        assert len(again) == len(ended)


def test_a_revoke_batch_is_one_statement_on_postgresql(count_statements: list[str]) -> None:
    _revoke_batch(Driver(tenant=f"gone-{os.urandom(3).hex()}"), count_statements)


@pytest.mark.usefixtures("sqlite_ledger")
def test_a_revoke_batch_on_sqlite() -> None:
    _revoke_batch(Driver(tenant="embedded"), None)


def _activate_as_a(session: Any, cred_id: str, *, sealed: str, now: Any) -> bool:
    """The activation by the delivery that took the lease with token "A"."""
    return ledger.activate(
        session,
        cred_id,
        token="A",
        ref="the-ref",
        sealed_secret=sealed,
        expires_at=now + timedelta(minutes=1),
        now=now,
    )


def test_a_delivery_that_waited_on_an_activation_does_not_mint_again() -> None:
    """Delivery B's statement waits on the lease of delivery A, which activates and
    releases it meanwhile: B must not take the lease of a credential now active (a
    second mint would replace the live role's password)."""
    import threading

    driver = Driver(tenant=f"race-{os.urandom(3).hex()}")
    data = {"max_duration": 60, "grants": [{"name": "db", "profile": "reports-readonly"}]}
    [cred_id] = driver.apply("task.started", f"race-{os.urandom(4).hex()}", data).to_mint
    now = utcnow()
    with session_scope() as s:
        assert ledger.begin_mint(s, cred_id, token="A", now=now)
    got: list[Any] = []
    a = session_scope()
    session_a = a.__enter__()
    try:
        # A activates: its row and its lease stay locked until it commits.
        assert _activate_as_a(session_a, cred_id, sealed="sealed", now=now)

        def delivery_b() -> None:
            with session_scope() as s:
                found = ledger.begin_mint_with_inputs(s, cred_id, token="B", now=utcnow())
                assert found is not None
                got.append((found[0].state, found[3]))

        b = threading.Thread(target=delivery_b)
        b.start()
        b.join(1.0)
        assert b.is_alive()  # B waits on A's lease
    finally:
        a.__exit__(None, None, None)  # A commits
    b.join(30)
    assert not b.is_alive()
    assert got == [("active", False)]
    with session_scope() as s:
        assert s.get(ledger.MintLease, cred_id) is None  # B let go of what it took


def _claim(driver: Driver, *, postgres: bool) -> None:
    """A claim's read and consume: one statement on PostgreSQL (rolled back, the secret
    is still there; committed, a second read finds it claimed), a read then
    `take_secret` on SQLite."""
    data = {"max_duration": 60, "grants": [{"name": "db", "profile": "reports-readonly"}]}
    name = f"claim-{os.urandom(4).hex()}"
    [cred_id] = driver.apply("task.started", name, data).to_mint
    now = utcnow()
    with session_scope() as s:
        assert ledger.begin_mint(s, cred_id, token="A", now=now)
    with session_scope() as s:
        assert _activate_as_a(s, cred_id, sealed="sealed-secret", now=now)
    task, _, _ = _rows(name, driver.tenant)
    claim = {
        "task_pk": task.id,
        "grant": "db",
        "tenant": driver.tenant,
        "task_name": name,
        "generation": task.claim_generation,
        "subject": None,
        "asks_again": [],
        "actor": "claim",
        "now": now,
    }

    def read(**changed: Any) -> tuple[Any, bool]:
        with get_engine().connect() as conn:
            return ledger.read_for_claim(conn, **{**claim, **changed})

    def claimed_entries() -> int:
        _, _, entries = _rows(name, driver.tenant)
        return sum(e.action == "claimed" for e in entries)

    if postgres:
        # Not the holder, not this task's name or tenant, or a profile that asks policy
        # again: read, never consumed.
        for changed in (
            {"generation": task.claim_generation + 1},
            {"task_name": "another"},
            {"tenant": "another"},
            {"asks_again": ["reports-readonly"]},
            {"subject": "spiffe://example.org/not-the-workload"},
        ):
            row, taken = read(**changed)
            assert row.id == cred_id and row.sealed_secret == "sealed-secret" and not taken
        row, taken = read()  # rolled back when the connection closes
        assert taken and row.sealed_secret == "sealed-secret" and row.claimed_at is None
        assert claimed_entries() == 0
        with get_engine().begin() as conn:
            row, taken = ledger.read_for_claim(conn, **claim)
            assert taken
    else:
        row, taken = read()
        assert not taken and row.state == "active" and row.sealed_secret == "sealed-secret"
        with get_engine().begin() as conn:
            assert ledger.take_secret(
                conn, credential_id=cred_id, sealed_secret="sealed-secret", actor="claim", now=now
            )
    row, taken = read()
    assert not taken and row.claimed_at is not None and row.sealed_secret is None
    assert claimed_entries() == 1


def test_a_claim_reads_and_consumes_in_one_statement_on_postgresql() -> None:
    _claim(Driver(tenant=f"claim-{os.urandom(3).hex()}"), postgres=True)


@pytest.mark.usefixtures("sqlite_ledger")
def test_a_claim_on_sqlite() -> None:
    _claim(Driver(tenant="embedded"), postgres=False)


def test_a_transaction_that_only_read_keeps_its_prepared_statements() -> None:
    """psycopg forgets a connection's prepared statements on ROLLBACK: a transaction
    that only read ends with COMMIT instead; one that wrote, or failed, rolls back."""
    import sqlalchemy
    from psycopg.pq import TransactionStatus

    prepared = sqlalchemy.text("SELECT count(*) FROM pg_prepared_statements")
    with get_engine().connect() as conn:
        driver = conn.connection.driver_connection
        for _ in range(8):  # psycopg prepares a statement on its 5th run
            conn.execute(select(Task.id).where(Task.tenant == "nobody")).all()
        kept = conn.execute(prepared).scalar_one()
        assert kept >= 1
        conn.rollback()
        assert driver.info.transaction_status == TransactionStatus.IDLE
        assert conn.execute(prepared).scalar_one() == kept
        # A write is rolled back for real (the temporary table is gone).
        conn.execute(sqlalchemy.text("CREATE TEMPORARY TABLE scratch (x int)"))
        conn.rollback()
        assert (
            conn.execute(sqlalchemy.text("SELECT to_regclass('pg_temp.scratch')")).scalar() is None
        )
        conn.rollback()
        # A transaction in error rolls back and the connection goes on.
        with pytest.raises(sqlalchemy.exc.DataError):
            conn.execute(sqlalchemy.text("SELECT 1 / 0"))
        conn.rollback()
        assert conn.execute(sqlalchemy.text("SELECT 2")).scalar() == 2
