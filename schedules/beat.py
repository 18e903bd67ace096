"""The beat schedule: deadlines every LEASEHOLD_SWEEP_INTERVAL, the rest less often."""

from __future__ import annotations

from app.core.settings import get_settings
from app.queue import (
    AUDIT_EXPORT,
    PURGE,
    QUEUES,
    RECONCILE,
    RENEW_VAULT,
    SWEEP_DEADLINES,
    celery_app,
)

AUDIT_EXPORT_INTERVAL = 2.0


def install_schedule() -> None:
    settings = get_settings()
    # Expire each tick before the next one: a stalled beat never piles them up.
    celery_app.conf.beat_schedule = {
        "deadline-sweep": {
            "task": SWEEP_DEADLINES,
            "schedule": settings.sweep_interval,
            "options": {"queue": QUEUES[SWEEP_DEADLINES], "expires": settings.sweep_interval},
        },
        # Ledger vs backends, then the re-drive of stuck mints and revokes; stored as a sweep.
        "reconcile": {
            "task": RECONCILE,
            "schedule": settings.reconcile_interval,
            "options": {"queue": QUEUES[RECONCILE], "expires": settings.reconcile_interval},
        },
        "retention": {
            "task": PURGE,
            "schedule": 3600.0,
            "options": {"queue": QUEUES[PURGE], "expires": 3600.0},
        },
        # An audit entry reaches the export within 5 s of its commit (PRODUCT.md).
        "audit-export": {
            "task": AUDIT_EXPORT,
            "schedule": AUDIT_EXPORT_INTERVAL,
            "options": {"queue": QUEUES[AUDIT_EXPORT], "expires": AUDIT_EXPORT_INTERVAL},
        },
        "renew-vault-token": {
            "task": RENEW_VAULT,
            "schedule": 60.0,
            "options": {"queue": QUEUES[RENEW_VAULT], "expires": 60.0},
        },
    }


install_schedule()
