"""The deadline sweep and the re-drive of work due again, run by beat every few seconds.

A revoke or mint whose message is lost (a Redis restart, a killed worker) is found
again from the ledger: every row waiting for a job carries `next_attempt_at`, and
each sweep enqueues what is due (see app.ledger.REVOKE_REDRIVE). The reconciliation
re-drives, in addition, whatever has not moved for REDRIVE_AFTER.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from sqlmodel import Session

from app import ledger, queue, switches
from app.core.db import session_scope
from app.core.logs import log
from app.core.models import utcnow
from app.core.settings import get_settings
from app.queue import enqueue_mint, enqueue_revoke
from workers.job import job

BATCH = 500
REDRIVE_AFTER = timedelta(minutes=2)  # longer than a mint or revoke with its retries


def sweep_deadlines() -> int:
    """Time out running tasks past their deadline, in batches; returns how many revokes."""
    total = 0
    while True:
        with session_scope() as session:
            ids = ledger.time_out_due(session, now=utcnow(), limit=BATCH)
        enqueue_revoke(ids)
        total += len(ids)
        if len(ids) < BATCH:
            break
    if total:
        log.info("deadline sweep", extra={"revokes": total})
    return total


def redrive_due() -> tuple[int, int]:
    """Enqueue again the mints and revokes due (their message may be lost), in batches;
    returns (mints, revokes) re-driven. A duplicate is harmless: a revoke is idempotent,
    and a mint's lease lets one delivery at a time through."""

    def due(session: Session) -> tuple[list[str], list[str]]:
        return ledger.redrive_due(session, now=utcnow(), limit=BATCH)

    return _redrive(due, "re-drive of due work")


def redrive_stuck(after: timedelta = REDRIVE_AFTER) -> tuple[int, int]:
    """Enqueue again what a lost message or a killed worker left pending or revoking
    (untouched for `after`), in batches; returns (mints, revokes) re-driven."""
    cutoff = utcnow() - after  # fixed: what this run touches is never picked again

    def stuck(session: Session) -> tuple[list[str], list[str]]:
        now = utcnow()
        pending, revoking = ledger.stuck_credentials(session, older_than=cutoff, limit=BATCH)
        # Touched first: the next batch, and the next re-drive, skip these.
        ledger.touch(session, pending + revoking, now=now)
        return pending, revoking

    return _redrive(stuck, "re-drive")


def _redrive(fetch: Callable[[Session], tuple[list[str], list[str]]], what: str) -> tuple[int, int]:
    """Enqueue what `fetch` returns, (pending, revoking) a batch at a time, until a
    batch is short; returns (mints, revokes)."""
    mints = revokes = 0
    while True:
        with session_scope() as session:
            pending, revoking = fetch(session)
        enqueue_revoke(revoking)
        enqueue_mint(pending)
        mints, revokes = mints + len(pending), revokes + len(revoking)
        if len(pending) + len(revoking) < BATCH:
            break
    if mints or revokes:
        log.info(what, extra={"pending": mints, "revoking": revokes})
    return mints, revokes


def enforce_switches() -> int:
    """What the kill switches in force still match (a request cut short, a credential
    written while the switch was thrown): revoked or denied now; returns how many."""
    revoking, denied = switches.enforce_all()
    if revoking or denied:
        log.warning("kill switches enforced", extra={"revokes": revoking, "denied": denied})
    return revoking + denied


@job(queue.SWEEP_DEADLINES)
def sweep_deadlines_task() -> int:
    revokes = sweep_deadlines()
    enforce_switches()
    redrive_due()
    return revokes


@job(queue.RENEW_VAULT)
def renew_vault_token_task() -> None:
    settings = get_settings()
    if settings.vault_addr:
        from app.issuers.vault_gateway import renew_own_token

        renew_own_token(settings)
