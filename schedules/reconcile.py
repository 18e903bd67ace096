"""Reconciliation: what each backend holds under this installation's mark, against the ledger.

Level-triggered, like a kopf operator: every run compares what is with what
should be, whatever happened in between (a lost message, a killed worker).

For each backend (several profiles may share one: deduplicated by issuer kind,
backend identity and ref) the backend is listed FIRST, then the ledger is read:

- a marked object the ledger holds for no running task -> revoked here, reason
  `orphan`, and recorded (an audit entry; the sweep's detail). "Holds" means a
  `pending` or `active` row of a running task whose ref is this object. A
  `pending` row younger than PENDING_GRACE is a mint in flight: left alone.
  (Rows are committed before their mint is enqueued, so "no row" is an orphan.)
- an `active` row minted before the listing began whose object the backend no
  longer shows -> `revoked` with reason `vanished` (last_error says where), and said
  so (audit `vanished`).
- a `revoked` row whose object is still there -> revoked again.

Then stuck work is re-driven (schedules.sweep.redrive_stuck); work whose message was
lost is found sooner by the deadline sweep (schedules.sweep.redrive_due). Every run is
stored as a Sweep row; one runs at a time per ledger (a PostgreSQL advisory
lock; a lock file on embedded SQLite), a second returns at once, skipped.
"""

from __future__ import annotations

import fcntl
import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from app import ledger, observe
from app.db import get_engine, session_scope
from app.issuers import get_issuer
from app.issuers.base import Issuer, IssuerError, MarkedObject
from app.ledger import HeldRow
from app.logs import log
from app.models import CredState, TaskState, utcnow
from app.profiles import Profile, get_profiles
from app.queue import RECONCILE, enqueue_extend, enqueue_revoke
from app.settings import Settings, get_settings
from schedules.sweep import REDRIVE_AFTER, redrive_stuck
from workers.issuing import installation_id
from workers.job import job

BATCH = 500
# A pending row untouched this long is no mint in flight (a mint with its retries
# takes well under a minute; the re-drive touches a row when it enqueues it again).
PENDING_GRACE = REDRIVE_AFTER
# Clock differences between processes (a row's minted_at is written after its object
# exists); also: rows due to expire about now are the deadline sweep's, not "vanished".
MARGIN = timedelta(seconds=2)
DETAIL_LIMIT = 100  # items kept per list in a sweep's detail
NAME_BASED = ("postgres", "redis")  # the ref is the name the ledger chose
LOCK_KEY = int.from_bytes(hashlib.sha256(b"leasehold:reconcile").digest()[:8], "big", signed=True)

_local_lock = threading.Lock()


@dataclass
class Backend:
    """One backend and the profiles that mint in it."""

    family: str  # postgres, redis, vault
    identity: str
    profiles: list[Profile]

    @property
    def label(self) -> str:
        return f"{self.family} {self.identity}"


@dataclass
class SweepReport:
    skipped: bool = False
    id: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    checked: int = 0
    orphans_revoked: int = 0
    vanished: int = 0
    rerevoked: int = 0
    redriven: int = 0
    errors: int = 0
    detail: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {
            "checked": self.checked,
            "orphans_revoked": self.orphans_revoked,
            "vanished": self.vanished,
            "rerevoked": self.rerevoked,
            "redriven": self.redriven,
            "errors": self.errors,
        }

    def note(self, kind: str, item: Any) -> None:
        items = self.detail.setdefault(kind, [])
        if len(items) < DETAIL_LIMIT:
            items.append(item)
        else:
            self.detail[f"{kind}_truncated"] = True

    def bump(self, kind: str, n: int = 1) -> None:
        self.detail[kind] = self.detail.get(kind, 0) + n

    def error(self, backend: Backend, action: str, exc: Exception, ref: str | None = None) -> None:
        self.errors += 1
        self.note(
            "errors",
            {"backend": backend.label, "action": action, "ref": ref, "error": str(exc)[:500]},
        )
        log.warning(
            "reconciliation error",
            extra={"backend": backend.label, "action": action, "error": str(exc)[:500]},
        )


# --- the backends -------------------------------------------------------------


