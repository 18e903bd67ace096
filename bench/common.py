"""What the benchmarks share: a free port, admin SQL, percentiles, a CloudEvent."""

from __future__ import annotations

import os
import socket
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg

PG = "postgresql://postgres@127.0.0.1:5432"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sql(db: str, *statements: str) -> None:
    with psycopg.connect(f"{PG}/{db}", autocommit=True) as c:
        for s in statements:
            c.execute(s)  # type: ignore[arg-type]


def wait_revoked(ledger: str, names: list[str], timeout: float = 120) -> None:
    """Until every credential of the named tasks is revoked in the ledger (bounded)."""
    end = time.monotonic() + timeout
    with psycopg.connect(f"{PG}/{ledger}", autocommit=True) as c:
        while time.monotonic() < end:
            left = c.execute(
                "SELECT count(*) FROM credentials c JOIN tasks t ON t.id = c.task_id "
                "WHERE t.name = ANY(%s) AND c.state <> 'revoked'",
                (names,),
            ).fetchone()
            if left == (0,):
                return
            time.sleep(0.05)
    raise SystemExit(f"not all credentials of {len(names)} task(s) revoked within {timeout:.0f} s")


def drop_broker_keys(prefix: str, url: str = "redis://127.0.0.1:6379/0") -> None:
    """A run's broker keys (its queues, bindings, unacked messages), by its key prefix."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=500):
            client.delete(key)
    finally:
        client.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


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


def _comm(pid: int | str) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def machine_cpu() -> dict[str, float]:
    """CPU seconds used so far: the whole machine (busy time of every core), and
    PostgreSQL and Redis by their processes (Linux /proc). PostgreSQL's exited
    backends count through the postmaster's reaped-children time."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    out = {"machine": busy / tick, "postgres": 0.0, "redis": 0.0}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or _comm(proc.name) not in ("postgres", "redis-server"):
                continue
            f = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            name = _comm(proc.name)
            used = int(f[11]) + int(f[12])
            if name == "postgres" and _comm(f[1]) != "postgres":  # the postmaster
                used += int(f[13]) + int(f[14])
        except (FileNotFoundError, ProcessLookupError):
            continue
        out["postgres" if name == "postgres" else "redis"] += used / tick
    return out


def cpu_since(before: dict[str, float], wall0: float, n: int) -> str:
    """A phase's CPU per item and how busy the machine was, from a machine_cpu()
    snapshot and time.perf_counter() taken when the phase began."""
    after, wall = machine_cpu(), time.perf_counter() - wall0
    used = {k: after[k] - before[k] for k in after}
    busy = used["machine"] / (wall * (os.cpu_count() or 1)) * 100
    return (
        f"machine CPU {used['machine'] / n * 1000:.1f} ms per cycle, {busy:.0f} % of "
        f"{os.cpu_count()} cores busy (PostgreSQL {used['postgres'] / n * 1000:.1f} ms, "
        f"Redis {used['redis'] / n * 1000:.1f} ms)"
    )
