"""The kill switch: POST/GET /v1/revocations, GET/DELETE /v1/revocations/{id}.

Throwing a switch commits it first (from then on no matching credential is minted:
the start refuses it and the activation re-checks), then takes what it matches a
batch at a time, each batch its own unit of work enqueued to the revoke queue after
its commit (app.switches). The deadline sweep finishes what an interrupted request
left."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, col, select

from app import ledger
from app.api.auth import OperatorKey, tenant_scope
from app.api.errors import ApiError
from app.api.paging import page
from app.api.schemas import ApiJSON, errors
from app.core.db import SessionDep, get_engine, session_scope
from app.core.logs import log
from app.core.models import ApiKey, KillSwitch, Role, utcnow
from app.switches import take_matching

router = APIRouter(tags=["revocations"], responses=errors(401, 403, 422))


class SwitchIn(BaseModel):
    """What to cut off: every credential matching all the fields given (at least one)."""

    model_config = ConfigDict(extra="forbid")

    tenant: str | None = Field(None, min_length=1, max_length=128)
    profile: str | None = Field(None, min_length=1, max_length=64)
    workload: str | None = Field(None, min_length=1, max_length=512)
    source: str | None = Field(None, min_length=1, max_length=512)


class SwitchOut(BaseModel):
    id: str
    match: SwitchIn
    created_at: datetime
    by: str
    revoking: int = Field(description="credentials the switch sent to revoking")
    denied: int = Field(description="pending or awaiting_approval credentials it denied")
    remaining: int = Field(description="its revocations not yet done")
    revoked: int
    failed: int
    live: int = Field(description="matching credentials not yet taken (0 once thrown)")
    done: bool = Field(description="nothing of the match is live or revoking")
    lifted_at: datetime | None
    lifted_by: str | None


class SwitchPage(BaseModel):
    items: list[SwitchOut]
    next: str | None


def switch_view(session: Session, switch: KillSwitch) -> dict[str, Any]:
    progress = ledger.switch_progress(session, switch)
    return {
        "id": switch.id,
        "match": {f: getattr(switch, f) for f in ledger.SWITCH_FIELDS},
        "created_at": switch.created_at,
        "by": switch.created_by,
        "revoking": switch.revoking,
        "denied": switch.denied,
        **progress,
        "done": progress["remaining"] == 0 and progress["live"] == 0,
        "lifted_at": switch.lifted_at,
        "lifted_by": switch.lifted_by,
    }


def _visible(session: Session, key: ApiKey, switch_id: str) -> KillSwitch:
    """The switch if this key may see it: an operator its own tenant's; else 404."""
    switch = session.get(KillSwitch, switch_id)
    if switch is None or (key.role != Role.admin and switch.tenant != key.tenant):
        raise ApiError(404, f"no kill switch {switch_id!r}")
    return switch


@router.post(
    "/v1/revocations",
    response_class=ApiJSON,
    status_code=202,
    response_model=SwitchOut,
)
def throw(body: SwitchIn, key: OperatorKey) -> ApiJSON:
    """Throw a kill switch: revoke every matching active credential (reason
    `kill_switch`), deny the matching pending and awaiting_approval ones, and refuse new
    mints for the match until it is lifted."""
    match = body.model_dump()
    if not any(match.values()):
        raise ApiError(422, "name at least one of " + ", ".join(ledger.SWITCH_FIELDS))
    if key.role != Role.admin:
        if match["tenant"] is not None and match["tenant"] != key.tenant:
            raise ApiError(403, "an operator's kill switch is for its own tenant only")
        match["tenant"] = key.tenant
    with session_scope() as session:
        switch = ledger.throw_switch(session, match, actor=key.name, now=utcnow())
        switch_id = switch.id
    revoking, denied = take_matching(switch_id, actor=key.name)
    log.warning(
        "kill switch thrown",
        extra={"switch": switch_id, "by": key.name, "revoking": revoking, "denied": denied},
    )
    with Session(get_engine()) as session:
        thrown = session.get(KillSwitch, switch_id)
        assert thrown is not None
        view = switch_view(session, thrown)
    return ApiJSON(view, status_code=202)


@router.get("/v1/revocations", response_class=ApiJSON, response_model=SwitchPage)
def list_switches(
    key: OperatorKey,
    session: SessionDep,
    tenant: str | None = None,
    lifted: bool = Query(False, description="include lifted switches"),
    limit: int = Query(100, ge=1, le=500),
    cursor: str | None = None,
) -> ApiJSON:
    """The switches in force (newest first), with their progress."""
    query = select(KillSwitch)
    scope = tenant_scope(key, tenant)
    if scope is not None:
        query = query.where(KillSwitch.tenant == scope)
    if not lifted:
        query = query.where(col(KillSwitch.lifted_at).is_(None))
    rows, nxt = page(session, query, KillSwitch.id, limit, cursor)
    return ApiJSON({"items": [switch_view(session, s) for s in rows], "next": nxt})


@router.get(
    "/v1/revocations/{switch_id}",
    response_class=ApiJSON,
    response_model=SwitchOut,
    responses=errors(404),
)
def get_switch(switch_id: str, key: OperatorKey, session: SessionDep) -> ApiJSON:
    """One switch and its progress (`remaining`, `live`, `done`)."""
    return ApiJSON(switch_view(session, _visible(session, key, switch_id)))


@router.delete(
    "/v1/revocations/{switch_id}",
    response_class=ApiJSON,
    response_model=SwitchOut,
    responses=errors(404, 409),
)
def lift(switch_id: str, key: OperatorKey, session: SessionDep) -> ApiJSON:
    """Lift a switch: matching credentials may be minted again (nothing revoked returns)."""
    switch = _visible(session, key, switch_id)
    if not ledger.lift_switch(session, switch.id, actor=key.name, now=utcnow()):
        raise ApiError(409, "the kill switch was lifted already")
    session.commit()
    session.refresh(switch)
    log.warning("kill switch lifted", extra={"switch": switch.id, "by": key.name})
    return ApiJSON(switch_view(session, switch))
