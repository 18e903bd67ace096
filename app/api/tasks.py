"""Reading tasks: GET /v1/tasks/{task_id} and GET /v1/tasks."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlmodel import Session, select

from app import ledger
from app.api.auth import ReaderKey, tenant_scope
from app.api.errors import ApiError
from app.api.paging import page
from app.api.paths import TASK_ID, raw_segment
from app.api.schemas import (
    ApiJSON,
    TaskDetail,
    TaskPage,
    credential_view,
    errors,
    task_view,
)
from app.core.db import SessionDep
from app.core.models import ApiKey, Task, TaskState

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
