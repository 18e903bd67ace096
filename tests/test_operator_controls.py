"""Operator controls: the kill switch, rotation, cancel and keys over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlmodel import col, func, select

from app import ledger
from app.api.auth import create_key
from app.core.db import session_scope
from app.core.models import AuditEntry, Credential, CredState, MintLease, Role, Task, utcnow
from tests.support.api import auth, claim_url, event, started, states, task_path, unique
from tests.support.procs import start_api, stop_process, wait_until
from tests.support.world import DATA_DB, HOME, ROOT, RUN

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

PG_DATA = f"postgresql://postgres@127.0.0.1:5432/{DATA_DB}"


def tenant_keys(tenant: str) -> dict[str, str]:
    """An emitter, a second emitter and an operator of a tenant of the test's own."""
    made: dict[str, str] = {}
    with session_scope() as session:
        for name, role in (
            ("emitter", Role.emitter),
            ("emitter-b", Role.emitter),
            ("operator", Role.operator),
        ):
            made[name] = create_key(
                session, name=f"{tenant}-{name}-{os.urandom(3).hex()}", role=role, tenant=tenant
            )[1]
    return made


def roles_existing(names: list[str]) -> list[str]:
    with psycopg.connect(PG_DATA) as conn:
        rows = conn.execute(
            "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (names,)
        ).fetchall()
    return [r[0] for r in rows]


def count(tenant: str, *states_: str) -> int:
    with session_scope() as session:
        return session.exec(
            select(func.count())
            .select_from(Credential)
            .where(Credential.tenant == tenant, col(Credential.state).in_(states_))
        ).one()


def start(client: TestClient, key: str, name: str, grants: dict[str, str], **data: Any) -> Any:
    answer = client.post("/v1/events", headers=auth(key), json=started(name, grants, 600, **data))
    assert answer.status_code == 202, answer.text
    return answer.json()


def can_login(secret: dict[str, Any]) -> bool:
    try:
        with psycopg.connect(secret["dsn"], connect_timeout=5) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


# --- the kill switch ---------------------------------------------------------------


def test_kill_switch_revokes_a_thousand_then_refuses_until_lifted(
    app_client: TestClient, keys: dict[str, str]
) -> None:
    tenant = f"tk-{RUN}"
    mine = tenant_keys(tenant)
    per_task, tasks = 16, 63  # 1,008 credentials of one postgres profile
    grants = {f"g{i}": "reports-readonly" for i in range(per_task)}
    names = [unique(f"kill/{i}") for i in range(tasks)]
    for name in names:
        start(app_client, mine["emitter"], name, grants)
    total = per_task * tasks
    wait_until(lambda: count(tenant, CredState.active) == total, timeout=90, interval=0.5)
    with session_scope() as session:
        backend = list(
            session.exec(select(Credential.backend_name).where(Credential.tenant == tenant))
        )
    assert len(roles_existing(backend)) == total

    # Another tenant's operator may not name this tenant.
    refused = app_client.post(
        "/v1/revocations", headers=auth(keys["operator-t2"]), json={"tenant": tenant}
    )
    assert refused.status_code == 403
    thrown = app_client.post(
        "/v1/revocations", headers=auth(mine["operator"]), json={"profile": "reports-readonly"}
    )
    assert thrown.status_code == 202, thrown.text
    switch = thrown.json()
    assert switch["match"] == {
        "tenant": tenant,
        "profile": "reports-readonly",
        "workload": None,
        "source": None,
    }
    assert switch["revoking"] == total and switch["by"].startswith(f"{tenant}-operator")
    assert count(tenant, CredState.active) == 0  # at once in the ledger

    def progress() -> dict[str, Any]:
        answer = app_client.get(f"/v1/revocations/{switch['id']}", headers=auth(mine["operator"]))
        assert answer.status_code == 200
        return answer.json()

    done = wait_until(lambda: (p := progress())["done"] and p, timeout=90, interval=0.5)
    assert done["revoked"] == total and done["remaining"] == 0
    assert roles_existing(backend) == []
    with session_scope() as session:
        reasons = set(
            session.exec(select(Credential.revoke_reason).where(Credential.tenant == tenant))
        )
    assert reasons == {"kill_switch"}

    # Another tenant's operator neither sees nor lifts it.
    other = auth(keys["operator-t2"])
    listed = app_client.get("/v1/revocations", headers=other).json()["items"]
    assert switch["id"] not in [s["id"] for s in listed]
    assert app_client.get(f"/v1/revocations/{switch['id']}", headers=other).status_code == 404
    assert app_client.delete(f"/v1/revocations/{switch['id']}", headers=other).status_code == 404
    mine_listed = app_client.get("/v1/revocations", headers=auth(mine["operator"])).json()
    assert [s["id"] for s in mine_listed["items"]] == [switch["id"]]

    # While in force a new mint is refused, naming the switch.
    refused_task = unique("kill/after")
    start(app_client, mine["emitter"], refused_task, {"db": "reports-readonly"})
    assert states(tenant, refused_task) == {"db": CredState.denied}
    with session_scope() as session:
        entry = session.exec(
            select(AuditEntry).where(AuditEntry.tenant == tenant, AuditEntry.action == "denied")
        ).one()
    assert entry.reason == "kill_switch" and switch["id"] in (entry.detail or "")

    lifted = app_client.delete(f"/v1/revocations/{switch['id']}", headers=auth(mine["operator"]))
    assert lifted.status_code == 200 and lifted.json()["lifted_at"]
    assert app_client.get("/v1/revocations", headers=auth(mine["operator"])).json()["items"] == []
    again = unique("kill/lifted")
    start(app_client, mine["emitter"], again, {"db": "reports-readonly"})
    wait_until(lambda: states(tenant, again) == {"db": CredState.active})


