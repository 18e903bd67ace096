"""Sentry: a local HTTP server stands in for Sentry and captures the envelopes. A forced
failing revocation in a real worker, and a second claim in the API, arrive as events that
carry no secret, key or claim token."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from fastapi.testclient import TestClient

from app import ledger
from app.api import create_app
from app.core.db import session_scope
from app.core.models import utcnow
from app.core.settings import get_settings
from app.observability.sentry import scrub_event, shutdown_sentry
from app.queue import REVOKE, REVOKE_QUEUE, configure, enqueue_revoke
from tests.support.api import auth, claim_url, credentials_of, event, started, states, unique
from tests.support.procs import environment, start_worker, stop_process, wait_until
from tests.support.world import HOME, PREFIX

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

URL_PASSWORD = "hunter2-url-password"


class Envelopes:
    """What the stand-in Sentry received: raw bodies and the events inside them."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self.lock = threading.Lock()

    def add(self, body: bytes) -> None:
        with self.lock:
            self.raw.append(body)

    def events(self) -> list[dict[str, Any]]:
        found = []
        with self.lock:
            bodies = list(self.raw)
        for body in bodies:
            lines = body.split(b"\n")
            # Envelope: a header line, then (item header, payload) pairs.
            for header, payload in zip(lines[1::2], lines[2::2], strict=False):
                if header.strip() and json.loads(header).get("type") == "event":
                    found.append(json.loads(payload))
        return found

    def matching(self, text: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if text in json.dumps(e.get("message", e))]


@pytest.fixture
def sentry_server() -> Iterator[tuple[str, Envelopes]]:
    captured = Envelopes()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            captured.add(body)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    dsn = f"http://publickey@127.0.0.1:{server.server_address[1]}/1"
    yield dsn, captured
    server.shutdown()


def forbidden(keys: dict[str, str], *more: str) -> list[str]:
    """Everything that must never reach Sentry."""
    settings = get_settings()
    values = [
        *keys.values(),
        *more,
        URL_PASSWORD,
        settings.secret_keys[0].decode(),
        settings.vault_token.get_secret_value() if settings.vault_token else "",
    ]
    return [v for v in values if v]


def assert_clean(captured: Envelopes, secrets: list[str]) -> None:
    raw = b"\n".join(captured.raw)
    for secret in secrets:
        assert secret.encode() not in raw, "a secret reached Sentry"
    assert b"lhk_" not in raw and b"lhc." not in raw


def test_scrubber_removes_secrets_keys_and_tokens() -> None:
    event = {
        "message": "revoke failed for redis://lh_x:pw-in-url@cache:6379/0 with hvs.CAESIabcdefghij",
        "request": {
            "headers": {
                "Authorization": "Bearer lhk_abcdefghijklmnopqrstuv",
                "Cookie": "lh_session=lhs.eyJ.sig",
                "X-Request-Id": "r-1",
            },
            "query_string": "claim_token=lhc.eyJ0.c2ln",
        },
        "extra": {
            "password": "pw-1",
            "sealed_secret": "gAAAAA",
            "attempts": 5,
            "nested": [{"dsn": "postgresql://u:pw-2@db/x"}, "s.ABCDEFGHIJKLMNOPQRSTUVWX"],
        },
        "breadcrumbs": {"values": [{"message": "claim with lhc.eyJhYmMi.c2lnbmF0dXJl"}]},
        "tags": {"issuer": "redis", "profile": "task-cache"},
    }
    clean = scrub_event(event, {})
    text = json.dumps(clean)
    for secret in (
        "pw-in-url",
        "hvs.CAESIabcdefghij",
        "lhk_abcdefghijklmnopqrstuv",
        "lhs.eyJ.sig",
        "lhc.eyJ0.c2ln",
        "pw-1",
        "gAAAAA",
        "pw-2",
        "s.ABCDEFGHIJKLMNOPQRSTUVWX",
        "lhc.eyJhYmMi.c2lnbmF0dXJl",
    ):
        assert secret not in text, secret
    # What helps is kept.
    assert clean["extra"]["attempts"] == 5 and clean["tags"]["issuer"] == "redis"
    assert clean["request"]["headers"]["X-Request-Id"] == "r-1"
    assert "redis://lh_x:[Filtered]@cache:6379/0" in clean["message"]


