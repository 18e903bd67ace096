"""Reading tasks: GET /v1/tasks/{task_id} and GET /v1/tasks."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlmodel import Session, select

from app import ledger
from app.api.auth import OperatorKey, ReaderKey, tenant_scope
from app.api.errors import ApiError
from app.api.paging import page
from app.api.paths import TASK_ID, raw_segment
from app.api.schemas import (
    ApiJSON,
    TaskBrief,
    TaskDetail,
    TaskPage,
    credential_view,
    errors,
    task_view,
)
from app.core.db import SessionDep, get_engine
from app.core.logs import log
from app.core.models import ApiKey, Task, TaskState, utcnow
from app.queue import enqueue_revoke

router = APIRouter(tags=["tasks"], responses=errors(401, 403, 422))


def visible_task(session: Session, key: ApiKey, name: str, tenant: str | None) -> Task:
    """The task as this key may see it; another tenant's task is as if it did not exist."""
    scope = tenant_scope(key, tenant)
    if scope is None:
        matches = list(session.exec(select(Task).where(Task.name == name).limit(2)))
        if len(matches) != 1:
            raise ApiError(404, f"no task {name!r}" + (" (name a ?tenant=)" if matches else ""))
        return matches[0]
    task = ledger.find_task(session, scope, name)
    if task is None:
        raise ApiError(404, f"no task {name!r}")
    return task


def full_task_view(session: Session, task: Task) -> dict[str, Any]:
    parent = session.get(Task, task.parent_id) if task.parent_id else None
    view = task_view(task, parent.name if parent else None)
    view["tenant"] = task.tenant
    view["credentials"] = [credential_view(c) for c in ledger.task_credentials(session, task.id)]
    return view


@router.get(
    "/v1/tasks/{task_id:path}",
    response_class=ApiJSON,
    response_model=TaskDetail,
    responses=errors(404),
)
def get_task(
    request: Request,
    key: ReaderKey,
    session: SessionDep,
    task_id: Annotated[str, TASK_ID],  # documented; read undecoded below
    tenant: str | None = None,
) -> ApiJSON:
    task = visible_task(session, key, raw_segment(request, 2), tenant)
    return ApiJSON(full_task_view(session, task))


def _cancel(key: ApiKey, name: str, tenant: str | None) -> tuple[Task, list[str]]:
    with Session(get_engine(), expire_on_commit=False) as session:
        task = visible_task(session, key, name, tenant)
        locked = ledger.find_task(session, task.tenant, task.name, lock=True)
        assert locked is not None
        try:
            revoke = ledger.cancel_task(session, locked, actor=key.name, now=utcnow())
        except ledger.LedgerError as exc:
            raise ApiError(exc.status, exc.message, **exc.extra) from None
        session.commit()
        return locked, revoke


@router.post(
    "/v1/tasks/{task_id:path}/cancel",
    response_class=ApiJSON,
    status_code=202,
    response_model=TaskBrief,
    responses=errors(404, 409),
)
def cancel_task(
    request: Request,
    key: OperatorKey,
    task_id: Annotated[str, TASK_ID],  # documented; read undecoded below
    tenant: str | None = None,
) -> ApiJSON:
    """End a running task as `cancelled` and revoke its credentials: for a task whose
    emitter key was revoked or whose orchestrator is gone. Who did it is in the audit."""
    if raw_segment(request, 3) != "cancel":  # e.g. .../credentials/x/cancel: no such route
        raise ApiError(404, "no such route")
    task, revoke = _cancel(key, raw_segment(request, 2), tenant)
    enqueue_revoke(revoke)  # after the commit
    log.info("task cancelled", extra={"task": task.id, "by": key.name, "revokes": len(revoke)})
    view = task_view(task)
    return ApiJSON(
        {"id": view["id"], "state": view["state"], "deadline": view["deadline"]},
        status_code=202,
    )


@router.get("/v1/tasks", response_class=ApiJSON, response_model=TaskPage)
def list_tasks(
    key: ReaderKey,
    session: SessionDep,
    state: TaskState | None = None,
    source: str | None = None,
    workload: str | None = None,
    tenant: str | None = None,
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = None,
) -> ApiJSON:
    query = select(Task)
    scope = tenant_scope(key, tenant)
    if scope is not None:
        query = query.where(Task.tenant == scope)
    for column, value in ((Task.state, state), (Task.source, source), (Task.workload, workload)):
        if value is not None:
            query = query.where(column == value)
    rows, nxt = page(session, query, Task.id, limit, cursor)
    return ApiJSON({"items": [task_view(t) | {"tenant": t.tenant} for t in rows], "next": nxt})