def backend_of(profile: Profile, settings: Settings) -> tuple[str, str]:
    """(family, identity): the same family and identity is the same set of objects."""
    if profile.issuer == "postgres":
        # Roles are cluster-wide: every database of one server lists the same roles.
        scheme, sep, rest = profile.dsn.partition("://")
        info = conninfo_to_dict(scheme.split("+", 1)[0] + sep + rest)
        host = str(info.get("hostaddr") or info.get("host") or "").lower()
        return "postgres", f"{host}:{info.get('port') or 5432}"
    if profile.issuer == "redis":
        # ACL users are server-wide, whatever the db number.
        parts = urlsplit(profile.url)
        where = f"{(parts.hostname or '').lower()}:{parts.port or 6379}"
        return "redis", where if parts.hostname else parts.path
    # Vault tokens are listed per profile (their metadata names it).
    return "vault", f"{settings.vault_addr or ''}#{profile.name}"


def backends(profiles: dict[str, Profile], settings: Settings) -> list[Backend]:
    grouped: dict[tuple[str, str], Backend] = {}
    for profile in sorted(profiles.values(), key=lambda p: p.name):
        family, identity = backend_of(profile, settings)
        backend = grouped.setdefault((family, identity), Backend(family, identity, []))
        backend.profiles.append(profile)
    return list(grouped.values())


# --- one at a time --------------------------------------------------------------


@contextmanager
def sweep_lock() -> Iterator[bool]:
    """True when this process may sweep now; False when another sweep holds the lock."""
    engine = get_engine()
    if engine.dialect.name != "postgresql":
        # Embedded (SQLite, one machine): the worker's beat and the API's POST /v1/sweeps
        # are two processes; a lock file excludes them, the thread lock the threads.
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
        return
    # A session-level advisory lock on a connection of its own, held for the whole
    # run; it goes with the connection if this process dies.
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


# --- the run ----------------------------------------------------------------------


def reconcile(
    *,
    trigger: str = "schedule",
    pending_grace: timedelta = PENDING_GRACE,
    redrive_after: timedelta = REDRIVE_AFTER,
) -> SweepReport:
    """Run one reconciliation, or return at once (skipped) if another is running."""
    with sweep_lock() as got:
        if not got:
            log.info("reconciliation skipped: another sweep is running")
            return SweepReport(skipped=True)
        return _run(trigger, pending_grace, redrive_after)


def _run(trigger: str, pending_grace: timedelta, redrive_after: timedelta) -> SweepReport:
    settings = get_settings()
    inst = installation_id()
    report = SweepReport(started_at=utcnow())
    with session_scope() as session:
        report.id = ledger.start_sweep(session, now=report.started_at, trigger=trigger)
    report.detail = {"trigger": trigger, "backends": []}
    seen: set[tuple[str, str]] = set()
    try:
        for backend in backends(get_profiles(), settings):
            _reconcile_backend(report, backend, inst, settings, seen, pending_grace)
        mints, revokes = redrive_stuck(redrive_after)
        report.redriven = mints + revokes
        report.detail["redriven"] = {"mints": mints, "revokes": revokes}
    finally:
        report.finished_at = utcnow()
        with session_scope() as session:
            ledger.finish_sweep(
                session,
                report.id,
                counts=report.counts(),
                detail=report.detail,
                now=report.finished_at,
            )
    observe.orphans_revoked(report.orphans_revoked)
    log.info("reconciliation", extra={"sweep": report.id, **report.counts()})
    return report


def _reconcile_backend(
    report: SweepReport,
    backend: Backend,
    inst: str,
    settings: Settings,
    seen: set[tuple[str, str]],
    pending_grace: timedelta,
) -> None:
    summary: dict[str, Any] = {
        "backend": backend.label,
        "profiles": [p.name for p in backend.profiles],
    }
    report.detail["backends"].append(summary)
    # The backend first, the ledger after: a row read later is at least as new as
    # the object listed, so an in-flight mint is never mistaken for an orphan.
    listed_at = utcnow()
    try:
        issuer = get_issuer(backend.profiles[0], installation_id=inst, settings=settings)
        objects = issuer.list_marked()
    except IssuerError as exc:
        summary["error"] = str(exc)[:500]
        report.error(backend, "list", exc)
        return
    fresh = []
    for obj in objects:
        # One ref names one object of this installation (a role or user name carries the
        # credential id, an accessor is unique): the same cluster reached under two
        # addresses (a proxy, localhost and 127.0.0.1) is judged once.
        key = (backend.family, obj.ref)
        if key not in seen:
            seen.add(key)
            fresh.append(obj)
    summary["listed"] = len(fresh)
    report.checked += len(fresh)
    prefix = f"lh_{inst[:12]}_"
    for start in range(0, len(fresh), BATCH):
        chunk = fresh[start : start + BATCH]
        ids = {obj.ref: _credential_id(obj, backend, prefix) for obj in chunk}
        with session_scope() as session:
            rows = ledger.held_rows(session, [i for i in ids.values() if i])
        for obj in chunk:
            cred_id = ids[obj.ref]
            _judge(report, backend, issuer, obj, cred_id, rows.get(cred_id or ""), pending_grace)
    _find_vanished(report, backend, {obj.ref for obj in objects}, listed_at)