@pytest.fixture
def alert_after_two(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("LEASEHOLD_REVOKE_ALERT_AFTER", "2")
    get_settings.cache_clear()
    yield
    monkeypatch.delenv("LEASEHOLD_REVOKE_ALERT_AFTER")
    get_settings.cache_clear()


def test_failing_revocation_reaches_sentry_without_secrets(
    sentry_server: tuple[str, Envelopes],
    app_client: TestClient,
    keys: dict[str, str],
    alert_after_two: None,
) -> None:
    dsn, captured = sentry_server
    # A worker whose redis backend is down (a closed port), reporting to our stand-in Sentry
    # and fed by its own queues, so only it sees this revocation.
    profiles = HOME / "profiles-broken-redis.toml"
    original = Path(get_settings().profiles_file).read_text()
    profiles.write_text(
        original.replace(
            'url = "redis://127.0.0.1:6379/0"', f'url = "redis://:{URL_PASSWORD}@127.0.0.1:1/0"'
        )
    )
    assert URL_PASSWORD in profiles.read_text()
    prefix = f"{PREFIX}sentry:"
    env = {
        "LEASEHOLD_SENTRY_DSN": dsn,
        "LEASEHOLD_PROFILES_FILE": str(profiles),
        "LEASEHOLD_BROKER_KEY_PREFIX": prefix,
        "LEASEHOLD_REVOKE_ALERT_AFTER": "2",
    }
    with environment(env):
        proc = start_worker(HOME / "worker-sentry.log", "--concurrency", "1")
    try:
        # A real credential, minted by the main worker and claimed.
        name = unique("sentry-failing")
        answer = app_client.post(
            "/v1/events", json=started(name, {"cache": "task-cache"}), headers=auth(keys["emitter"])
        )
        token = answer.json()["claim_token"]
        claimed = app_client.post(claim_url(name, "cache", wait=15), headers=auth(token))
        assert claimed.status_code == 200
        password = claimed.json()["secret"]["password"]
        (cred,) = credentials_of("t1", name)
        with session_scope() as session:
            assert ledger.request_revoke(
                session, credential_id=cred.id, reason="manual", actor="pytest", now=utcnow()
            ) == [cred.id]
        sender = Celery("sentry-test")
        configure(sender, get_settings().model_copy(update={"broker_key_prefix": prefix}))
        sender.send_task(REVOKE, args=[cred.id], queue=REVOKE_QUEUE)

        events = wait_until(
            lambda: captured.matching("failing revocation"), timeout=30, interval=0.2
        )
        (reported,) = events[:1]
        assert reported["level"] == "error"
        assert reported["tags"]["issuer"] == "redis"
        assert reported["tags"]["profile"] == "task-cache"
        assert reported["tags"]["credential"] == cred.id
        assert reported["tags"]["component"] == "worker"
        assert reported["extra"]["attempts"] >= 2
        assert_clean(captured, forbidden(keys, password, token))

        # The same failing revocation on the dashboard and in the metrics.
        assert credentials_of("t1", name)[0].attempts >= 2
        scrape = app_client.get("/metrics").text
        failing = next(
            line
            for line in scrape.splitlines()
            if line.startswith("leasehold_failing_revocations ")
        )
        assert float(failing.split()[1]) >= 1
        web = TestClient(app_client.app, follow_redirects=False)
        web.post("/dashboard/login", data={"key": keys["operator"]})
        part = web.get("/dashboard/live").text.split('id="failing-revocations"', 1)[1]
        assert name in part.split("</section>", 1)[0]
        assert URL_PASSWORD not in web.get("/dashboard/live").text
        web.close()
    finally:
        stop_process(proc)
    # The main worker, whose redis is up, finishes the job.
    enqueue_revoke([cred.id])
    wait_until(lambda: states("t1", name) == {"cache": "revoked"}, timeout=15)
    app_client.post("/v1/events", json=event("succeeded", name), headers=auth(keys["emitter"]))


def test_second_claim_in_the_api_reaches_sentry_without_secrets(
    sentry_server: tuple[str, Envelopes],
    keys: dict[str, str],
    worker: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dsn, captured = sentry_server
    monkeypatch.setenv("LEASEHOLD_SENTRY_DSN", dsn)
    get_settings.cache_clear()
    try:
        # create_app() starts Sentry; its lifespan is not run (the session's API already
        # runs the process-wide notification listener).
        app = create_app()

        @app.get("/boom")
        def boom() -> None:
            raise RuntimeError(f"an unexpected error near {keys['operator']}")

        client = TestClient(app, raise_server_exceptions=False)
        assert client.get("/boom").status_code == 500
        crash = wait_until(
            lambda: [e for e in captured.events() if "exception" in e], timeout=15, interval=0.2
        )
        assert crash[0]["exception"]["values"][-1]["type"] == "RuntimeError"
        assert "[Filtered]" in crash[0]["exception"]["values"][-1]["value"]

        name = unique("sentry-second-claim")
        answer = client.post(
            "/v1/events", json=started(name, {"v": "kv-reader"}), headers=auth(keys["emitter"])
        )
        token = answer.json()["claim_token"]
        wait_until(lambda: states("t1", name) == {"v": "active"})
        first = client.post(claim_url(name, "v"), headers=auth(token))
        assert first.status_code == 200
        secret = first.json()["secret"]["token"]
        assert client.post(claim_url(name, "v"), headers=auth(token)).status_code == 410
        events = wait_until(lambda: captured.matching("second claim"), timeout=15, interval=0.2)
        assert events[0]["level"] == "warning"
        assert events[0]["tags"]["component"] == "api"
        assert events[0]["tags"]["profile"] == "kv-reader"
        client.post("/v1/events", json=event("succeeded", name), headers=auth(keys["emitter"]))
        client.close()
        assert_clean(captured, forbidden(keys, secret, token))
    finally:
        shutdown_sentry()
        monkeypatch.delenv("LEASEHOLD_SENTRY_DSN")
        get_settings.cache_clear()
