"""Hostile input against a real `leasehold api` process: bodies cut while read, NULs,
bad UTF-8 and deep nesting refused with a named 4xx, idempotent retries, capped
long-polls, and no escape sequence reaching an operator's terminal."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlmodel import col, select

from app import ledger
from app.api.credentials import MAX_WAITERS, MAX_WAITERS_PER_TOKEN
from app.core.db import session_scope
from app.core.models import LIVE_CRED_STATES, Credential, utcnow
from app.queue import enqueue_revoke
from tests.support.api import auth, claim_url, event, started, states, task_path, unique
from tests.support.procs import start_api, stop_process, wait_until
from tests.support.world import DATA_DB, HOME, PROFILES, REDIS_URL, ROOT

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

MiB = 1024 * 1024
# Profiles only this API process knows. With approval = true nothing is ever minted, so
# the shared worker never needs them (a never-minted vault token revokes without them).
EXTRA = """
[profiles.needs-approval]
issuer = "vault-token"
policies = ["reports-read"]
max_ttl = 900
approval = true

[profiles.soon-retired]
issuer = "vault-token"
policies = ["reports-read"]
max_ttl = 900
approval = true
retired = {retired}
"""


@dataclass
class Api:
    url: str
    pid: int
    log: Path
    profiles: Path

    def write_profiles(self, *, retired: bool) -> None:
        text = PROFILES.format(data_db=DATA_DB, redis_url=REDIS_URL)
        self.profiles.write_text(text + EXTRA.format(retired=str(retired).lower()))
        stamp = time.time() + (1 if retired else 0)
        os.utime(self.profiles, (stamp, stamp))  # the API reloads on a changed mtime


@pytest.fixture(scope="module")
def api(worker: Path, installation_id: str) -> Iterator[Api]:
    log = HOME / "hostile-api.log"
    profiles = HOME / "hostile-profiles.toml"
    server = Api("", 0, log, profiles)
    server.write_profiles(retired=False)
    proc, server.url = start_api(log, {**os.environ, "LEASEHOLD_PROFILES_FILE": str(profiles)})
    server.pid = proc.pid
    try:
        yield server
    finally:
        stop_process(proc)
        _revoke_leftovers()


def _revoke_leftovers() -> None:
    """Even after a failure, leave no live credential of a profile only this API knew
    (a later API's startup check would refuse to start over it)."""
    with session_scope() as session:
        ids = session.exec(
            select(Credential.id).where(
                col(Credential.profile).in_(("needs-approval", "soon-retired")),
                col(Credential.state).in_(LIVE_CRED_STATES),
            )
        ).all()
        revoking = [
            i
            for cred_id in ids
            for i in ledger.request_revoke(
                session, credential_id=cred_id, reason="manual", actor="pytest", now=utcnow()
            )
        ]
    enqueue_revoke(revoking)


def post_event(api: Api, key: str, body: Any) -> httpx.Response:
    return httpx.post(f"{api.url}/v1/events", json=body, headers=auth(key), timeout=10)


def raw_event(api: Api, key: str, text: str) -> httpx.Response:
    return httpx.post(
        f"{api.url}/v1/events",
        content=text.encode(),
        headers={**auth(key), "Content-Type": "application/json"},
        timeout=10,
    )


def no_server_errors(api: Api) -> None:
    text = api.log.read_text()
    assert "Traceback" not in text and "Exception in ASGI" not in text, text[-3000:]


# --- bodies ------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _flood(url: str, headers: dict[str, str], total: int) -> tuple[int | None, int]:
    """Stream `total` bytes without a Content-Length; (status or None if cut, bytes sent)."""
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        block = b"a" * MiB
        while sent < total:
            sent += len(block)
            yield block

    try:
        answer = httpx.post(url, content=chunks(), headers=headers, timeout=60)
    except httpx.TransportError:
        return None, sent
    return answer.status_code, sent


def test_huge_bodies_are_refused_while_read(api: Api, keys: dict[str, str]) -> None:
    # Peak RSS from here on (writing 5 to clear_refs resets VmHWM to the current RSS).
    Path(f"/proc/{api.pid}/clear_refs").write_text("5")
    base = _status_kib(api.pid, "VmRSS")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for url, headers in (
        (f"{api.url}/dashboard/login", form),
        (f"{api.url}/v1/events", {**auth(keys["emitter"]), "Content-Type": "application/json"}),
    ):
        status, sent = _flood(url, headers, 256 * MiB)
        assert status in (413, None), status
        assert sent < 256 * MiB, "the upload should be cut, not read to the end"
    peak = _status_kib(api.pid, "VmHWM")
    assert (peak - base) * 1024 < 64 * MiB, f"API grew by {(peak - base) // 1024} MiB"

    # A declared length over the limit is refused before a byte of body is read.
    with socket.create_connection(("127.0.0.1", int(api.url.rsplit(":", 1)[1])), 5) as s:
        s.sendall(
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 268435456\r\n\r\n"
        )
        s.settimeout(5)
        head = b""
        # The status line and the body may come in separate segments: read to the body.
        while b"KiB" not in head and (chunk := s.recv(4096)):
            head += chunk
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"64 KiB" in head
    # A form a little over its limit, with a declared length: 413 before any CSRF check.
    big_form = httpx.post(f"{api.url}/dashboard/logout", data={"csrf": "x" * 5000}, timeout=10)
    assert big_form.status_code == 413 and "KiB" in big_form.json()["error"]
    no_server_errors(api)


# --- names the problem, never a 500 ----------------------------------------------


def test_bad_paths_and_query_parameters_answer_a_named_4xx(api: Api, keys: dict[str, str]) -> None:
    reader, operator = auth(keys["emitter"]), auth(keys["operator"])
    cases = [
        ("GET", "/v1/tasks/%FF", reader, "UTF-8"),
        ("GET", "/v1/tasks/a%00b", reader, "NUL"),
        ("GET", "/v1/tasks?state=%00", reader, "'state'"),
        ("GET", "/v1/credentials?tenant=t%00", operator, "'tenant'"),
        ("POST", "/v1/credentials/ab%00/revoke", operator, "NUL"),
        ("GET", "/dashboard/credentials/%00/revoke", {}, "NUL"),
    ]
    name = unique("hostile-claim")
    token = post_event(api, keys["emitter"], started(name, {"g": "needs-approval"})).json()[
        "claim_token"
    ]
    cases.append(("POST", "/v1/tasks/%FF%FE/credentials/g/claim", auth(token), "UTF-8"))
    for method, path, headers, word in cases:
        answer = httpx.request(method, api.url + path, headers=headers, timeout=10)
        assert 400 <= answer.status_code < 500, (path, answer.status_code, answer.text)
        assert word in answer.json()["error"], (path, answer.text)
    post_event(api, keys["emitter"], event("cancelled", name))
    no_server_errors(api)


def _envelope(subject: str, data: str) -> str:
    head = f'{{"specversion":"1.0","id":"{uuid.uuid4()}","source":"pytest://hostile",'
    return head + f'"type":"task.succeeded","subject":{subject},"data":{data}}}'


def test_hostile_event_bodies_answer_a_named_400(api: Api, keys: dict[str, str]) -> None:
    cases = [
        ("NUL in subject", _envelope('"a\\u0000b"', "{}"), "subject contains a NUL"),
        ("NUL in data", _envelope('"t"', '{"x":["ok","\\u0000"]}'), "data.x[1] contains a NUL"),
        ("NUL in a key", _envelope('"t"', '{"a\\u0000":1}'), "NUL"),
        ("lone surrogate", _envelope('"\\ud800"', "{}"), "subject is not valid Unicode"),
        ("very deep", _envelope('"t"', "[" * 30000 + "]" * 30000), "nests deeper"),
        ("deep", _envelope('"t"', '{"a":' * 40 + "1" + "}" * 40), "nests deeper"),
        ("NaN", _envelope('"t"', '{"x":NaN}'), "not valid JSON"),
        ("infinite", _envelope('"t"', '{"x":1e999}'), "not valid JSON"),
    ]
    for label, body, words in cases:
        answer = raw_event(api, keys["emitter"], body)
        assert answer.status_code == 400, (label, answer.status_code, answer.text)
        assert words in answer.json()["error"], (label, answer.text)
    no_server_errors(api)


# --- idempotency ----------------------------------------------------------------


def test_a_rebuilt_retry_is_a_duplicate(api: Api, keys: dict[str, str]) -> None:
    name = unique("rebuilt")
    first = started(name, {"g": "needs-approval"})
    assert post_event(api, keys["emitter"], first).status_code == 202
    # The sender rebuilds the event to retry: a new time, an extension attribute.
    rebuilt = dict(first, time="2030-01-01T00:00:00Z", traceparent="00-abc-def-01")
    again = post_event(api, keys["emitter"], rebuilt)
    assert again.status_code == 200 and again.json()["duplicate"] is True, again.text
    for changed in (
        dict(first, subject=name + "-other"),
        dict(first, data={**first["data"], "workload": "spiffe://x/y"}),
        dict(first, type="task.heartbeat", data={}),
    ):
        refused = post_event(api, keys["emitter"], changed)
        assert refused.status_code == 409, refused.text
        assert "type, subject or data" in refused.json()["error"]
    post_event(api, keys["emitter"], event("cancelled", name))


def test_a_retried_start_is_a_duplicate_after_its_profile_was_retired(
    api: Api, keys: dict[str, str]
) -> None:
    name = unique("retired-later")
    body = started(name, {"g": "soon-retired"})
    first = post_event(api, keys["emitter"], body)
    assert first.status_code == 202, first.text
    api.write_profiles(retired=True)
    try:
        again = post_event(api, keys["emitter"], body)
        assert again.status_code == 200 and again.json()["duplicate"] is True, again.text
        assert again.json()["claim_token"] == first.json()["claim_token"]
        # A new event naming the retired profile is still refused.
        fresh = post_event(api, keys["emitter"], started(name, {"g": "soon-retired"}))
        assert fresh.status_code == 422 and "retired" in fresh.json()["error"]
    finally:
        api.write_profiles(retired=False)
        post_event(api, keys["emitter"], event("cancelled", name))


# --- long-polls ---------------------------------------------------------------------


# A flood's claims wait this long. The bounds below are fractions of it: a waiter held
# (almost) all of it, a refused claim and another tenant's event well under half; a
# loaded 2-core machine answers the last of ~300 refusals within seconds, not at once.
LONG_POLL = 10


async def _flood_of_waiters(
    api: Api, keys: dict[str, str], tokens: list[tuple[str, str]], per_task: list[int]
) -> tuple[list[tuple[int, int, float]], list[float]]:
    """Claims with ?wait= (task index, status, seconds); meanwhile another tenant's events."""
    wait = LONG_POLL
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=api.url, limits=limits, timeout=30) as client:

        async def one_claim(i: int) -> tuple[int, int, float]:
            name, token = tokens[i]
            began = time.monotonic()
            answer = await client.post(claim_url(name, "g", wait=wait), headers=auth(token))
            if answer.status_code == 409:
                assert answer.headers["retry-after"]
            return i, answer.status_code, time.monotonic() - began

        async def other_tenant() -> list[float]:
            await asyncio.sleep(2)  # the waiters are all in by now
            took = []
            for _ in range(10):
                began = time.monotonic()
                answer = await client.post(
                    "/v1/events",
                    json=event("cancelled", unique("other-tenant")),
                    headers=auth(keys["emitter-t2"]),
                )
                assert answer.status_code == 202, answer.text
                took.append(time.monotonic() - began)
            return took

        claims = [one_claim(i) for i, n in enumerate(per_task) for _ in range(n)]
        results = await asyncio.gather(*claims, other_tenant())
    return results[:-1], results[-1]  # type: ignore[return-value]


