"""The Celery app. Messages carry ids only; there is no result backend."""

from __future__ import annotations

from celery import Celery
from celery.signals import celeryd_init, worker_process_init
from kombu import Exchange, Queue

from app.settings import Settings, get_settings

MINT_QUEUE = "mint"
REVOKE_QUEUE = "revoke"  # revocations and sweeps: never behind mints


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
        worker_prefetch_multiplier=1,
        task_queues=[
            Queue(REVOKE_QUEUE, Exchange(REVOKE_QUEUE), routing_key=REVOKE_QUEUE),
            Queue(MINT_QUEUE, Exchange(MINT_QUEUE), routing_key=MINT_QUEUE),
        ],
        task_default_queue=MINT_QUEUE,
        task_routes={
            "workers.mint.*": {"queue": MINT_QUEUE},
            "workers.notify_approval.*": {"queue": MINT_QUEUE},
            "workers.revoke.*": {"queue": REVOKE_QUEUE},
            "schedules.*": {"queue": REVOKE_QUEUE},
        },
        task_default_exchange=MINT_QUEUE,
        task_default_routing_key=MINT_QUEUE,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        beat_schedule_filename=str((settings.home / "beat-schedule").resolve()),
        include=[
            "workers.mint",
            "workers.revoke",
            "workers.notify_approval",
            "schedules.sweep",
            "schedules.reconcile",
            "schedules.retention",
        ],
    )


celery_app = Celery("leasehold")
configure(celery_app, get_settings())


@worker_process_init.connect
def _fresh_pools(**_: object) -> None:
    """Pools never survive fork: each worker process opens its own."""
    from app.db import dispose_engines
    from app.issuers import close_all

    dispose_engines()
    close_all()


@celeryd_init.connect
def _error_reporting(**_: object) -> None:
    """Sentry in the worker's main process, before the pool forks (its children inherit it)."""
    from app.errors_reporting import init_sentry

    init_sentry(get_settings(), component="worker")


def enqueue_mint(ids: list[str]) -> None:
    for cred_id in ids:
        celery_app.send_task("workers.mint.mint_credential", args=[cred_id], queue=MINT_QUEUE)


def enqueue_extend(ids: list[str]) -> None:
    for cred_id in ids:
        celery_app.send_task("workers.mint.extend_credential", args=[cred_id], queue=MINT_QUEUE)


def enqueue_revoke(ids: list[str]) -> None:
    for cred_id in ids:
        celery_app.send_task("workers.revoke.revoke_credential", args=[cred_id], queue=REVOKE_QUEUE)


def enqueue_approval_request(ids: list[str]) -> None:
    for cred_id in ids:
        celery_app.send_task(
            "workers.notify_approval.request_approval", args=[cred_id], queue=MINT_QUEUE
        )
