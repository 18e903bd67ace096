"""The proxy's added latency: direct calls against reverse and forward mode.

Starts, on loopback only: a plain-HTTP upstream and an HTTPS one behind a throwaway
CA (in a separate process, so that the clients do not share its interpreter lock), an
OpenBao dev server holding the static key, the API and a worker on a scratch
PostgreSQL ledger and Redis broker, and a real `leasehold proxy`. It opens one task
with two proxy grants (a real task.started + claim), then, for small GETs and a
larger streamed body, with a few concurrent keep-alive clients, measures side by side:
  - direct to the HTTP upstream, through the reverse proxy, through forward mode
    (absolute-form `http://` request, as `HTTP_PROXY` does);
  - direct to the HTTPS upstream, through the reverse proxy (verified TLS upstream),
    through forward mode (`CONNECT` + TLS terminated with the task CA's leaf, as
    `HTTPS_PROXY` does; httpx's own proxy support);
and prints p50/p99 latency, requests/s and the added latency (proxied minus direct).

Usage: python bench/proxy_bench.py [--requests 400] [--big-requests 60]
                                   [--big-kib 1024] [--clients 4]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import httpx
import hvac
import psycopg
from common import PG, drop_broker_keys, event, free_port, pct, sql, wait_revoked

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # app.* when run as a script

# Made by the parent, handed to the upstream child by environment.
STATIC_KEY = os.environ.get("BENCH_STATIC_KEY") or "sk_bench_" + secrets.token_urlsafe(24)
CHUNK = 64 * 1024
SMALL = json.dumps({"ok": True, "items": list(range(20))}).encode()  # ~80 bytes
TIMEOUT = 30.0  # every client call and every wait is bounded


# --- the upstream (its own process) ---------------------------------------------------


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # head and body are separate writes
    big = 0

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {STATIC_KEY}":
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/big"):
            # Streamed in chunks, no Content-Length: the proxy streams it on.
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            block = b"x" * CHUNK
            for _ in range(Upstream.big // CHUNK):
                self.wfile.write(b"%x\r\n%s\r\n" % (CHUNK, block))
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(SMALL)))
        self.end_headers()
        self.wfile.write(SMALL)


def serve_upstreams(chain: str, big: int) -> None:
    """The child's part: two servers, their ports on stdout, then until stdin closes."""
    Upstream.big = big
    plain = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    tls = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain)
    tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
    for server in (plain, tls):
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print(json.dumps({"http": plain.server_address[1], "https": tls.server_address[1]}))
    sys.stdout.flush()
    sys.stdin.read()  # the parent closes it (or dies)


# --- measuring ------------------------------------------------------------------------


def measure(
    make: Callable[[], httpx.Client], url: str, n: int, clients: int
) -> tuple[list[float], float]:
    """n GETs of url over `clients` kept-alive clients: (latencies in ms, requests/s).
    Each body is read to its end; each client warms its connection first."""
    per = max(1, n // clients)
    latencies: list[float] = []
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)

    def one(client: httpx.Client) -> float:
        t0 = time.perf_counter()
        with client.stream("GET", url) as answer:
            for _ in answer.iter_bytes(CHUNK):
                pass
            if answer.status_code != 200:
                raise SystemExit(f"{url}: {answer.status_code}")
        return (time.perf_counter() - t0) * 1000

    def worker() -> None:
        with make() as client:
            one(client)  # connection (and TLS, and CONNECT) set up outside the figures
            ready.wait(TIMEOUT)
            ready.wait(TIMEOUT)
            got = [one(client) for _ in range(per)]
        with lock:
            latencies.extend(got)

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(worker) for _ in range(clients)]
        ready.wait(TIMEOUT)  # all warmed
        start = time.perf_counter()
        ready.wait(TIMEOUT)  # go
        for f in futures:
            f.result(timeout=TIMEOUT * per)
        elapsed = time.perf_counter() - start
    return sorted(latencies), len(latencies) / elapsed


