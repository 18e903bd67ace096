"""POST /v1/events: validate, authenticate, store event and transition in one transaction."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from app import ledger, sealing
from app.api.auth import EmitterKey
from app.api.errors import ApiError, describe_validation
from app.api.limits import MAX_EVENT_BODY
from app.api.ratelimit import check_event_rate
from app.api.schemas import (
    ApiJSON,
    CloudEvent,
    EventAnswer,
    HeartbeatData,
    StartedData,
    errors,
    event_body,
    task_view,
)
from app.db import get_engine
from app.ledger import EventIn, EventResult, installation_id
from app.logs import log
from app.models import ApiKey, Task
from app.profiles import Profile, get_profiles
from app.queue import enqueue_approval_request, enqueue_extend, enqueue_mint, enqueue_revoke
from app.settings import get_settings

router = APIRouter()
MAX_BODY = MAX_EVENT_BODY
MAX_DEPTH = 32  # levels of JSON nesting an event may use; data is a small document
CONTENT_TYPES = ("application/json", "application/cloudevents+json")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _where(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "body"


def check_shape(raw: Any) -> None:
    """Refuse what no column may hold: deep nesting, NUL, lone surrogates (iteratively)."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(raw, ())]
    while stack:
        value, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise ApiError(400, f"body nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for name, item in value.items():
                _check_text(name, path)
                stack.append((item, (*path, name)))
        elif isinstance(value, list):
            stack.extend((item, (*path, i)) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, path)


def _check_text(text: str, path: tuple[str | int, ...]) -> None:
    if "\x00" in text:
        raise ApiError(400, f"{_where(path)} contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{_where(path)} is not valid Unicode (a lone surrogate)") from None


def event_identity(type_: str, subject: str, data: dict[str, Any] | None) -> str:
    """What makes two events with one idempotency key the same event (PRODUCT.md):
    type, subject and data; time, extensions and the transport mode are not compared."""
    canonical = json.dumps(
        {"type": type_, "subject": subject, "data": data},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def parse_event(body: bytes, content_type: str) -> EventIn:
    """Refuse bad input with a 4xx that names the problem; nothing is stored."""
    if content_type.split(";")[0].strip().lower() not in CONTENT_TYPES:
        raise ApiError(415, "Content-Type must be application/json or application/cloudevents+json")
    if len(body) > MAX_BODY:
        raise ApiError(413, f"event body is over {MAX_BODY // 1024} KiB")
    try:
        raw = json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ApiError(400, f"body nests deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "body is not valid JSON") from None
    if not isinstance(raw, dict):
        raise ApiError(400, "body must be a JSON object (a CloudEvent)")
    check_shape(raw)
    try:
        event = CloudEvent.model_validate(raw)
    except ValidationError as exc:
        raise ApiError(400, describe_validation(exc)) from None
    try:
        if event.type == "task.started":
            if event.data is None:
                raise ApiError(400, "data is required for task.started")
            data: dict[str, Any] | None = StartedData.model_validate(event.data).model_dump(
                exclude_none=True
            )
        elif event.type == "task.heartbeat":
            data = HeartbeatData.model_validate(event.data or {}).model_dump(exclude_none=True)
        else:
            data = event.data
    except ValidationError as exc:
        raise ApiError(400, describe_validation(exc, "data.")) from None
    return EventIn(
        source=event.source,
        id=event.id,
        type=event.type,
        subject=event.subject,
        time=event.time,
        data=data,
        body_hash=event_identity(event.type, event.subject, data),
    )


def check_profiles(event: EventIn, tenant: str, profiles: dict[str, Profile]) -> None:
    if event.type != "task.started" or event.data is None:
        return
    smallest: tuple[int, str] | None = None
    for grant in event.data["grants"]:
        name = grant["profile"]
        profile = profiles.get(name)
        if profile is None:
            raise ApiError(422, f"grant {grant['name']!r}: unknown profile {name!r}")
        if profile.retired:
            raise ApiError(422, f"grant {grant['name']!r}: profile {name!r} is retired")
        if not profile.open_to(tenant):
            raise ApiError(
                422, f"grant {grant['name']!r}: profile {name!r} is not open to this tenant"
            )
        if profile.claim == "jwt" and not event.data.get("workload"):
            # The claim proves the workload against this name: without one, nothing could.
            raise ApiError(
                422,
                f"grant {grant['name']!r}: profile {name!r} is claimed with a JWT; "
                "the event must name its workload",
            )
        if smallest is None or profile.max_ttl < smallest[0]:
            smallest = (profile.max_ttl, name)
    assert smallest is not None
    if event.data["max_duration"] > smallest[0]:
        raise ApiError(
            422,
            f"max_duration {event.data['max_duration']} is over the max_ttl of profile "
            f"{smallest[1]!r} ({smallest[0]})",
        )


def _apply(key: ApiKey, event: EventIn) -> tuple[EventResult, dict[str, Any]]:
    settings = get_settings()
    profiles = get_profiles()
    inst = installation_id()
    for attempt in range(3):
        with Session(get_engine(), expire_on_commit=False) as session:
            try:
                result = ledger.apply_event(
                    session,
                    key=key,
                    event=event,
                    profiles=profiles,
                    installation_id=inst,
                    retention_days=settings.retention_days,
                    # After the idempotency check: a retry is a duplicate even if a
                    # profile was retired since.
                    check=lambda: check_profiles(event, key.tenant or "", profiles),
                )
                answer = _answer(session, key, event, result)
                session.commit()
                return result, answer
            except ledger.LedgerError as exc:
                if exc.audit:  # a refusal worth recording: in a unit of work of its own
                    session.rollback()
                    ledger.record_refusal(session, exc)
                    session.commit()
                raise
            except IntegrityError:
                # A concurrent request stored the same event or task first: replay it.
                session.rollback()
                if attempt == 2:
                    raise
    raise AssertionError("unreachable")


def _answer(session: Session, key: ApiKey, event: EventIn, result: EventResult) -> dict[str, Any]:
    task: Task = result.task
    parent = session.get(Task, task.parent_id) if task.parent_id else None
    view = task_view(task, parent.name if parent else None)
    answer: dict[str, Any] = {
        "accepted": True,
        "duplicate": result.duplicate,
        "task": {"id": view["id"], "state": view["state"], "deadline": view["deadline"]},
        "claim_token": None,
    }
    if event.type == "task.started":
        answer["claim_token"] = sealing.claim_token(task.tenant, task.id, task.claim_generation)
    return answer


@router.post(
    "/v1/events",
    status_code=202,
    tags=["events"],
    response_model=EventAnswer,
    responses={
        200: {"model": EventAnswer, "description": "A duplicate: the first answer again"},
        **errors(401, 403, 404, 409, 415, 422, 429),
    },
    # The body is read raw (limits, nesting, NUL checks) and parsed by parse_event.
    openapi_extra=event_body(),
)
async def post_event(request: Request, key: EmitterKey) -> ApiJSON:
    await check_event_rate(key.id)  # before the body is read: a flood costs little
    body = await request.body()
    event = parse_event(body, request.headers.get("content-type", ""))
    result, answer = await run_in_threadpool(_apply, key, event)
    # Enqueue only after the commit: a worker must find what it is told about.
    enqueue_revoke(result.to_revoke)
    enqueue_mint(result.to_mint)
    enqueue_extend(result.to_extend)
    enqueue_approval_request(result.to_ask)
    log.info(
        "event",
        extra={
            "type": event.type,
            "task": result.task.id,
            "duplicate": result.duplicate,
            "mints": len(result.to_mint),
            "revokes": len(result.to_revoke),
        },
    )
    return ApiJSON(answer, status_code=200 if result.duplicate else 202)
