"""End-to-end lifecycle throughput and revoke latency, against the direct floor.

Starts its own API and worker on a scratch PostgreSQL ledger and Redis broker
(127.0.0.1), then prints:
  - floor: CREATE ROLE + DROP ROLE directly, two at a time over pooled connections;
  - lifecycles/s end to end: HTTP task.started -> minted -> claimed -> HTTP
    task.succeeded -> revoked (verified), with several clients at once;
  - time to revoke at a steady 20 terminal events/s (task end -> verified revoke).

Usage: python bench/lifecycle_bench.py [--tasks 300] [--clients 8] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
PG = "postgresql://postgres@127.0.0.1:5432"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sql(db: str, *statements: str) -> None:
    with psycopg.connect(f"{PG}/{db}", autocommit=True) as c:
        for s in statements:
            c.execute(s)  # type: ignore[arg-type]


def floor(db: str, n: int) -> float:
    """Direct role create+drop, two at a time over two pooled connections."""
    from scramp import ScramMechanism

    group = f"lh_bench_floor_{secrets.token_hex(3)}"
    sql(db, f'CREATE ROLE "{group}" NOLOGIN')
    mech = ScramMechanism("SCRAM-SHA-256")
    until = (datetime.now(UTC) + timedelta(hours=1)).isoformat()

    def run(count: int) -> None:
        with psycopg.connect(f"{PG}/{db}", autocommit=True) as c:
            for _ in range(count):
                role = f"lh_bench_{uuid.uuid4().hex[:16]}"
                salt, stored, server, it = mech.make_auth_info(secrets.token_urlsafe(24))
                import base64

                b = base64.b64encode
                verifier = (
                    f"SCRAM-SHA-256${it}:{b(salt).decode()}${b(stored).decode()}:"
                    f"{b(server).decode()}"
                )
                c.execute(
                    f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{verifier}' "  # type: ignore[arg-type]
                    f"VALID UNTIL '{until}' IN ROLE \"{group}\""
                )
                c.execute(f'DROP ROLE "{role}"')  # type: ignore[arg-type]

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(n // 2,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    sql(db, f'DROP ROLE "{group}"')
    return (n // 2 * 2) / elapsed


def event(kind: str, subject: str, data: dict | None = None) -> dict:
    body = {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": "bench://",
        "type": kind,
        "subject": subject,
        "time": datetime.now(UTC).isoformat(),
    }
    if data is not None:
        body["data"] = data
    return body


def wait_revoked(ledger: str, names: list[str], timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    with psycopg.connect(f"{PG}/{ledger}") as c:
        while time.monotonic() < end:
            left = c.execute(
                "SELECT count(*) FROM credentials c JOIN tasks t ON t.id = c.task_id "
                "WHERE t.name = ANY(%s) AND c.state <> 'revoked'",
                (names,),
            ).fetchone()
            c.commit()
            if left == (0,):
                return
            time.sleep(0.05)
    raise SystemExit("timed out waiting for revocations")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--api-workers", type=int, default=1, help="API processes")
    parser.add_argument("--steady", type=int, default=100, help="tasks for the 20/s phase")
    args = parser.parse_args()

    run = secrets.token_hex(3)
    ledger, data = f"lh_bench_{run}", f"lh_bench_{run}_data"
    home = Path(tempfile.mkdtemp(prefix="leasehold-bench-"))
    sql("postgres", f"CREATE DATABASE {ledger}", f"CREATE DATABASE {data}")
    sql(data, "CREATE TABLE reports (id int)")
    (home / "profiles.toml").write_text(
        f'[profiles.bench]\nissuer = "postgres"\ndsn = "{PG}/{data}"\n'
        f'grants = ["GRANT SELECT ON reports TO {{role}}"]\nmax_ttl = 3600\n'
    )
    port = free_port()
    env = {
        **os.environ,
        "LEASEHOLD_HOME": str(home),
        "LEASEHOLD_DATABASE_URL": f"{PG}/{ledger}",
        "LEASEHOLD_BROKER_URL": "redis://127.0.0.1:6379/0",
        "LEASEHOLD_BROKER_KEY_PREFIX": f"lhbench{run}:",
        "LEASEHOLD_SECRET_KEY": secrets.token_urlsafe(32),
        "LEASEHOLD_PROFILES_FILE": str(home / "profiles.toml"),
        "LEASEHOLD_LOG_LEVEL": "WARNING",
        "LEASEHOLD_VAULT_ADDR": "http://127.0.0.1:1",
    }
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
    log = (home / "procs.log").open("ab")
    procs = [
        subprocess.Popen(
            [*exe, "api", "--port", str(port)], env=env, cwd=ROOT, stdout=log, stderr=log
        ),
        subprocess.Popen(
            [*exe, "worker", "--concurrency", str(args.workers), "--beat"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=log,
        ),
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        time.sleep(2)  # the worker's pools warm up
        print(f"floor: direct create+drop role, 2 at a time: {floor(data, 400):.0f} /s")

        client = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
            limits=httpx.Limits(max_connections=args.clients * 2),
        )

        def lifecycle(name: str) -> None:
            r = client.post(
                "/v1/events",
                json=event(
                    "task.started",
                    name,
                    {"max_duration": 600, "grants": [{"name": "db", "profile": "bench"}]},
                ),
            )
            token = r.json()["claim_token"]
            c = client.post(
                f"/v1/tasks/{name}/credentials/db/claim?wait=30",
                headers={"Authorization": f"Bearer {token}"},
            )
            assert c.status_code == 200, c.text
            client.post("/v1/events", json=event("task.succeeded", name))

        names = [f"bench-{run}-{i}" for i in range(args.tasks)]
        lifecycle(f"warm-{run}")
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(lifecycle, names))
        wait_revoked(ledger, names)
        elapsed = time.perf_counter() - start
        print(
            f"end to end: {args.tasks} lifecycles (start, mint, claim, end, verified revoke) "
            f"with {args.clients} clients: {args.tasks / elapsed:.0f} /s"
        )
        with psycopg.connect(f"{PG}/{ledger}") as c:
            stages = c.execute(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM "
                "c.minted_at - c.created_at)), percentile_cont(0.5) WITHIN GROUP (ORDER BY "
                "extract(epoch FROM c.claimed_at - c.minted_at)), percentile_cont(0.5) WITHIN "
                "GROUP (ORDER BY extract(epoch FROM c.revoke_requested_at - c.claimed_at)), "
                "percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM c.revoked_at - "
                "c.revoke_requested_at)) FROM credentials c JOIN tasks t ON t.id = c.task_id "
                "WHERE t.name = ANY(%s)",
                (names,),
            ).fetchone()
        print(
            "  p50 per stage (ms): event->minted {:.1f}, minted->claimed {:.1f}, "
            "claimed->end event {:.1f}, end->revoked {:.1f}".format(
                *(float(x) * 1000 for x in stages)
            )
        )

        steady = [f"steady-{run}-{i}" for i in range(args.steady)]
        with ThreadPoolExecutor(args.clients) as pool:
            list(
                pool.map(
                    lambda n: client.post(
                        "/v1/events",
                        json=event(
                            "task.started",
                            n,
                            {"max_duration": 600, "grants": [{"name": "db", "profile": "bench"}]},
                        ),
                    ),
                    steady,
                )
            )
        time.sleep(3)
        t0 = time.perf_counter()
        for i, name in enumerate(steady):
            time.sleep(max(0.0, t0 + i / 20 - time.perf_counter()))
            client.post("/v1/events", json=event("task.succeeded", name))
        wait_revoked(ledger, steady)
        with psycopg.connect(f"{PG}/{ledger}") as c:
            rows = c.execute(
                "SELECT extract(epoch FROM c.revoked_at - t.ended_at) FROM credentials c "
                "JOIN tasks t ON t.id = c.task_id WHERE t.name = ANY(%s)",
                (steady,),
            ).fetchall()
        ms = sorted(float(r[0]) * 1000 for r in rows)
        p50 = statistics.median(ms)
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        print(
            f"time to revoke at 20 events/s (task end -> verified revoke): "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {ms[-1]:.1f} ms"
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(15)
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as c:
            for db in (ledger, data):
                c.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (db,),
                )
                c.execute(f"DROP DATABASE IF EXISTS {db}")  # type: ignore[arg-type]
            groups = c.execute(
                "SELECT rolname FROM pg_roles WHERE rolname LIKE 'lh\\_%%' "
                "AND NOT rolcanlogin AND rolname NOT LIKE 'lh_bench%%'"
            ).fetchall()
            del groups  # group roles of other runs are not ours to drop


if __name__ == "__main__":
    main()
