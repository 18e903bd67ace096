"""End-to-end lifecycle throughput and revoke latency, against the direct floor.

Starts its own API and worker on a scratch PostgreSQL ledger and Redis broker
(127.0.0.1), then prints:
  - floor: CREATE ROLE + DROP ROLE directly, two at a time over pooled connections;
  - lifecycles/s end to end: HTTP task.started -> minted -> claimed -> HTTP
    task.succeeded -> revoked (verified), with several clients at once;
  - OpenBao's database secrets engine doing the same job on the same PostgreSQL
    (read a dynamic role's credentials, revoke the lease; four clients);
  - the ratios, p50/p99 per stage, API and worker CPU per lifecycle, and the
    statements and commits per lifecycle (counted on the driver: bench/_count_sql.py);
  - time to revoke at a steady 20 terminal events/s and in a burst of 120 ends;
  - API and worker resident memory over a soak (`--soak 10000` for the full one).

Usage: python bench/lifecycle_bench.py [--tasks 300] [--clients 8] [--workers 2] [--soak N]
"""

from __future__ import annotations

import argparse
import os
import resource
import secrets
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
from common import (
    PG,
    cpu_since,
    drop_broker_keys,
    event,
    free_port,
    machine_cpu,
    pct,
    sql,
    wait_revoked,
)

ROOT = Path(__file__).resolve().parent.parent