def test_long_polls_are_capped_and_do_not_starve_other_tenants(
    api: Api, keys: dict[str, str]
) -> None:
    # Credentials that stay awaiting_approval: every claim answers 409 until its wait ends.
    per_task = [MAX_WAITERS_PER_TOKEN + 4] + [MAX_WAITERS_PER_TOKEN] * (
        MAX_WAITERS // MAX_WAITERS_PER_TOKEN + 1
    )
    tokens = []
    for _ in per_task:
        name = unique("waiter")
        answer = post_event(api, keys["emitter"], started(name, {"g": "needs-approval"}))
        tokens.append((name, answer.json()["claim_token"]))
    claims, other = asyncio.run(_flood_of_waiters(api, keys, tokens, per_task))
    assert len(claims) > MAX_WAITERS and all(status == 409 for _, status, _ in claims)
    waited = [c for c in claims if c[2] >= LONG_POLL - 1]
    refused_at_once = [c for c in claims if c[2] < LONG_POLL / 2]
    assert len(waited) + len(refused_at_once) == len(claims)
    assert len(waited) <= MAX_WAITERS
    assert len(refused_at_once) >= len(claims) - MAX_WAITERS
    assert sum(1 for i, _, _ in waited if i == 0) <= MAX_WAITERS_PER_TOKEN
    # Another tenant's events are answered promptly while hundreds of claims wait.
    assert max(other) < LONG_POLL / 2, other
    for name, _ in tokens:
        post_event(api, keys["emitter"], event("cancelled", name))
    no_server_errors(api)


