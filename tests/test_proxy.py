"""Brokered access (PRODUCT.md): a real upstream on loopback, the session's OpenBao KV,
a real `leasehold proxy` process, the API and the worker."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import hvac
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.core.db import get_engine
from app.core.settings import Settings, get_settings
from app.issuers.base import IssuerError, PermanentIssuerError
from app.issuers.proxy import ProxyIssuer
from app.profiles import ProxyProfile
from app.proxy.paths import PathRefused, allowed, clean
from app.proxy.redact import Patterns, Redactor
from app.startup import upstream_problem
from schedules.reconcile import reconcile
from tests.support.api import auth, claim_url, credentials_of, event, started, states, unique
from tests.support.procs import free_port, spawn, stop_process, wait_healthy, wait_until
from tests.support.world import HOME

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

STATIC_KEY = "sk_live_" + secrets.token_urlsafe(24)
BIG = 48 * 1024 * 1024  # bytes each way in the memory test


# --- the upstream -------------------------------------------------------------------


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict[str, Any]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _record(self, body_bytes: int) -> None:
        Upstream.seen.append(
            {
                "method": self.command,
                "path": self.path,
                "headers": dict(self.headers.items()),
                "raw_headers": str(self.headers),
                "body_bytes": body_bytes,
            }
        )

    def _read_body(self) -> int:
        total = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return total
                left = size
                while left:
                    left -= len(self.rfile.read(min(left, 65536)))
                total += size
                self.rfile.readline()
        left = int(self.headers.get("Content-Length") or 0)
        while left:
            got = len(self.rfile.read(min(left, 65536)))
            total += got
            left -= got
        return total

    def _send(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunks(self, chunks: Iterator[bytes], delay: float = 0.0) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        try:
            for chunk in chunks:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
                if delay:
                    time.sleep(delay)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        size = self._read_body()
        self._record(size)
        injected = self.headers.get("Authorization", "")
        key = injected.removeprefix("Bearer ")
        if self.path.startswith("/echo/json"):
            body = json.dumps(
                {"you_sent": injected, "b64": base64.b64encode(key.encode()).decode()}
            )
            self._send(200, body.encode(), Content_Type="application/json", X_Echo=quote(key))
        elif self.path.startswith("/echo/stream"):
            # The key cut across chunk boundaries, raw and base64, with no Content-Length.
            blob = (b"a" * 5000 + key.encode() + b"b" * 70 + base64.b64encode(key.encode())) * 3
            self._chunks(blob[i : i + 7] for i in range(0, len(blob), 7))
        elif self.path == "/big":
            self._chunks(b"x" * 65536 for _ in range(BIG // 65536))
        elif self.path == "/slow":
            self._chunks((b"tick\n" for _ in range(200)), delay=0.05)
        elif self.path == "/redirect":
            self._send(302, b"", Location="http://127.0.0.1:9/elsewhere")
        else:
            self._send(200, json.dumps({"ok": True, "bytes": size}).encode())


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()


PROFILES = """
[profiles.vendor-api]
issuer = "proxy"
upstream = "http://127.0.0.1:{port}"
secret = "secret/data/vendor-{run}#api_key"
inject = "Authorization: Bearer {{secret}}"
methods = ["GET", "POST"]
paths = ["/v1/reports/*", "/echo/**", "/big", "/upload", "/slow", "/redirect"]
max_ttl = 900

[profiles.vendor-slow]
issuer = "proxy"
upstream = "http://127.0.0.1:{port}"
secret = "secret/data/vendor-{run}#api_key"
inject = "X-Api-Key: {{secret}}"
rate = "2/m"  # a burst of 2, then one every 30 s: the 3rd and 4th call are refused
max_ttl = 900
"""


@pytest.fixture(scope="module")
def proxy(upstream: int, worker: Path, app_client: Any) -> Iterator[str]:
    """The proxy profiles in the session's file, the key in OpenBao, `leasehold proxy` up."""
    run = secrets.token_hex(3)
    bao = hvac.Client(os.environ["LEASEHOLD_VAULT_ADDR"], os.environ["LEASEHOLD_VAULT_TOKEN"])
    bao.secrets.kv.v2.create_or_update_secret(path=f"vendor-{run}", secret={"api_key": STATIC_KEY})
    profiles = Path(os.environ["LEASEHOLD_PROFILES_FILE"])
    original = profiles.read_text()
    profiles.write_text(original + PROFILES.format(port=upstream, run=run))
    url = os.environ["LEASEHOLD_PROXY_PUBLIC_URL"]
    port = url.rsplit(":", 1)[1]
    log = HOME / "proxy.log"
    metrics_port = free_port()
    proc = spawn(
        ["proxy", "--port", port], log, {**os.environ, "LEASEHOLD_METRICS_PORT": str(metrics_port)}
    )
    wait_healthy(proc, url, log, timeout=20)
    Proxy.pid, Proxy.metrics = proc.pid, metrics_port
    try:
        yield url
    finally:
        stop_process(proc)
        profiles.write_text(original)


