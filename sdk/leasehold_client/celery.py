"""Celery integration: every attempt of a task declared with `leasehold=` is a
Leasehold task, and its secrets are read with `current_credentials()`.

    from leasehold_client.celery import current_credentials, install

    app = Celery("reports", broker=...)
    install(app)

    @app.task(leasehold={"grants": {"db": "reports-readonly"}, "max_duration": 300})
    def nightly() -> int:
        dsn = current_credentials()["db"]["dsn"]
        ...

The Leasehold task id is `<app.main>/<task name>/<celery task id>/try-<n>`
(n = request.retries + 1): a retry ends one attempt (`task.failed`) and the next
attempt is a new task with fresh credentials. Secrets are claimed on first use,
kept in a context variable of that execution only (never in arguments, results
or messages) and dropped when it ends. Works under the prefork, threads and solo
pools: signals run in the thread that runs the task, and each process makes its
own HTTP client.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from celery import Celery, Task, signals

from ._attempt import Attempt, Credentials
from .client import Client

__all__ = ["current_credentials", "install", "leasehold_task_id"]

log = logging.getLogger("leasehold_client.celery")


def leasehold_task_id(app_main: str, task_name: str, celery_id: str, retries: int) -> str:
    """The Leasehold task id of one attempt."""
    return f"{app_main}/{task_name}/{celery_id}/try-{int(retries or 0) + 1}"


_current: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar(
    "leasehold_attempt", default=None
)


def current_credentials() -> Mapping[str, dict[str, Any]]:
    """The running task's secrets: `current_credentials()["db"]` is the `db` grant's
    `secret` (claimed once, waiting for the mint). Only inside a task declared with
    `leasehold=`; raises LookupError elsewhere."""
    attempt = _current.get()
    if attempt is None:
        raise LookupError("not inside a Celery task declared with leasehold=...")
    return Credentials(attempt)


def _options(task: Any) -> dict[str, Any] | None:
    opts = getattr(task, "leasehold", None)
    return opts if isinstance(opts, dict) else None


class _Integration:
    def __init__(self, app: Celery, url: str | None, key: str | None, source: str | None) -> None:
        self.app = app
        self.url, self.key = url, key
        self.source = source or f"celery://{app.main}"
        self._clients: dict[int, Client] = {}
        self._lock = threading.Lock()

    def client(self) -> Client:
        """One client per process: a prefork child must not share its parent's sockets."""
        pid = os.getpid()
        with self._lock:
            if pid not in self._clients:
                self._clients = {pid: Client(self.url, self.key, source=self.source)}
            return self._clients[pid]

    def ours(self, task: Any) -> dict[str, Any] | None:
        if task is None or getattr(task, "app", None) is not self.app:
            return None
        return _options(task)

    def prerun(self, sender: Task[Any, Any] | None = None, task_id: str = "", **_: Any) -> None:
        opts = self.ours(sender)
        if sender is None or opts is None:
            return
        grants = dict(opts.get("grants") or {})
        name = leasehold_task_id(
            self.app.main or "celery", sender.name, task_id, sender.request.retries
        )
        attempt = Attempt(self.client(), name, grants)
        _current.set(attempt)
        try:
            answer = attempt.client.started(
                name,
                grants=grants,
                max_duration=int(opts.get("max_duration", 600)),
                workload=opts.get("workload"),
            )
            attempt.claim_token = answer.claim_token
        except Exception as exc:
            # Celery logs and swallows a signal handler's exception: keep it, so the
            # task's first current_credentials() read fails closed with it.
            attempt.error = exc
            log.error("leasehold: task.started for %r failed: %s", name, exc)

    def postrun(
        self, sender: Task[Any, Any] | None = None, state: str | None = None, **_: Any
    ) -> None:
        attempt = _current.get()
        if attempt is None or self.ours(sender) is None:
            return
        _current.set(None)
        attempt.secrets.clear()
        if state == "SUCCESS":
            kind = "task.succeeded"
        elif state in ("FAILURE", "RETRY"):
            kind = "task.failed"  # a retry ends this attempt; the next one is a new task
        else:
            kind = "task.cancelled"  # rejected, ignored, or interrupted
        self._end(kind, attempt.task_id)

    def revoked(self, sender: Task[Any, Any] | None = None, request: Any = None, **_: Any) -> None:
        # In the worker's main process, e.g. `revoke(terminate=True)`: the attempt's
        # own process or thread never reaches postrun.
        if request is None or self.ours(sender) is None:
            return
        assert sender is not None
        name = leasehold_task_id(
            self.app.main or "celery", sender.name, request.id, getattr(request, "retries", 0)
        )
        self._end("task.cancelled", name)

    def _end(self, kind: str, name: str) -> None:
        try:
            self.client().emit(kind, name, {})
        except Exception as exc:  # the deadline still ends the task
            log.error("leasehold: %s for %r failed: %s", kind, name, exc)


def install(
    app: Celery, *, url: str | None = None, key: str | None = None, source: str | None = None
) -> None:
    """Connect the integration to `app`'s tasks declared with `leasehold={"grants":
    {name: profile}, "max_duration": seconds, "workload": optional}`. `url` and `key`
    default to LEASEHOLD_URL and LEASEHOLD_KEY; `source` to `celery://<app.main>`."""
    integration = _Integration(app, url, key, source)
    app._leasehold = integration  # type: ignore[attr-defined]  # keeps the receivers alive
    signals.task_prerun.connect(integration.prerun, weak=False)
    signals.task_postrun.connect(integration.postrun, weak=False)
    signals.task_revoked.connect(integration.revoked, weak=False)