def _credential_id(obj: MarkedObject, backend: Backend, prefix: str) -> str | None:
    if obj.credential_id:
        return obj.credential_id
    if backend.family in NAME_BASED and obj.ref.startswith(prefix):
        return obj.ref[len(prefix) :] or None  # the name is lh_<installation>_<credential>
    return None


def _row_ref(row: HeldRow, backend: Backend) -> str | None:
    if row.backend_ref:
        return row.backend_ref
    return row.backend_name if backend.family in NAME_BASED else None


def _judge(
    report: SweepReport,
    backend: Backend,
    issuer: Issuer,
    obj: MarkedObject,
    cred_id: str | None,
    row: HeldRow | None,
    pending_grace: timedelta,
) -> None:
    """Decide about one marked object; act on it."""
    if row is None:
        _revoke_orphan(report, backend, issuer, obj, cred_id, None, "no credential in the ledger")
        return
    same = _row_ref(row, backend) == obj.ref
    running = row.task_state == TaskState.running
    if row.state == CredState.revoked:
        if same:
            _revoke_again(report, backend, issuer, obj, row)
        else:
            _revoke_orphan(
                report, backend, issuer, obj, cred_id, row, "another object of a revoked credential"
            )
        return
    if row.state in (CredState.failed, CredState.denied, CredState.awaiting_approval):
        _revoke_orphan(report, backend, issuer, obj, cred_id, row, f"the credential is {row.state}")
        return
    if not same and row.backend_ref is not None:
        # e.g. a second Vault token from a mint retried after a crash: the row names another.
        _revoke_orphan(
            report,
            backend,
            issuer,
            obj,
            cred_id,
            row,
            "not the object the ledger recorded for this credential",
        )
        return
    if row.state == CredState.revoking:
        if not same:
            # A mint that never recorded its object (a Vault token from a killed worker),
            # then the task ended: the credential's revoke has no ref and cannot find it.
            _revoke_orphan(report, backend, issuer, obj, cred_id, row, "its task has ended")
            return
        report.bump("revoking")  # its revoke is under way (and re-driven if stuck)
        return
    # pending or active
    if not running:
        if not same:  # a Vault token the row never recorded: nothing else will find it
            _revoke_orphan(report, backend, issuer, obj, cred_id, row, "its task has ended")
        _queue_revoke(report, row)
        return
    if row.state == CredState.pending:
        if row.updated_at > utcnow() - pending_grace:
            report.bump("in_flight")  # being minted for a running task: never touched
            return
        # A mint that never reached the ledger (its worker died): the object goes, and the
        # re-drive below mints the credential again.
        _revoke_orphan(report, backend, issuer, obj, cred_id, row, "minted but never recorded")
        return
    report.bump("held")
    _check_expiry(report, obj, row)


def _revoke_orphan(
    report: SweepReport,
    backend: Backend,
    issuer: Issuer,
    obj: MarkedObject,
    cred_id: str | None,
    row: HeldRow | None,
    why: str,
) -> None:
    try:
        issuer.revoke(obj.ref)
    except IssuerError as exc:
        report.error(backend, "revoke orphan", exc, obj.ref)
        return
    report.orphans_revoked += 1
    item = {
        "backend": backend.label,
        "ref": obj.ref,
        "name": obj.name,
        "credential": cred_id,
        "why": why,
    }
    report.note("orphans", item)
    with session_scope() as session:
        ledger.record_swept(
            session,
            "orphan_revoked",
            reason="orphan",
            row=row,
            credential_id=cred_id,
            detail=f"{backend.label} {obj.ref}: {why}",
            now=utcnow(),
        )
    log.warning(
        "orphan revoked",
        extra={
            "backend": backend.label,
            "object": obj.name or obj.ref,
            "credential": cred_id,
            "why": why,
        },
    )