def test_the_notification_listener_reconnects_with_one_connection(api: Api) -> None:
    r = redis.Redis.from_url(REDIS_URL)
    name = f"leasehold-notify-{api.pid}"

    def mine() -> list[dict[str, Any]]:
        return [c for c in r.client_list() if c.get("name") == name]

    def the_one() -> list[dict[str, Any]] | None:
        found = mine()
        return found if len(found) == 1 else None

    for _ in range(3):
        # One connection, settled: after a kill redis-py's pubsub may reconnect once by
        # itself before the listener's loop sees the error, closes that client and
        # connects again a second later (none in between).
        (conn,) = wait_until(the_one, 10)
        r.client_kill_filter(_id=conn["id"])
        wait_until(lambda old=conn["id"]: [c["id"] for c in mine()] not in ([], [old]), 10)
    time.sleep(1.5)
    assert len(mine()) == 1


# --- terminals ------------------------------------------------------------------


def test_status_shows_escape_sequences_as_text(
    api: Api, keys: dict[str, str], worker: Path
) -> None:
    name = unique("evil\x1b[2J\x1b]0;owned\x07\u202e")
    body = started(name, {"kv": "kv-reader"}, workload="spiffe://x/\x1b[31mred")
    assert post_event(api, keys["emitter"], body).status_code == 202
    wait_until(lambda: states("t1", name) == {"kv": "active"})
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "status"],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        env={**os.environ},
    )
    post_event(api, keys["emitter"], event("succeeded", name))
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "evil\\x1b[2J\\x1b]0;owned\\x07\\u202e" in text
    assert "spiffe://x/\\x1b[31mred" in text
    # The API answers it as data (JSON escapes it): nothing was changed or lost.
    shown = httpx.get(
        f"{api.url}/v1/tasks/{task_path(name)}", headers=auth(keys["emitter"]), timeout=10
    )
    assert json.loads(shown.text)["id"] == name
