"""The beat schedule: deadlines every LEASEHOLD_SWEEP_INTERVAL, the rest less often."""

from __future__ import annotations

from app.settings import get_settings
from workers.celery_app import REVOKE_QUEUE, celery_app


def install_schedule() -> None:
    settings = get_settings()
    # Expire each tick before the next one: a stalled beat never piles them up.
    celery_app.conf.beat_schedule = {
        "deadline-sweep": {
            "task": "schedules.sweep.sweep_deadlines_task",
            "schedule": settings.sweep_interval,
            "options": {"queue": REVOKE_QUEUE, "expires": settings.sweep_interval},
        },
        # Ledger vs backends, then the re-drive of stuck mints and revokes; stored as a sweep.
        "reconcile": {
            "task": "schedules.reconcile.reconcile_task",
            "schedule": settings.reconcile_interval,
            "options": {"queue": REVOKE_QUEUE, "expires": settings.reconcile_interval},
        },
        "retention": {
            "task": "schedules.retention.purge_task",
            "schedule": 3600.0,
            "options": {"queue": REVOKE_QUEUE, "expires": 3600.0},
        },
        "renew-vault-token": {
            "task": "schedules.sweep.renew_vault_token_task",
            "schedule": 60.0,
            "options": {"queue": REVOKE_QUEUE, "expires": 60.0},
        },
    }


install_schedule()
