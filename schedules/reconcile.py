"""Reconciliation: what each backend holds under this installation's mark, against the ledger.

Level-triggered, like a kopf operator: every run compares what is with what
should be, whatever happened in between (a lost message, a killed worker).

For each backend (profiles with one `backend_identity()` share one; objects are
deduplicated by family and ref) the backend is listed FIRST, then the ledger is read,
and each marked object is judged (schedules/judge.py):

- a marked object the ledger holds for no running task -> revoked here, reason
  `orphan`, and recorded (an audit entry; the sweep's detail). "Holds" means a
  `pending` or `active` row of a running task whose ref is this object. A
  `pending` row younger than PENDING_GRACE is a mint in flight: left alone.
  (Rows are committed before their mint is enqueued, so "no row" is an orphan.)
- an `active` row minted before the listing began whose object the backend no
  longer shows -> `revoked` with reason `vanished` (last_error says where), and said
  so (audit `vanished`).
- a `revoked` row whose object is still there -> revoked again.

Then this run re-drives stuck work (schedules.sweep.redrive_stuck); work whose message
was lost is found sooner by the deadline sweep (schedules.sweep.redrive_due). Every run
is stored as a Sweep row (schedules/report.py); one runs at a time per ledger
(schedules/lock.py), a second returns at once, skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from app import ledger
from app.core.db import session_scope
from app.core.logs import log
from app.core.models import utcnow
from app.core.redact import clip
from app.core.settings import Settings, get_settings
from app.issuers import backend_identity, get_issuer
from app.issuers.base import BackendIdentity, Issuer, IssuerError, MarkedObject
from app.ledger import HeldRow, installation_id
from app.observability import observe
from app.profiles import Profile, get_profiles
from app.queue import RECONCILE, enqueue_extend, enqueue_revoke
from schedules.judge import MARGIN, Act, expiry_lags, judge, vanished
from schedules.lock import LOCK_KEY, sweep_lock
from schedules.report import DETAIL_LIMIT, SweepReport, render_report
from schedules.sweep import REDRIVE_AFTER, redrive_stuck
from workers.job import job

# Re-exported: callers and tests import these from here.
__all__ = [
    "DETAIL_LIMIT",
    "LOCK_KEY",
    "MARGIN",
    "SweepReport",
    "reconcile",
    "reconcile_task",
    "render_report",
    "sweep_lock",
]

BATCH = 500
# A pending row untouched this long is no mint in flight (a mint with its retries
# takes well under a minute; the re-drive touches a row when it enqueues it again).
PENDING_GRACE = REDRIVE_AFTER


@dataclass
class Backend:
    """One backend and the profiles that mint in it."""

    identity: BackendIdentity
    profiles: list[Profile]

    @property
    def label(self) -> str:
        return str(self.identity)


def backends(profiles: dict[str, Profile], settings: Settings) -> list[Backend]:
    grouped: dict[BackendIdentity, Backend] = {}
    for profile in sorted(profiles.values(), key=lambda p: p.name):
        identity = backend_identity(profile, settings)
        grouped.setdefault(identity, Backend(identity, [])).profiles.append(profile)
    return list(grouped.values())


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


@job(RECONCILE)
def reconcile_task() -> dict[str, Any]:
    report = reconcile(trigger="schedule")
    return {"skipped": report.skipped, **report.counts()}


def _run(trigger: str, pending_grace: timedelta, redrive_after: timedelta) -> SweepReport:
    settings = get_settings()
    inst = installation_id()
    started = utcnow()
    report = SweepReport(started_at=started)
    with session_scope() as session:
        report.id = ledger.start_sweep(session, now=started, trigger=trigger)
    report.detail = {"trigger": trigger, "backends": []}
    seen: set[tuple[str, str]] = set()
    try:
        for backend in backends(get_profiles(), settings):
            _reconcile_backend(report, backend, inst, settings, seen, pending_grace)
        # The re-drive of what has not moved for `redrive_after`.
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
        if not issuer.holds_objects:  # the ledger is all there is (proxy): nothing to judge
            summary["listed"] = 0
            return
        objects = issuer.list_marked()
    except IssuerError as exc:
        summary["error"] = clip(exc)
        report.error(backend.label, "list", exc)
        return
    fresh = []
    for obj in objects:
        # One ref names one object of this installation (a role or user name carries the
        # credential id, an accessor is unique): the same cluster reached under two
        # addresses (a proxy, localhost and 127.0.0.1) is judged once.
        key = (backend.identity.family, obj.ref)
        if key not in seen:
            seen.add(key)
            fresh.append(obj)
    summary["listed"] = len(fresh)
    report.checked += len(fresh)
    for start in range(0, len(fresh), BATCH):
        chunk = fresh[start : start + BATCH]
        with session_scope() as session:
            rows = ledger.held_rows(session, [o.credential_id for o in chunk if o.credential_id])
        for obj in chunk:
            row = rows.get(obj.credential_id or "")
            _act(report, backend, issuer, obj, row, pending_grace)
    _find_vanished(report, backend, issuer, {obj.ref for obj in objects}, listed_at)


def _act(
    report: SweepReport,
    backend: Backend,
    issuer: Issuer,
    obj: MarkedObject,
    row: HeldRow | None,
    pending_grace: timedelta,
) -> None:
    """Judge one marked object, then do what the verdict says."""
    row_ref = issuer.ref_for(row) if row is not None else None
    verdict = judge(obj, row, row_ref, now=utcnow(), pending_grace=pending_grace)
    act = verdict.act
    if act in (Act.revoke_orphan, Act.orphan_and_queue):
        _revoke_orphan(report, backend, issuer, obj, row, verdict.why)
    if act in (Act.queue_revoke, Act.orphan_and_queue):
        assert row is not None
        _queue_revoke(report, row)
    elif act == Act.revoke_again:
        assert row is not None
        _revoke_again(report, backend, issuer, obj, row)
    elif act in (Act.in_flight, Act.revoking):
        report.bump(act.value)
    elif act == Act.held:
        assert row is not None
        report.bump("held")
        if expiry_lags(obj, row):  # a heartbeat's extend that never ran: re-drive it
            enqueue_extend([row.id])
            report.note("extended", {"credential": row.id})


def _revoke_orphan(
    report: SweepReport,
    backend: Backend,
    issuer: Issuer,
    obj: MarkedObject,
    row: HeldRow | None,
    why: str,
) -> None:
    if not _revoke(report, backend, issuer, obj, "revoke orphan"):
        return
    cred_id = obj.credential_id
    report.orphans_revoked += 1
    report.note(
        "orphans",
        {
            "backend": backend.label,
            "ref": obj.ref,
            "name": obj.name,
            "credential": cred_id,
            "why": why,
        },
    )
    _record(row, "orphan_revoked", cred_id, f"{backend.label} {obj.ref}: {why}")
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
    if not _revoke(report, backend, issuer, obj, "revoke again"):
        return
    report.rerevoked += 1
    report.note("rerevoked", {"backend": backend.label, "ref": obj.ref, "credential": row.id})
    why = "revoked in the ledger, still present in the backend"
    _record(row, "revoked_again", row.id, f"{backend.label} {obj.ref}: {why}")
    log.warning("revoked again", extra={"credential": row.id, "backend": backend.label})


def _revoke(
    report: SweepReport, backend: Backend, issuer: Issuer, obj: MarkedObject, action: str
) -> bool:
    """Revoke one object here; a failure is counted in the report (False)."""
    try:
        issuer.revoke(obj.ref)
    except IssuerError as exc:
        report.error(backend.label, action, exc, obj.ref)
        return False
    return True


def _record(row: HeldRow | None, action: str, credential_id: str | None, detail: str) -> None:
    """The audit entry of what the sweep did to an object, reason `orphan`."""
    with session_scope() as session:
        ledger.record_swept(
            session,
            action,
            reason="orphan",
            row=row,
            credential_id=credential_id,
            detail=detail,
            now=utcnow(),
        )


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


def _find_vanished(
    report: SweepReport,
    backend: Backend,
    issuer: Issuer,
    listed: set[str],
    listed_at: datetime,
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
            if not vanished(row, issuer.ref_for(row), listed, listed_at):
                continue
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
