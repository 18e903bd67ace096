"""POST /v1/policy/check: what the policy in force would decide for a task.started event."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel
from sqlmodel import Session, select

from app import ledger
from app.api.auth import OperatorKey, tenant_scope
from app.api.errors import ApiError
from app.api.events import parse_event
from app.api.schemas import ApiJSON, errors, event_body
from app.authority import policy, scope
from app.core.db import get_engine
from app.core.models import ApiKey, Role
from app.profiles import get_profiles

router = APIRouter(tags=["policy"])


class GrantDecision(BaseModel):
    name: str
    profile: str
    decision: Literal["allow", "deny"]
    policies: list[str]
    reason: str | None


class PolicyCheckOut(BaseModel):
    grants: list[GrantDecision]


def _check(event: Any, tenant: str, emitter: str) -> dict[str, Any]:
    profiles = get_profiles()
    ledger.check_grants(event, tenant, profiles)
    data = event.data
    grants = data["grants"]
    asks = [
        policy.Ask(
            action="mint",
            workload=data.get("workload"),
            profile=g["profile"],
            issuer=profiles[g["profile"]].issuer,
            tenant=tenant,
            emitter=emitter,
            source=event.source,
            task=event.subject,
            parent=data.get("parent"),
            max_duration=int(data["max_duration"]),
        )
        for g in grants
    ]
    # decide(), not authorize(): a dry run is not counted among real decisions.
    decisions = policy.decide(policy.engine().current(), asks)
    answers = [
        {
            "name": g["name"],
            "profile": g["profile"],
            "decision": d.word,
            "policies": list(d.policies),
            "reason": d.reason,
        }
        for g, d in zip(grants, decisions, strict=True)
    ]
    # A named emitter key's scope refuses before any policy, as a real start does.
    with Session(get_engine()) as session:
        key = session.exec(
            select(ApiKey).where(
                ApiKey.name == emitter, ApiKey.tenant == tenant, ApiKey.role == Role.emitter
            )
        ).first()
    if key is not None:
        refused_source = scope.source_refusal(key.sources, event.source)
        for answer in answers:
            refused = refused_source or scope.grant_refusal(
                key.workloads, key.profiles, data.get("workload"), answer["profile"]
            )
            if refused is not None:
                answer.update(decision="deny", policies=[], reason=refused)
    return {"grants": answers}


@router.post(
    "/v1/policy/check",
    response_class=ApiJSON,
    response_model=PolicyCheckOut,
    responses=errors(401, 403, 415, 422),
    openapi_extra=event_body(),
)
async def policy_check(
    request: Request,
    key: OperatorKey,
    emitter: Annotated[
        str | None, Query(max_length=128, description="the emitter key name to decide for")
    ] = None,
    tenant: Annotated[
        str | None, Query(max_length=128, description="admin keys: the tenant to decide for")
    ] = None,
) -> ApiJSON:
    """Decide each grant of a `task.started` event as a start would; nothing is stored."""
    event = parse_event(
        await request.body(), request.headers.get("content-type", ""), request.headers
    )
    if event.type != "task.started":
        raise ApiError(422, "the dry run takes a task.started event")
    scope = tenant_scope(key, tenant)
    if scope is None:
        raise ApiError(422, "an admin key names the tenant with ?tenant=")
    answer = await run_in_threadpool(_check, event, scope, emitter or key.name)
    return ApiJSON(answer)
