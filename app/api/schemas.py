"""Request bodies and answers; the shapes of PRODUCT.md."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from app.api.errors import PROBLEM_JSON, PROBLEM_MEMBERS, problem_body
from app.core.models import Credential, CredState, Task, TaskState
from app.ledger import EVENT_TYPES
from app.profiles import NAME_PATTERN

MAX_GRANTS = 16


def iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class ApiJSON(JSONResponse):
    """JSON with RFC 3339 UTC times ending in Z. An error status with an `error`
    member answers the problem document (app.api.errors) of that status."""

    def __init__(
        self, content: Any, status_code: int = 200, headers: Any = None, **kwargs: Any
    ) -> None:
        if status_code >= 400 and isinstance(content, dict) and "error" in content:
            extra = {k: v for k, v in content.items() if k not in PROBLEM_MEMBERS}
            content = problem_body(status_code, content["error"], **extra)
            self.media_type = PROBLEM_JSON
        super().__init__(content, status_code, headers, **kwargs)

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


# --- what the API answers, as /openapi.json describes it ----------------------
# The routes answer ApiJSON built from the *_view dicts above; these models are
# the documented shapes (the schemathesis test checks that answers conform).


class ErrorOut(BaseModel):
    """Every refusal, an RFC 9457 problem: `detail` (and `error`, the same text)
    names the problem; some carry more members (e.g. `state`)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["about:blank"] = Field(
        description="always about:blank: the status is the kind of problem"
    )
    title: str = Field(description="the HTTP status phrase")
    status: int = Field(description="the HTTP status code")
    detail: str = Field(description="what exactly was wrong")
    error: str = Field(description="the same text as detail (read by earlier clients)")


ERROR_TEXT = {
    400: "Malformed request (bad JSON, a NUL character, bad percent-encoding)",
    401: "A valid API key is required",
    403: "This key (or token) may not do this",
    404: "Not found (or another tenant's)",
    409: "Conflict with the current state",
    410: "Gone: ended, revoked or already claimed",
    413: "Request body too large",
    415: "Unsupported Content-Type",
    422: "Invalid parameters or body",
    429: "Over the rate limit; see Retry-After",
    503: "The ledger is unavailable; try again",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these error statuses, all in the shape of ErrorOut
    (served as application/problem+json: see `problem_media_types`)."""
    return {code: {"model": ErrorOut, "description": ERROR_TEXT[code]} for code in codes}


def problem_media_types(doc: dict[str, Any]) -> None:
    """FastAPI files every answer's schema under the route's media type; an error
    answers application/problem+json, so its schema moves there."""
    for ops in doc.get("paths", {}).values():
        for op in ops.values():
            for status, answer in op.get("responses", {}).items():
                content = answer.get("content", {})
                if status[:1] in ("4", "5") and "application/json" in content:
                    content[PROBLEM_JSON] = content.pop("application/json")


# Any request may meet these: the door (app.api.limits) and a ledger outage.
COMMON_ERRORS = errors(400, 413, 503)


class CredentialOut(BaseModel):
    id: str
    task: str | None = Field(description="the task's id (in listings)")
    grant: str
    profile: str
    issuer: str
    state: CredState
    minted_at: datetime | None
    expires_at: datetime | None
    claimed_at: datetime | None
    revoked_at: datetime | None
    revoke_reason: str | None
    attempts: int
    last_error: str | None
    tenant: str | None = Field(None, description="in listings")


class TaskOut(BaseModel):
    id: str = Field(description="the orchestrator's task id")
    state: TaskState
    started_at: datetime | None
    deadline: datetime | None
    ended_at: datetime | None
    parent: str | None
    source: str
    workload: str | None
    tenant: str


class TaskDetail(TaskOut):
    credentials: list[CredentialOut]


class TaskPage(BaseModel):
    items: list[TaskOut]
    next: str | None = Field(description="the cursor of the next page; null on the last")


class CredentialPage(BaseModel):
    items: list[CredentialOut]
    next: str | None


class TaskBrief(BaseModel):
    id: str
    state: TaskState
    deadline: datetime | None


class EventAnswer(BaseModel):
    accepted: bool
    duplicate: bool
    task: TaskBrief
    claim_token: str | None = Field(description="on task.started: the task's claim token")


class ClaimOut(BaseModel):
    grant: str
    profile: str
    issuer: str
    expires_at: datetime | None
    secret: dict[str, Any] = Field(description="the credential, handed out once")


class StateOut(BaseModel):
    id: str
    state: CredState


class Health(BaseModel):
    status: str


class CloudEventDoc(CloudEvent):
    """The body of POST /v1/events (documentation: the handler reads the raw body)."""

    # Re-typed for the document only: this model never stands in for a CloudEvent.
    data: StartedData | HeartbeatData | dict[str, Any] | None = Field(  # type: ignore[assignment]
        None,
        description="task.started: StartedData; task.heartbeat: HeartbeatData; "
        "task.succeeded/failed/cancelled: any object",
    )


def event_body() -> dict[str, Any]:
    """`openapi_extra` for routes that take a CloudEvent (structured mode described)."""
    ref = {"$ref": "#/components/schemas/CloudEvent"}
    return {
        "requestBody": {
            "required": True,
            "description": "A CloudEvent in structured mode, or in binary mode: the "
            "attributes in percent-encoded ce-* headers (ce-specversion, ce-id, ce-source, "
            "ce-type, ce-subject, optional ce-time) and data as the JSON body. Batch mode "
            "(application/cloudevents-batch+json) answers 415.",
            "content": {
                "application/cloudevents+json": {"schema": ref},
                "application/json": {"schema": ref},
            },
        }
    }


def event_components() -> dict[str, Any]:
    """The CloudEvent schema and what it uses, for the OpenAPI components."""
    schema = CloudEventDoc.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    schema["title"] = "CloudEvent"
    return {"CloudEvent": schema, **defs}
