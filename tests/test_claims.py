"""Claims tell the truth: a secret that cannot be decrypted is kept, a second claim is
said also after the end, and a claim that loses a race with a revoke is no interception."""

from __future__ import annotations

import asyncio
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
import redis
from psycopg.pq import TransactionStatus
from sqlalchemy import event as sa_event
from sqlmodel import Session, select

from app import ledger, notify
from app.core.db import get_engine, session_scope
from app.core.models import AuditEntry, utcnow
from tests.support.api import auth, claim_url, credentials_of, event, started, states, unique
from tests.support.procs import wait_until

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")


def second_claims(cred_id: str) -> int:
    with session_scope() as session:
        return len(
            session.exec(
                select(AuditEntry).where(
                    AuditEntry.action == "second_claim", AuditEntry.credential_id == cred_id
                )
            ).all()
        )


def counted(client: Any) -> float:
    text = client.get("/metrics").text
    found = re.search(
        r'^leasehold_second_claims_total\{issuer="redis",profile="task-cache"\} (\S+)$',
        text,
        re.M,
    )
    return float(found.group(1)) if found else 0.0


def start(client: Any, key: str) -> tuple[str, str, str]:
    name = unique("claims")
    answer = client.post("/v1/events", json=started(name, {"c": "task-cache"}), headers=auth(key))
    assert answer.status_code == 202, answer.text
    wait_until(lambda: states("t1", name) == {"c": "active"})
    return name, answer.json()["claim_token"], credentials_of("t1", name)[0].id


