"""Small helpers for talking to the API as an orchestrator and a workload would."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import psycopg
from sqlmodel import select

from app.core.db import session_scope
from app.core.models import Credential, Task


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def event(type_: str, subject: str, data: dict[str, Any] | None = None, **attrs: Any) -> dict:
    body: dict[str, Any] = {
        "specversion": "1.0",
        "id": attrs.pop("id", f"evt-{uuid.uuid4()}"),
        "source": attrs.pop("source", "pytest://lifecycle"),
        "type": type_ if type_.startswith("task.") else f"task.{type_}",
        "subject": subject,
        "time": attrs.pop("time", datetime.now(UTC).isoformat().replace("+00:00", "Z")),
        **attrs,
    }
    if data is not None:
        body["data"] = data
    return body


def started(subject: str, grants: dict[str, str], max_duration: int = 60, **data: Any) -> dict:
    return event(
        "started",
        subject,
        {
            "max_duration": max_duration,
            "grants": [{"name": n, "profile": p} for n, p in grants.items()],
            **data,
        },
    )


def task_path(name: str) -> str:
    return quote(name, safe="")


def claim_url(task: str, grant: str, wait: float = 0) -> str:
    url = f"/v1/tasks/{task_path(task)}/credentials/{grant}/claim"
    return f"{url}?wait={wait}" if wait else url


def unique(name: str) -> str:
    return f"{name}/{uuid.uuid4().hex[:8]}/try-1"


def credentials_of(tenant: str, task: str) -> list[Credential]:
    with session_scope() as session:
        t = session.exec(select(Task).where(Task.tenant == tenant, Task.name == task)).first()
        if t is None:
            return []
        return list(session.exec(select(Credential).where(Credential.task_id == t.id)))


def states(tenant: str, task: str) -> dict[str, str]:
    return {c.grant: c.state for c in credentials_of(tenant, task)}


def role_exists(name: str) -> bool:
    """A PostgreSQL role by this name exists (roles are cluster-wide)."""
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres") as conn:
        row = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
    return row is not None
