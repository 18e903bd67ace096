"""Engine per process, a session per request, session_scope() for workers."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import Depends
from psycopg.pq import TransactionStatus
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

from app.core.settings import get_settings

_lock = threading.Lock()
_engines: dict[tuple[int, str], Engine] = {}
# A round trip (SELECT 1) before every checkout, to find a connection the server
# dropped. The worker turns it off (pre_ping(False)): its jobs retry on
# OperationalError, and SQLAlchemy invalidates the pool on a disconnect, so a dropped
# connection costs one retried step, not a round trip on every step.
_pre_ping = True


def pre_ping(enabled: bool) -> None:
    """Whether engines created from now on ping connections at checkout."""
    global _pre_ping
    _pre_ping = enabled


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    # WAL lets the API read while the worker writes; busy_timeout waits out locks.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _keep_prepared_statements(engine: Engine) -> None:
    """A transaction that only read ends with COMMIT, not ROLLBACK: psycopg forgets every
    prepared statement of a connection on ROLLBACK (and sends DEALLOCATE ALL), so each
    read-only request that closed its session (a list, the dashboard, a key lookup)
    made the hot statements on that pooled connection be planned again. Without a
    write, COMMIT ends the transaction exactly as ROLLBACK does. Anything but a single
    plain SELECT counts as a write (so do several statements in one text), and a
    transaction in error always rolls back. No SELECT here calls a function that
    writes (pg_notify, set_config, ...): one that did would need a ROLLBACK kept."""
    dialect = engine.dialect
    rollback, commit = dialect.do_rollback, dialect.do_commit
    wrote: weakref.WeakSet[Any] = weakref.WeakSet()  # psycopg connections

    @event.listens_for(engine, "before_cursor_execute")
    def _note_write(_conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if not statement.startswith("SELECT") or ";" in statement:
            wrote.add(cursor.connection)

    def do_rollback(dbapi_connection: Any) -> None:
        driver = dbapi_connection.driver_connection
        if driver in wrote or driver.info.transaction_status != TransactionStatus.INTRANS:
            wrote.discard(driver)
            rollback(dbapi_connection)
        else:
            commit(dbapi_connection)

    def do_commit(dbapi_connection: Any) -> None:
        commit(dbapi_connection)  # first: a COMMIT that failed leaves the mark
        wrote.discard(dbapi_connection.driver_connection)

    dialect.do_rollback = do_rollback  # type: ignore[method-assign]
    dialect.do_commit = do_commit  # type: ignore[method-assign]


def get_engine(url: str | None = None) -> Engine:
    """The engine for this process; a forked child gets its own (pools don't survive fork)."""
    settings = get_settings()
    url = url or settings.sqlalchemy_url
    key = (os.getpid(), url)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            if url.startswith("sqlite"):
                settings.home.mkdir(parents=True, exist_ok=True)
                engine = create_engine(
                    url, connect_args={"check_same_thread": False, "timeout": 10}
                )
                event.listen(engine, "connect", _sqlite_pragmas)
            else:
                engine = create_engine(
                    url,
                    pool_size=10,
                    max_overflow=20,
                    pool_pre_ping=_pre_ping,
                    pool_timeout=settings.backend_timeout,
                    connect_args={"connect_timeout": int(settings.backend_timeout)},
                )
                if engine.dialect.driver == "psycopg":
                    _keep_prepared_statements(engine)
            _engines[key] = engine
        return engine


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def get_session() -> Iterator[Session]:
    with Session(get_engine(), expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


@contextmanager
def session_scope() -> Iterator[Session]:
    """A unit of work: commits on success, rolls back on error."""
    session = Session(get_engine(), expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