class Proxy:
    pid = 0
    metrics = 0


CLAIMS: list[str] = []  # every claim answer's token: allowed in that answer only


def start_task(client: Any, keys: dict[str, str], profile: str = "vendor-api") -> dict[str, Any]:
    name = unique("proxy")
    answer = client.post(
        "/v1/events", json=started(name, {"api": profile}), headers=auth(keys["emitter"])
    )
    assert answer.status_code == 202, answer.text
    wait_until(lambda: states("t1", name) == {"api": "active"})
    claim = client.post(claim_url(name, "api"), headers=auth(answer.json()["claim_token"]))
    assert claim.status_code == 200, claim.text
    secret = claim.json()["secret"]
    assert set(secret) == {"proxy_url", "token", "ca"}
    assert secret["ca"].startswith("-----BEGIN CERTIFICATE-----")
    CLAIMS.append(secret["token"])
    cred = credentials_of("t1", name)[0]
    assert secret["proxy_url"].endswith(f"/p/{cred.id}")
    return {"name": name, "id": cred.id, "url": secret["proxy_url"], "token": secret["token"]}


def end_task(client: Any, keys: dict[str, str], name: str) -> None:
    answer = client.post("/v1/events", json=event("succeeded", name), headers=auth(keys["emitter"]))
    assert answer.status_code == 202, answer.text


