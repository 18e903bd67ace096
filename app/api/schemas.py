"""Request bodies and answers; the shapes of PRODUCT.md."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from app.ledger import EVENT_TYPES
from app.models import Credential, Task
from app.profiles import NAME_PATTERN

MAX_GRANTS = 16


def iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class ApiJSON(JSONResponse):
    """JSON with RFC 3339 UTC times ending in Z."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, default=_default, separators=(",", ":")).encode()


class CloudEvent(BaseModel):
    """A CloudEvents 1.0 envelope in structured mode."""

    model_config = ConfigDict(extra="allow")

    specversion: Literal["1.0"]
    id: str = Field(min_length=1, max_length=256)
    source: str = Field(min_length=1, max_length=512)
    type: Literal[EVENT_TYPES]  # type: ignore[valid-type]
    subject: str = Field(min_length=1, max_length=256)
    time: datetime | None = None
    datacontenttype: str | None = None
    data: dict[str, Any] | None = None

    @field_validator("time")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("time needs a timezone (RFC 3339)")
        return value


class Grant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    profile: str = Field(min_length=1, max_length=64)


class StartedData(BaseModel):
    # Events name profiles; they never carry SQL, ACL rules or policies.
    model_config = ConfigDict(extra="forbid")

    max_duration: StrictInt = Field(ge=1)
    grants: list[Grant] = Field(min_length=1, max_length=MAX_GRANTS)
    workload: str | None = Field(default=None, min_length=1, max_length=512)
    parent: str | None = Field(default=None, min_length=1, max_length=256)

    @field_validator("grants")
    @classmethod
    def _unique_names(cls, grants: list[Grant]) -> list[Grant]:
        names = [g.name for g in grants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"grant names must be unique within the task: {', '.join(dup)}")
        return grants


class HeartbeatData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_duration: StrictInt | None = Field(default=None, ge=1)


def credential_view(cred: Credential, task_name: str | None = None) -> dict[str, Any]:
    """A credential as the API shows it: never a secret."""
    return {
        "id": cred.id,
        "task": task_name,
        "grant": cred.grant,
        "profile": cred.profile,
        "issuer": cred.issuer,
        "state": cred.state,
        "minted_at": cred.minted_at,
        "expires_at": cred.expires_at,
        "claimed_at": cred.claimed_at,
        "revoked_at": cred.revoked_at,
        "revoke_reason": cred.revoke_reason,
        "attempts": cred.attempts,
        "last_error": cred.last_error,
    }


def task_view(task: Task, parent_name: str | None = None) -> dict[str, Any]:
    return {
        "id": task.name,
        "state": task.state,
        "started_at": task.started_at,
        "deadline": task.deadline,
        "ended_at": task.ended_at,
        "parent": parent_name,
        "source": task.source,
        "workload": task.workload,
    }