def test_a_switch_needs_a_match_and_an_operator(
    app_client: TestClient, keys: dict[str, str]
) -> None:
    assert (
        app_client.post("/v1/revocations", headers=auth(keys["operator"]), json={}).status_code
        == 422
    )
    assert (
        app_client.post(
            "/v1/revocations", headers=auth(keys["emitter"]), json={"profile": "x"}
        ).status_code
        == 403
    )
    assert app_client.get("/v1/revocations", headers=auth(keys["emitter"])).status_code == 403


def test_activation_after_a_switch_is_revoked_in_the_same_compare_and_set(
    installation_id: str,
) -> None:
    """A credential written before the switch was seen (its start raced the throw) is
    still pending when its mint completes: the activation re-checks and fails."""
    tenant = f"ta-{RUN}-{os.urandom(3).hex()}"
    now = utcnow()
    with session_scope() as session:
        key, _ = create_key(session, name=f"{tenant}-e", role=Role.emitter, tenant=tenant)
        task = Task(
            tenant=tenant,
            name="race",
            owner_key_id=key.id,
            source="pytest://race",
            workload="spiffe://example.org/race",
            state="running",
            started_at=now,
            deadline=now + timedelta(minutes=5),
            created_at=now,
        )
        session.add(task)
        session.flush()
        cred = Credential(
            tenant=tenant,
            task_id=task.id,
            grant="db",
            profile="reports-readonly",
            issuer="postgres",
            state=CredState.pending,
            backend_name=f"lh_race_{os.urandom(4).hex()}",
            expires_at=now + timedelta(minutes=5),
            created_at=now,
            updated_at=now,
        )
        session.add(cred)
        session.flush()
        assert ledger.begin_mint(session, cred.id, token="t", now=now)
        # The switch, and the activation after it, in one unit of work: no sweep between.
        switch = ledger.throw_switch(
            session, {"workload": "spiffe://example.org/race"}, actor="pytest", now=now
        )
        session.flush()
        active = ledger.activate(
            session,
            cred.id,
            token="t",
            ref="the-ref",
            sealed_secret="sealed",
            expires_at=now + timedelta(minutes=5),
            now=now,
        )
        assert active is False
        session.flush()
        row = session.exec(
            select(
                Credential.state,
                Credential.revoke_reason,
                Credential.sealed_secret,
                Credential.backend_ref,
            ).where(Credential.id == cred.id)
        ).one()
        assert tuple(row) == (CredState.revoking, "kill_switch", None, "the-ref")
        entries = session.exec(
            select(AuditEntry.actor, AuditEntry.reason, AuditEntry.detail).where(
                AuditEntry.credential_id == cred.id, AuditEntry.action == "revoke_requested"
            )
        ).all()
        assert [tuple(e) for e in entries] == [
            ("system", "kill_switch", "minted after a kill switch")
        ]
        assert session.get(MintLease, cred.id) is None  # released with the activation
        # Another installation's switch on another workload would not have matched.
        ledger.lift_switch(session, switch.id, actor="pytest", now=now)


