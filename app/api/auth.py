"""API keys: bearer tokens looked up by SHA-256, with a role and a tenant."""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import or_, update
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from app.api import offload
from app.authority.scope import normalise as normalise_scope
from app.core.db import get_engine, session_scope
from app.core.logs import log
from app.core.models import ApiKey, Role, utcnow
from app.core.sealing import hash_api_key

# A retired key stops working within this on every API process (the contract: 5 s; the
# margin covers a request in flight). An expired key stops at once: checked per request.
_CACHE_SECONDS = 4.0
_LAST_USED_EVERY = timedelta(minutes=1)  # last_used_at is kept to the minute, cheaply
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
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """A new key row and its secret (shown once, stored only as a hash).

    `sources`, `workloads` and `profiles` limit an emitter key (app/authority/scope.py);
    None means no limit. Raises ValueError naming what is wrong."""
    now = now or utcnow()
    if role != Role.admin and not tenant:
        raise ValueError(f"a {role} key needs a tenant")
    if expires_at is not None and (expires_at.tzinfo is None or expires_at <= now):
        raise ValueError("expires_at must be a time in the future, with its time zone")
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
        created_at=now,
        expires_at=expires_at,
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


def retire_key(session: Session, key_id: str, *, now: datetime | None = None) -> ApiKey | None:
    """Revoke a key (idempotent): every API process refuses it within _CACHE_SECONDS."""
    key = session.get(ApiKey, key_id)
    if key is None:
        return None
    if key.revoked_at is None:
        key.revoked_at = now or utcnow()
    return key


def forget(key_hash: str) -> None:
    """Drop a key from this process's cache (it was just revoked here)."""
    _cache.pop(key_hash, None)


def _cached(digest: str) -> tuple[bool, ApiKey | None]:
    """(hit, key) from this process's cache; a hit answers without the ledger."""
    hit = _cache.get(digest)
    if hit is not None and hit[0] > time.monotonic():
        return True, hit[1]
    return False, None


def _load(session: Session, digest: str) -> ApiKey | None:
    key = session.exec(
        select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at == None)  # noqa: E711
    ).first()
    if key is not None:
        session.expunge(key)
        _touch(key)
    if len(_cache) > 10_000:
        _cache.clear()
    _cache[digest] = (time.monotonic() + _CACHE_SECONDS, key)
    return key


def _load_own_session(digest: str) -> ApiKey | None:
    with Session(get_engine(), expire_on_commit=False) as session:
        return _load(session, digest)


def _unexpired(key: ApiKey | None) -> ApiKey | None:
    if key is not None and key.expires_at is not None and key.expires_at <= utcnow():
        return None
    return key


def lookup_key(session: Session, secret: str) -> ApiKey | None:
    digest = hash_api_key(secret)
    hit, key = _cached(digest)
    if not hit:
        key = _load(session, digest)
    return _unexpired(key)


async def lookup_key_async(secret: str) -> ApiKey | None:
    """lookup_key for the event loop: a cached key costs no thread hand-off; a miss
    reads the ledger in the thread pool (the loop never blocks on the database)."""
    digest = hash_api_key(secret)
    hit, key = _cached(digest)
    if not hit:
        key = await offload.run(_load_own_session, digest)
    return _unexpired(key)


def _touch(key: ApiKey) -> None:
    """last_used_at, at most once a minute per key (and per cache miss): best effort,
    in a unit of work of its own; a busy ledger never fails the request for it."""
    now = utcnow()
    if key.last_used_at is not None and key.last_used_at > now - _LAST_USED_EVERY:
        return
    try:
        with session_scope() as session:
            session.execute(
                update(ApiKey)
                .where(
                    col(ApiKey.id) == key.id,
                    or_(
                        col(ApiKey.last_used_at).is_(None),
                        col(ApiKey.last_used_at) <= now - _LAST_USED_EVERY,
                    ),
                )
                .values(last_used_at=now)
            )
        key.last_used_at = now
    except SQLAlchemyError as exc:
        log.warning("could not record a key's last use", extra={"error": type(exc).__name__})


async def current_key(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Security(api_key_scheme)] = None,
) -> ApiKey:
    # async: FastAPI runs it on the event loop (a sync dependency would hop to a thread).
    secret = bearer(request)
    key = await lookup_key_async(secret) if secret else None
    if key is None:
        raise HTTPException(401, "a valid API key is required", {"WWW-Authenticate": "Bearer"})
    return key


def require(*roles: Role) -> Callable[..., Awaitable[ApiKey]]:
    async def dependency(key: Annotated[ApiKey, Depends(current_key)]) -> ApiKey:
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