def audit(client: Any, keys: dict[str, str], cred_id: str, action: str) -> list[dict[str, Any]]:
    answer = client.get(
        f"/v1/audit?credential={cred_id}&action={action}", headers=auth(keys["operator"])
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["items"]


# --- pure parts -------------------------------------------------------------------


def test_paths_are_decoded_normalised_and_matched_by_segment() -> None:
    assert clean(b"/v1//reports/./q3").text == "/v1/reports/q3"
    assert clean(b"/v1/r%20x").encoded == "/v1/r%20x"
    for climbing in (b"/v1/../x", b"/v1/%2e%2e/x", b"/v1/..%2fx", b"/a%252fb", b"/a%5c..", b"/a;b"):
        with pytest.raises(PathRefused):
            clean(climbing)
    for bad in (b"/a%zz", b"/a%00b", b"/a%ff"):
        with pytest.raises(PathRefused):
            clean(bad)
    patterns = ("/v1/reports/*", "/files/**")
    assert allowed(clean(b"/v1/reports/q3"), patterns)
    assert not allowed(clean(b"/v1/reports/q3/more"), patterns)
    assert not allowed(clean(b"/v1/reports/"), patterns)
    assert allowed(clean(b"/files"), patterns) and allowed(clean(b"/files/a/b/c"), patterns)
    assert not allowed(clean(b"/v1/payroll"), patterns)
    assert allowed(clean(b"/anything"), None)


def test_echo_redaction_finds_every_form_across_chunks() -> None:
    key = 'k3y/with+odd"chars-' + secrets.token_hex(8)
    patterns = Patterns(key)
    forms = [
        key.encode(),
        quote(key, safe="").encode(),
        quote(key, safe="").lower().encode(),
        json.dumps(key)[1:-1].encode(),
        base64.b64encode(b"x" + key.encode()),
        base64.urlsafe_b64encode(b"xy" + key.encode()),
    ]
    for form in forms:
        body = b"head " + form + b" tail" * 20
        for size in (1, 3, 7, 64):
            redactor = Redactor(patterns)
            out = b"".join(redactor.feed(body[i : i + size]) for i in range(0, len(body), size))
            out += redactor.finish()
            assert redactor.found == 1, (form, size)
            assert key.encode() not in out and form not in out and b"[redacted]" in out
            assert out.endswith(b" tail" * 20)


def test_production_refuses_a_plain_http_upstream_unless_told() -> None:
    profile = ProxyProfile(
        name="p",
        issuer="proxy",
        max_ttl=60,
        upstream="http://api.example:8080",
        secret="secret/data/x#k",
        inject="X-Key: {secret}",
    )
    production = Settings.model_construct(env="production", insecure_backends=False)
    assert "plain http" in (upstream_problem(profile, production) or "")
    insecure = Settings.model_construct(env="production", insecure_backends=True)
    assert upstream_problem(profile, insecure) is None
    local = Settings.model_construct(env="local", insecure_backends=False)
    assert upstream_problem(profile, local) is None
    tls = profile.model_copy(update={"upstream": "https://api.example"})
    assert upstream_problem(tls, production) is None


def test_a_secret_with_a_line_break_is_refused_and_never_said(installation_id: str) -> None:
    bad = "line\r\nX-Evil: 1" + secrets.token_hex(8)
    bao = hvac.Client(os.environ["LEASEHOLD_VAULT_ADDR"], os.environ["LEASEHOLD_VAULT_TOKEN"])
    path = f"crlf-{secrets.token_hex(3)}"
    bao.secrets.kv.v2.create_or_update_secret(path=path, secret={"k": bad})
    profile = ProxyProfile(
        name="crlf",
        issuer="proxy",
        max_ttl=60,
        upstream="https://api.example",
        secret=f"secret/data/{path}#k",
        inject="X-Key: {secret}",
    )
    issuer = ProxyIssuer(profile, installation_id=installation_id, settings=get_settings())
    with pytest.raises(PermanentIssuerError) as refused:
        issuer.read_secret()
    assert "CR, LF or NUL" in str(refused.value) and bad not in str(refused.value)
    missing = profile.model_copy(update={"secret": f"secret/data/{path}-none#k"})
    with pytest.raises(IssuerError):
        ProxyIssuer(missing, installation_id=installation_id, settings=get_settings()).read_secret()


# --- through the proxy --------------------------------------------------------------


def test_the_upstream_gets_the_key_and_never_the_token(
    proxy: str, app_client: Any, keys: dict[str, str]
) -> None:
    cred = start_task(app_client, keys)
    Upstream.seen.clear()
    answer = httpx.get(
        f"{cred['url']}/v1/reports/q3?format=csv",
        headers={
            "Authorization": f"Bearer {cred['token']}",
            "authorization": "Bearer second-copy",
            "X-Forwarded-For": "10.0.0.1",
            "Forwarded": "for=10.0.0.1",
            "Host": "evil.example",
            "Proxy-Authorization": "Basic eA==",
            "X-Workload": "kept",
        },
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["ok"] is True
    [seen] = Upstream.seen
    assert seen["method"] == "GET" and seen["path"] == "/v1/reports/q3?format=csv"
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["authorization"] == f"Bearer {STATIC_KEY}"
    assert seen["raw_headers"].lower().count("authorization:") == 1
    assert headers["host"].startswith("127.0.0.1:")
    assert headers["accept-encoding"] == "identity"
    assert headers["x-workload"] == "kept"
    for dropped in ("x-forwarded-for", "forwarded", "proxy-authorization"):
        assert dropped not in headers
    assert cred["token"] not in seen["raw_headers"]
    # Audited, with method, path and status, never a header value.
    wait_until(lambda: audit(app_client, keys, cred["id"], "proxy_request"))
    [entry] = audit(app_client, keys, cred["id"], "proxy_request")
    detail = json.loads(entry["detail"])
    assert detail["method"] == "GET" and detail["path"] == "/v1/reports/q3"
    assert detail["status"] == 200 and detail["bytes_out"] > 0
    # The dashboard shows the proxy credential with its request count.
    web = TestClient(app_client.app, base_url="http://testserver", follow_redirects=False)
    assert web.post("/dashboard/login", data={"key": keys["operator"]}).status_code == 303
    live = web.get("/dashboard/live").text
    row = live.split(f'data-credential="{cred["id"]}"', 1)[1].split("</tr>", 1)[0]
    assert re.search(r"proxy-requests[^>]*>\s*1 requests", row), row
    web.close()
    # Nothing in a backend: the reconciliation leaves it alone (neither orphan nor vanished).
    report = reconcile(trigger="test")
    assert not report.skipped and report.vanished == 0
    [summary] = [b for b in report.detail["backends"] if b["backend"] == "proxy ledger"]
    assert summary["listed"] == 0 and "vendor-api" in summary["profiles"]
    assert states("t1", cred["name"]) == {"api": "active"}
    # A redirect is handed back, never followed.
    Upstream.seen.clear()
    moved = httpx.get(f"{cred['url']}/redirect", headers=auth(cred["token"]))
    assert moved.status_code == 302 and len(Upstream.seen) == 1
    end_task(app_client, keys, cred["name"])


def test_refusals_reach_nothing_upstream(proxy: str, app_client: Any, keys: dict[str, str]) -> None:
    mine = start_task(app_client, keys)
    other = start_task(app_client, keys)
    Upstream.seen.clear()
    base = mine["url"]
    cases = [
        ("GET", f"{base}/v1/reports/q3", {}, 401, "no_token"),
        ("GET", f"{base}/v1/reports/q3", auth("lhp.wrong"), 403, "bad_token"),
        ("GET", f"{base}/v1/reports/q3", auth(other["token"]), 403, "bad_token"),
        ("DELETE", f"{base}/v1/reports/q3", auth(mine["token"]), 403, "method"),
        ("GET", f"{base}/v1/payroll", auth(mine["token"]), 403, "path"),
        ("GET", f"{base}/v1/reports/q3/extra", auth(mine["token"]), 403, "path"),
        ("GET", f"{base}/v1/reports/../../payroll", auth(mine["token"]), 403, "path"),
        ("GET", f"{base}/v1/reports/%2e%2e/payroll", auth(mine["token"]), 403, "path"),
        ("GET", f"{base}/v1/reports/..%2fpayroll", auth(mine["token"]), 403, "path"),
        ("GET", f"{base}/v1/reports/a%3bb", auth(mine["token"]), 403, "path"),
    ]
    with httpx.Client() as client:
        for method, url, headers, status, reason in cases:
            # Sent as written: no client-side normalisation of "..".
            request = client.build_request(method, httpx.URL(url), headers=headers)
            request.url = request.url.copy_with(raw_path=url.split(proxy, 1)[1].encode())
            answer = client.send(request)
            assert answer.status_code == status, (url, answer.text)
            assert answer.json()["reason"] == reason, (url, answer.text)
            assert answer.headers["content-type"] == "application/json"
    assert Upstream.seen == []
    # Refusals about a real credential are audited with their reason.
    wait_until(lambda: len(audit(app_client, keys, mine["id"], "proxy_refused")) >= 9)
    reasons = {e["reason"] for e in audit(app_client, keys, mine["id"], "proxy_refused")}
    assert reasons == {"no_token", "bad_token", "method", "path"}
    end_task(app_client, keys, mine["name"])
    end_task(app_client, keys, other["name"])


def test_an_echo_is_redacted_and_audited(proxy: str, app_client: Any, keys: dict[str, str]) -> None:
    cred = start_task(app_client, keys)
    answer = httpx.get(f"{cred['url']}/echo/json", headers=auth(cred["token"]))
    assert answer.status_code == 200
    assert STATIC_KEY not in answer.text and quote(STATIC_KEY) not in answer.headers["x-echo"]
    assert answer.json()["you_sent"] == "Bearer [redacted]"
    assert answer.headers["x-echo"] == "[redacted]"
    assert int(answer.headers["content-length"]) == len(answer.content)
    with httpx.stream("GET", f"{cred['url']}/echo/stream", headers=auth(cred["token"])) as streamed:
        body = b"".join(streamed.iter_bytes())
    assert streamed.status_code == 200
    assert STATIC_KEY.encode() not in body and body.count(b"[redacted]") == 6
    assert base64.b64encode(STATIC_KEY.encode()) not in body
    wait_until(lambda: len(audit(app_client, keys, cred["id"], "proxy_echo")) == 2)
    log = (HOME / "proxy.log").read_text()
    assert "echoed the secret" in log
    end_task(app_client, keys, cred["name"])


def test_the_end_of_the_task_shuts_the_token_out_at_once(
    proxy: str, app_client: Any, keys: dict[str, str]
) -> None:
    cred = start_task(app_client, keys)
    ok = httpx.get(f"{cred['url']}/v1/reports/q3", headers=auth(cred["token"]))
    assert ok.status_code == 200
    cut: dict[str, Any] = {}

    def stream() -> None:
        try:
            with httpx.stream("GET", f"{cred['url']}/slow", headers=auth(cred["token"])) as r:
                for _ in r.iter_bytes():
                    cut.setdefault("first", time.monotonic())
        except httpx.HTTPError as exc:
            cut["error"] = type(exc).__name__
        cut["done"] = time.monotonic()

    reader = threading.Thread(target=stream)
    reader.start()
    wait_until(lambda: "first" in cut)
    end_task(app_client, keys, cred["name"])
    ended = time.monotonic()
    while True:
        answer = httpx.get(f"{cred['url']}/v1/reports/q3", headers=auth(cred["token"]))
        if answer.status_code == 403:
            break
        assert time.monotonic() - ended < 1.0, "still forwarded a second after the end"
    assert time.monotonic() - ended < 1.0
    assert answer.json()["reason"] == "not_active"
    reader.join(5)
    # The slow answer (10 s long) was cut off, not completed.
    assert cut["done"] - ended < 2.0 and "error" in cut, cut


def test_a_rate_and_a_large_body_stream(proxy: str, app_client: Any, keys: dict[str, str]) -> None:
    limited = start_task(app_client, keys, "vendor-slow")
    forged = {**auth(limited["token"]), "x-API-key": "forged", "Connection": "X-Hop", "X-Hop": "1"}
    codes = [httpx.get(f"{limited['url']}/any", headers=forged).status_code for _ in range(4)]
    assert codes == [200, 200, 429, 429]
    seen = Upstream.seen[-1]
    assert seen["headers"]["X-Api-Key"] == STATIC_KEY
    assert "forged" not in seen["raw_headers"] and "x-hop" not in seen["raw_headers"].lower()
    # The proxy token is not the upstream's business, whatever the injected header.
    assert "authorization" not in seen["raw_headers"].lower()
    end_task(app_client, keys, limited["name"])

    cred = start_task(app_client, keys)
    warm = httpx.get(f"{cred['url']}/v1/reports/q3", headers=auth(cred["token"]))
    assert warm.status_code == 200
    before = _peak_rss(Proxy.pid)

    def upload() -> Iterator[bytes]:
        chunk = b"u" * 65536
        for _ in range(BIG // len(chunk)):
            yield chunk

    up = httpx.post(
        f"{cred['url']}/upload", content=upload(), headers=auth(cred["token"]), timeout=60
    )
    assert up.status_code == 200 and up.json()["bytes"] == BIG
    received = 0
    with httpx.stream("GET", f"{cred['url']}/big", headers=auth(cred["token"]), timeout=60) as r:
        assert "content-length" not in r.headers  # streamed, not buffered
        for chunk in r.iter_raw():
            received += len(chunk)
    assert received == BIG
    grown = _peak_rss(Proxy.pid) - before
    assert grown < 16 * 1024 * 1024, f"the proxy's peak RSS grew by {grown} bytes"
    end_task(app_client, keys, cred["name"])


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_metrics_count_the_proxy_requests(proxy: str) -> None:
    text = httpx.get(f"http://127.0.0.1:{Proxy.metrics}/metrics").text
    assert 'leasehold_proxy_requests_total{outcome="forwarded",profile="vendor-api"}' in text
    assert 'outcome="path",profile="vendor-api"' in text
    assert STATIC_KEY not in text


def test_no_leak_of_the_key_or_the_token(
    proxy: str, app_client: Any, keys: dict[str, str], worker: Path
) -> None:
    assert CLAIMS, "run with the tests above"
    wait_until(
        lambda: all(c.state == "revoked" for c in _proxy_credentials() if c.issuer == "proxy")
    )
    needles = [STATIC_KEY, quote(STATIC_KEY), *CLAIMS]
    haystacks = {
        "proxy.log": (HOME / "proxy.log").read_text(),
        "worker.log": worker.read_text(),
    }
    with get_engine().connect() as conn:
        for table in ("credentials", "audit", "events", "tasks"):
            rows = conn.execute(text(f"SELECT * FROM {table}")).fetchall()
            haystacks[table] = "\n".join(repr(tuple(r)) for r in rows)
    for path in (
        "/v1/credentials?limit=500",
        "/v1/audit?limit=500",
        "/v1/tasks?limit=500",
        "/metrics",
    ):
        haystacks[path] = app_client.get(path, headers=auth(keys["admin"])).text
    for where, hay in haystacks.items():
        for needle in needles:
            assert needle not in hay, f"a secret in {where}"


def _proxy_credentials() -> list[Any]:
    from sqlmodel import select

    from app.core.db import session_scope
    from app.core.models import Credential

    with session_scope() as session:
        return list(session.exec(select(Credential).where(Credential.issuer == "proxy")))
