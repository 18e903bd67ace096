"""The job queue: the Celery app, its queues and the names of its jobs.

The API, the schedules and the workers enqueue through here, by name; nothing here
imports a job's code, so `app` never imports `workers`. Messages carry ids only; there
is no result backend. A job is declared with `workers.job.job(<name>, ...)`.
"""

from __future__ import annotations

from celery import Celery
from celery.signals import celeryd_init, worker_process_init
from kombu import Exchange, Queue

from app.core.settings import Settings, get_settings

MINT_QUEUE = "mint"
REVOKE_QUEUE = "revoke"  # revocations and sweeps: never behind mints

# Job names: the decorator registers them, send_task and beat address them. They are
# the wire names of messages in flight, so they never change with the code's layout.
MINT = "workers.mint.mint_credential"
EXTEND = "workers.mint.extend_credential"
REVOKE = "workers.revoke.revoke_credential"
REQUEST_APPROVAL = "workers.notify_approval.request_approval"
SWEEP_DEADLINES = "schedules.sweep.sweep_deadlines_task"
RENEW_VAULT = "schedules.sweep.renew_vault_token_task"
RECONCILE = "schedules.reconcile.reconcile_task"
PURGE = "schedules.retention.purge_task"
AUDIT_EXPORT = "schedules.audit_export.export_task"

# Each job's queue. Revocations and the schedules never wait behind mints.
QUEUES: dict[str, str] = {
    MINT: MINT_QUEUE,
    EXTEND: MINT_QUEUE,
    REQUEST_APPROVAL: MINT_QUEUE,
    REVOKE: REVOKE_QUEUE,
    SWEEP_DEADLINES: REVOKE_QUEUE,
    RENEW_VAULT: REVOKE_QUEUE,
    RECONCILE: REVOKE_QUEUE,
    PURGE: REVOKE_QUEUE,
    AUDIT_EXPORT: REVOKE_QUEUE,
}
# The modules that declare the jobs, imported by the worker (strings: never by the API).
JOB_MODULES = (
    "workers.mint",
    "workers.revoke",
    "workers.notify_approval",
    "schedules.sweep",
    "schedules.reconcile",
    "schedules.retention",
    "schedules.audit_export",
)


def configure(app: Celery, settings: Settings) -> None:
    transport_options: dict[str, object] = {"visibility_timeout": 300}
    if not settings.broker_url:
        folder = settings.broker_dir
        (folder / "processed").mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),  # kombu's default is ./control
            "store_processed": False,
            "polling_interval": 0.1,
        }
    elif settings.broker_key_prefix:
        transport_options["global_keyprefix"] = settings.broker_key_prefix
    app.conf.update(
        broker_url=settings.celery_broker_url,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.backend_timeout,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Jobs are short and idempotent and acks are late: a few messages reserved per
        # process save a broker round trip between jobs; one lost with its worker comes
        # back (visibility timeout, or the ledger's re-drive sooner).
        worker_prefetch_multiplier=4,
        task_queues=[
            Queue(REVOKE_QUEUE, Exchange(REVOKE_QUEUE), routing_key=REVOKE_QUEUE),
            Queue(MINT_QUEUE, Exchange(MINT_QUEUE), routing_key=MINT_QUEUE),
        ],
        task_default_queue=MINT_QUEUE,
        task_routes={name: {"queue": queue} for name, queue in QUEUES.items()},
        task_default_exchange=MINT_QUEUE,
        task_default_routing_key=MINT_QUEUE,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        beat_schedule_filename=str((settings.home / "beat-schedule").resolve()),
        include=list(JOB_MODULES),
    )


celery_app = Celery("leasehold")
configure(celery_app, get_settings())


@worker_process_init.connect
def _fresh_pools(**_: object) -> None:
    """Pools never survive fork: each worker process opens its own."""
    from app.core.db import dispose_engines
    from app.issuers import close_all

    dispose_engines()
    close_all()


@celeryd_init.connect
def _error_reporting(**_: object) -> None:
    """Sentry in the worker's main process, before the pool forks (its children inherit it)."""
    from app.observability.sentry import init_sentry

    init_sentry(get_settings(), component="worker")


def _enqueue(name: str, ids: list[str]) -> None:
    for cred_id in ids:
        # The reprs given: Celery's own (saferepr) cost an eighth of a publish.
        args = [cred_id]
        celery_app.send_task(
            name, args=args, queue=QUEUES[name], argsrepr=repr(args), kwargsrepr="{}"
        )


def enqueue_mint(ids: list[str]) -> None:
    _enqueue(MINT, ids)


def enqueue_extend(ids: list[str]) -> None:
    _enqueue(EXTEND, ids)


def enqueue_revoke(ids: list[str]) -> None:
    _enqueue(REVOKE, ids)


def enqueue_approval_request(ids: list[str]) -> None:
    _enqueue(REQUEST_APPROVAL, ids)