def _revoke_again(
    report: SweepReport, backend: Backend, issuer: Issuer, obj: MarkedObject, row: HeldRow
) -> None:
    try:
        issuer.revoke(obj.ref)
    except IssuerError as exc:
        report.error(backend, "revoke again", exc, obj.ref)
        return
    report.rerevoked += 1
    report.note("rerevoked", {"backend": backend.label, "ref": obj.ref, "credential": row.id})
    with session_scope() as session:
        ledger.record_swept(
            session,
            "revoked_again",
            reason="orphan",
            row=row,
            credential_id=row.id,
            detail=f"{backend.label} {obj.ref}: revoked in the ledger, "
            "still present in the backend",
            now=utcnow(),
        )
    log.warning("revoked again", extra={"credential": row.id, "backend": backend.label})


def _queue_revoke(report: SweepReport, row: HeldRow) -> None:
    """A live row of an ended task (its end did not reach it): revoke it the usual way."""
    with session_scope() as session:
        ids = ledger.request_revoke(
            session, reason="orphan", actor="reconcile", now=utcnow(), credential_id=row.id
        )
    enqueue_revoke(ids)
    if ids:
        report.orphans_revoked += 1
        report.note("orphans", {"credential": row.id, "why": "task ended; revoke queued"})


def _check_expiry(report: SweepReport, obj: MarkedObject, row: HeldRow) -> None:
    """A heartbeat's extend that never ran (a lost message): re-drive it."""
    raw = obj.extra.get("valid_until") or obj.extra.get("expire_time")
    if not raw or row.expires_at is None:
        return
    try:
        backend_expiry = datetime.fromisoformat(raw)
    except ValueError:
        return
    if backend_expiry.tzinfo is not None and backend_expiry < row.expires_at - MARGIN:
        enqueue_extend([row.id])
        report.note("extended", {"credential": row.id})


def _find_vanished(
    report: SweepReport, backend: Backend, listed: set[str], listed_at: datetime
) -> None:
    """Active rows minted before the listing began whose object is not in it."""
    profiles = [p.name for p in backend.profiles]
    after: tuple[datetime, str] | None = None
    checked = 0
    while True:
        with session_scope() as session:
            rows = ledger.active_minted_before(
                session, profiles=profiles, before=listed_at - MARGIN, after=after, limit=BATCH
            )
        checked += len(rows)
        for row in rows:
            if _row_ref(row, backend) in listed:
                continue
            if row.expires_at is not None and row.expires_at <= listed_at + MARGIN:
                continue  # the backend expired it on time; the deadline sweep ends the task
            detail = f"vanished: {backend.label} no longer holds it (sweep {report.id})"
            with session_scope() as session:
                marked = ledger.mark_vanished(session, row.id, detail, now=utcnow())
            if marked:
                report.vanished += 1
                report.note(
                    "vanished",
                    {"backend": backend.label, "credential": row.id, "profile": row.profile},
                )
                log.warning(
                    "credential vanished from its backend",
                    extra={"credential": row.id, "backend": backend.label},
                )
        if len(rows) < BATCH:
            break
        after = (rows[-1].updated_at, rows[-1].id)
    report.bump("active_checked", checked)


@job(RECONCILE)
def reconcile_task() -> dict[str, Any]:
    report = reconcile(trigger="schedule")
    return {"skipped": report.skipped, **report.counts()}


def render_report(report: SweepReport) -> str:
    """What `leasehold sweep` prints."""
    if report.skipped:
        return "skipped: another sweep is running"
    d = report.detail
    lines = [
        f"sweep {report.id}",
        f"checked          {report.checked} marked objects in "
        f"{len(d.get('backends', []))} backends, {d.get('active_checked', 0)} active credentials",
        f"orphans revoked  {report.orphans_revoked}",
        f"vanished         {report.vanished}",
        f"revoked again    {report.rerevoked}",
        f"re-driven        {report.redriven}",
        f"in flight        {d.get('in_flight', 0)} (being minted: left alone)",
        f"errors           {report.errors}",
    ]
    for item in d.get("orphans", []):
        where = f"{item.get('backend', '')} {item.get('name') or item.get('ref') or ''}".strip()
        lines.append(f"  orphan    {where or item.get('credential')}: {item['why']}")
    for item in d.get("vanished", []):
        lines.append(f"  vanished  credential {item['credential']} ({item['profile']})")
    for item in d.get("rerevoked", []):
        lines.append(f"  again     {item['backend']} {item['ref']}")
    for item in d.get("errors", []):
        lines.append(f"  error     {item['backend']} {item['action']}: {item['error']}")
    return "\n".join(lines)
