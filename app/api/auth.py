"""API keys: bearer tokens looked up by SHA-256, with a role and a tenant."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from datetime import datetime
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session, select

from app.authority.scope import normalise as normalise_scope
from app.core.db import SessionDep
from app.core.models import ApiKey, Role, utcnow
from app.core.sealing import hash_api_key

_CACHE_SECONDS = 5.0  # a retired key stops working within this
_cache: dict[str, tuple[float, ApiKey | None]] = {}
# Names the scheme in /openapi.json; current_key reads the header itself, so a
# missing or wrong key stays 401 and a key of the wrong role 403.
api_key_scheme = HTTPBearer(
    scheme_name="ApiKey", description="a Leasehold API key (lhk_...)", auto_error=False
)


def new_key_secret() -> str:
    return "lhk_" + secrets.token_urlsafe(32)


def create_key(
    session: Session,
    *,
    name: str,
    role: Role,
    tenant: str | None,
    now: datetime | None = None,
    sources: list[str] | None = None,
    workloads: list[str] | None = None,
    profiles: list[str] | None = None,
) -> tuple[ApiKey, str]:
    """A new key row and its secret (shown once, stored only as a hash).

    `sources`, `workloads` and `profiles` limit an emitter key (app/authority/scope.py);
    None means no limit. Raises ValueError naming what is wrong."""
    if role != Role.admin and not tenant:
        raise ValueError(f"a {role} key needs a tenant")
    limits = {
        "sources": normalise_scope("sources", sources),
        "workloads": normalise_scope("workloads", workloads),
        "profiles": normalise_scope("profiles", profiles),
    }
    if role != Role.emitter and any(v is not None for v in limits.values()):
        raise ValueError("--sources, --workloads and --profiles limit emitter keys only")
    secret = new_key_secret()
    key = ApiKey(
        name=name,
        role=role,
        tenant=None if role == Role.admin else tenant,
        key_hash=hash_api_key(secret),
        created_at=now or utcnow(),
        sources=limits["sources"],
        workloads=limits["workloads"],
        profiles=limits["profiles"],
    )
    session.add(key)
    return key, secret


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def lookup_key(session: Session, secret: str) -> ApiKey | None:
    digest = hash_api_key(secret)
    hit = _cache.get(digest)
    if hit is not None and hit[0] > time.monotonic():
        return hit[1]
    key = session.exec(
        select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at == None)  # noqa: E711
    ).first()
    if key is not None:
        session.expunge(key)
    if len(_cache) > 10_000:
        _cache.clear()
    _cache[digest] = (time.monotonic() + _CACHE_SECONDS, key)
    return key


def current_key(
    request: Request,
    session: SessionDep,
    _: Annotated[HTTPAuthorizationCredentials | None, Security(api_key_scheme)] = None,
) -> ApiKey:
    secret = bearer(request)
    key = lookup_key(session, secret) if secret else None
    if key is None:
        raise HTTPException(401, "a valid API key is required", {"WWW-Authenticate": "Bearer"})
    return key


def require(*roles: Role) -> Callable[..., ApiKey]:
    def dependency(key: Annotated[ApiKey, Depends(current_key)]) -> ApiKey:
        if key.role not in roles:
            raise HTTPException(403, f"a {key.role} key may not do this")
        return key

    return dependency


def tenant_scope(key: ApiKey, tenant: str | None) -> str | None:
    """The tenant a request reads: its key's own; an admin may name one (None: all)."""
    if key.role == Role.admin:
        return tenant
    return key.tenant


EmitterKey = Annotated[ApiKey, Depends(require(Role.emitter))]
ReaderKey = Annotated[ApiKey, Depends(require(Role.emitter, Role.operator, Role.admin))]
OperatorKey = Annotated[ApiKey, Depends(require(Role.operator, Role.admin))]
AdminKey = Annotated[ApiKey, Depends(require(Role.admin))]