def wait_for(url: str, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{what} did not answer within 60 s")


PROFILES = """
[profiles.bench-http]
issuer = "proxy"
upstream = "http://127.0.0.1:{http}"
secret = "secret/data/bench#api_key"
inject = "Authorization: Bearer {{secret}}"
methods = ["GET"]
max_ttl = 3600

[profiles.bench-https]
issuer = "proxy"
upstream = "https://localhost:{https}"
ca_file = "{ca_file}"
secret = "secret/data/bench#api_key"
inject = "Authorization: Bearer {{secret}}"
methods = ["GET"]
max_ttl = 3600
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400, help="small GETs per path")
    parser.add_argument("--big-requests", type=int, default=60, help="big GETs per path")
    parser.add_argument("--big-kib", type=int, default=1024, help="size of the big body")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--upstream", help=argparse.SUPPRESS)  # the child's mode
    args = parser.parse_args()
    big = max(1, args.big_kib * 1024 // CHUNK) * CHUNK
    if args.upstream:
        serve_upstreams(args.upstream, big)
        return

    from app.local.openbao_dev import start_dev_server
    from app.proxy.ca import issue_leaf, make_ca

    run = secrets.token_hex(3)
    ledger = f"lh_pbench_{run}"
    home = Path(tempfile.mkdtemp(prefix="leasehold-pbench-"))
    log_path = home / "procs.log"
    log = log_path.open("ab")
    procs: list[subprocess.Popen[bytes]] = []
    bao = None
    upstream = None
    sql("postgres", f"CREATE DATABASE {ledger}")
    try:
        # The upstreams, the HTTPS one on localhost with a throwaway CA.
        ca = make_ca(
            ["localhost"], label="bench upstream", not_after=datetime.now(UTC) + timedelta(1)
        )
        leaf = issue_leaf(ca, "localhost")
        ca_file, chain = home / "upstream-ca.pem", home / "upstream-leaf.pem"
        ca_file.write_text(ca.cert_pem)
        chain.write_text(leaf.cert_pem + leaf.key_pem)
        upstream = subprocess.Popen(
            [sys.executable, __file__, "--upstream", str(chain), "--big-kib", str(args.big_kib)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "BENCH_STATIC_KEY": STATIC_KEY},
        )
        assert upstream.stdout is not None
        ports = json.loads(upstream.stdout.readline() or "{}")
        if not ports:
            raise SystemExit("the upstream did not start")

        bao = start_dev_server(log_path=home / "openbao.log")
        vault = hvac.Client(bao.addr, bao.token, timeout=10)
        vault.secrets.kv.v2.create_or_update_secret(path="bench", secret={"api_key": STATIC_KEY})
        (home / "profiles.toml").write_text(
            PROFILES.format(http=ports["http"], https=ports["https"], ca_file=ca_file)
        )
        api_port, proxy_port = free_port(), free_port()
        proxy_url = f"http://127.0.0.1:{proxy_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEASEHOLD_")}
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
            env.pop(name, None)
        env.update(
            {
                "LEASEHOLD_HOME": str(home),
                "LEASEHOLD_DATABASE_URL": f"{PG}/{ledger}",
                "LEASEHOLD_BROKER_URL": "redis://127.0.0.1:6379/0",
                "LEASEHOLD_BROKER_KEY_PREFIX": f"lhpbench{run}:",
                "LEASEHOLD_SECRET_KEY": secrets.token_urlsafe(32),
                "LEASEHOLD_PROFILES_FILE": str(home / "profiles.toml"),
                "LEASEHOLD_LOG_LEVEL": "WARNING",
                "LEASEHOLD_VAULT_ADDR": bao.addr,
                "LEASEHOLD_VAULT_TOKEN": bao.token,
                "LEASEHOLD_PROXY_PUBLIC_URL": proxy_url,
            }
        )
        exe = [sys.executable, "-m", "app.cli"]
        subprocess.run([*exe, "db", "upgrade"], env=env, cwd=ROOT, check=True, capture_output=True)
        key = subprocess.run(
            [*exe, "keys", "create", "bench", "--role", "emitter", "--tenant", "b"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        for command, extra in (
            (["api", "--port", str(api_port)], {}),
            (["worker", "--concurrency", "1"], {}),
            (["proxy", "--port", str(proxy_port)], {"LEASEHOLD_METRICS_PORT": str(free_port())}),
        ):
            procs.append(
                subprocess.Popen(
                    [*exe, *command], env={**env, **extra}, cwd=ROOT, stdout=log, stderr=log
                )
            )
        api = f"http://127.0.0.1:{api_port}"
        wait_for(f"{api}/healthz", procs[0], "the API", log_path)
        wait_for(f"{proxy_url}/healthz", procs[2], "the proxy", log_path)

        # One task, two proxy grants: a real task.started and claims.
        task = f"pbench-{run}"
        with httpx.Client(base_url=api, timeout=TIMEOUT) as client:
            started = client.post(
                "/v1/events",
                headers={"Authorization": f"Bearer {key}"},
                json=event(
                    "task.started",
                    task,
                    {
                        "max_duration": 3600,
                        "grants": [
                            {"name": "plain", "profile": "bench-http"},
                            {"name": "tls", "profile": "bench-https"},
                        ],
                    },
                ),
            )
            if started.status_code != 202:
                raise SystemExit(f"task.started: {started.status_code} {started.text}")
            claim = started.json()["claim_token"]
            secrets_of: dict[str, dict[str, str]] = {}
            for grant in ("plain", "tls"):
                answer = client.post(
                    f"/v1/tasks/{task}/credentials/{grant}/claim?wait=30",
                    headers={"Authorization": f"Bearer {claim}"},
                )
                if answer.status_code != 200:
                    raise SystemExit(f"claim {grant}: {answer.status_code} {answer.text}")
                secrets_of[grant] = answer.json()["secret"]

        plain, tls = secrets_of["plain"], secrets_of["tls"]
        upstream_ctx = ssl.create_default_context(cafile=str(ca_file))
        task_ctx = ssl.create_default_context(cadata=tls["ca"])  # what `leasehold run` trusts
        forward = f"http://lh:{quote(tls['token'], safe='')}@127.0.0.1:{proxy_port}"
        direct_http = f"http://127.0.0.1:{ports['http']}"
        direct_https = f"https://localhost:{ports['https']}"
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)

        def client(**kw: object) -> Callable[[], httpx.Client]:
            return lambda: httpx.Client(timeout=TIMEOUT, limits=limits, trust_env=False, **kw)  # type: ignore[arg-type]

        direct_key = {"Authorization": f"Bearer {STATIC_KEY}"}
        paths: list[tuple[str, str, Callable[[], httpx.Client], str]] = [
            ("http", "direct", client(headers=direct_key), direct_http),
            (
                "http",
                "reverse proxy",
                client(headers={"Authorization": f"Bearer {plain['token']}"}),
                plain["proxy_url"],
            ),
            ("http", "forward (HTTP_PROXY)", client(proxy=forward), direct_http),
            ("https", "direct", client(headers=direct_key, verify=upstream_ctx), direct_https),
            (
                "https",
                "reverse proxy",
                client(headers={"Authorization": f"Bearer {tls['token']}"}),
                tls["proxy_url"],
            ),
            (
                "https",
                "forward (CONNECT+TLS)",
                client(proxy=forward, verify=task_ctx),
                direct_https,
            ),
        ]
        sizes = [
            (f"small GET ({len(SMALL)} B)", "/small", args.requests),
            (f"streamed GET ({big // 1024} KiB)", "/big", args.big_requests),
        ]
        print(
            f"proxy overhead, loopback, {args.clients} concurrent keep-alive clients "
            f"(upstream: Python http.server in its own process)"
        )
        header = (
            f"{'body':<24} {'upstream':<8} {'path':<22} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'req/s':>8} {'added p50':>10} {'added p99':>10}"
        )
        print(header)
        print("-" * len(header))
        for label, path, n in sizes:
            base: dict[str, tuple[float, float]] = {}
            for scheme, name, make, url in paths:
                lat, rate = measure(make, url.rstrip("/") + path, n, args.clients)
                p50, p99 = statistics.median(lat), pct(lat, 0.99)
                if name == "direct":
                    base[scheme] = (p50, p99)
                    added = f"{'':>10} {'':>10}"
                else:
                    added = f"{p50 - base[scheme][0]:>+10.2f} {p99 - base[scheme][1]:>+10.2f}"
                print(
                    f"{label:<24} {scheme:<8} {name:<22} {len(lat):>5} {p50:>8.2f} "
                    f"{p99:>8.2f} {rate:>8.0f} {added}"
                )
        with httpx.Client(base_url=api, timeout=TIMEOUT) as client_:
            client_.post(
                "/v1/events",
                headers={"Authorization": f"Bearer {key}"},
                json=event("task.succeeded", task),
            )
        # The worker idle before it is stopped: a SIGTERM in the instant a revoke is
        # handed to its pool process left that process waiting (about 30 s) for the
        # parent to take its result, and the stop below ran into its 15 s kill.
        wait_revoked(ledger, [task], TIMEOUT)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if upstream is not None:
            if upstream.stdin is not None:
                upstream.stdin.close()
            upstream.terminate()
            upstream.wait(10)
        if bao is not None:
            bao.stop()
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as c:
            c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (ledger,),
            )
            c.execute(f"DROP DATABASE IF EXISTS {ledger}")  # type: ignore[arg-type]
        drop_broker_keys(f"lhpbench{run}:")


if __name__ == "__main__":
    main()
