"""What the stack costs before Leasehold does anything: the CPU of one HTTP request
through uvicorn + FastAPI, and of one Celery message through Redis to a prefork
worker (acks late), each doing nothing.

A lifecycle is three requests (start, claim, end) and two messages (mint, revoke), so
3 x request + 2 x message is the least machine CPU any lifecycle on this stack can
cost; the lifecycle benchmark's "machine CPU per cycle" is to be read against it.

Usage: python bench/stack_floor.py [--requests 3000] [--messages 3000] [--clients 8]
"""

from __future__ import annotations

import argparse
import os
import resource
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import redis
from common import cpu_since, event, free_port, machine_cpu

HERE = Path(__file__).resolve().parent
BROKER = "redis://127.0.0.1:6379/0"
PREFIX = os.environ.get("STACK_FLOOR_PREFIX", "lhfloor:")

# --- the do-nothing app and worker (imported by the child processes) --------------

if os.environ.get("STACK_FLOOR_ROLE") == "api":
    from fastapi import FastAPI
    from pydantic import BaseModel

    class Event(BaseModel):
        specversion: str
        id: str
        source: str
        type: str
        subject: str
        time: str
        data: dict | None = None

    app = FastAPI()

    @app.post("/v1/events", status_code=202)
    def post_event(body: Event) -> dict[str, str]:  # a thread hand-off, as the real route
        return {"task": body.subject, "state": "running"}


if os.environ.get("STACK_FLOOR_ROLE") in ("worker", "client"):
    from celery import Celery

    celery = Celery("stack_floor", broker=BROKER)
    celery.conf.update(
        broker_transport_options={"global_keyprefix": PREFIX, "visibility_timeout": 300},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=4,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_default_queue="floor",
    )

    @celery.task(name="floor.noop")
    def noop(item: str) -> None:
        return None


def _usage(pid: int) -> float:
    """CPU seconds of a process and its descendants."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                pids += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def _own() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def http_floor(n: int, clients: int) -> tuple[float, float, str]:
    port = free_port()
    env = {**os.environ, "STACK_FLOOR_ROLE": "api"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import uvicorn; uvicorn.run('stack_floor:app', host='127.0.0.1', "
            f"port={port}, log_level='warning', access_log=False)",
        ],
        cwd=HERE,
        env=env,
    )
    try:
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", limits=httpx.Limits(max_connections=clients * 2)
        )
        for _ in range(300):
            try:
                client.get("/docs", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        body = event("task.started", "t", {"max_duration": 600, "grants": [{"name": "db"}]})

        def one(_: int) -> None:
            r = client.post("/v1/events", json=body)
            assert r.status_code == 202, r.text

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(200)))  # warm
            s0, c0, m0, w0 = _usage(server.pid), _own(), machine_cpu(), time.perf_counter()
            list(pool.map(one, range(n)))
            cpu = cpu_since(m0, w0, n)
            s1, c1 = _usage(server.pid), _own()
        return (s1 - s0) / n * 1000, (c1 - c0) / n * 1000, cpu
    finally:
        server.terminate()
        server.wait(10)


def celery_floor(n: int) -> tuple[float, float, str]:
    global PREFIX
    PREFIX = f"lhfloor{secrets.token_hex(3)}:"
    env = {**os.environ, "STACK_FLOOR_ROLE": "worker", "STACK_FLOOR_PREFIX": PREFIX}
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "stack_floor:celery",
            "worker",
            "-P",
            "prefork",
            "-c",
            "2",
            "-Q",
            "floor",
            "--loglevel",
            "WARNING",
        ],
        cwd=HERE,
        env=env,
    )
    os.environ.update(STACK_FLOOR_ROLE="client", STACK_FLOOR_PREFIX=PREFIX)
    sys.path.insert(0, str(HERE))
    import stack_floor as me  # the client side of the same Celery app, with this prefix

    r = redis.Redis.from_url(BROKER)
    queue, unacked = f"{PREFIX}floor", f"{PREFIX}unacked"

    def drained() -> None:
        end = time.monotonic() + 120
        while r.llen(queue) or r.hlen(unacked):
            if time.monotonic() > end:
                raise SystemExit("the Celery worker did not drain its queue")
            time.sleep(0.01)

    try:
        time.sleep(3)  # the worker's pool starts
        for i in range(200):
            me.celery.send_task("floor.noop", args=[f"warm-{i}"])
        drained()
        w0, p0, m0, t0 = _usage(worker.pid), _own(), machine_cpu(), time.perf_counter()
        for i in range(n):
            me.celery.send_task("floor.noop", args=[f"item-{i}"])
        p1 = _own()
        drained()
        cpu = cpu_since(m0, t0, n)
        w1 = _usage(worker.pid)
        return (p1 - p0) / n * 1000, (w1 - w0) / n * 1000, cpu
    finally:
        worker.terminate()
        worker.wait(20)
        for key in r.scan_iter(f"{PREFIX}*"):
            r.delete(key)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    server, client, cpu = http_floor(args.requests, args.clients)
    print(
        f"http: one request through uvicorn + FastAPI doing nothing, {args.clients} clients: "
        f"server {server:.2f} ms, client (httpx) {client:.2f} ms CPU"
    )
    print(f"  {cpu}")
    publish, consume, cpu = celery_floor(args.messages)
    print(
        "celery: one no-op message through Redis to a prefork worker (2 processes, acks "
        f"late): publish {publish:.2f} ms, worker {consume:.2f} ms CPU"
    )
    print(f"  {cpu}")
    least = 3 * (server + client) + 2 * (publish + consume)
    print(
        f"a lifecycle's three requests and two messages: {least:.1f} ms of CPU before any "
        f"ledger or backend work; {os.cpu_count()} cores carry at most "
        f"{os.cpu_count() * 1000 / least:.0f} such lifecycles/s"
    )


if __name__ == "__main__":
    main()
