"""API keys over HTTP (admin): GET/POST /v1/keys, DELETE /v1/keys/{id}.

The secret is in the creation's answer only; lists never carry it. A revoked or
expired key answers 401 within seconds on every API process (app.api.auth)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from app.api import auth
from app.api.auth import AdminKey
from app.api.errors import ApiError
from app.api.paging import page
from app.api.schemas import ApiJSON, errors
from app.core.db import SessionDep
from app.core.logs import log
from app.core.models import ApiKey, Role, utcnow

router = APIRouter(tags=["keys"], responses=errors(401, 403, 422))


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")
    role: Role
    tenant: str | None = Field(None, min_length=1, max_length=128)
    expires_at: AwareDatetime | None = None
    sources: list[str] | None = None
    workloads: list[str] | None = None
    profiles: list[str] | None = None


class KeyOut(BaseModel):
    id: str
    name: str
    role: Role
    tenant: str | None
    sources: list[str] | None
    workloads: list[str] | None
    profiles: list[str] | None
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None


class NewKeyOut(KeyOut):
    key: str = Field(description="the secret: in this answer only, stored only as a hash")


class KeyPage(BaseModel):
    items: list[KeyOut]
    next: str | None


def key_view(key: ApiKey) -> dict[str, Any]:
    """A key as the API shows it (KeyOut's fields): never its secret nor its hash."""
    return {name: getattr(key, name) for name in KeyOut.model_fields}


@router.get("/v1/keys", response_class=ApiJSON, response_model=KeyPage)
def list_keys(
    _: AdminKey,
    session: SessionDep,
    revoked: bool = Query(False, description="include revoked keys"),
    limit: int = Query(100, ge=1, le=500),
    cursor: str | None = None,
) -> ApiJSON:
    query = select(ApiKey)
    if not revoked:
        query = query.where(col(ApiKey.revoked_at).is_(None))
    rows, nxt = page(session, query, ApiKey.id, limit, cursor)
    return ApiJSON({"items": [key_view(k) for k in rows], "next": nxt})


@router.post(
    "/v1/keys",
    response_class=ApiJSON,
    status_code=201,
    response_model=NewKeyOut,
    responses=errors(409, 422),
)
def create_key(body: KeyIn, admin: AdminKey, session: SessionDep) -> ApiJSON:
    try:
        key, secret = auth.create_key(
            session,
            name=body.name,
            role=body.role,
            tenant=body.tenant,
            sources=body.sources,
            workloads=body.workloads,
            profiles=body.profiles,
            expires_at=body.expires_at,
        )
        session.flush()
        view = key_view(key)
        session.commit()
    except ValueError as exc:
        raise ApiError(422, str(exc)) from None
    except IntegrityError:
        session.rollback()
        raise ApiError(409, f"a key named {body.name!r} exists") from None
    log.info("key created", extra={"key": key.id, "role": key.role, "by": admin.name})
    return ApiJSON(view | {"key": secret}, status_code=201, headers={"Cache-Control": "no-store"})


@router.delete(
    "/v1/keys/{key_id}",
    response_class=ApiJSON,
    response_model=KeyOut,
    responses=errors(404),
)
def revoke_key(key_id: str, admin: AdminKey, session: SessionDep) -> ApiJSON:
    """Revoke a key: 401 within seconds on every API process. A revoked emitter's running
    tasks keep running; an operator or admin can cancel them."""
    key = auth.retire_key(session, key_id, now=utcnow())
    if key is None:
        raise ApiError(404, f"no key {key_id!r}")
    session.commit()
    auth.forget(key.key_hash)  # at once in this process; the others within the cache time
    log.info("key revoked", extra={"key": key.id, "by": admin.name})
    return ApiJSON(key_view(key))