def floor(db: str, n: int) -> tuple[float, str]:
    """Direct role create+drop, two at a time over two pooled connections: the role as
    Leasehold's mint makes it (its SCRAM verifier, the same iteration count)."""
    from app.issuers.postgres import scram_sha256_verifier

    group = f"lh_bench_floor_{secrets.token_hex(3)}"
    sql(db, f'CREATE ROLE "{group}" NOLOGIN')
    until = (datetime.now(UTC) + timedelta(hours=1)).isoformat()

    def run(count: int) -> None:
        with psycopg.connect(f"{PG}/{db}", autocommit=True) as c:
            for _ in range(count):
                role = f"lh_bench_{uuid.uuid4().hex[:16]}"
                verifier = scram_sha256_verifier(secrets.token_urlsafe(32))
                c.execute(
                    f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{verifier}' "  # type: ignore[arg-type]
                    f"VALID UNTIL '{until}' IN ROLE \"{group}\""
                )
                c.execute(f'DROP ROLE "{role}"')  # type: ignore[arg-type]

    cpu0, start = machine_cpu(), time.perf_counter()
    threads = [threading.Thread(target=run, args=(n // 2,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    cpu = cpu_since(cpu0, start, n // 2 * 2)
    sql(db, f'DROP ROLE "{group}"')
    return (n // 2 * 2) / elapsed, cpu


def openbao_rate(db: str, n: int, clients: int = 4) -> tuple[float, str]:
    """OpenBao's database engine on the same PostgreSQL: read a dynamic role's
    credentials, then revoke the lease (OpenBao drops the role), `clients` at a time."""
    from app.local.openbao_dev import start_dev_server

    group = f"lh_bench_bao_{secrets.token_hex(3)}"
    sql(db, f'CREATE ROLE "{group}" NOLOGIN')
    server = start_dev_server()
    try:
        h = {"X-Vault-Token": server.token}
        with httpx.Client(base_url=server.addr, headers=h, timeout=30) as c:
            c.post("/v1/sys/mounts/database", json={"type": "database"}).raise_for_status()
            c.post(
                "/v1/database/config/pg",
                json={
                    "plugin_name": "postgresql-database-plugin",
                    "connection_url": f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:5432/{db}",
                    "username": "postgres",
                    "password": "unused",
                    "allowed_roles": "bench",
                    "verify_connection": True,
                },
            ).raise_for_status()
            c.post(
                "/v1/database/roles/bench",
                json={
                    "db_name": "pg",
                    "creation_statements": [
                        "CREATE ROLE \"{{name}}\" LOGIN PASSWORD '{{password}}' "
                        f"VALID UNTIL '{{{{expiration}}}}' IN ROLE \"{group}\""
                    ],
                    "default_ttl": "1h",
                },
            ).raise_for_status()

        def run(count: int) -> None:
            with httpx.Client(base_url=server.addr, headers=h, timeout=30) as c:
                for _ in range(count):
                    lease = c.get("/v1/database/creds/bench").raise_for_status().json()
                    c.put(
                        "/v1/sys/leases/revoke", json={"lease_id": lease["lease_id"]}
                    ).raise_for_status()

        run(4)  # warm
        cpu0, start = machine_cpu(), time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(run, [n // clients] * clients))
        rate = (n // clients * clients) / (time.perf_counter() - start)
        return rate, cpu_since(cpu0, start, n // clients * clients)
    finally:
        server.stop()
        with psycopg.connect(f"{PG}/{db}", autocommit=True) as c:
            for (role,) in c.execute(
                "SELECT r.rolname FROM pg_roles r JOIN pg_auth_members m ON m.member = r.oid "
                "JOIN pg_roles g ON g.oid = m.roleid WHERE g.rolname = %s",
                (group,),
            ).fetchall():
                c.execute(f'DROP ROLE "{role}"')  # type: ignore[arg-type]
        sql(db, f'DROP ROLE "{group}"')


def _children(pid: int) -> list[int]:
    out = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += _children(int(child))
    return out


def usage(pid: int) -> tuple[float, float]:
    """(CPU seconds, resident MiB) of a process and all its descendants."""
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    cpu = rss = 0.0
    for p in _children(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / tick
            rss += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page / 2**20
        except (FileNotFoundError, ProcessLookupError):
            pass
    return cpu, rss


def sql_totals(folder: Path) -> tuple[int, int]:
    """(statements, commits) the API and worker processes sent, summed."""
    s = c = 0
    for f in folder.iterdir():
        text = f.read_text().split()
        if len(text) == 2:
            s, c = s + int(text[0]), c + int(text[1])
    return s, c


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--api-workers", type=int, default=1, help="API processes")
    parser.add_argument("--steady", type=int, default=100, help="tasks for the 20/s phase")
    parser.add_argument("--burst", type=int, default=120, help="task ends sent at once")
    parser.add_argument("--floor", type=int, default=400, help="direct cycles")
    parser.add_argument("--openbao", type=int, default=200, help="OpenBao cycles (0: skip)")
    parser.add_argument("--soak", type=int, default=1000, help="lifecycles for the memory soak")
    args = parser.parse_args()

    run = secrets.token_hex(3)
    ledger, data = f"lh_bench_{run}", f"lh_bench_{run}_data"
    home = Path(tempfile.mkdtemp(prefix="leasehold-bench-"))
    counts = home / "sql"
    counts.mkdir()
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
        "LEASEHOLD_BENCH_SQL_DIR": str(counts),
    }
    exe = [sys.executable, "-m", "app.cli"]
    # The API and worker count their statements (bench/_count_sql.py) before app.cli runs.
    counted = [
        sys.executable,
        "-c",
        "import runpy, sys; sys.path.insert(0, 'bench'); import _count_sql; "
        "runpy.run_module('app.cli', run_name='__main__', alter_sys=True)",
    ]
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
    api = [*counted, "api", "--port", str(port), "--workers", str(args.api_workers)]
    worker = [*counted, "worker", "--concurrency", str(args.workers), "--beat"]
    procs = [
        subprocess.Popen(api, env=env, cwd=ROOT, stdout=log, stderr=log),
        subprocess.Popen(worker, env=env, cwd=ROOT, stdout=log, stderr=log),
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
        direct, cpu = floor(data, args.floor)
        print(f"floor: direct create+drop role, 2 at a time: {direct:.0f} /s")
        print(f"  {cpu}")
        bao, cpu = openbao_rate(data, args.openbao) if args.openbao else (float("nan"), "")
        print(f"openbao: database engine read creds + revoke lease, 4 clients: {bao:.0f} /s")
        print(f"  {cpu}")

        client = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
            limits=httpx.Limits(max_connections=args.clients * 2),
        )

        def start(name: str) -> str:
            r = client.post(
                "/v1/events",
                json=event(
                    "task.started",
                    name,
                    {"max_duration": 600, "grants": [{"name": "db", "profile": "bench"}]},
                ),
            )
            assert r.status_code == 202, r.text
            return str(r.json()["claim_token"])

        def lifecycle(name: str) -> None:
            token = start(name)
            c = client.post(
                f"/v1/tasks/{name}/credentials/db/claim?wait=30",
                headers={"Authorization": f"Bearer {token}"},
            )
            assert c.status_code == 200, c.text
            r = client.post("/v1/events", json=event("task.succeeded", name))
            assert r.status_code == 202, r.text

        def lifecycles(names: list[str]) -> float:
            """Runs them with the clients; returns lifecycles per second."""
            begin = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(lifecycle, names))
            wait_revoked(ledger, names)
            return len(names) / (time.perf_counter() - begin)

        names = [f"bench-{run}-{i}" for i in range(args.tasks)]
        lifecycles([f"warm-{run}-{i}" for i in range(2 * args.clients)])
        time.sleep(1)
        api0, worker0, sql0 = usage(procs[0].pid), usage(procs[1].pid), sql_totals(counts)
        own0, cpu0, wall0 = (
            resource.getrusage(resource.RUSAGE_SELF),
            machine_cpu(),
            time.perf_counter(),
        )
        rate = lifecycles(names)
        cpu = cpu_since(cpu0, wall0, args.tasks)
        own1 = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(0.5)
        api1, worker1, sql1 = usage(procs[0].pid), usage(procs[1].pid), sql_totals(counts)
        print(
            f"end to end: {args.tasks} lifecycles (start, mint, claim, end, verified revoke) "
            f"with {args.clients} clients: {rate:.0f} /s"
        )
        print(f"  ratio: leasehold/direct {rate / direct:.2f}, leasehold/openbao {rate / bao:.2f}")
        n = args.tasks
        print(
            f"  per lifecycle: API CPU {(api1[0] - api0[0]) / n * 1000:.1f} ms, worker CPU "
            f"{(worker1[0] - worker0[0]) / n * 1000:.1f} ms, statements "
            f"{(sql1[0] - sql0[0]) / n:.1f}, commits {(sql1[1] - sql0[1]) / n:.1f} "
            "(API + worker, sweeps included)"
        )
        own = own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime
        print(f"  {cpu}; this benchmark's clients {own / n * 1000:.1f} ms")
        with psycopg.connect(f"{PG}/{ledger}") as c:
            rows = c.execute(
                "SELECT extract(epoch FROM c.minted_at - c.created_at), extract(epoch FROM "
                "c.claimed_at - c.minted_at), extract(epoch FROM c.revoked_at - "
                "c.revoke_requested_at) FROM credentials c JOIN tasks t ON t.id = c.task_id "
                "WHERE t.name = ANY(%s)",
                (names,),
            ).fetchall()
        for i, stage in enumerate(("event->minted", "minted->claimed", "end->revoked")):
            ms = [float(r[i]) * 1000 for r in rows]
            print(f"  {stage}: p50 {pct(ms, 0.5):.1f} ms, p99 {pct(ms, 0.99):.1f} ms")

        def ends(tasks: list[str], per_second: float | None) -> list[float]:
            """Starts the tasks, waits for their mints, ends them (at a rate, or all at
            once); returns each one's task end -> verified revoke in ms."""
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(start, tasks))
            time.sleep(3)
            t0 = time.perf_counter()

            def end(i: int) -> None:
                if per_second:
                    time.sleep(max(0.0, t0 + i / per_second - time.perf_counter()))
                client.post("/v1/events", json=event("task.succeeded", tasks[i]))

            with ThreadPoolExecutor(len(tasks) if per_second is None else 4) as pool:
                list(pool.map(end, range(len(tasks))))
            wait_revoked(ledger, tasks)
            with psycopg.connect(f"{PG}/{ledger}") as c:
                rows = c.execute(
                    "SELECT extract(epoch FROM c.revoked_at - t.ended_at) FROM credentials c "
                    "JOIN tasks t ON t.id = c.task_id WHERE t.name = ANY(%s)",
                    (tasks,),
                ).fetchall()
            return [float(r[0]) * 1000 for r in rows]

        ms = ends([f"steady-{run}-{i}" for i in range(args.steady)], 20)
        print(
            f"time to revoke at 20 ends/s (task end -> verified revoke, {args.steady} ends): "
            f"p50 {pct(ms, 0.5):.1f} ms, p99 {pct(ms, 0.99):.1f} ms, max {max(ms):.1f} ms"
        )
        ms = ends([f"burst-{run}-{i}" for i in range(args.burst)], None)
        print(
            f"time to revoke in a burst of {args.burst} ends: p50 {pct(ms, 0.5):.1f} ms, "
            f"p99 {pct(ms, 0.99):.1f} ms, max {max(ms):.1f} ms"
        )

        # Memory: after a warm-up of a tenth, then at the end of the soak.
        warm = max(1, args.soak // 10)
        soak = [f"soak-{run}-{i}" for i in range(args.soak)]
        lifecycles(soak[:warm])
        before = usage(procs[0].pid)[1], usage(procs[1].pid)[1]
        for i in range(warm, args.soak, 1000):
            lifecycles(soak[i : i + 1000])
        after = usage(procs[0].pid)[1], usage(procs[1].pid)[1]
        print(
            f"memory over a soak of {args.soak} lifecycles (RSS after {warm} -> at the end): "
            f"API {before[0]:.0f} -> {after[0]:.0f} MiB "
            f"({(after[0] / before[0] - 1) * 100:+.1f} %), worker (all processes) "
            f"{before[1]:.0f} -> {after[1]:.0f} MiB ({(after[1] / before[1] - 1) * 100:+.1f} %)"
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(15)
        with psycopg.connect(f"{PG}/{ledger}", autocommit=True) as c:
            found = c.execute("SELECT id FROM installation").fetchone()
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as c:
            for db in (ledger, data):
                c.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (db,),
                )
                c.execute(f"DROP DATABASE IF EXISTS {db}")  # type: ignore[arg-type]
            # Roles are cluster-wide: this installation's (its mark), logins first.
            for (role,) in c.execute(
                "SELECT rolname FROM pg_roles WHERE rolname LIKE 'lh_%%' AND "
                "shobj_description(oid, 'pg_authid') LIKE %s ORDER BY rolcanlogin DESC",
                (f"leasehold installation={found[0] if found else '-'} %",),
            ).fetchall():
                c.execute(f'DROP ROLE IF EXISTS "{role}"')  # type: ignore[arg-type]
        drop_broker_keys(env["LEASEHOLD_BROKER_KEY_PREFIX"])


if __name__ == "__main__":
    main()
