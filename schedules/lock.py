"""One reconciliation at a time per ledger.

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

from app.db import get_engine
from app.logs import log
from app.settings import get_settings

LOCK_KEY = int.from_bytes(hashlib.sha256(b"leasehold:reconcile").digest()[:8], "big", signed=True)

_local_lock = threading.Lock()


@contextmanager
def sweep_lock() -> Iterator[bool]:
    """True when this process may sweep now; False when another sweep holds the lock."""
    engine = get_engine()
    if engine.dialect.name != "postgresql":
        with _file_lock() as got:
            yield got
        return
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK_KEY}).scalar())
        try:
            yield got
        finally:
            if got:
                try:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
                except DBAPIError as exc:  # connection lost: the server released it
                    log.warning("sweep lock release failed", extra={"error": type(exc).__name__})
                    conn.invalidate()
    finally:
        conn.close()


@contextmanager
def _file_lock() -> Iterator[bool]:
    if not _local_lock.acquire(blocking=False):
        yield False
        return
    try:
        home = get_settings().home
        home.mkdir(parents=True, exist_ok=True)
        with (home / "sweep.lock").open("a") as fh:
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
        _local_lock.release()
