"""Airflow 3 integration: a listener plugin that makes every try of a task declared
with `params={"leasehold": ...}` a Leasehold task, and `current_credentials()` to
read its secrets inside.

    from airflow.sdk import dag, task
    from leasehold_client.airflow import current_credentials

    @task(params={"leasehold": {"grants": {"db": "reports-readonly"}, "max_duration": 600}})
    def report() -> int:
        dsn = current_credentials()["db"]["dsn"]
        ...

Installing leasehold-client next to Airflow registers the plugin (the
`airflow.plugins` entry point `leasehold`); a plugins-folder file holding
`from leasehold_client.airflow import LeaseholdPlugin` does the same. The
listener runs in the task's own process: `on_task_instance_running` sends
`task.started` for `<dag_id>/<run_id>/<task_id>/<map_index>/try-<n>`, success
sends `task.succeeded`, failure (and a failure that will be retried)
`task.failed`, a task that skips itself `task.cancelled`. The declaration is read
from the task as the DAG file defines it (`task.params`), never from a run's conf,
so whoever triggers a run cannot change the grants. The claim token and the
secrets stay in this process's memory: never in XCom, logs or return values.
LEASEHOLD_URL, LEASEHOLD_KEY and LEASEHOLD_SOURCE (default `airflow`) configure it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

from airflow.plugins_manager import AirflowPlugin
from pluggy import HookimplMarker

from ._attempt import Attempt, Credentials, declaration
from .client import Client

__all__ = ["LeaseholdPlugin", "credentials", "current_credentials", "leasehold_task_id"]

log = logging.getLogger("leasehold_client.airflow")
hookimpl = HookimplMarker("airflow")
PARAM = "leasehold"

_lock = threading.Lock()
_client: tuple[int, Client] | None = None
# The attempts running in this process by Leasehold task id, and the latest one
# started in each thread (the task runner runs one task instance per process;
# dag.test() runs them one after another in one thread).
_attempts: dict[str, Attempt] = {}
_current: dict[int, str] = {}


def leasehold_task_id(dag_id: str, run_id: str, task_id: str, map_index: int, try_n: int) -> str:
    """The Leasehold task id of one try of one task instance."""
    return f"{dag_id}/{run_id}/{task_id}/{map_index}/try-{try_n}"


def _ti_task_id(ti: Any) -> str:
    map_index = getattr(ti, "map_index", -1)
    return leasehold_task_id(
        ti.dag_id, ti.run_id, ti.task_id, -1 if map_index is None else map_index, ti.try_number
    )


def _client_here() -> Client:
    """One client per process: a forked task runner must not share its parent's sockets."""
    global _client
    with _lock:
        if _client is None or _client[0] != os.getpid():
            _client = (os.getpid(), Client(source=os.environ.get("LEASEHOLD_SOURCE") or "airflow"))
        return _client[1]


def _declared(ti: Any) -> Any:
    """The task's `leasehold` param as the DAG file declares it, or None."""
    task = getattr(ti, "task", None)
    params = getattr(task, "params", None)
    if not isinstance(params, Mapping) or PARAM not in params:
        return None
    value = params[PARAM]  # ParamsDict resolves a Param to its default value
    return getattr(value, "value", value)


def current_credentials() -> Mapping[str, dict[str, Any]]:
    """The running task instance's secrets: `current_credentials()["db"]` is the
    `db` grant's `secret` (claimed on first use, waiting for the mint). Raises
    LookupError outside a task declared with `params={"leasehold": ...}`."""
    with _lock:
        task_id = _current.get(threading.get_ident())
        attempt = _attempts.get(task_id) if task_id else None
    if attempt is None:
        raise LookupError("not inside an Airflow task declared with params={'leasehold': ...}")
    return Credentials(attempt)


def credentials(context: Mapping[str, Any]) -> Mapping[str, dict[str, Any]]:
    """The secrets of the task instance whose context this is (`**context` or
    `get_current_context()`)."""
    with _lock:
        attempt = _attempts.get(_ti_task_id(context["ti"]))
    if attempt is None:
        raise LookupError("this task instance is not a running Leasehold task")
    return Credentials(attempt)


@hookimpl
def on_task_instance_running(previous_state: Any, task_instance: Any) -> None:
    opts = _declared(task_instance)
    if opts is None:
        return
    task_id = _ti_task_id(task_instance)
    try:
        grants, max_duration, workload = declaration(opts)
    except ValueError as exc:
        # Fail closed: the task runs, but its first read of a secret raises this.
        attempt = Attempt(_client_here(), task_id, {})
        attempt.error = exc
        log.error("leasehold: %s: %s", task_id, exc)
    else:
        attempt = Attempt(_client_here(), task_id, grants)
        attempt.start(max_duration, workload)
    with _lock:
        _attempts[task_id] = attempt
        _current[threading.get_ident()] = task_id


def _end(task_instance: Any, kind: str) -> None:
    task_id = _ti_task_id(task_instance)
    with _lock:
        attempt = _attempts.pop(task_id, None)
        for thread, running in list(_current.items()):
            if running == task_id:
                del _current[thread]
    # Sent even when task.started failed: it may have arrived with its answer lost.
    if attempt is not None and attempt.grants:
        attempt.end(kind)


@hookimpl
def on_task_instance_success(previous_state: Any, task_instance: Any) -> None:
    _end(task_instance, "task.succeeded")


@hookimpl
def on_task_instance_failed(previous_state: Any, task_instance: Any, error: Any = None) -> None:
    # Also a try that will be retried: the next try is a new Leasehold task.
    _end(task_instance, "task.failed")


@hookimpl
def on_task_instance_skipped(previous_state: Any, task_instance: Any) -> None:
    _end(task_instance, "task.cancelled")


class LeaseholdPlugin(AirflowPlugin):
    """Registers this module as a listener."""

    name = "leasehold"
    listeners = [sys.modules[__name__]]