def test_a_switch_thrown_in_a_storm_of_mints_leaves_nothing_alive(
    app_client: TestClient, keys: dict[str, str]
) -> None:
    tenant = f"ts-{RUN}"
    mine = tenant_keys(tenant)
    grants = {f"g{i}": "reports-readonly" for i in range(4)}
    names = [unique(f"storm/{i}") for i in range(60)]
    errors: list[str] = []

    def storm(part: list[str]) -> None:
        for name in part:
            answer = app_client.post(
                "/v1/events", headers=auth(mine["emitter"]), json=started(name, grants, 600)
            )
            if answer.status_code != 202:
                errors.append(answer.text)

    threads = [threading.Thread(target=storm, args=(names[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: count(tenant, CredState.active) >= 8, timeout=30)
    thrown = app_client.post(
        "/v1/revocations", headers=auth(mine["operator"]), json={"profile": "reports-readonly"}
    )
    assert thrown.status_code == 202, thrown.text
    for t in threads:
        t.join(60)
    assert not errors

    def settled() -> bool:
        unsettled = (CredState.pending, CredState.awaiting_approval, CredState.revoking)
        return count(tenant, *unsettled) == 0

    wait_until(settled, timeout=90, interval=0.5)
    assert count(tenant, CredState.active) == 0
    with session_scope() as session:
        rows = list(session.exec(select(Credential).where(Credential.tenant == tenant)))
    assert len(rows) == 240
    assert roles_existing([c.backend_name for c in rows]) == []
    assert {c.state for c in rows} <= {CredState.revoked, CredState.denied}
    assert any(c.state == CredState.revoked for c in rows)
    switch_id = thrown.json()["id"]
    assert (
        app_client.delete(f"/v1/revocations/{switch_id}", headers=auth(mine["operator"]))
    ).status_code == 200


# --- rotation and cancel -----------------------------------------------------------


def test_rotation_replaces_the_credential_and_the_claim_token(
    app_client: TestClient, keys: dict[str, str]
) -> None:
    name = unique("rotate")
    token = start(app_client, keys["emitter"], name, {"db": "reports-readonly"})["claim_token"]
    first = app_client.post(claim_url(name, "db", wait=15), headers=auth(token))
    assert first.status_code == 200, first.text
    old_secret = first.json()["secret"]
    assert can_login(old_secret)

    url = f"/v1/tasks/{task_path(name)}/credentials/db/rotate"
    assert app_client.post(url, headers=auth(keys["emitter-b"])).status_code == 403
    assert app_client.post(url, headers=auth(keys["emitter-t2"])).status_code == 404
    assert app_client.post(url, headers=auth(keys["operator"])).status_code == 403
    missing = f"/v1/tasks/{task_path(name)}/credentials/nope/rotate"
    assert app_client.post(missing, headers=auth(keys["emitter"])).status_code == 404

    rotated = app_client.post(url, headers=auth(keys["emitter"]))
    assert rotated.status_code == 202, rotated.text
    fresh = rotated.json()["claim_token"]
    assert fresh != token and "secret" not in rotated.json()
    # The old role stops working as soon as its revoke is done (the revoke queue).
    wait_until(lambda: not can_login(old_secret), timeout=15, interval=0.2)
    # The old token is refused, for the new generation as for any.
    assert app_client.post(claim_url(name, "db"), headers=auth(token)).status_code == 403
    second = app_client.post(claim_url(name, "db", wait=15), headers=auth(fresh))
    assert second.status_code == 200, second.text
    new_secret = second.json()["secret"]
    assert new_secret["username"] != old_secret["username"] and can_login(new_secret)
    again = app_client.post(claim_url(name, "db"), headers=auth(fresh))
    assert again.status_code == 410 and again.json()["state"] == "claimed"
    # A repeated start answers the current token.
    repeat = app_client.post(
        "/v1/events",
        headers=auth(keys["emitter"]),
        json=started(name, {"db": "reports-readonly"}, 600),
    )
    assert repeat.json()["claim_token"] == fresh
    with session_scope() as session:
        rows = list(
            session.exec(
                select(Credential)
                .join(Task)
                .where(Task.name == name)
                .order_by(col(Credential.generation))
            )
        )
    assert [(c.generation, c.state, c.revoke_reason) for c in rows] == [
        (0, CredState.revoked, "rotated"),
        (1, CredState.active, None),
    ]
    app_client.post("/v1/events", headers=auth(keys["emitter"]), json=_ended(name))


def _ended(name: str) -> dict[str, Any]:
    return event("succeeded", name)


def test_cancel_ends_a_task_of_a_revoked_emitter(
    app_client: TestClient, keys: dict[str, str]
) -> None:
    tenant = f"tc-{RUN}"
    mine = tenant_keys(tenant)
    name = unique("cancel")
    start(app_client, mine["emitter"], name, {"db": "reports-readonly"})
    wait_until(lambda: states(tenant, name) == {"db": CredState.active})
    with session_scope() as session:
        emitter_id = session.exec(
            select(Task.owner_key_id).where(Task.tenant == tenant, Task.name == name)
        ).one()
    gone = app_client.delete(f"/v1/keys/{emitter_id}", headers=auth(keys["admin"]))
    assert gone.status_code == 200 and gone.json()["revoked_at"]
    assert states(tenant, name) == {"db": CredState.active}  # the task keeps running

    url = f"/v1/tasks/{task_path(name)}/cancel"
    assert app_client.post(url, headers=auth(mine["emitter-b"])).status_code == 403
    assert app_client.post(url, headers=auth(keys["operator-t2"])).status_code == 404
    cancelled = app_client.post(f"{url}?tenant={tenant}", headers=auth(keys["admin"]))
    assert cancelled.status_code == 202, cancelled.text
    assert cancelled.json()["state"] == "cancelled"
    wait_until(lambda: states(tenant, name) == {"db": CredState.revoked})
    assert app_client.post(url, headers=auth(mine["operator"])).status_code == 409
    with session_scope() as session:
        ended = session.exec(
            select(AuditEntry).where(AuditEntry.tenant == tenant, AuditEntry.action == "task_ended")
        ).one()
    assert ended.actor == f"admin-{RUN}" and ended.reason == "cancelled"


# --- keys over HTTP ------------------------------------------------------------------


def test_keys_over_http(app_client: TestClient, keys: dict[str, str]) -> None:
    admin = auth(keys["admin"])
    assert app_client.get("/v1/keys", headers=auth(keys["operator"])).status_code == 403
    body = {"name": f"http-{RUN}", "role": "operator", "tenant": "t1"}
    made = app_client.post("/v1/keys", headers=admin, json=body)
    assert made.status_code == 201, made.text
    view = made.json()
    secret = view.pop("key")
    assert secret.startswith("lhk_") and view["last_used_at"] is None
    assert app_client.post("/v1/keys", headers=admin, json=body).status_code == 409
    bad = {"name": f"bad-{RUN}", "role": "operator", "tenant": "t1", "sources": ["x"]}
    assert app_client.post("/v1/keys", headers=admin, json=bad).status_code == 422

    assert app_client.get("/v1/tasks", headers=auth(secret)).status_code == 200
    listed = app_client.get("/v1/keys", headers=admin).json()["items"]
    mine = next(k for k in listed if k["id"] == view["id"])
    assert mine["last_used_at"] is not None
    assert all("key" not in k and "key_hash" not in k for k in listed)
    assert secret not in str(listed)

    assert app_client.delete(f"/v1/keys/{view['id']}", headers=admin).status_code == 200
    assert app_client.get("/v1/tasks", headers=auth(secret)).status_code == 401
    listed = app_client.get("/v1/keys", headers=admin).json()["items"]
    assert view["id"] not in [k["id"] for k in listed]
    assert app_client.delete("/v1/keys/nope", headers=admin).status_code == 404


def test_an_expired_key_answers_401(app_client: TestClient, keys: dict[str, str]) -> None:
    admin = auth(keys["admin"])
    # Expiring in 6 s: time to create it and use it once on a loaded machine; then a
    # 401 within 5 s of the expiry (PRODUCT.md), polled up to 12 s from here.
    soon = (utcnow() + timedelta(seconds=6)).isoformat()
    body = {"name": f"expiring-{RUN}", "role": "operator", "tenant": "t1", "expires_at": soon}
    made = app_client.post("/v1/keys", headers=admin, json=body)
    assert made.status_code == 201, made.text
    secret = made.json()["key"]
    assert app_client.get("/v1/tasks", headers=auth(secret)).status_code == 200
    wait_until(
        lambda: app_client.get("/v1/tasks", headers=auth(secret)).status_code == 401,
        timeout=12,
        interval=0.2,
    )
    past = {**body, "name": f"past-{RUN}", "expires_at": (utcnow() - timedelta(1)).isoformat()}
    assert app_client.post("/v1/keys", headers=admin, json=past).status_code == 422


# --- against a running API: `leasehold revoke`, keys across processes ----------------


@pytest.fixture(scope="module")
def api_url(worker: Path) -> Iterator[str]:
    """A real `leasehold api` process on the test run's ledger."""
    proc, url = start_api(HOME / "o1-api.log")
    try:
        yield url
    finally:
        stop_process(proc)


def cli(*args: str, key: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LEASEHOLD_URL": url, "LEASEHOLD_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_leasehold_revoke_cli_waits_until_done(
    app_client: TestClient, api_url: str, keys: dict[str, str]
) -> None:
    tenant = f"tr-{RUN}"
    mine = tenant_keys(tenant)
    names = [unique(f"cli-revoke/{i}") for i in range(3)]
    for name in names:
        start(app_client, mine["emitter"], name, {"a": "reports-readonly", "b": "task-cache"})
    wait_until(lambda: count(tenant, CredState.active) == 6, timeout=30)

    nothing = cli("revoke", key=keys["admin"], url=api_url)
    assert nothing.returncode == 2 and "at least one" in nothing.stderr
    done = cli(
        "revoke",
        "--profile",
        "reports-readonly",
        "--tenant",
        tenant,
        "--json",
        key=keys["admin"],
        url=api_url,
    )
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert view["done"] and view["revoked"] == 3 and view["remaining"] == 0
    assert view["match"]["tenant"] == tenant and view["by"] == f"admin-{RUN}"
    assert count(tenant, CredState.active) == 3  # the redis ones: not of the match

    # For people: a progress bar until done; an operator is held to its own tenant.
    shown = cli("revoke", "--source", "pytest://lifecycle", key=mine["operator"], url=api_url)
    assert shown.returncode == 0, shown.stderr
    assert "kill switch" in shown.stdout and "] 3/3 done" in shown.stdout
    assert count(tenant, CredState.active) == 0
    other = cli("revoke", "--tenant", tenant, key=keys["operator-t2"], url=api_url)
    assert other.returncode == 1 and "403" in other.stderr
    listed = app_client.get("/v1/revocations", headers=auth(mine["operator"])).json()["items"]
    assert len(listed) == 2  # the admin's (for this tenant) and the operator's
    for switch in listed:
        lifted = app_client.delete(f"/v1/revocations/{switch['id']}", headers=auth(keys["admin"]))
        assert lifted.status_code == 200


def test_a_revoked_key_gets_401_within_5_s_on_another_process(
    app_client: TestClient, api_url: str, keys: dict[str, str]
) -> None:
    admin = auth(keys["admin"])
    body = {"name": f"cross-{RUN}", "role": "operator", "tenant": "t1"}
    made = app_client.post("/v1/keys", headers=admin, json=body).json()
    elsewhere = f"{api_url}/v1/tasks"
    assert httpx.get(elsewhere, headers=auth(made["key"]), timeout=5).status_code == 200
    assert app_client.delete(f"/v1/keys/{made['id']}", headers=admin).status_code == 200
    revoked_at = time.monotonic()
    wait_until(
        lambda: httpx.get(elsewhere, headers=auth(made["key"]), timeout=5).status_code == 401,
        timeout=6,
        interval=0.1,
    )
    assert time.monotonic() - revoked_at <= 5.0


def test_keys_create_expires(api_url: str) -> None:
    made = cli(
        "keys",
        "create",
        f"exp-{RUN}",
        "--role",
        "operator",
        "--tenant",
        "t1",
        "--expires",
        "8s",  # room for the CLI's own start on a loaded machine before the first use
        key="",
        url=api_url,
    )
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert httpx.get(f"{api_url}/v1/tasks", headers=auth(secret), timeout=5).status_code == 200
    wait_until(
        lambda: (
            httpx.get(f"{api_url}/v1/tasks", headers=auth(secret), timeout=5).status_code == 401
        ),
        timeout=14,
        interval=0.2,
    )
    listed = cli("keys", "list", key="", url=api_url)
    row = next(line for line in listed.stdout.splitlines() if line.startswith(f"exp-{RUN}"))
    assert "expired" in row
    bad = cli(
        "keys", "create", f"bad-{RUN}", "--role", "admin", "--expires", "soon", key="", url=api_url
    )
    assert bad.returncode == 1 and "--expires" in bad.stderr


# --- the dashboard's kill switch panel --------------------------------------------------


def test_dashboard_throws_shows_and_lifts_a_switch(
    app_client: TestClient, keys: dict[str, str]
) -> None:
    tenant = f"td-{RUN}"
    mine = tenant_keys(tenant)
    name = unique("dash")
    start(app_client, mine["emitter"], name, {"db": "reports-readonly"})
    wait_until(lambda: states(tenant, name) == {"db": CredState.active})
    web = TestClient(app_client.app, base_url="http://testserver", follow_redirects=False)
    other = TestClient(app_client.app, base_url="http://testserver", follow_redirects=False)
    try:

        def sign_in(client: TestClient, key: str) -> str:
            assert client.post("/dashboard/login", data={"key": key}).status_code == 303
            page = client.get("/dashboard").text
            assert 'id="throw-switch"' in page
            return page.split('name="csrf" value="', 1)[1].split('"', 1)[0]

        csrf = sign_in(web, mine["operator"])
        form = {"profile": "reports-readonly"}
        assert web.post("/dashboard/revocations", data=form).status_code == 403  # no token
        evil = {"Origin": "https://evil.example"}
        refused = web.post("/dashboard/revocations", data={**form, "csrf": csrf}, headers=evil)
        assert refused.status_code == 403
        assert states(tenant, name) == {"db": CredState.active}
        thrown = web.post("/dashboard/revocations", data={**form, "csrf": csrf})
        assert thrown.status_code == 303 and "switch=thrown" in thrown.headers["location"]
        wait_until(lambda: states(tenant, name) == {"db": CredState.revoked})
        live = web.get("/dashboard/live").text
        assert 'id="kill-switches"' in live and "profile=<code>reports-readonly</code>" in live
        (switch_id,) = [
            s["id"]
            for s in app_client.get("/v1/revocations", headers=auth(mine["operator"])).json()[
                "items"
            ]
        ]
        assert f'data-switch="{switch_id}"' in live

        csrf_t2 = sign_in(other, keys["operator-t2"])
        assert switch_id not in other.get("/dashboard/live").text
        lift_url = f"/dashboard/revocations/{switch_id}/lift"
        assert other.post(lift_url, data={"csrf": csrf_t2}).status_code == 404
        lifted = web.post(lift_url, data={"csrf": csrf})
        assert lifted.status_code == 303 and "switch=lifted" in lifted.headers["location"]
        assert f'data-switch="{switch_id}"' not in web.get("/dashboard/live").text
    finally:
        web.close()
        other.close()
