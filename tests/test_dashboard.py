"""/dashboard as an operator sees it: headless Chromium (Debian's, driven by Playwright)
against a real `leasehold api` process, the real worker and backends; then the session,
CSRF and tenant rules through plain HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, expect, sync_playwright
from sqlalchemy import delete
from sqlmodel import col, select

from app.api.auth import create_key
from app.api.dashboard import COOKIE, SESSION_SECONDS, new_session
from app.api.dashboard.sessions import SESSION, csrf_ok, csrf_token, read_session
from app.core import sealing
from app.core.db import session_scope
from app.core.models import ApiKey, AuditEntry, Credential, Role, Sweep, Task, utcnow
from tests.support.api import auth, claim_url, credentials_of, event, started, states
from tests.support.procs import start_api, stop_process, wait_until
from tests.support.world import HOME, ROOT

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The README's picture is taken only when asked for (LEASEHOLD_SCREENSHOT=docs/dashboard.png):
# a test run leaves the checkout as it found it.
SCREENSHOT = Path(os.environ.get("LEASEHOLD_SCREENSHOT") or HOME / "dashboard.png")
WORKLOAD = "spiffe://example.org/agent/reporter"
KINDS = [
    "nightly-report/extract",
    "etl/orders-sync",
    "agent/research-assistant",
    "billing/invoice-run",
    "ml/feature-backfill",
]


def task_name(kind: str) -> str:
    return f"{kind}/{uuid.uuid4().hex[:8]}/try-1"


@pytest.fixture(scope="module")
def server(worker: Path, installation_id: str) -> Iterator[str]:
    """A real `leasehold api` process, reachable by the browser."""
    proc, url = start_api(HOME / "dashboard-api.log")
    yield url
    stop_process(proc)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Debian's chromium, never a downloaded browser.
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def emit(url: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = httpx.post(f"{url}/v1/events", json=body, headers=auth(key), timeout=10)
    assert answer.status_code in (200, 202), answer.text
    return answer.json()


def start(url: str, key: str, name: str, grants: dict[str, str], **data: Any) -> str:
    return emit(url, key, started(name, grants, max_duration=600, **data))["claim_token"]


def test_browser_sign_in_live_updates_and_revoke_button(
    server: str, browser: Browser, keys: dict[str, str], installation_id: str
) -> None:
    emitter = keys["emitter"]
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    page.goto(f"{server}/dashboard")
    expect(page).to_have_url(f"{server}/dashboard/login")
    page.fill("#key", keys["operator"])
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{server}/dashboard")
    expect(page.locator("header")).to_contain_text("operator")

    (cookie,) = [c for c in context.cookies() if c["name"] == COOKIE]
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/dashboard" and cookie["secure"] is False  # plain http here
    assert SESSION_SECONDS - 60 < cookie["expires"] - time.time() <= SESSION_SECONDS
    assert keys["operator"] not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script can read it

    # Everything below happens without a reload: this marker would not survive one.
    page.evaluate("window.__still_here = 'yes'")

    first = task_name("nightly-report/extract")
    start(server, emitter, first, {"vault": "kv-reader"}, workload=WORKLOAD)
    row = page.locator("#active-credentials tbody tr", has_text=first)
    expect(row).to_be_visible(timeout=15_000)
    expect(row).to_contain_text("kv-reader")
    expect(row).to_contain_text("vault-token")
    expect(row).to_contain_text(WORKLOAD)

    emit(server, emitter, event("succeeded", first))
    gone = page.locator("#recent-revocations tbody tr", has_text=first)
    expect(gone).to_be_visible(timeout=15_000)
    expect(gone.locator("td.reason")).to_have_text("succeeded")
    expect(page.locator("#active-credentials tbody tr", has_text=first)).to_have_count(0)
    assert page.evaluate("window.__still_here") == "yes"

    # The revoke button, with its confirmation.
    second = task_name("nightly-report/load")
    start(server, emitter, second, {"cache": "task-cache"}, workload=WORKLOAD)
    target = page.locator("#active-credentials tbody tr", has_text=second)
    expect(target).to_be_visible(timeout=15_000)
    assert page.evaluate("window.__still_here") == "yes"
    target.locator("a.revoke").click()
    dialog = page.locator("#confirm-revoke")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text(second)
    dialog.locator("button.cancel").click()  # cancel first: nothing happens
    expect(dialog).to_be_hidden()
    assert states("t1", second) == {"cache": "active"}
    target.locator("a.revoke").click()
    page.click("#confirm-revoke-button")
    expect(page.locator("#notice")).to_contain_text("Revocation requested")
    revoked = page.locator("#recent-revocations tbody tr", has_text=second)
    expect(revoked.locator("td.reason")).to_have_text("manual", timeout=15_000)
    assert states("t1", second) == {"cache": "revoked"}
    (cred,) = credentials_of("t1", second)
    assert cred.revoke_reason == "manual"
    with session_scope() as session:
        actors = session.exec(
            select(AuditEntry.actor).where(
                AuditEntry.credential_id == cred.id, AuditEntry.action == "revoke_requested"
            )
        ).all()
    assert actors and all(a.startswith("operator-") for a in actors)

    # A fuller picture for the README's screenshot: a few running tasks, a second claim,
    # and an hour of revocation history (rows written for the chart, removed after).
    shown, tokens = [], {}
    for kind, grants in (
        ("nightly-report/transform", {"db": "reports-readonly", "vault": "kv-reader"}),
        ("agent/research-assistant", {"cache": "task-cache"}),
        ("etl/orders-sync", {"vault": "kv-reader"}),
    ):
        name = task_name(kind)
        tokens[name] = start(server, emitter, name, grants, workload=WORKLOAD)
        shown.append(name)
    for name in shown:
        expect(page.locator("#active-credentials tbody tr", has_text=name).first).to_be_visible(
            timeout=15_000
        )
    sniffed = shown[2]
    for expected in (200, 410):
        answer = httpx.post(
            f"{server}{claim_url(sniffed, 'vault')}", headers=auth(tokens[sniffed]), timeout=10
        )
        assert answer.status_code == expected
    with revocation_history(emitter_id(), installation_id):
        expect(page.locator("#interceptions tbody tr", has_text=sniffed)).to_be_visible(
            timeout=15_000
        )
        expect(page.locator("#chart rect.bar")).to_have_count(30, timeout=15_000)
        expect(page.locator("#chart circle.p99.dot").first).to_be_attached()
        expect(page.locator("#notice")).to_have_count(0, timeout=15_000)  # it fades
        assert "revoked=" not in page.url
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        assert SCREENSHOT.stat().st_size > 10_000
    for name in shown:
        emit(server, emitter, event("succeeded", name))
    emit(server, emitter, event("succeeded", second))
    context.close()


def emitter_id() -> str:
    with session_scope() as session:
        key_id = session.exec(
            select(ApiKey.id).where(ApiKey.role == Role.emitter, ApiKey.tenant == "t1")
        ).first()
    assert key_id is not None
    return key_id


@contextmanager
def revocation_history(owner_key_id: str, installation: str) -> Iterator[None]:
    """An hour of ended tasks with verified revocations, so the chart has a history.

    Rows go into each of the chart's 30 aligned two-minute buckets, the current one
    included, so every bar is there whether or not this run's own revocations fell in
    the current bucket. Near a bucket's end it first waits for the next bucket, so the
    page's render (within seconds) sees the same window.
    """
    width = timedelta(minutes=2)
    now = utcnow()
    into = now.timestamp() % width.total_seconds()
    if into > width.total_seconds() - 20:
        time.sleep(width.total_seconds() - into + 1)
        now = utcnow()
    current = now - timedelta(seconds=now.timestamp() % width.total_seconds())
    profiles = [
        ("kv-reader", "vault-token"),
        ("task-cache", "redis"),
        ("reports-readonly", "postgres"),
    ]
    tasks, creds = [], []
    for bucket in range(30):
        bucket_start = current - width * (29 - bucket)
        for j in range(3 + (bucket * 7) % 9):
            revoked_at = min(bucket_start + timedelta(seconds=5 + 9 * j), now)
            timeout = j % 6 == 5
            exposure = timedelta(milliseconds=(350 + 40 * j) if timeout else 6 + (j * 13) % 30)
            ended = revoked_at - exposure
            kind = KINDS[(bucket * 3 + j) % len(KINDS)]
            task = Task(
                tenant="t1",
                name=f"{kind}/{uuid.uuid4().hex[:8]}/try-1",
                owner_key_id=owner_key_id,
                source="pytest://history",
                state="timed_out" if timeout else "succeeded",
                started_at=ended - timedelta(minutes=3),
                deadline=ended,
                ended_at=ended,
                created_at=ended - timedelta(minutes=3),
            )
            profile, issuer = profiles[(bucket + j) % 3]
            cred = Credential(
                tenant="t1",
                task_id=task.id,
                grant="db",
                profile=profile,
                issuer=issuer,
                state="revoked",
                backend_name="",
                created_at=task.created_at,
                updated_at=revoked_at,
                minted_at=task.created_at,
                revoked_at=revoked_at,
                revoke_requested_at=ended,
                revoke_reason="timeout" if timeout else "succeeded",
            )
            cred.backend_name = f"lh_{installation[:12]}_{cred.id}"
            tasks.append(task)
            creds.append(cred)
    with session_scope() as session:
        session.add_all(tasks)
        session.flush()
        session.add_all(creds)
    try:
        yield
    finally:
        with session_scope() as session:
            session.execute(delete(Credential).where(col(Credential.id).in_([c.id for c in creds])))
            session.execute(delete(Task).where(col(Task.id).in_([t.id for t in tasks])))


def test_browser_refuses_an_emitter_key(
    server: str, browser: Browser, keys: dict[str, str]
) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{server}/dashboard/login")
    page.fill("#key", keys["emitter"])
    with page.expect_response(f"{server}/dashboard/login") as answer:
        page.click("button[type=submit]")
    assert answer.value.status == 403
    expect(page.locator("#login-error")).to_contain_text("cannot sign in")
    assert context.cookies() == []
    page.goto(f"{server}/dashboard")
    expect(page).to_have_url(f"{server}/dashboard/login")
    page.fill("#key", "lhk_not-a-key-at-all")
    page.click("button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("not valid")
    assert context.cookies() == []
    context.close()


# --- the same rules over plain HTTP ---------------------------------------------


@pytest.fixture
def web(app_client: TestClient) -> Iterator[TestClient]:
    """A client of the same app with its own cookie jar (no second lifespan)."""
    client = TestClient(app_client.app, base_url="http://testserver", follow_redirects=False)
    yield client
    client.close()


def sign_in(client: TestClient, key: str) -> str:
    answer = client.post("/dashboard/login", data={"key": key})
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/dashboard"
    header = answer.headers["set-cookie"]
    assert "HttpOnly" in header and "SameSite=strict" in header.replace("Strict", "strict")
    assert f"Max-Age={SESSION_SECONDS}" in header and "Path=/dashboard" in header
    page = client.get("/dashboard")
    assert page.status_code == 200
    marker = 'name="csrf" value="'
    return page.text.split(marker, 1)[1].split('"', 1)[0]


def live_html(client: TestClient, query: str = "") -> str:
    answer = client.get("/dashboard/live" + query)
    assert answer.status_code == 200, answer.text
    return answer.text


def test_security_headers_and_no_session_without_sign_in(web: TestClient) -> None:
    assert web.get("/dashboard").headers["location"] == "/dashboard/login"
    assert web.get("/dashboard/live").status_code == 401
    page = web.get("/dashboard/login")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-frame-options"] == "DENY"
    assert "<script>" not in page.text  # no inline script, ever
    assert web.get("/dashboard/static/dashboard.js").status_code == 200


def test_emitter_and_unknown_keys_cannot_sign_in(web: TestClient, keys: dict[str, str]) -> None:
    assert web.post("/dashboard/login", data={"key": keys["emitter"]}).status_code == 403
    assert web.post("/dashboard/login", data={"key": "lhk_nope"}).status_code == 401
    assert web.post("/dashboard/login", data={}).status_code == 401
    assert COOKIE not in web.cookies


def test_sessions_and_claim_tokens_share_one_signer_never_one_key(installation_id: str) -> None:
    """app.core.sealing signs both; a tag made for one purpose verifies for no other."""
    session_token = new_session("some-key-id")
    _, payload, tag = session_token.split(".")
    assert sealing.unsign("lhs", SESSION, session_token) is not None
    assert sealing.read_claim_token(f"lhc.{payload}.{tag}") is None
    claim = sealing.claim_token("t1", "task-pk")
    _, payload, tag = claim.split(".")
    assert read_session(f"lhs.{payload}.{tag}") is None
    assert not csrf_ok(payload, tag)  # nor as a CSRF token
    assert csrf_ok("nonce", csrf_token("nonce")) and not csrf_ok("nonce", None)


def test_forged_expired_and_retired_sessions_are_refused(
    web: TestClient, keys: dict[str, str]
) -> None:
    sign_in(web, keys["operator"])
    good = web.cookies[COOKIE]
    prefix, payload, sig = good.split(".")
    web.cookies.set(COOKIE, f"{prefix}.{payload}.{sig[::-1]}", path="/dashboard")
    assert web.get("/dashboard/live").status_code == 401
    with session_scope() as session:
        key_id = session.exec(
            select(ApiKey.id).where(ApiKey.name.startswith("operator-"), ApiKey.tenant == "t1")
        ).first()
    assert key_id is not None
    expired = new_session(key_id, now=time.time() - SESSION_SECONDS - 1)
    web.cookies.set(COOKIE, expired, path="/dashboard")
    assert web.get("/dashboard/live").status_code == 401

    # Retiring the key ends its sessions at once.
    with session_scope() as session:
        key, secret = create_key(
            session, name=f"op-retire-{uuid.uuid4().hex[:6]}", role=Role.operator, tenant="t1"
        )
        retired_id = key.id
    web.cookies.clear()
    sign_in(web, secret)
    assert web.get("/dashboard/live").status_code == 200
    with session_scope() as session:
        row = session.get(ApiKey, retired_id)
        assert row is not None
        row.revoked_at = utcnow()
    assert web.get("/dashboard/live").status_code == 401
    assert web.get("/dashboard").headers["location"] == "/dashboard/login"


def test_signing_out_ends_the_session_on_the_server(web: TestClient, keys: dict[str, str]) -> None:
    csrf = sign_in(web, keys["operator"])
    copied = web.cookies[COOKIE]
    thief = TestClient(web.app, base_url="http://testserver", follow_redirects=False)
    thief.cookies.set(COOKIE, copied, path="/dashboard")
    assert thief.get("/dashboard/live").status_code == 200
    out = web.post("/dashboard/logout", data={"csrf": csrf})
    assert out.status_code == 303 and COOKIE not in web.cookies
    # The copied cookie is still well signed and unexpired, and no longer works.
    assert thief.get("/dashboard/live").status_code == 401
    assert thief.get("/dashboard").headers["location"] == "/dashboard/login"
    assert thief.post("/dashboard/logout", data={"csrf": csrf}).status_code == 403
    # A cookie signed with the right key but never opened here does not work either.
    with session_scope() as session:
        key_id = session.exec(
            select(ApiKey.id).where(ApiKey.name.startswith("operator-"), ApiKey.tenant == "t1")
        ).first()
    assert key_id is not None
    thief.cookies.set(COOKIE, new_session(key_id), path="/dashboard")
    assert thief.get("/dashboard/live").status_code == 401
    thief.close()


def test_revoke_needs_the_sessions_csrf_token_and_the_tenant(
    web: TestClient, app_client: TestClient, keys: dict[str, str]
) -> None:
    name = task_name("csrf")
    app_client.post(
        "/v1/events", json=started(name, {"v": "kv-reader"}), headers=auth(keys["emitter"])
    )
    wait_until(lambda: states("t1", name) == {"v": "active"})
    (cred,) = credentials_of("t1", name)
    url = f"/dashboard/credentials/{cred.id}/revoke"

    # Another tenant's operator: as if it did not exist.
    csrf_t2 = sign_in(web, keys["operator-t2"])
    assert name not in live_html(web)
    assert web.get(url).status_code == 404
    assert web.post(url, data={"csrf": csrf_t2}).status_code == 404
    web.cookies.clear()

    other = TestClient(app_client.app, follow_redirects=False)
    foreign_csrf = sign_in(other, keys["operator"])  # a valid token of another session
    csrf = sign_in(web, keys["operator"])
    assert foreign_csrf != csrf
    assert name in live_html(web)
    assert web.get(url).status_code == 200  # the confirmation page
    assert web.post(url, data={}).status_code == 403
    assert web.post(url, data={"csrf": foreign_csrf}).status_code == 403
    assert (
        web.post(url, data={"csrf": csrf}, headers={"Origin": "https://evil.example"}).status_code
        == 403
    )
    assert states("t1", name) == {"v": "active"}
    answer = web.post(url, data={"csrf": csrf}, headers={"Origin": "http://testserver"})
    assert answer.status_code == 303 and answer.headers["location"].startswith("/dashboard?")
    wait_until(lambda: states("t1", name) == {"v": "revoked"})
    assert web.post(url, data={"csrf": csrf}).status_code == 409  # not live any more

    # Logout is a form with the token too.
    assert web.post("/dashboard/logout", data={}).status_code == 403
    out = web.post("/dashboard/logout", data={"csrf": csrf})
    assert out.status_code == 303 and COOKIE not in web.cookies
    assert web.get("/dashboard/live").status_code == 401
    other.close()
    app_client.post("/v1/events", json=event("succeeded", name), headers=auth(keys["emitter"]))


def test_tenants_interceptions_and_sweeps(
    web: TestClient, app_client: TestClient, keys: dict[str, str]
) -> None:
    mine, theirs = task_name("tenant-one"), task_name("tenant-two")
    token = app_client.post(
        "/v1/events", json=started(mine, {"v": "kv-reader"}), headers=auth(keys["emitter"])
    ).json()["claim_token"]
    app_client.post(
        "/v1/events", json=started(theirs, {"v": "kv-reader"}), headers=auth(keys["emitter-t2"])
    )
    wait_until(
        lambda: states("t1", mine) == {"v": "active"} and states("t2", theirs) == {"v": "active"}
    )
    assert app_client.post(claim_url(mine, "v"), headers=auth(token)).status_code == 200
    assert app_client.post(claim_url(mine, "v"), headers=auth(token)).status_code == 410

    sign_in(web, keys["operator"])
    html = live_html(web)
    assert mine in html and theirs not in html
    # The second claim shows as a possible interception (that part refreshes every few s).
    wait_until(
        lambda: mine in live_html(web).split('id="interceptions"', 1)[1], timeout=10, interval=0.5
    )
    web.cookies.clear()

    sign_in(web, keys["admin"])
    everything = live_html(web)
    assert mine in everything and theirs in everything
    only_t2 = live_html(web, "?tenant=t2")
    assert theirs in only_t2 and mine not in only_t2

    with session_scope() as session:
        empty = session.exec(select(Sweep.id)).first() is None
    if empty:
        assert "no sweep yet" in everything
    now = utcnow()
    with session_scope() as session:
        sweep = Sweep(
            started_at=now - timedelta(seconds=3), finished_at=now, checked=42, orphans_revoked=7
        )
        session.add(sweep)
    try:
        figure = live_html(web).split('id="last-sweep"', 1)[1].split("</div>", 1)[0]
        assert "7" in figure and "orphans in the last sweep" in figure
        wait_until(
            lambda: ">42<" in live_html(web).split('id="sweeps"', 1)[1], timeout=10, interval=0.5
        )
    finally:
        with session_scope() as session:
            session.delete(session.get(Sweep, sweep.id))
    for key, name in ((keys["emitter"], mine), (keys["emitter-t2"], theirs)):
        app_client.post("/v1/events", json=event("succeeded", name), headers=auth(key))


def test_status_command_shows_the_same_figures(
    app_client: TestClient, keys: dict[str, str]
) -> None:
    name = task_name("status")
    app_client.post(
        "/v1/events",
        json=started(name, {"v": "kv-reader"}, workload=WORKLOAD),
        headers=auth(keys["emitter"]),
    )
    wait_until(lambda: states("t1", name) == {"v": "active"})
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "status"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert out.returncode == 0, out.stderr
    for label in (
        "running tasks",
        "active credentials",
        "revoked last hour",
        "failing revocations",
        "last sweep",
    ):
        assert label in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.startswith(name))
    assert "kv-reader" in row and "vault-token" in row and WORKLOAD in row
    app_client.post("/v1/events", json=event("succeeded", name), headers=auth(keys["emitter"]))


def test_browser_approve_and_deny_buttons_show_the_tasks_context(
    server: str, browser: Browser, keys: dict[str, str]
) -> None:
    emitter = keys["emitter"]
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    page.goto(f"{server}/dashboard/login")
    page.fill("#key", keys["operator"])
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{server}/dashboard")

    gated, refused = task_name("agent/gated-deploy"), task_name("agent/gated-drop")
    token = start(server, emitter, gated, {"db": "approved-db"}, workload=WORKLOAD)
    start(server, emitter, refused, {"db": "approved-db"}, workload=WORKLOAD)
    row = page.locator("#awaiting-approval tbody tr", has_text=gated)
    expect(row).to_be_visible(timeout=15_000)  # appears without a reload
    for shown in ("approved-db", WORKLOAD, "pytest://lifecycle", "600 s"):
        expect(row).to_contain_text(shown)

    row.locator("a.decide").click()
    card = page.locator("#decide")
    expect(card.locator("dd.task")).to_have_text(gated)
    expect(card.locator("dd.workload")).to_have_text(WORKLOAD)
    expect(card.locator("dd.source")).to_have_text("pytest://lifecycle")
    expect(card.locator("dd.profile")).to_contain_text("approved-db")
    expect(card.locator("dd.max-duration")).to_have_text("600 s")
    expect(card.locator("dd.deadline")).to_contain_text("UTC")
    assert states("t1", gated) == {"db": "awaiting_approval"}
    page.fill("#reason", "deploy window")
    page.click("#approve-button")
    expect(page.locator("#notice")).to_contain_text("Approved")
    row = page.locator("#active-credentials tbody tr", has_text=gated)
    expect(row).to_be_visible(timeout=15_000)
    assert (
        httpx.post(f"{server}{claim_url(gated, 'db')}", headers=auth(token), timeout=10).status_code
        == 200
    )

    page.locator("#awaiting-approval tbody tr", has_text=refused).locator("a.decide").click()
    page.click("#deny-button")
    expect(page.locator("#notice")).to_contain_text("Denied")
    expect(page.locator("#awaiting-approval tbody tr", has_text=refused)).to_have_count(0)
    assert states("t1", refused) == {"db": "denied"}

    with session_scope() as session:
        decided = session.exec(
            select(AuditEntry.action, AuditEntry.actor, AuditEntry.detail).where(
                col(AuditEntry.credential_id).in_(
                    [c.id for name in (gated, refused) for c in credentials_of("t1", name)]
                ),
                col(AuditEntry.action).in_(("approved", "denied")),
            )
        ).all()
    assert sorted((a, d) for a, _, d in decided) == [
        ("approved", "deploy window"),
        ("denied", None),
    ]
    assert all(actor.startswith("operator-") for _, actor, _ in decided)
    for name in (gated, refused):
        emit(server, emitter, event("succeeded", name))
    context.close()


def test_approve_needs_the_sessions_csrf_token_and_the_tenant(
    web: TestClient, app_client: TestClient, keys: dict[str, str]
) -> None:
    name = task_name("csrf-approve")
    app_client.post(
        "/v1/events", json=started(name, {"db": "approved-db"}), headers=auth(keys["emitter"])
    )
    (cred,) = credentials_of("t1", name)
    review = f"/dashboard/credentials/{cred.id}/decide"
    approve = f"/dashboard/credentials/{cred.id}/approve"

    csrf_t2 = sign_in(web, keys["operator-t2"])
    assert name not in live_html(web)
    assert web.get(review).status_code == 404
    assert web.post(approve, data={"csrf": csrf_t2}).status_code == 404
    web.cookies.clear()

    csrf = sign_in(web, keys["operator"])
    assert name in live_html(web).split('id="awaiting-approval"', 1)[1]
    assert web.get(review).status_code == 200
    assert web.post(approve, data={}).status_code == 403
    evil = {"Origin": "https://evil.example"}
    assert web.post(approve, data={"csrf": csrf}, headers=evil).status_code == 403
    assert states("t1", name) == {"db": "awaiting_approval"}
    answer = web.post(f"/dashboard/credentials/{cred.id}/deny", data={"csrf": csrf})
    assert answer.status_code == 303 and "denied=" in answer.headers["location"]
    assert states("t1", name) == {"db": "denied"}
    assert web.post(approve, data={"csrf": csrf}).status_code == 409
    assert web.get(review).status_code == 409
    app_client.post("/v1/events", json=event("succeeded", name), headers=auth(keys["emitter"]))
