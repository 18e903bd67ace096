"""Imported first by the benchmark's own API and worker processes (never by the app):
counts the statements and commits each process sends through SQLAlchemy into
$LEASEHOLD_BENCH_SQL_DIR/<pid>, so the benchmark can state the database work per
lifecycle without pg_stat_statements (which needs shared_preload_libraries)."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

_dir = os.environ["LEASEHOLD_BENCH_SQL_DIR"]
_state = {"pid": 0, "fd": -1, "statements": 0, "commits": 0}


def _count(what: str) -> None:
    pid = os.getpid()
    if _state["pid"] != pid:  # a forked worker child counts on its own
        _state.update(pid=pid, statements=0, commits=0)
        _state["fd"] = os.open(f"{_dir}/{pid}", os.O_WRONLY | os.O_CREAT, 0o600)
    _state[what] += 1
    os.pwrite(_state["fd"], b"%012d %012d" % (_state["statements"], _state["commits"]), 0)


_trace = os.environ.get("LEASEHOLD_BENCH_SQL_TRACE")  # a file: each statement's start


@event.listens_for(Engine, "before_cursor_execute")
def _statement(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
    _count("statements")
    if _trace:
        with open(_trace, "a") as f:
            f.write(f"{os.getpid()} {' '.join(statement.split())[:110]}\n")


@event.listens_for(Engine, "commit")
def _commit(*_: Any) -> None:
    _count("commits")
