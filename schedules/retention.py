"""The retention purge: ended tasks, old events and old audit entries go after
LEASEHOLD_RETENTION_DAYS; an audit entry only once it is in the audit export."""

from __future__ import annotations

from datetime import timedelta

from app import ledger, queue
from app.core.db import session_scope
from app.core.logs import log
from app.core.models import utcnow
from app.core.settings import get_settings
from workers.job import job

BATCH = 500


def purge() -> tuple[int, int, int]:
    """Delete in batches; returns (tasks, credentials, events) deleted."""
    before = utcnow() - timedelta(days=get_settings().retention_days)
    tasks = creds = events = audit = 0
    while True:
        with session_scope() as session:
            t, c = ledger.purge_ended(session, before=before, limit=BATCH)
            e = ledger.purge_events(session, before=before, limit=BATCH)
            a = ledger.purge_audit(session, before=before, limit=BATCH)
        tasks, creds, events, audit = tasks + t, creds + c, events + e, audit + a
        if t < BATCH and e < BATCH and a < BATCH:
            break
    if tasks or events or audit:
        log.info(
            "retention purge",
            extra={"tasks": tasks, "credentials": creds, "events": events, "audit": audit},
        )
    return tasks, creds, events


@job(queue.PURGE)
def purge_task() -> tuple[int, int, int]:
    return purge()
