"""Prefect 3 integration: state hooks that make every run of a task or flow a
Leasehold task, and `current_credentials()` to read its secrets inside.

    from prefect import flow, task
    from leasehold_client.prefect import current_credentials, leasehold

    @leasehold(grants={"db": "reports-readonly"}, max_duration=600)
    @task
    def report() -> int:
        dsn = current_credentials()["db"]["dsn"]
        ...

`leasehold(...)` adds the hooks to a task or flow (keeping the ones it has);
`task_hooks(...)` and `flow_hooks(...)` give them as keyword arguments instead:
`@task(**task_hooks(grants=..., max_duration=...))`. Each run is the Leasehold
task `<flow name>/<flow run id>/<task name>/<task run id>/try-<n>` (a flow:
`<flow name>/<flow run id>/try-<n>`; n is Prefect's run count): `on_running` sends
`task.started`, `on_completion` `task.succeeded`, `on_failure` and `on_crashed`
`task.failed`, `on_cancellation` `task.cancelled`. A retry ends the try before
it (`task.failed`) and the next is a new Leasehold task. The claim token and the
secrets stay in this process's memory, never in parameters, results or logs.
LEASEHOLD_URL, LEASEHOLD_KEY and LEASEHOLD_SOURCE (default `prefect`) configure it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from ._attempt import Attempt, Credentials, declaration
from .client import Client

__all__ = ["current_credentials", "flow_hooks", "leasehold", "task_hooks"]

log = logging.getLogger("leasehold_client.prefect")
T = TypeVar("T")
Hook = Callable[[Any, Any, Any], None]

_lock = threading.Lock()
_client: tuple[int, Client] | None = None
# Running attempts by Prefect run id (task run or flow run): hooks and the run's
# code find them through Prefect's own run context, in any thread or event loop.
_attempts: dict[str, Attempt] = {}


def _client_here() -> Client:
    """One client per process: a forked worker must not share its parent's sockets."""
    global _client
    with _lock:
        if _client is None or _client[0] != os.getpid():
            _client = (os.getpid(), Client(source=os.environ.get("LEASEHOLD_SOURCE") or "prefect"))
        return _client[1]


def _flow_name(flow_run_id: Any) -> str:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow is not None and str(ctx.flow_run.id) == str(flow_run_id):
        return str(ctx.flow.name)
    return "-"


def task_run_task_id(task: Any, task_run: Any) -> str:
    """The Leasehold task id of one try of a task run."""
    flow_run_id = task_run.flow_run_id
    return (
        f"{_flow_name(flow_run_id)}/{flow_run_id or '-'}/{task.name}/{task_run.id}"
        f"/try-{max(1, task_run.run_count)}"
    )


def flow_run_task_id(flow: Any, flow_run: Any) -> str:
    """The Leasehold task id of one try of a flow run."""
    return f"{flow.name}/{flow_run.id}/try-{max(1, flow_run.run_count)}"


def _hooks(
    grants: dict[str, str], max_duration: int, workload: str | None, name: Callable[[Any, Any], str]
) -> tuple[Hook, Callable[[str], Hook]]:
    declaration({"grants": grants, "max_duration": max_duration, "workload": workload})

    def on_running(obj: Any, run: Any, state: Any) -> None:
        task_id = name(obj, run)
        with _lock:
            before = _attempts.pop(str(run.id), None)
        if before is not None and before.task_id != task_id:
            before.end("task.failed")  # the try before this retry ended without a hook
        attempt = Attempt(_client_here(), task_id, dict(grants))
        attempt.start(max_duration, workload)
        with _lock:
            _attempts[str(run.id)] = attempt

    def ending(kind: str) -> Hook:
        def end(obj: Any, run: Any, state: Any) -> None:
            with _lock:
                attempt = _attempts.pop(str(run.id), None)
            if attempt is not None:
                attempt.end(kind)

        end.__name__ = f"leasehold_{kind.removeprefix('task.')}"
        return end

    on_running.__name__ = "leasehold_started"
    return on_running, ending


def task_hooks(
    *, grants: dict[str, str], max_duration: int = 600, workload: str | None = None
) -> dict[str, list[Hook]]:
    """`@task(**task_hooks(grants={"db": "reports-readonly"}, max_duration=600))`."""
    started, ending = _hooks(grants, max_duration, workload, task_run_task_id)
    return {
        "on_running": [started],
        "on_completion": [ending("task.succeeded")],
        "on_failure": [ending("task.failed")],
    }


def flow_hooks(
    *, grants: dict[str, str], max_duration: int = 600, workload: str | None = None
) -> dict[str, list[Hook]]:
    """`@flow(**flow_hooks(grants={"db": "reports-readonly"}, max_duration=600))`."""
    started, ending = _hooks(grants, max_duration, workload, flow_run_task_id)
    return {
        "on_running": [started],
        "on_completion": [ending("task.succeeded")],
        "on_failure": [ending("task.failed")],
        "on_crashed": [ending("task.failed")],
        "on_cancellation": [ending("task.cancelled")],
    }


def leasehold(
    *, grants: dict[str, str], max_duration: int = 600, workload: str | None = None
) -> Callable[[T], T]:
    """A decorator over `@task` or `@flow` that adds the hooks to the ones it has."""
    from prefect import Flow, Task

    def apply(obj: T) -> T:
        if isinstance(obj, Flow):
            hooks = flow_hooks(grants=grants, max_duration=max_duration, workload=workload)
        elif isinstance(obj, Task):
            hooks = task_hooks(grants=grants, max_duration=max_duration, workload=workload)
        else:
            raise TypeError("leasehold(...) goes above @task or @flow")
        for kind, added in hooks.items():  # a new list: the one given may be shared
            setattr(obj, f"{kind}_hooks", [*getattr(obj, f"{kind}_hooks"), *added])
        return obj

    return apply


def current_credentials() -> Mapping[str, dict[str, Any]]:
    """The running task's (or else flow's) secrets: `current_credentials()["db"]`
    is the `db` grant's `secret`, claimed on first use. Raises LookupError outside a
    task or flow with Leasehold hooks."""
    from prefect.context import FlowRunContext, TaskRunContext

    ids = []
    task_ctx = TaskRunContext.get()
    if task_ctx is not None:
        ids.append(str(task_ctx.task_run.id))
    flow_ctx = FlowRunContext.get()
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        ids.append(str(flow_ctx.flow_run.id))
    with _lock:
        attempt = next((_attempts[i] for i in ids if i in _attempts), None)
    if attempt is None:
        raise LookupError("not inside a Prefect task or flow with Leasehold hooks")
    return Credentials(attempt)
