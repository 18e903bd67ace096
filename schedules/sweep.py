"""The deadline sweep and the re-drive of stuck work, run by beat every few seconds."""

from __future__ import annotations

from datetime import timedelta

from app import ledger
from app.db import session_scope
from app.logs import log
from app.models import utcnow
from app.settings import get_settings
from workers.celery_app import celery_app, enqueue_mint, enqueue_revoke

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


def redrive() -> int:
    """Enqueue again what a lost message or a killed worker left pending or revoking."""
    now = utcnow()
    with session_scope() as session:
        pending, revoking = ledger.stuck_credentials(session, older_than=now - REDRIVE_AFTER)
        ledger.touch(session, pending + revoking, now=now)
    enqueue_mint(pending)
    enqueue_revoke(revoking)
    if pending or revoking:
        log.info("re-drive", extra={"pending": len(pending), "revoking": len(revoking)})
    return len(pending) + len(revoking)


@celery_app.task(name="schedules.sweep.sweep_deadlines_task", ignore_result=True)
def sweep_deadlines_task() -> int:
    return sweep_deadlines()


@celery_app.task(name="schedules.sweep.redrive_task", ignore_result=True)
def redrive_task() -> int:
    return redrive()


@celery_app.task(name="schedules.sweep.renew_vault_token_task", ignore_result=True)
def renew_vault_token_task() -> None:
    settings = get_settings()
    if settings.vault_addr:
        from app.vault import renew_own_token

        renew_own_token(settings)
