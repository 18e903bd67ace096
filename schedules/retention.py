"""The retention purge: ended tasks and old events go after LEASEHOLD_RETENTION_DAYS."""

from __future__ import annotations

from datetime import timedelta

from app import ledger, queue
from app.db import session_scope
from app.logs import log
from app.models import utcnow
from app.settings import get_settings
from workers.job import job

BATCH = 500


def purge() -> tuple[int, int, int]:
    """Delete in batches; returns (tasks, credentials, events) deleted."""
    before = utcnow() - timedelta(days=get_settings().retention_days)
    tasks = creds = events = 0
    while True:
        with session_scope() as session:
            t, c = ledger.purge_ended(session, before=before, limit=BATCH)
            e = ledger.purge_events(session, before=before, limit=BATCH)
        tasks, creds, events = tasks + t, creds + c, events + e
        if t < BATCH and e < BATCH:
            break
    if tasks or events:
        log.info("retention purge", extra={"tasks": tasks, "credentials": creds, "events": events})
    return tasks, creds, events


@job(queue.PURGE)
def purge_task() -> tuple[int, int, int]:
    return purge()
