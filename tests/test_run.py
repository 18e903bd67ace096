"""`leasehold run` and forward mode (PRODUCT.md "Running a command", "Forward mode"):
`leasehold run` as a subprocess against a real `leasehold api`, worker and `leasehold
proxy`, with a real plain-HTTP upstream and a real HTTPS upstream behind a private CA;
the child uses curl and Python's urllib, configured by nothing but its environment."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import hvac
import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from sqlmodel import select

from app.core.db import session_scope
from app.core.models import AuditEntry, Task, TaskCA
from app.proxy.ca import issue_leaf, make_ca
from app.run import env_name
from tests.support.api import credentials_of
from tests.support.client import leasehold_api
from tests.support.procs import free_port, spawn, stop_process, wait_healthy, wait_until
from tests.support.world import HOME, RUN

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

STATIC_KEY = "sk_fwd_" + secrets.token_urlsafe(24)


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        got = self.headers.get("Authorization", "")
        body = json.dumps(
            {"authorized": got == f"Bearer {STATIC_KEY}", "echo": got, "path": self.path}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _serve(server: ThreadingHTTPServer) -> int:
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return int(server.server_address[1])


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, Any]]:
    """A plain-HTTP upstream on 127.0.0.1, an HTTPS one on localhost with a private CA."""
    ca = make_ca(["localhost"], label="test upstream", not_after=datetime.now(UTC) + timedelta(1))
    leaf = issue_leaf(ca, "localhost")
    ca_file, chain = HOME / "upstream-ca.pem", HOME / "upstream-leaf.pem"
    ca_file.write_text(ca.cert_pem)
    chain.write_text(leaf.cert_pem + leaf.key_pem)
    plain = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    tls = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain)
    tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
    yield {"http": _serve(plain), "https": _serve(tls), "ca_file": str(ca_file)}
    plain.shutdown()
    tls.shutdown()


PROFILES = """
[profiles.fwd-https]
issuer = "proxy"
upstream = "https://localhost:{https}"
ca_file = "{ca_file}"
secret = "secret/data/fwd-{run}#api_key"
inject = "Authorization: Bearer {{secret}}"
paths = ["/v1/**"]
max_ttl = 600

[profiles.fwd-http]
issuer = "proxy"
upstream = "http://127.0.0.1:{http}"
secret = "secret/data/fwd-{run}#api_key"
inject = "Authorization: Bearer {{secret}}"
max_ttl = 900
"""


@pytest.fixture(scope="module")
def stack(
    upstreams: dict[str, Any], worker: Path, keys: dict[str, str]
) -> Iterator[dict[str, Any]]:
    """The profiles, the key in OpenBao, a real `leasehold proxy` and `leasehold api`."""
    run = secrets.token_hex(3)
    bao = hvac.Client(os.environ["LEASEHOLD_VAULT_ADDR"], os.environ["LEASEHOLD_VAULT_TOKEN"])
    bao.secrets.kv.v2.create_or_update_secret(path=f"fwd-{run}", secret={"api_key": STATIC_KEY})
    profiles = Path(os.environ["LEASEHOLD_PROFILES_FILE"])
    original = profiles.read_text()
    profiles.write_text(original + PROFILES.format(run=run, **upstreams))
    proxy_url = os.environ["LEASEHOLD_PROXY_PUBLIC_URL"]
    log = HOME / "run-proxy.log"
    proc = spawn(
        ["proxy", "--port", proxy_url.rsplit(":", 1)[1]],
        log,
        {**os.environ, "LEASEHOLD_METRICS_PORT": str(free_port())},
    )
    try:
        wait_healthy(proc, proxy_url, log, timeout=20)
        with leasehold_api() as api:
            yield {"api": api, "proxy": proxy_url, "key": keys["emitter"], **upstreams}
    finally:
        stop_process(proc)
        profiles.write_text(original)


def run_env(stack: dict[str, Any]) -> dict[str, str]:
    """The caller's environment: the server's own LEASEHOLD_* settings (which must not
    reach the child) plus the emitter key and URL."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy")}
    env.pop("https_proxy", None)
    env.update(LEASEHOLD_URL=stack["api"], LEASEHOLD_KEY=stack["key"])
    return env