def sql(query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(os.environ["LEASEHOLD_DATABASE_URL"], autocommit=True) as conn:
        cur = conn.execute(query, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def test_a_secret_that_cannot_be_decrypted_is_kept(app_client: Any, keys: dict[str, str]) -> None:
    name, token, cred_id = start(app_client, keys["emitter"])
    (sealed,) = sql("SELECT sealed_secret FROM credentials WHERE id = %s", cred_id)[0]
    sql("UPDATE credentials SET sealed_secret = 'not-a-fernet-token' WHERE id = %s", cred_id)
    failed = app_client.post(claim_url(name, "c"), headers=auth(token))
    assert failed.status_code == 500 and "decrypt" in failed.json()["error"]
    assert sql("SELECT sealed_secret, claimed_at FROM credentials WHERE id = %s", cred_id) == [
        ("not-a-fernet-token", None)
    ]
    # The consume and its `claimed` entry were one statement, rolled back together.
    assert not sql("SELECT 1 FROM audit WHERE credential_id = %s AND action = 'claimed'", cred_id)
    # The key comes back (say, a rotation undone): the credential is still claimable.
    sql("UPDATE credentials SET sealed_secret = %s WHERE id = %s", sealed, cred_id)
    claimed = app_client.post(claim_url(name, "c"), headers=auth(token))
    assert claimed.status_code == 200, claimed.text
    client = redis.Redis.from_url(claimed.json()["secret"]["url"], socket_timeout=5)
    assert client.ping()
    client.close()
    assert second_claims(cred_id) == 0
    app_client.post("/v1/events", json=event("succeeded", name), headers=auth(keys["emitter"]))


def test_a_second_claim_is_said_after_the_end_and_after_a_revoke(
    app_client: Any, keys: dict[str, str]
) -> None:
    before = counted(app_client)
    ended, token, cred_id = start(app_client, keys["emitter"])
    assert app_client.post(claim_url(ended, "c"), headers=auth(token)).status_code == 200
    app_client.post("/v1/events", json=event("succeeded", ended), headers=auth(keys["emitter"]))
    wait_until(lambda: states("t1", ended) == {"c": "revoked"})
    again = app_client.post(claim_url(ended, "c"), headers=auth(token))
    assert again.status_code == 410 and again.json()["state"] == "claimed"
    assert second_claims(cred_id) == 1

    revoked, token, cred_id = start(app_client, keys["emitter"])
    assert app_client.post(claim_url(revoked, "c"), headers=auth(token)).status_code == 200
    answer = app_client.post(f"/v1/credentials/{cred_id}/revoke", headers=auth(keys["operator"]))
    assert answer.status_code == 202
    again = app_client.post(claim_url(revoked, "c"), headers=auth(token))
    assert again.status_code == 410 and again.json()["state"] == "claimed"
    assert second_claims(cred_id) == 1
    assert wait_until(lambda: counted(app_client) == before + 2)
    app_client.post("/v1/events", json=event("succeeded", revoked), headers=auth(keys["emitter"]))


def test_a_claim_that_loses_a_race_with_a_revoke_is_no_interception(
    app_client: Any, keys: dict[str, str]
) -> None:
    """The revoke has moved the row but not committed when the claim's statement reads
    it: the claim waits on the row, then sees it revoking and consumes nothing."""
    from app.queue import enqueue_revoke

    name, token, cred_id = start(app_client, keys["emitter"])
    before = counted(app_client)
    with Session(get_engine()) as revoke, ThreadPoolExecutor(1) as pool:
        ids = ledger.request_revoke(
            revoke, credential_id=cred_id, reason="manual", actor="test", now=utcnow()
        )
        claiming = pool.submit(app_client.post, claim_url(name, "c"), headers=auth(token))
        assert wait_until(lambda: waiting_on_a_lock("taken AS"))
        revoke.commit()
        lost = claiming.result(timeout=30)
    enqueue_revoke(ids)
    assert lost.status_code == 410 and lost.json()["state"] in ("revoking", "revoked")
    assert sql("SELECT claimed_at FROM credentials WHERE id = %s", cred_id) == [(None,)]
    assert not sql("SELECT 1 FROM audit WHERE credential_id = %s AND action = 'claimed'", cred_id)
    again = app_client.post(claim_url(name, "c"), headers=auth(token))
    assert again.status_code == 410 and again.json()["state"] != "claimed"
    assert second_claims(cred_id) == 0 and counted(app_client) == before
    wait_until(lambda: states("t1", name) == {"c": "revoked"})
    app_client.post("/v1/events", json=event("succeeded", name), headers=auth(keys["emitter"]))


def waiting_on_a_lock(query_part: str) -> bool:
    return bool(
        sql(
            "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
            f"%{query_part}%",
        )
    )


def test_a_claim_is_one_statement_with_its_audit_entry(
    app_client: Any, keys: dict[str, str]
) -> None:
    name, token, cred_id = start(app_client, keys["emitter"])
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement.split()[0].upper())

    engine = get_engine()
    sa_event.listen(engine, "before_cursor_execute", count)
    try:
        claimed = app_client.post(claim_url(name, "c"), headers=auth(token))
    finally:
        sa_event.remove(engine, "before_cursor_execute", count)
    assert claimed.status_code == 200, claimed.text
    # The read, the consuming UPDATE and the audit INSERT: one statement.
    assert seen == ["WITH"], seen
    entries = sql(
        "SELECT actor, tenant, task_id FROM audit WHERE credential_id = %s AND action = 'claimed'",
        cred_id,
    )
    assert len(entries) == 1 and entries[0][0] == "claim" and entries[0][1] == "t1"
    # A consume that finds the row moved on changes nothing and records nothing.
    with engine.begin() as conn:
        assert not ledger.take_secret(
            conn, credential_id=cred_id, sealed_secret="gone", actor="claim", now=utcnow()
        )
    assert (
        len(sql("SELECT 1 FROM audit WHERE credential_id = %s AND action = 'claimed'", cred_id))
        == 1
    )
    app_client.post("/v1/events", json=event("succeeded", name), headers=auth(keys["emitter"]))


def test_a_claim_that_only_reads_ends_with_commit_not_rollback(
    app_client: Any, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """psycopg forgets every prepared statement of a connection on ROLLBACK, so an
    attempt that reads and answers (here 410, the task has ended) must not end with one
    (app/core/db.py): the API's statements would be planned again on every claim. What
    the driver is told, whatever SQLAlchemy's own events say."""
    name, token, _ = start(app_client, keys["emitter"])
    ended = app_client.post(
        "/v1/events", json=event("succeeded", name), headers=auth(keys["emitter"])
    )
    assert ended.status_code == 202
    ends: list[str] = []
    for end in ("commit", "rollback"):
        real = getattr(psycopg.Connection, end)

        def told(conn: psycopg.Connection, _real: Any = real, _end: str = end) -> None:
            if conn.info.transaction_status != TransactionStatus.IDLE:  # else a no-op
                ends.append(_end)
            _real(conn)

        monkeypatch.setattr(psycopg.Connection, end, told)
    answer = app_client.post(claim_url(name, "c"), headers=auth(token))
    monkeypatch.undo()
    assert answer.status_code == 410 and answer.json()["error"] == "the task has ended"
    assert ends == ["commit"], ends


def test_a_waiting_claim_sees_a_change_that_came_before_it_watched() -> None:
    waiters = notify.Waiters()

    async def check() -> None:
        waiters._task = asyncio.create_task(asyncio.sleep(3600))  # a listener "runs"
        try:
            since = waiters.clock()
            assert not waiters.notified_since("c1", since)
            waiters._wake("c1")  # the mint's message, while the first read was in flight
            assert waiters.notified_since("c1", since)
            assert not waiters.notified_since("c2", since)
            assert not waiters.notified_since("c1", waiters.clock() + 1)
        finally:
            waiters._task.cancel()
        waiters._task = None
        # Without a listener nothing arrives: the caller re-checks the ledger itself.
        assert waiters.notified_since("c3", waiters.clock())

    asyncio.run(check())
