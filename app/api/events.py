"""POST /v1/events: validate, authenticate, store event and transition in one transaction."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi import APIRouter, Request
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import ledger
from app.api import offload
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
)
from app.core import sealing
from app.core.db import get_engine
from app.core.logs import log
from app.core.models import ApiKey
from app.core.settings import get_settings
from app.ledger import EventIn, EventResult, installation_id
from app.observability import observe
from app.profiles import get_profiles
from app.queue import enqueue_approval_request, enqueue_extend, enqueue_mint, enqueue_revoke

router = APIRouter()
MAX_BODY = MAX_EVENT_BODY
MAX_DEPTH = 32  # levels of JSON nesting an event may use; data is a small document
CONTENT_TYPES = ("application/json", "application/cloudevents+json")
BATCH_TYPE = "application/cloudevents-batch"
CE_PREFIX = "ce-"


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


def media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def _is_json(media: str) -> bool:
    return media == "application/json" or media.endswith("+json")


def _header_text(name: str, values: list[str]) -> str:
    """One ce-* header, percent-decoded as the CloudEvents HTTP binding asks (3.1.3.2)."""
    if len(values) > 1:
        raise ApiError(400, f"header {name} appears more than once")
    try:
        # Starlette hands header bytes over as latin-1: undo that, then decode UTF-8.
        return unquote_to_bytes(values[0].encode("latin-1")).decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise ApiError(400, f"header {name} is not percent-encoded UTF-8") from None


def _load_json(body: bytes) -> Any:
    try:
        return json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ApiError(400, f"body nests deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "body is not valid JSON") from None


def _binary_event(body: bytes, media: str, headers: Headers) -> dict[str, Any]:
    """A binary-mode event (ce-* headers, data as the body) as its structured form."""
    raw: dict[str, Any] = {}
    for name in {key for key in headers if key.startswith(CE_PREFIX)}:
        attribute = name.removeprefix(CE_PREFIX)
        if attribute in ("data", "data_base64", "datacontenttype"):
            raise ApiError(400, f"{name} is not a CloudEvents header")
        raw[attribute] = _header_text(name, headers.getlist(name))
    if body:
        # Without a Content-Type, the body is taken as JSON: senders that leave
        # datacontenttype out (data is JSON by default) send none.
        if media and not _is_json(media):
            raise ApiError(415, "binary-mode data must be JSON (Content-Type application/json)")
        data = _load_json(body)
        if not isinstance(data, dict):
            raise ApiError(400, "data must be a JSON object")
        raw["data"] = data
        if media:
            raw["datacontenttype"] = media
    return raw


def parse_event(body: bytes, content_type: str, headers: Headers | None = None) -> EventIn:
    """Refuse bad input with a 4xx that names the problem; nothing is stored.

    Structured mode (application/cloudevents+json, or application/json without
    ce-specversion) or binary mode (ce-* headers, data as the body), as the
    CloudEvents HTTP binding has a receiver tell them apart; batch mode is refused.
    """
    media = media_type(content_type)
    if media.startswith(BATCH_TYPE):
        raise ApiError(415, "batch mode is not accepted: send each event in a request of its own")
    if len(body) > MAX_BODY:
        raise ApiError(413, f"event body is over {MAX_BODY // 1024} KiB")
    binary = (
        headers is not None
        and "ce-specversion" in headers
        and not media.startswith("application/cloudevents")
    )
    if binary:
        assert headers is not None
        raw: Any = _binary_event(body, media, headers)
    elif media not in CONTENT_TYPES:
        raise ApiError(
            415,
            "Content-Type must be application/json or application/cloudevents+json "
            "(structured mode), or the event sent in ce-* headers (binary mode)",
        )
    else:
        raw = _load_json(body)
    if not isinstance(raw, dict):
        raise ApiError(400, "body must be a JSON object (a CloudEvent)")
    check_shape(raw)
    try:
        event = CloudEvent.model_validate(raw)
    except ValidationError as exc:
        # In binary mode an attribute is a header: name the header.
        raise ApiError(400, describe_validation(exc, CE_PREFIX if binary else "")) from None
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


def _apply_and_enqueue(key: ApiKey, event: EventIn) -> tuple[EventResult, dict[str, Any]]:
    """In the thread pool: the broker round trips must not block the event loop."""
    result, answer = _apply(key, event)
    # Enqueue only after the commit: a worker must find what it is told about.
    enqueue_revoke(result.to_revoke)
    enqueue_mint(result.to_mint)
    enqueue_extend(result.to_extend)
    enqueue_approval_request(result.to_ask)
    return result, answer


def _answer(session: Session, key: ApiKey, event: EventIn, result: EventResult) -> dict[str, Any]:
    # The three task fields the answer shows, from the task in hand: nothing re-read
    # (task_view's parent name is not among them).
    task = result.task
    answer: dict[str, Any] = {
        "accepted": True,
        "duplicate": result.duplicate,
        "task": {"id": task.name, "state": task.state, "deadline": task.deadline},
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
    event = parse_event(body, request.headers.get("content-type", ""), request.headers)
    request.state.event_type = event.type  # for leasehold_events_total (count_events)
    result, answer = await offload.run(_apply_and_enqueue, key, event)
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


class count_events:
    """Counts every POST /v1/events by type and outcome, refusals included (those of
    the key check and the rate limit happen before the route runs)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/events" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        status = 500
        state = scope.setdefault("state", {})

        async def answered(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, answered)
        finally:
            observe.event_answered(state.get("event_type"), status)