def leasehold_run(
    stack: dict[str, Any], task: str, grants: list[str], command: list[str], **kw: Any
) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "app.cli", "run", "--task", task, "--grace", "1"]
    for grant in grants:
        args += ["--grant", grant]
    return subprocess.Popen(
        [*args, "--", *command],
        cwd=HOME,
        env=run_env(stack),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def task_row(name: str) -> Task:
    with session_scope() as session:
        row = session.exec(select(Task).where(Task.tenant == "t1", Task.name == name)).one()
        session.expunge(row)
        return row


def ended(name: str, state: str, reason: str) -> None:
    def check() -> bool:
        creds = credentials_of("t1", name)
        return task_row(name).state == state and all(
            c.state == "revoked" and c.revoke_reason == reason for c in creds
        )

    wait_until(check, timeout=20)


CHILD = """
import json, os, stat, sys, psycopg
path = os.environ["LEASEHOLD_CREDENTIALS"]
with psycopg.connect(os.environ["LEASEHOLD_DB_DSN"]) as conn:
    rows = conn.execute("SELECT count(*) FROM reports").fetchone()[0]
print(json.dumps({
    "rows": rows,
    "file": path,
    "mode": stat.S_IMODE(os.stat(path).st_mode),
    "in_file": sorted(json.load(open(path))["db"]),
    "env": dict(os.environ),
}))
sys.exit(int(sys.argv[1]))
"""


def test_run_gives_the_credentials_and_ends_the_task_with_the_fate(
    stack: dict[str, Any],
) -> None:
    name = f"run/{RUN}/ok-{secrets.token_hex(3)}"
    proc = leasehold_run(stack, name, ["db=reports-readonly"], [sys.executable, "-c", CHILD, "0"])
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    seen = json.loads(out)
    env = seen["env"]
    assert seen["rows"] >= 0 and seen["mode"] == 0o600
    assert seen["in_file"] == ["dsn", "password", "username"]
    assert env_name("db", "dsn") == "LEASEHOLD_DB_DSN" and env["LEASEHOLD_DB_DSN"].startswith(
        "postgresql://"
    )
    assert {"LEASEHOLD_DB_USERNAME", "LEASEHOLD_DB_PASSWORD"} <= set(env)
    # Nothing LEASEHOLD_* of the caller's: the key least of all, in any variable.
    ours = {k for k in os.environ if k.startswith("LEASEHOLD_")}
    assert ours and not ours & set(env), ours & set(env)
    assert stack["key"] not in json.dumps(env)
    assert not Path(seen["file"]).exists() and not Path(seen["file"]).parent.exists()
    ended(name, "succeeded", "succeeded")
    task = task_row(name)
    # --max-duration defaults to the smallest max_ttl (reports-readonly: 3600).
    assert task.deadline is not None and task.started_at is not None
    assert abs((task.deadline - task.started_at).total_seconds() - 3600) < 2


def test_a_failing_command_fails_the_task_and_its_code_is_kept(stack: dict[str, Any]) -> None:
    name = f"run/{RUN}/fail-{secrets.token_hex(3)}"
    proc = leasehold_run(stack, name, ["db=reports-readonly"], [sys.executable, "-c", CHILD, "3"])
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 3, err
    assert not Path(json.loads(out)["file"]).exists()
    ended(name, "failed", "failed")


SLEEPER = """
import signal, sys, time
if sys.argv[1] == "stubborn":
    signal.signal(signal.SIGINT, lambda s, f: print("got", s, flush=True))
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize(
    ("signum", "mode", "code"),
    [(signal.SIGTERM, "plain", 128 + 15), (signal.SIGINT, "stubborn", 128 + 9)],
    ids=["sigterm-forwarded", "ctrl-c-then-killed-after-grace"],
)
def test_a_signal_is_forwarded_and_cancels_the_task(
    stack: dict[str, Any], signum: int, mode: str, code: int
) -> None:
    name = f"run/{RUN}/sig-{secrets.token_hex(3)}"
    proc = leasehold_run(stack, name, ["db=short-lived"], [sys.executable, "-c", SLEEPER, mode])
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    if mode == "stubborn":
        assert f"got {int(signum)}" in out  # the child had it, ignored it, and was killed
    ended(name, "cancelled", "cancelled")


FORWARD = """
set -u
curl -sS --max-time 10 "https://localhost:{https}/v1/reports?q=1"; echo
curl -sS --max-time 10 "http://127.0.0.1:{http}/anything"; echo
curl -s --max-time 10 -o /dev/null -w 'other:%{{http_connect}}\\n' https://other.example:{https}/
curl -s --max-time 10 -o /dev/null -w 'outside:%{{http_code}}\\n' "https://localhost:{https}/admin"
{python} -c 'import urllib.request as u; print(u.urlopen("https://localhost:{https}/v1/py").read().decode())'
env
"""


def test_forward_mode_through_the_environment_only(stack: dict[str, Any]) -> None:
    name = f"run/{RUN}/fwd-{secrets.token_hex(3)}"
    script = FORWARD.format(https=stack["https"], http=stack["http"], python=sys.executable)
    proc = leasehold_run(stack, name, ["api=fwd-https", "plain=fwd-http"], ["sh", "-c", script])
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    env = dict(line.split("=", 1) for line in lines[5:] if "=" in line)
    proxy = env["HTTPS_PROXY"]
    # The token dies within a second of the task's end (sent before `run` exits).
    with httpx.Client(proxy=proxy, timeout=5) as client:
        wait_until(
            lambda: client.get(f"http://127.0.0.1:{stack['http']}/x").status_code == 403,
            timeout=1.0,
        )
    assert STATIC_KEY not in out and STATIC_KEY not in err  # injected, never seen
    tls, plain, py = json.loads(lines[0]), json.loads(lines[1]), json.loads(lines[4])
    assert tls["authorized"] and tls["path"] == "/v1/reports?q=1"
    assert tls["echo"] == "Bearer [redacted]"  # the upstream's echo, redacted
    assert plain["authorized"] and plain["path"] == "/anything"
    assert py["authorized"] and py["path"] == "/v1/py"
    assert lines[2] == "other:403"  # CONNECT to another host: refused, nothing opened
    assert lines[3] == "outside:403"  # a path outside the profile
    assert proxy == env["HTTP_PROXY"] == env["https_proxy"] == env["http_proxy"]
    assert proxy.startswith("http://lh:lhp.") and proxy.endswith(stack["proxy"].split("//")[1])
    assert (
        len(
            {
                env[k]
                for k in (
                    "SSL_CERT_FILE",
                    "REQUESTS_CA_BUNDLE",
                    "CURL_CA_BUNDLE",
                    "NODE_EXTRA_CA_CERTS",
                )
            }
        )
        == 1
    )
    assert not Path(env["SSL_CERT_FILE"]).exists()
    assert "LEASEHOLD_KEY" not in env and stack["key"] not in out
    ended(name, "succeeded", "succeeded")
    # The task's CA: name-constrained to the two upstreams, no longer than the task can
    # live, its key destroyed with the task's end.
    task = task_row(name)

    def proxy_audit_with_the_refusal() -> list[tuple[str, str | None]] | None:
        """The proxy's entries once the refusal's is there: it is written after the 403
        is sent (off the request's path)."""
        with session_scope() as session:
            audited = session.exec(
                select(AuditEntry.action, AuditEntry.reason).where(
                    AuditEntry.task_id == task.id, AuditEntry.actor == "proxy"
                )
            ).all()
        return list(audited) if ("proxy_refused", "not_active") in audited else None

    audited = wait_until(proxy_audit_with_the_refusal, timeout=10)
    with session_scope() as session:
        row = session.get(TaskCA, task.id)
        assert row is not None
        cert_pem, sealed = row.cert_pem, row.sealed_key
    assert sealed is None
    # Each forwarded request, inside the tunnel or not, each echo, each refusal (the
    # probe after the end among them; it may have been forwarded while the end was news).
    counts = Counter(audited)
    assert counts[("proxy_request", None)] >= 3 and counts[("proxy_echo", "echo")] >= 3
    assert counts[("proxy_refused", "host")] == counts[("proxy_refused", "path")] == 1
    assert counts[("proxy_refused", "not_active")] == 1
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    constraints = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical
    permitted = {str(n.value) for n in constraints.value.permitted_subtrees or []}
    assert permitted == {"localhost", "127.0.0.1/32"}
    excluded = {str(n.value) for n in constraints.value.excluded_subtrees or []}
    assert excluded == {"::/0"}
    assert task.started_at is not None
    assert cert.not_valid_after_utc <= task.started_at + timedelta(seconds=600)


def test_a_leaf_for_another_host_from_a_task_ca_is_rejected() -> None:
    """Name constraints hold for a standard TLS client (OpenSSL, through Python's ssl)
    and for cryptography's verifier: a task CA signs nothing useful for other hosts."""
    ca = make_ca(["localhost", "127.0.0.1"], label="t", not_after=datetime.now(UTC) + timedelta(1))
    root = x509.load_pem_x509_certificate(ca.cert_pem.encode())
    verifier = PolicyBuilder().store(Store([root]))
    good = x509.load_pem_x509_certificate(issue_leaf(ca, "localhost").cert_pem.encode())
    verifier.build_server_verifier(x509.DNSName("localhost")).verify(good, [])
    for other in ("evil.example", "10.0.0.1", "::1"):
        leaf = x509.load_pem_x509_certificate(issue_leaf(ca, other).cert_pem.encode())
        name: Any = (
            x509.IPAddress(ipaddress.ip_address(other)) if other[0] in "1:" else x509.DNSName(other)
        )
        with pytest.raises(VerificationError):
            verifier.build_server_verifier(name).verify(leaf, [])
    # A real handshake: a server holding a leaf for evil.example from the task CA.
    evil = issue_leaf(ca, "evil.example")
    chain = HOME / "evil.pem"
    chain.write_text(evil.cert_pem + evil.key_pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(chain)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept() -> None:
        conn, _ = listener.accept()
        try:
            server_ctx.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError) as refused,
    ):
        client_ctx.wrap_socket(raw, server_hostname="evil.example")
    assert "subtree" in str(refused.value) or "name constraint" in str(refused.value).lower()
    listener.close()
