"""One reconciliation (and one audit exporter) at a time per ledger.

PostgreSQL: a session-level advisory lock on a connection of its own, held for the
whole run (it goes with the connection if the process dies). Embedded SQLite (one
machine): the worker's beat and the API's POST /v1/sweeps are two processes; a lock
file excludes them, a thread lock the threads.
"""

from __future__ import annotations

import fcntl
import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from app.core.db import get_engine
from app.core.logs import log
from app.core.settings import get_settings


def _key(name: str) -> int:
    return int.from_bytes(
        hashlib.sha256(f"leasehold:{name}".encode()).digest()[:8], "big", signed=True
    )


LOCK_KEY = _key("reconcile")
_local_locks = {"reconcile": threading.Lock(), "audit-export": threading.Lock()}
# The lock files keep their names: "sweep.lock" is the reconciliation's.
_FILES = {"reconcile": "sweep.lock", "audit-export": "audit-export.lock"}


@contextmanager
def sweep_lock() -> Iterator[bool]:
    """True when this process may sweep now; False when another sweep holds the lock."""
    with ledger_lock("reconcile") as got:
        yield got


@contextmanager
def ledger_lock(name: str) -> Iterator[bool]:
    """True when this process holds the ledger-wide lock `name` (reconcile, audit-export)."""
    engine = get_engine()
    if engine.dialect.name != "postgresql":
        with _file_lock(name) as got:
            yield got
        return
    key = _key(name)
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        try:
            yield got
        finally:
            if got:
                try:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                except DBAPIError as exc:  # connection lost: the server released it
                    log.warning(
                        "ledger lock release failed",
                        extra={"lock": name, "error": type(exc).__name__},
                    )
                    conn.invalidate()
    finally:
        conn.close()


@contextmanager
def _file_lock(name: str) -> Iterator[bool]:
    local = _local_locks[name]
    if not local.acquire(blocking=False):
        yield False
        return
    try:
        home = get_settings().home
        home.mkdir(parents=True, exist_ok=True)
        with (home / _FILES[name]).open("a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        local.release()
