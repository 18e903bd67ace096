"""Emitter key scope (sources, workloads, profiles) and the per-key event rate limit."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlmodel import select

from app.api.auth import create_key
from app.api.ratelimit import RateLimiter, bucket_key
from app.authority.scope import ScopeError, grant_refusal, normalise, source_refusal, workload_in
from app.core.db import session_scope
from app.core.models import ApiKey, Role
from app.core.sealing import hash_api_key
from app.core.settings import get_settings
from tests.support.api import auth, event, started, states, unique
from tests.support.procs import wait_until
from tests.support.world import REDIS_URL, ROOT, RUN

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

TD = "spiffe://example.org"


def scoped_key(**scope: list[str]) -> tuple[str, str]:
    """A new t1 emitter key with this scope: (name, secret)."""
    name = f"scoped-{RUN}-{uuid.uuid4().hex[:6]}"
    with session_scope() as session:
        _, secret = create_key(session, name=name, role=Role.emitter, tenant="t1", **scope)
    return name, secret


def started_from(source: str, subject: str, grants: dict[str, str], **data: Any) -> dict:
    return {**started(subject, grants, **data), "source": source}


def denials(client: Any, operator: str, task: str) -> list[dict[str, Any]]:
    items = client.get("/v1/audit", params={"task": task}, headers=auth(operator)).json()["items"]
    return [i for i in items if i["action"] == "denied"]


# --- matching rules ----------------------------------------------------------


@pytest.mark.parametrize(
    ("workload", "inside"),
    [
        ("spiffe://example.org/agent/reporter", True),
        ("spiffe://example.org", True),
        ("spiffe://example.org.evil/x", False),
        ("spiffe://example.org@evil/x", False),
        ("spiffe://example.org:443/x", False),
        ("spiffe://example.orgx/x", False),
        ("spiffe://EXAMPLE.org/x", False),
        ("spiffe://example.org/", False),
        ("spiffe://example.org//x", False),
        ("spiffe://example.org/a/../b", False),
        ("spiffe://other.org/example.org/x", False),
        ("https://example.org/x", False),
    ],
)
def test_trust_domain_matches_on_its_boundary(workload: str, inside: bool) -> None:
    assert workload_in(workload, [TD]) is inside


def test_prefixes_match_whole_segments_only() -> None:
    agents = [f"{TD}/agent"]
    assert workload_in(f"{TD}/agent", agents)
    assert workload_in(f"{TD}/agent/reporter", agents)
    assert not workload_in(f"{TD}/agents", agents)
    assert not workload_in(f"{TD}/agent-evil", agents)
    assert not workload_in(f"{TD}/agent/../admin", agents)
    assert source_refusal(["airflow://prod"], "airflow://prod/dags") is None
    assert source_refusal(["airflow://prod"], "airflow://prod") is None
    refusal = source_refusal(["airflow://prod"], "airflow://prod-evil")
    assert refusal is not None and "airflow://prod-evil" in refusal
    assert grant_refusal(None, ["kv-reader"], None, "kv-reader") is None
    assert "no workload" in (grant_refusal([TD], None, None, "kv-reader") or "")


@pytest.mark.parametrize(
    ("kind", "entries", "problem"),
    [
        ("workloads", [], "empty"),
        ("workloads", ["spiffe://Example.org"], "trust domain"),
        ("workloads", ["spiffe://"], "trust domain"),
        ("workloads", ["spiffe://example.org/a/../b"], "segment"),
        ("sources", ["air flow://x"], "without spaces"),
        ("profiles", ["no/such"], "profile name"),
    ],
)
def test_bad_scope_entries_are_refused(kind: str, entries: list[str], problem: str) -> None:
    with pytest.raises(ScopeError, match=problem):
        normalise(kind, entries)


def test_scope_is_for_emitter_keys_only() -> None:
    with session_scope() as session, pytest.raises(ValueError, match="emitter keys only"):
        create_key(session, name="x", role=Role.operator, tenant="t1", profiles=["kv-reader"])


# --- over the API ------------------------------------------------------------


def test_source_outside_scope_answers_403(app_client: Any, keys: dict[str, str]) -> None:
    _, key = scoped_key(sources=["pytest://scope"])
    name = unique("scope/source")
    body = started_from("pytest://scope-evil", name, {"kv": "kv-reader"})
    refused = app_client.post("/v1/events", json=body, headers=auth(key))
    assert refused.status_code == 403
    assert "pytest://scope-evil" in refused.json()["error"]
    assert "outside this key's sources" in refused.json()["error"]
    assert states("t1", name) == {}  # nothing stored
    body = started_from("pytest://scope/dag-1", name, {"kv": "kv-reader"})
    assert app_client.post("/v1/events", json=body, headers=auth(key)).status_code == 202
    ended = event("succeeded", name, source="pytest://other")
    assert app_client.post("/v1/events", json=ended, headers=auth(key)).status_code == 403
    ended = event("succeeded", name, source="pytest://scope")
    assert app_client.post("/v1/events", json=ended, headers=auth(key)).status_code == 202


def test_out_of_scope_profile_and_workload_are_denied(
    app_client: Any, keys: dict[str, str]
) -> None:
    _, key = scoped_key(workloads=[TD], profiles=["kv-reader"])
    inside = f"{TD}/agent/reporter"

    # A profile outside the key's profiles: that grant denied, the other minted.
    name = unique("scope/profile")
    body = started(name, {"kv": "kv-reader", "db": "reports-readonly"}, workload=inside)
    assert app_client.post("/v1/events", json=body, headers=auth(key)).status_code == 202
    wait_until(lambda: states("t1", name) == {"kv": "active", "db": "denied"})
    [denied] = denials(app_client, keys["operator"], name)
    assert denied["reason"] == "out_of_scope"
    assert "'reports-readonly' is outside this key's profiles" in denied["detail"]
    assert denied["credential"] and denied["actor"].startswith("scoped-")

    # A workload in a look-alike trust domain, and a task naming no workload: all denied.
    for workload in ("spiffe://example.org.evil/x", None):
        name = unique("scope/workload")
        extra = {"workload": workload} if workload else {}
        body = started(name, {"kv": "kv-reader"}, **extra)
        answer = app_client.post("/v1/events", json=body, headers=auth(key))
        assert answer.status_code == 202, answer.text
        assert states("t1", name) == {"kv": "denied"}
        [denied] = denials(app_client, keys["operator"], name)
        assert denied["reason"] == "out_of_scope"
        expected = f"workload {workload!r} is outside" if workload else "no workload named"
        assert expected in denied["detail"]
        # A denied grant is never claimable.
        token = answer.json()["claim_token"]
        claim = app_client.post(
            f"/v1/tasks/{name.replace('/', '%2F')}/credentials/kv/claim",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert claim.status_code in (403, 409, 410), claim.text
        assert "secret" not in claim.json()
        end = event("succeeded", name)
        assert app_client.post("/v1/events", json=end, headers=auth(key)).status_code == 202


def test_cli_creates_and_lists_a_scoped_key(app_client: Any) -> None:
    name = f"cli-scoped-{RUN}-{uuid.uuid4().hex[:6]}"
    cli = [sys.executable, "-m", "app.cli", "keys"]
    made = subprocess.run(
        [
            *cli,
            *("create", name, "--role", "emitter", "--tenant", "t1"),
            *("--sources", "pytest://cli,pytest://cli-2", "--workloads", TD + "/"),
            *("--profiles", "kv-reader", "--profiles", "task-cache"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert made.stdout == key + "\n" and key.startswith("lhk_")
    with session_scope() as session:
        row = session.exec(select(ApiKey).where(ApiKey.name == name)).one()
        assert row.sources == ["pytest://cli", "pytest://cli-2"]
        assert row.workloads == [TD]  # the trailing slash dropped
        assert row.profiles == ["kv-reader", "task-cache"]

    listed = subprocess.run(
        [*cli, "list"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert listed.returncode == 0, listed.stderr
    line = next(x for x in listed.stdout.splitlines() if x.startswith(name))
    assert f"sources=pytest://cli,pytest://cli-2 workloads={TD} profiles=kv-reader,task-cache" in (
        line
    )
    assert key not in listed.stdout

    # The key the CLI made is held to its scope by the API.
    task = unique("scope/cli")
    body = started_from("pytest://cli", task, {"db": "reports-readonly"}, workload=f"{TD}/a")
    assert app_client.post("/v1/events", json=body, headers=auth(key)).status_code == 202
    assert states("t1", task) == {"db": "denied"}
    body = started_from("pytest://cli-3", unique("scope/cli"), {"kv": "kv-reader"})
    assert app_client.post("/v1/events", json=body, headers=auth(key)).status_code == 403

    bad_td = ("--workloads", "spiffe://Example.org")
    bad = subprocess.run(
        [*cli, "create", f"{name}-bad", *("--role", "emitter", "--tenant", "t1"), *bad_td],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode != 0 and bad.stdout == ""
    assert "trust domain" in bad.stderr and "Traceback" not in bad.stderr


# --- rate limit ----------------------------------------------------------------


@pytest.fixture
def limited(request: pytest.FixtureRequest, installation_id: str) -> Iterator[TestClient]:
    """A second API instance with LEASEHOLD_EVENT_RATE_LIMIT=0.5 (or the test's indirect
    parameter); settings restored after.

    Its lifespan is not run: the session's app holds the process's notification listener."""
    from app.api import create_app

    saved = os.environ.get("LEASEHOLD_EVENT_RATE_LIMIT")
    os.environ["LEASEHOLD_EVENT_RATE_LIMIT"] = getattr(request, "param", "0.5")
    get_settings.cache_clear()
    try:
        yield TestClient(create_app())
    finally:
        if saved is None:
            os.environ.pop("LEASEHOLD_EVENT_RATE_LIMIT", None)
        else:
            os.environ["LEASEHOLD_EVENT_RATE_LIMIT"] = saved
        get_settings.cache_clear()


def key_id(name: str) -> str:
    with session_scope() as session:
        return session.exec(select(ApiKey).where(ApiKey.name == name)).one().id


def test_over_the_rate_limit_answers_429_with_retry_after(limited: TestClient) -> None:
    name, key = scoped_key()
    _, other = scoped_key()
    first = event("succeeded", unique("rate/a"))
    assert limited.post("/v1/events", json=first, headers=auth(key)).status_code == 202
    second = event("succeeded", unique("rate/b"))
    over = limited.post("/v1/events", json=second, headers=auth(key))
    assert over.status_code == 429, over.text
    retry = int(over.headers["Retry-After"])
    assert 1 <= retry <= 2
    assert "rate limit" in over.json()["error"]
    # Per key: another key is not held back.
    third = event("succeeded", unique("rate/c"))
    assert limited.post("/v1/events", json=third, headers=auth(other)).status_code == 202
    # The bucket lives in Redis, with an expiry.
    r = redis.Redis.from_url(REDIS_URL)
    assert r.pttl(bucket_key(key_id(name))) > 0
    # After Retry-After the refused event goes through: the 429 stored nothing.
    time.sleep(retry)
    again = limited.post("/v1/events", json=second, headers=auth(key))
    assert again.status_code == 202 and again.json()["duplicate"] is False


# One event in 20 s: the token the other process takes is not back before this one posts,
# however slowly that process exits on a loaded machine.
@pytest.mark.parametrize("limited", ["0.05"], indirect=True)
def test_the_limit_holds_across_processes(limited: TestClient) -> None:
    name, key = scoped_key()
    # Another process takes this key's one token through Redis ...
    drain = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from app.api.ratelimit import limiter, _redis_url; "
            "print(limiter.wait(sys.argv[1], 0.05, _redis_url()))",
            key_id(name),
        ],
        cwd=ROOT,
        env={**os.environ, "LEASEHOLD_EVENT_RATE_LIMIT": "0.05"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert drain.returncode == 0 and drain.stdout.strip() == "0.0", drain.stderr
    # ... so this process's first event for it is already over the limit.
    over = limited.post("/v1/events", json=event("succeeded", unique("rate/x")), headers=auth(key))
    assert over.status_code == 429 and over.headers["Retry-After"]


def test_unreachable_redis_fails_open_to_a_local_bucket(caplog: pytest.LogCaptureFixture) -> None:
    limiter = RateLimiter()
    with caplog.at_level(logging.WARNING, logger="app.api.ratelimit"):
        started_at = time.monotonic()
        assert limiter.wait("k", 1.0, "redis://127.0.0.1:1/0") == 0.0  # nothing listens on 1
        assert time.monotonic() - started_at < 2  # bounded
    assert "Redis unreachable" in caplog.text
    # Still limited within this process, and Redis is not retried at once.
    assert limiter.wait("k", 1.0, "redis://127.0.0.1:1/0") > 0
    assert caplog.text.count("Redis unreachable") == 1


def test_no_limit_when_unset(app_client: Any) -> None:
    assert get_settings().event_rate_limit is None
    _, key = scoped_key()
    for _ in range(5):
        body = event("succeeded", unique("rate/none"))
        assert app_client.post("/v1/events", json=body, headers=auth(key)).status_code == 202


def test_the_dry_run_applies_a_named_emitters_scope(app_client: Any, keys: dict[str, str]) -> None:
    name, _ = scoped_key(workloads=[TD], profiles=["kv-reader"])
    body = started(
        unique("scope/dry"), {"kv": "kv-reader", "db": "reports-readonly"}, workload=f"{TD}/a"
    )
    check = app_client.post(
        "/v1/policy/check", params={"emitter": name}, json=body, headers=auth(keys["operator"])
    )
    assert check.status_code == 200, check.text
    by_grant = {g["name"]: g for g in check.json()["grants"]}
    assert by_grant["kv"]["decision"] == "allow"
    assert by_grant["db"]["decision"] == "deny"
    assert "outside this key's profiles" in by_grant["db"]["reason"]
    # Without the key's name the dry run decides by policy alone (none is in force here).
    plain = app_client.post("/v1/policy/check", json=body, headers=auth(keys["operator"]))
    assert {g["decision"] for g in plain.json()["grants"]} == {"allow"}


def test_the_event_loop_check_shares_the_bucket_and_fails_open(
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = f"async-{uuid.uuid4().hex}"
    url = REDIS_URL
    assert RateLimiter().wait(key, 0.5, url) == 0.0  # another process takes the one token
    assert asyncio.run(RateLimiter().wait_async(key, 0.5, url)) > 0  # ... through Redis
    limiter = RateLimiter()
    with caplog.at_level(logging.WARNING, logger="app.api.ratelimit"):
        started_at = time.monotonic()
        assert asyncio.run(limiter.wait_async("k", 1.0, "redis://127.0.0.1:1/0")) == 0.0
        assert time.monotonic() - started_at < 2  # bounded
    assert "Redis unreachable" in caplog.text
    assert asyncio.run(limiter.wait_async("k", 1.0, "redis://127.0.0.1:1/0")) > 0
    assert caplog.text.count("Redis unreachable") == 1


def test_a_cached_key_costs_no_thread_hand_off(
    keys: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.api import auth as api_auth
    from app.api import offload

    secret = keys["emitter"]
    api_auth.forget(hash_api_key(secret))
    assert asyncio.run(api_auth.lookup_key_async(secret)) is not None  # a miss: in the pool

    async def no_hand_off(*_: Any) -> None:
        raise AssertionError("a cached key went to a thread")

    monkeypatch.setattr(offload, "run", no_hand_off)
    assert asyncio.run(api_auth.lookup_key_async(secret)) is not None
