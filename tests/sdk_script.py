"""Runs in a virtualenv that holds only leasehold-client (and psycopg to log in):
one task block, ended as argv[1] says. Prints the credential's username, never
its password. After "inside ..." it waits for a line on stdin before it leaves the
block, so the test can look at the credential while the block still holds it."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from typing import Any

import psycopg
from leasehold_client import AsyncClient, Client

# Ctrl-C as in a terminal, even when started from a shell that ignores SIGINT.
signal.signal(signal.SIGINT, signal.default_int_handler)
mode, task = sys.argv[1], sys.argv[2]
GRANTS = {"db": "reports-readonly"}


def use(secret: dict[str, Any]) -> None:
    with psycopg.connect(secret["dsn"], connect_timeout=5) as conn:
        row = conn.execute("SELECT title FROM reports").fetchone()
    print(f"inside {secret['username']} {row[0] if row else None}", flush=True)


def hold() -> None:
    """Until the test has seen the credential live (a line on stdin)."""
    sys.stdin.readline()


def run_sync() -> None:
    lh = Client(source="pytest://client-only")
    with lh.task(task, grants=GRANTS, max_duration=120, heartbeat_every=0.3) as t:
        use(t.credential("db"))
        hold()
        if mode == "raise":
            raise RuntimeError("the block failed")
        if mode == "sigint":
            print("waiting", flush=True)
            time.sleep(60)


async def run_async() -> None:
    lh = AsyncClient(source="pytest://client-only")
    inside = asyncio.Event()

    async def block() -> None:
        async with lh.task(task, grants=GRANTS, max_duration=120) as t:
            use(await t.credential("db"))
            await asyncio.to_thread(hold)
            inside.set()
            if mode == "async-cancel":
                await asyncio.sleep(60)

    job = asyncio.ensure_future(block())
    await inside.wait()
    if mode == "async-cancel":
        job.cancel()
    try:
        await job
    except asyncio.CancelledError:
        print("cancelled", flush=True)
    await lh.aclose()


if mode.startswith("async"):
    asyncio.run(run_async())
else:
    run_sync()
