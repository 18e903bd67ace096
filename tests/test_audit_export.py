"""The audit export (PRODUCT.md, "Audit export"): a hash chain written once per entry,
in commit order, that survives a killed exporter and that `audit verify` checks."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import col, select

from app import ledger
from app.audit_chain import GENESIS, encode, link, verify
from app.core.db import session_scope
from app.core.models import AuditEntry, utcnow
from app.core.settings import get_settings
from schedules import audit_export
from schedules.lock import ledger_lock
from tests.support.procs import wait_until
from tests.support.world import ROOT

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

CLI = [sys.executable, "-m", "app.cli"]


def export_file() -> Path:
    path = get_settings().audit_export_path
    assert path is not None
    return path


@contextmanager
def export_lock() -> Iterator[None]:
    """The exporter's lock, as an exporter holds it; the scheduler's exporter (every 2 s)
    may hold it just now, so wait that out (bounded) rather than go on without it."""
    deadline = time.monotonic() + 30
    while True:
        with ledger_lock("audit-export") as got:
            if got:
                yield
                return
        assert time.monotonic() < deadline, "the exporter's lock was held for 30 s"
        time.sleep(0.05)


def add_entries(n: int, tag: str) -> list[str]:
    ids = []
    with session_scope() as s:
        for i in range(n):
            entry = AuditEntry(at=utcnow(), actor="pytest", action="test", detail=f"{tag} {i}")
            s.add(entry)
            ids.append(entry.id)
    return ids


def file_lines() -> list[dict]:
    return [json.loads(raw) for raw in export_file().read_bytes().splitlines()]


def assert_complete(ids: list[str]) -> None:
    """The file is one intact chain, each of `ids` in it exactly once, and every line
    is the ledger's: same seq and hash as the entry's marker (read under the exporter's
    lock, so the scheduler's exporter does not add lines between the two reads)."""
    with export_lock():
        with export_file().open("rb") as fh:
            verdict = verify(fh)
        lines = file_lines()
        with session_scope() as s:
            rows = s.exec(select(AuditEntry).where(col(AuditEntry.id).in_(ids))).all()
            head, head_hash = ledger.audit_export_head(s)
    assert verdict.ok, (verdict.bad_line, verdict.problem)
    seen = [line["id"] for line in lines]
    assert len(seen) == len(set(seen)), "an entry was written twice"
    assert set(ids) <= set(seen), f"{len(set(ids) - set(seen))} entries missing"
    by_id = {line["id"]: line for line in lines}
    for row in rows:
        assert (row.exported_seq, row.export_hash) == (by_id[row.id]["seq"], by_id[row.id]["hash"])
    assert (lines[-1]["seq"], lines[-1]["hash"]) == (head, head_hash)


def export_now() -> audit_export.ExportResult:
    """Export, waiting out the scheduler's exporter if it holds the lock just now."""
    return wait_until(lambda: (r := audit_export.export()).ran and r, timeout=30, interval=0.2)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


# --- verify ----------------------------------------------------------------------


def _chain(path: Path, n: int, *, seq: int = 1, prev: str = GENESIS) -> list[bytes]:
    out = []
    for i in range(n):
        line = link(
            {"id": f"e{i}", "at": "2026-01-01T00:00:00Z", "actor": "a", "detail": f"x{i}"},
            seq=seq + i,
            prev=prev,
        )
        prev = line["hash"]
        out.append(encode(line))
    path.write_bytes(b"".join(out))
    return out


def test_verify_names_the_first_bad_line(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    lines = _chain(good, 5)
    ok = cli("audit", "verify", str(good))
    assert ok.returncode == 0, ok.stderr
    assert "5 lines" in ok.stdout

    edited = tmp_path / "edited.jsonl"
    edited.write_bytes(b"".join(lines).replace(b'"x2"', b'"y2"'))
    missing = tmp_path / "missing.jsonl"
    missing.write_bytes(b"".join(lines[:3] + lines[4:]))
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_bytes(b"".join([lines[0], lines[2], lines[1], *lines[3:]]))
    for path, bad in ((edited, 3), (missing, 4), (swapped, 2)):
        result = cli("audit", "verify", str(path))
        assert result.returncode == 1, (path.name, result.stdout)
        assert f"{path}:{bad}:" in result.stderr, (path.name, result.stderr)
    # Also a line whose seq and hash were recomputed after an edit breaks the next prev.
    with good.open("rb") as fh:
        assert verify(fh).ok


def test_verify_accepts_a_rotated_file_given_its_first_prev(tmp_path: Path) -> None:
    first = tmp_path / "audit.jsonl.1"
    old = _chain(first, 3)
    last_hash = json.loads(old[-1])["hash"]
    second = tmp_path / "audit.jsonl"
    _chain(second, 4, seq=4, prev=last_hash)
    assert cli("audit", "verify", str(second)).returncode == 1  # mid-chain, not told
    told = cli("audit", "verify", str(second), "--first-prev", last_hash)
    assert told.returncode == 0, told.stderr
    wrong = cli("audit", "verify", str(second), "--first-prev", "1" * 64)
    assert wrong.returncode == 1 and f"{second}:1:" in wrong.stderr


# --- the exporter -------------------------------------------------------------


def test_export_writes_each_entry_once_in_commit_order() -> None:
    """An entry made first (earlier id) but committed after a later one is still
    written, once: the exporter picks by the ledger's marker, not by id."""
    late = session_scope()
    session = late.__enter__()
    early = AuditEntry(at=utcnow(), actor="pytest", action="test", detail="committed late")
    session.add(early)
    session.flush()
    try:
        later = add_entries(1, "committed first")
        export_now()
        assert later[0] in {line["id"] for line in file_lines()}
        assert early.id not in {line["id"] for line in file_lines()}
    finally:
        late.__exit__(None, None, None)  # commits
    export_now()
    assert_complete([early.id, *later])


def test_a_crash_between_write_and_mark_repeats_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = add_entries(7, "crash")

    def crash(*_: object) -> None:
        raise KeyboardInterrupt("died after the write")

    monkeypatch.setattr(audit_export.ledger, "mark_exported", crash)
    with pytest.raises(KeyboardInterrupt), export_lock():
        audit_export._export_locked(export_file())
    monkeypatch.undo()
    assert set(ids) <= {line["id"] for line in file_lines()}  # written, not marked
    with export_lock():  # as an exporter mid-write would hold it
        with export_file().open("ab") as fh:  # and a half-written line after them
            fh.write(b'{"id":"half')
        # `audit status` only reads (no lock): it leaves a line being written alone.
        assert cli("audit", "status").returncode in (0, 1)
        assert export_file().read_bytes().endswith(b'{"id":"half')
    more = add_entries(2, "after the crash")
    result = export_now()
    assert result.ran
    assert_complete(ids + more)


def test_export_survives_kill_9_mid_export() -> None:
    ids = add_entries(3000, "kill")
    rng = random.Random()
    for _ in range(3):
        proc = subprocess.Popen(
            [*CLI, "audit", "export", "--follow"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(rng.uniform(1.0, 2.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        ids += add_entries(300, "between kills")
    export_now()
    assert_complete(ids)
    status = cli("audit", "status")
    assert status.returncode == 0, status.stderr
    assert "in step" in status.stdout


def test_a_file_cut_short_is_refused_not_forked(tmp_path: Path) -> None:
    add_entries(3, "cut")
    export_now()
    path = export_file()
    original = path.read_bytes()
    try:
        path.write_bytes(b"".join(original.splitlines(keepends=True)[:-2]))
        status = cli("audit", "status")
        assert status.returncode == 1 and "short of the ledger" in status.stderr
        with pytest.raises(audit_export.ExportError), export_lock():
            audit_export._export_locked(path)
    finally:
        path.write_bytes(original)


def test_retention_purges_only_exported_entries() -> None:
    old = utcnow() - timedelta(days=get_settings().retention_days + 1)
    tag = uuid.uuid4().hex
    with export_lock():  # the scheduler's exporter waits meanwhile
        with session_scope() as s:
            s.add(AuditEntry(at=old, actor="pytest", action="test", detail=f"{tag} exported"))
            s.add(AuditEntry(at=old, actor="pytest", action="test", detail=f"{tag} last"))
        audit_export._export_locked(export_file())
        with session_scope() as s:
            s.add(AuditEntry(at=old, actor="pytest", action="test", detail=f"{tag} waiting"))
        with session_scope() as s:
            head, head_hash = ledger.audit_export_head(s)
            ledger.purge_audit(s, before=utcnow() - timedelta(days=1), limit=100_000)
        with session_scope() as s:
            left = {
                e.detail: e.exported_seq
                for e in s.exec(select(AuditEntry).where(col(AuditEntry.detail).startswith(tag)))
            }
            # The chain's head stays, whoever's it is: the export goes on from it.
            assert ledger.audit_export_head(s) == (head, head_hash)
    assert f"{tag} exported" not in left
    assert left[f"{tag} waiting"] is None
    assert f"{tag} last" not in left or left[f"{tag} last"] == head
    export_now()  # and the chain goes on
    with export_file().open("rb") as fh:
        assert verify(fh).ok


def test_an_entry_reaches_the_file_within_5_s(worker: Path) -> None:
    """The scheduler exports by itself (every 2 s)."""
    [entry] = add_entries(1, "scheduled")
    started = time.monotonic()
    path = export_file()  # written by the scheduler's first run, if no test wrote it yet
    wait_until(lambda: path.exists() and entry in path.read_text(), timeout=5, interval=0.1)
    assert time.monotonic() - started < 5


def test_a_scheduled_run_is_bounded_and_the_next_one_goes_on() -> None:
    """A backlog is worked off over several runs (each stops after the batch that passes
    its budget), with the chain intact; the CLI's run (no budget) writes everything."""
    export_now()  # start from a caught-up file
    # Holding the exporter's lock as export() would: the scheduler's exporter waits, and
    # exports none of the backlog before this run does.
    with export_lock():
        ids = add_entries(audit_export.BATCH * 2 + 7, "backlog")
        first = audit_export._export_locked(export_file(), budget=0)
    assert first.written == audit_export.BATCH  # one whole batch, then the budget stops it
    rest = export_now()
    assert rest.written >= audit_export.BATCH + 7
    assert_complete(ids)
