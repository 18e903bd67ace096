"""Issuers by name. Instances are cached per process, created after fork."""

from __future__ import annotations

import os
import threading

from app.core.settings import Settings
from app.issuers.base import BackendIdentity, Issuer, Recorded
from app.profiles import Profile

_lock = threading.Lock()
_cache: dict[tuple[int, str, Profile], Issuer] = {}


def issuer_class(kind: str) -> type[Issuer]:
    """The class of an issuer kind (a profile's or a credential's `issuer`)."""
    if kind == "postgres":
        from app.issuers.postgres import PostgresIssuer

        return PostgresIssuer
    if kind == "redis":
        from app.issuers.redis import RedisIssuer

        return RedisIssuer
    if kind == "vault-token":
        from app.issuers.vault import VaultTokenIssuer

        return VaultTokenIssuer
    if kind == "vault-dynamic":
        from app.issuers.vault import VaultDynamicIssuer

        return VaultDynamicIssuer
    if kind == "proxy":
        from app.issuers.proxy import ProxyIssuer

        return ProxyIssuer
    raise ValueError(f"unknown issuer {kind!r}")


def build_issuer(profile: Profile, *, installation_id: str, settings: Settings) -> Issuer:
    """A new issuer for one profile (callers normally want get_issuer)."""
    cls = issuer_class(profile.issuer)
    return cls(profile, installation_id=installation_id, settings=settings)


def get_issuer(profile: Profile, *, installation_id: str, settings: Settings) -> Issuer:
    """The process's issuer for this profile (pools are never shared across fork)."""
    key = (os.getpid(), installation_id, profile)
    with _lock:
        issuer = _cache.get(key)
        if issuer is None:
            issuer = _cache[key] = build_issuer(
                profile, installation_id=installation_id, settings=settings
            )
        return issuer


def backend_identity(profile: Profile, settings: Settings) -> BackendIdentity:
    """Where a profile's objects live; profiles with one identity share one backend."""
    return issuer_class(profile.issuer).backend_identity(profile, settings)


def revoke_ref(kind: str, recorded: Recorded) -> str | None:
    """What revoke() needs for a credential of this issuer kind (see Issuer.ref_for)."""
    return issuer_class(kind).ref_for(recorded)


def close_all() -> None:
    with _lock:
        for issuer in _cache.values():
            issuer.close()
        _cache.clear()
    from app.issuers.vault_gateway import close_gateways

    close_gateways()
