"""GET /v1/audit: who did what to which task and credential, and why (operator; admin for all)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlmodel import col, select

from app.api.auth import OperatorKey, tenant_scope
from app.api.paging import page
from app.api.schemas import ApiJSON, errors
from app.audit_chain import view
from app.core.db import SessionDep
from app.core.models import AuditEntry, Task

router = APIRouter(tags=["audit"])


class AuditOut(BaseModel):
    id: str
    at: datetime
    tenant: str | None
    actor: str = Field(description="the key's name, a proven identity, or system")
    action: str
    task: str | None
    credential: str | None
    reason: str | None
    detail: str | None


class AuditPage(BaseModel):
    items: list[AuditOut]
    next: str | None


@router.get(
    "/v1/audit",
    response_class=ApiJSON,
    response_model=AuditPage,
    responses=errors(401, 403, 422),
)
def list_audit(
    key: OperatorKey,
    session: SessionDep,
    task: str | None = Query(None, min_length=1, max_length=256),
    credential: str | None = Query(None, min_length=1, max_length=32),
    action: str | None = Query(None, min_length=1, max_length=32),
    tenant: str | None = Query(None, min_length=1, max_length=128),
    limit: int = Query(100, ge=1, le=500),
    cursor: str | None = Query(None, max_length=32),
) -> ApiJSON:
    query = select(AuditEntry)
    scope = tenant_scope(key, tenant)
    if scope is not None:
        query = query.where(AuditEntry.tenant == scope)
    if task is not None:
        # `task` is the orchestrator's id; within one tenant it names one task, an admin
        # without ?tenant= sees that name in every tenant.
        names = select(Task.id).where(Task.name == task)
        if scope is not None:
            names = names.where(Task.tenant == scope)
        query = query.where(col(AuditEntry.task_id).in_(names))
    if credential is not None:
        query = query.where(AuditEntry.credential_id == credential)
    if action is not None:
        query = query.where(AuditEntry.action == action)
    rows, nxt = page(session, query, AuditEntry.id, limit, cursor)
    task_ids = {r.task_id for r in rows if r.task_id}
    names_by_id = (
        dict(session.exec(select(Task.id, Task.name).where(col(Task.id).in_(task_ids))).all())
        if task_ids
        else {}
    )
    items = [view(r, names_by_id.get(r.task_id or "")) for r in rows]
    return ApiJSON({"items": items, "next": nxt})
