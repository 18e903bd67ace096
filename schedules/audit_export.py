"""The audit export: every audit entry once, in commit order, to LEASEHOLD_AUDIT_EXPORT.

One exporter at a time (a ledger lock). It picks entries by the ledger's marker
(`audit.exported_seq` NULL), not by id order, so an entry committed late with an earlier
id is written when it becomes visible. Each batch is written and fsynced first, then
marked in the ledger. A crash between the two leaves lines in the file that the ledger
has not marked: the next run reads the file's last lines and marks those entries, so
nothing is written twice or skipped. A partial last line (a crash mid-write) is cut off
and written again. A file that is missing or empty while the ledger has exported
entries was rotated: the chain continues from the ledger's last seq and hash.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import sqlalchemy
from sqlmodel import Session

from app import ledger, queue
from app.audit_chain import GENESIS, encode, link, record
from app.core.db import session_scope
from app.core.logs import log
from app.core.models import AuditEntry, Task
from app.core.settings import get_settings
from schedules.lock import ledger_lock
from workers.job import job

BATCH = 500
RUN_BUDGET = 1.0  # seconds of writing per scheduled run (batches are whole)
# What record() reads of an entry.
_FIELDS = ("id", "at", "tenant", "actor", "action", "credential_id", "reason", "detail")
_TAIL_BLOCK = 64 * 1024


class ExportError(Exception):
    """The file and the ledger disagree: exporting on would fork or break the chain."""


@dataclass
class ExportResult:
    ran: bool  # False: another exporter holds the lock
    written: int = 0
    reconciled: int = 0  # lines found in the file that the ledger had not marked yet
    seq: int = 0  # the chain's last seq afterwards


@dataclass
class FileTail:
    last_seq: int | None  # None: the file is empty (new, or rotated)
    last_hash: str | None
    after: list[dict[str, Any]]  # the lines with seq above the ledger's head, in order


def read_tail(path: Path, after_seq: int, *, repair: bool = True) -> FileTail:
    """The file's last line and every line after seq `after_seq` (read from the end).
    `repair` (the exporter, under its lock): cut off a partial last line, whose entry
    was never marked, so it is written again; otherwise such a line is skipped."""
    if not path.exists():
        return FileTail(None, None, [])
    with path.open("r+b" if repair else "rb") as fh:
        pos = _cut_partial_line(fh) if repair else _last_newline(fh)
        data = b""
        while True:
            step = min(_TAIL_BLOCK, pos)
            pos -= step
            fh.seek(pos)
            data = fh.read(step) + data
            if pos == 0:
                lines = data.split(b"\n")[:-1]
                break
            first = data.find(b"\n")
            if first < 0:
                continue
            lines = data[first + 1 :].split(b"\n")[:-1]
            if lines and _seq(lines[0]) <= after_seq:
                break
    if not lines:
        return FileTail(None, None, [])
    parsed = [_parse(raw) for raw in lines if _seq(raw) > after_seq]
    last = _parse(lines[-1])
    return FileTail(last["seq"], last["hash"], parsed)


def _cut_partial_line(fh: BinaryIO) -> int:
    """Truncate after the last newline; returns the file's size afterwards."""
    size = fh.seek(0, os.SEEK_END)
    end = _last_newline(fh)
    if end < size:
        log.warning("audit export: cutting off a partial last line", extra={"bytes": size - end})
        fh.truncate(end)
    return end


def _last_newline(fh: BinaryIO) -> int:
    """The offset just after the file's last newline (0: none)."""
    size = fh.seek(0, os.SEEK_END)
    end = size
    while end > 0:
        step = min(_TAIL_BLOCK, end)
        fh.seek(end - step)
        block = fh.read(step)
        if end == size and block.endswith(b"\n"):
            return size
        cut = block.rfind(b"\n")
        if cut >= 0:
            end = end - step + cut + 1
            break
        end -= step
    return end


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        line = json.loads(raw)
    except ValueError:
        raise ExportError("the export's last lines are not chain lines") from None
    if not isinstance(line, dict) or not all(k in line for k in ("id", "seq", "prev", "hash")):
        raise ExportError("the export's last lines are not chain lines")
    return line


