"""Approvals: a profile with `approval = true` mints nothing until an operator of its
tenant (or an admin) approves; a denial is final; who decided is in the audit trail;
the profile's webhook is called, signed, when a grant starts waiting."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from app.core.db import session_scope
from app.core.models import AuditEntry, Credential, Task
from app.profiles import ProfileError, parse_profiles, webhook_url_problem
from tests.support.api import (
    auth,
    claim_url,
    credentials_of,
    event,
    role_exists,
    started,
    states,
    unique,
)
from tests.support.procs import wait_until
from tests.support.world import ROOT, RUN

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

WORKLOAD = "spiffe://example.org/agent/gated-test"


def post(client: TestClient, url: str, key: str, body: Any = None) -> Any:
    return client.post(url, headers=auth(key), json=body)


def audit_of(client: TestClient, key: str, cred_id: str) -> list[dict[str, Any]]:
    answer = client.get(f"/v1/audit?credential={cred_id}", headers=auth(key))
    assert answer.status_code == 200, answer.text
    return answer.json()["items"]


def deadline_of(tenant: str, name: str) -> Any:
    with session_scope() as session:
        task = session.exec(select(Task).where(Task.tenant == tenant, Task.name == name)).one()
        return task.deadline


def test_nothing_is_minted_before_approval_then_approval_mints_once(
    app_client: TestClient, keys: dict[str, str]
) -> None:
    name = unique("approve")
    token = post(
        app_client,
        "/v1/events",
        keys["emitter"],
        started(name, {"db": "approved-db", "cache": "task-cache"}, 300, workload=WORKLOAD),
    ).json()["claim_token"]
    # The grant without approval is minted; the other one waits, with nothing in the backend.
    wait_until(lambda: states("t1", name).get("cache") == "active")
    (db,) = [c for c in credentials_of("t1", name) if c.grant == "db"]
    assert db.state == "awaiting_approval" and db.minted_at is None and db.approved_at is None
    assert not role_exists(db.backend_name)

    for wait in (0, 0.3):
        answer = app_client.post(claim_url(name, "db", wait), headers=auth(token))
        assert answer.status_code == 409 and answer.json()["state"] == "awaiting_approval"
        assert answer.headers["retry-after"] == "1"

    # While it waits, the deadline the operator sees cannot move.
    before = deadline_of("t1", name)
    longer = post(
        app_client, "/v1/events", keys["emitter"], event("heartbeat", name, {"max_duration": 600})
    )
    assert longer.status_code == 403 and "approval" in longer.json()["error"]
    assert deadline_of("t1", name) == before

    url = f"/v1/credentials/{db.id}/approve"
    assert post(app_client, url, keys["emitter"]).status_code == 403  # an emitter may not
    assert post(app_client, url, keys["operator-t2"]).status_code == 404  # nor another tenant
    assert post(app_client, url, keys["operator"], {"reason": "x" * 501}).status_code == 422
    assert post(app_client, url, keys["operator"], {"reason": "a\u0000b"}).status_code == 422
    assert post(app_client, url, keys["operator"], {"why": "extra"}).status_code == 422
    assert states("t1", name)["db"] == "awaiting_approval"

    answer = post(app_client, url, keys["operator"], {"reason": "change ticket CHG-42"})
    assert answer.status_code == 202 and answer.json() == {"id": db.id, "state": "pending"}
    again = post(app_client, url, keys["operator"])
    assert again.status_code == 409 and again.json()["state"] in ("pending", "active")
    wait_until(lambda: states("t1", name)["db"] == "active")
    assert role_exists(db.backend_name)

    answer = app_client.post(claim_url(name, "db"), headers=auth(token))
    assert answer.status_code == 200, answer.text
    assert answer.json()["secret"]["username"] == db.backend_name
    (db,) = [c for c in credentials_of("t1", name) if c.grant == "db"]
    assert db.approved_at is not None and db.expires_at is not None
    assert db.expires_at <= before  # short-lived: no later than the deadline approved

    # Approved: still no stretching the deadline; a heartbeat that moves nothing is fine.
    longer = post(
        app_client, "/v1/events", keys["emitter"], event("heartbeat", name, {"max_duration": 600})
    )
    assert longer.status_code == 403
    same = post(
        app_client, "/v1/events", keys["emitter"], event("heartbeat", name, {"max_duration": 300})
    )
    assert same.status_code == 202
    assert deadline_of("t1", name) == before
    assert post(app_client, f"/v1/credentials/{db.id}/deny", keys["operator"]).status_code == 409

    trail = audit_of(app_client, keys["operator"], db.id)
    actions = [e["action"] for e in reversed(trail)]  # oldest first
    assert actions[: actions.index("claimed") + 1] == ["approved", "minted", "claimed"]
    (approved,) = [e for e in trail if e["action"] == "approved"]
    assert approved["actor"] == f"operator-{RUN}" and approved["detail"] == "change ticket CHG-42"
    assert approved["task"] == name
    with session_scope() as session:
        rows = session.exec(
            select(AuditEntry).where(
                AuditEntry.credential_id == db.id, AuditEntry.action == "approved"
            )
        ).all()
    assert len(rows) == 1 and rows[0].actor == f"operator-{RUN}"

    post(app_client, "/v1/events", keys["emitter"], event("succeeded", name))
    wait_until(lambda: states("t1", name) == {"db": "revoked", "cache": "revoked"})
    assert not role_exists(db.backend_name)


def test_a_denial_is_final_and_never_claimable(
    app_client: TestClient, keys: dict[str, str]
) -> None:
    name = unique("deny")
    token = post(
        app_client, "/v1/events", keys["emitter"], started(name, {"db": "approved-db"}, 120)
    ).json()["claim_token"]
    (db,) = credentials_of("t1", name)
    assert db.state == "awaiting_approval"

    answer = post(
        app_client, f"/v1/credentials/{db.id}/deny", keys["operator"], {"reason": "not today"}
    )
    assert answer.status_code == 200 and answer.json() == {"id": db.id, "state": "denied"}
    claim = app_client.post(claim_url(name, "db"), headers=auth(token))
    assert claim.status_code == 410 and claim.json()["state"] == "denied"
    again = post(app_client, f"/v1/credentials/{db.id}/approve", keys["admin"])
    assert again.status_code == 409 and again.json()["state"] == "denied"
    assert post(app_client, f"/v1/credentials/{db.id}/deny", keys["operator"]).status_code == 409
    time.sleep(0.5)  # had anything been enqueued, the worker would have acted by now
    assert states("t1", name) == {"db": "denied"} and not role_exists(db.backend_name)

    (denied,) = [e for e in audit_of(app_client, keys["admin"], db.id) if e["action"] == "denied"]
    assert denied["actor"] == f"operator-{RUN}" and denied["detail"] == "not today"
    assert all(e["action"] != "minted" for e in audit_of(app_client, keys["admin"], db.id))
    assert post(app_client, "/v1/credentials/nope/deny", keys["operator"]).status_code == 404
    post(app_client, "/v1/events", keys["emitter"], event("succeeded", name))


def test_the_tasks_end_revokes_a_waiting_grant_and_an_admin_decides_any_tenant(
    app_client: TestClient, keys: dict[str, str]
) -> None:
    ended, theirs = unique("ends-waiting"), unique("t2-waits")
    token = post(
        app_client, "/v1/events", keys["emitter"], started(ended, {"db": "approved-db"}, 120)
    ).json()["claim_token"]
    post(app_client, "/v1/events", keys["emitter-t2"], started(theirs, {"db": "approved-db"}, 120))
    (mine,) = credentials_of("t1", ended)
    (other,) = credentials_of("t2", theirs)

    post(app_client, "/v1/events", keys["emitter"], event("cancelled", ended))
    wait_until(lambda: states("t1", ended) == {"db": "revoked"})
    assert app_client.post(claim_url(ended, "db"), headers=auth(token)).status_code == 410
    late = post(app_client, f"/v1/credentials/{mine.id}/approve", keys["operator"])
    assert late.status_code == 409 and late.json()["state"] == "revoked"
    assert not role_exists(mine.backend_name)

    assert post(app_client, f"/v1/credentials/{other.id}/deny", keys["operator"]).status_code == 404
    answer = post(app_client, f"/v1/credentials/{other.id}/deny", keys["admin"])
    assert answer.status_code == 200 and states("t2", theirs) == {"db": "denied"}
    (entry,) = [e for e in audit_of(app_client, keys["admin"], other.id) if e["action"] == "denied"]
    assert entry["actor"] == f"admin-{RUN}" and entry["tenant"] == "t2"
    post(app_client, "/v1/events", keys["emitter-t2"], event("succeeded", theirs))


# --- the approval webhook -----------------------------------------------------


def test_webhook_urls_are_https_or_loopback_http_outside_production() -> None:
    assert webhook_url_problem("https://hooks.example.org/x", production=True) is None
    assert webhook_url_problem("http://127.0.0.1:9000/hook", production=False) is None
    assert webhook_url_problem("http://[::1]:9000/hook", production=False) is None
    assert webhook_url_problem("http://127.0.0.1:9000/hook", production=True) is not None
    assert webhook_url_problem("http://hooks.example.org/x", production=False) is not None
    assert webhook_url_problem("https://user:pw@hooks.example.org/x", production=False) is not None
    assert webhook_url_problem("ftp://hooks.example.org/x", production=False) is not None
    base = {"issuer": "vault-token", "policies": ["p"], "max_ttl": 60, "approval": True}
    parse_profiles({"profiles": {"ok": {**base, "approval_webhook": "https://h.example/x"}}})
    for bad, field in (
        ({**base, "approval_webhook": "http://h.example/x"}, "approval_webhook"),
        (
            {**base, "approval": False, "approval_webhook": "https://h.example/x"},
            "approval_webhook",
        ),
        ({**base, "approval_webhook_secret": "short"}, "approval_webhook_secret"),
    ):
        with pytest.raises(ProfileError, match=field) as caught:
            parse_profiles({"profiles": {"bad": bad}})
        assert "h.example" not in str(caught.value) and "short" not in str(caught.value)


class Receiver:
    """A real local HTTP server that records every call; the first answers 500."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], bytes, float]] = []
        calls = self.calls

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                calls.append(({k.lower(): v for k, v in self.headers.items()}, body, time.time()))
                self.send_response(500 if len(calls) == 1 else 204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/leasehold/approvals"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    profiles = Path(os.environ["LEASEHOLD_PROFILES_FILE"])
    # A profile of this module only, appended (the API and the worker reload on mtime).
    with profiles.open("a") as f:
        f.write(
            '\n[profiles.approval-hooked]\nissuer = "vault-token"\npolicies = ["reports-read"]\n'
            f'max_ttl = 900\napproval = true\napproval_webhook = "{hook.url}"\n'
        )
    stamp = time.time() + 1
    os.utime(profiles, (stamp, stamp))
    yield hook
    hook.server.shutdown()


def verify(
    key: bytes, headers: dict[str, str], body: bytes, *, now: float, tolerance: int = 300
) -> bool:
    """What a receiver does (the README's recipe)."""
    parts = dict(p.split("=", 1) for p in headers["leasehold-signature"].split(","))
    timestamp = int(parts["t"])
    expected = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return abs(now - timestamp) <= tolerance and hmac.compare_digest(expected, parts["v1"])


def test_the_webhook_asks_signed_retried_and_without_secrets(
    app_client: TestClient, keys: dict[str, str], receiver: Receiver
) -> None:
    name = unique("hooked")
    answer = post(
        app_client,
        "/v1/events",
        keys["emitter"],
        started(name, {"v": "approval-hooked"}, 240, workload=WORKLOAD),
    )
    assert answer.status_code == 202, answer.text
    token = answer.json()["claim_token"]
    (cred,) = credentials_of("t1", name)
    # The first call answers 500: the worker retries with backoff and the second lands.
    wait_until(lambda: len(receiver.calls) >= 2, timeout=20)
    time.sleep(1.0)
    assert len(receiver.calls) == 2  # no more after a 2xx

    secret_key = os.environ["LEASEHOLD_SECRET_KEY"].split(",")[0].encode()
    key = hmac.new(secret_key, b"leasehold-approval-webhook:approval-hooked", hashlib.sha256)
    derived = key.hexdigest().encode()
    printed = subprocess.run(
        [sys.executable, "-m", "app.cli", "webhook-secret", "approval-hooked"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.strip().encode() == derived

    for headers, body, at in receiver.calls:
        assert verify(derived, headers, body, now=at)
        assert not verify(derived, headers, body.replace(b"gated-test", b"other-test"), now=at)
        assert not verify(b"another key", headers, body, now=at)
        assert not verify(derived, headers, body, now=at + 3600)  # a stale replay
        assert headers["leasehold-delivery"] == cred.id
        assert headers["content-type"] == "application/json"
        sent = json.loads(body)
        assert sent == {
            "type": "approval.requested",
            "credential": cred.id,
            "tenant": "t1",
            "task": name,
            "grant": "v",
            "profile": "approval-hooked",
            "issuer": "vault-token",
            "workload": WORKLOAD,
            "source": "pytest://lifecycle",
            "max_duration": 240,
            "deadline": sent["deadline"],
            "requested_at": sent["requested_at"],
        }
        text = body.decode()
        assert token not in text and "/approve" not in text and "/v1/" not in text
    assert states("t1", name) == {"v": "awaiting_approval"}  # asking decides nothing

    # Once decided, a re-delivered job is a no-op: nobody needs asking any more.
    post(app_client, f"/v1/credentials/{cred.id}/approve", keys["operator"])
    wait_until(lambda: states("t1", name) == {"v": "active"})
    from workers.notify_approval import request_approval

    assert request_approval(cred.id) == "skipped"
    assert len(receiver.calls) == 2
    post(app_client, "/v1/events", keys["emitter"], event("succeeded", name))
    wait_until(lambda: states("t1", name) == {"v": "revoked"})
    with session_scope() as session:
        assert session.get(Credential, cred.id) is not None