def _seq(raw: bytes) -> int:
    seq = _parse(raw)["seq"]
    if not isinstance(seq, int):
        raise ExportError("the export's last lines are not chain lines")
    return seq


def _reconcile(session: Session, tail: FileTail, head: int, head_hash: str | None) -> int:
    """Mark entries the file holds but the ledger does not (a crash after the write)."""
    if tail.last_seq is None or tail.last_seq == head:
        if tail.last_seq is not None and tail.last_hash != head_hash:
            raise ExportError(f"the export's line {head} is not the ledger's (hash differs)")
        return 0
    if tail.last_seq < head:
        raise ExportError(
            f"the export ends at seq {tail.last_seq} but the ledger exported up to {head}: "
            "lines were cut off the end, or this is not the current file"
        )
    prev = head_hash or GENESIS
    marks = []
    for expected, line in enumerate(tail.after, start=head + 1):
        if line["seq"] != expected or line["prev"] != prev:
            raise ExportError(f"the export's line seq {line['seq']} does not follow the ledger")
        marks.append((line["id"], line["seq"], line["hash"]))
        prev = line["hash"]
    ledger.mark_exported(session, marks)
    return len(marks)


def _pending(session: Session) -> list[tuple[AuditEntry, str | None]]:
    """The next batch waiting for export with each entry's task name: one statement, as
    plain rows (no ORM objects: the export runs every 2 s on every entry)."""
    entry, task = AuditEntry.__table__, Task.__table__  # type: ignore[attr-defined]
    rows = session.execute(
        sqlalchemy.select(*(entry.c[name] for name in _FIELDS), task.c.name.label("task_name"))
        .select_from(entry.outerjoin(task, task.c.id == entry.c.task_id))
        .where(entry.c.exported_seq.is_(None))
        .order_by(entry.c.id)
        .limit(BATCH)
    ).all()
    # A row has every attribute record() reads of an entry.
    return [(cast(AuditEntry, row), row.task_name) for row in rows]


def _write(path: Path | None, data: bytes) -> None:
    if path is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)  # on disk before the ledger says so
    finally:
        os.close(fd)


def export(budget: float | None = None) -> ExportResult:
    """Write every entry not yet exported; returns what it did. With a `budget`
    (seconds), stop after the batch that passes it: the rest waits for the next run."""
    with ledger_lock("audit-export") as got:
        if not got:
            return ExportResult(ran=False)
        return _export_locked(get_settings().audit_export_path, budget)


def _export_locked(path: Path | None, budget: float | None = None) -> ExportResult:
    result = ExportResult(ran=True)
    until = None if budget is None else time.monotonic() + budget
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    with session_scope() as session:
        head, head_hash = ledger.audit_export_head(session)
        if path is not None:
            result.reconciled = _reconcile(session, read_tail(path, head), head, head_hash)
            if result.reconciled:
                log.warning(
                    "audit export: marked entries written before a crash",
                    extra={"entries": result.reconciled},
                )
    while True:
        with session_scope() as session:
            seq, prev = ledger.audit_export_head(session)
            prev = prev or GENESIS
            rows = _pending(session)
            if not rows:
                break
            lines, marks = [], []
            for entry, task_name in rows:
                seq += 1
                line = link(record(entry, task_name), seq=seq, prev=prev)
                lines.append(encode(line))
                marks.append((entry.id, seq, line["hash"]))
                prev = line["hash"]
            _write(path, b"".join(lines))
            ledger.mark_exported(session, marks)
        result.written += len(rows)
        if len(rows) < BATCH or (until is not None and time.monotonic() >= until):
            break
    result.seq = seq  # the head as the last batch left it: no read of its own
    return result


@job(queue.AUDIT_EXPORT)
def export_task() -> int:
    # Every 2 s: one index probe when nothing waits (the usual case between bursts),
    # no lock, no file. An entry written but not marked (a crash) still waits, so the
    # file's repair runs whenever there is anything to repair.
    with session_scope() as session:
        if not ledger.audit_export_waiting(session):
            return 0
    try:
        # Bounded: a backlog (a long outage, a burst) is worked off over several runs, so
        # one run never holds a worker process, or its warm shutdown, for long.
        return export(budget=RUN_BUDGET).written
    except ExportError as exc:
        log.error("audit export stopped", extra={"error": str(exc)})
        raise
