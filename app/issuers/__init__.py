"""Issuers by name. Instances are cached per process, created after fork."""

from __future__ import annotations

import os
import threading

from app.issuers.base import Issuer
from app.profiles import Profile
from app.settings import Settings

_lock = threading.Lock()
_cache: dict[tuple[int, str, Profile], Issuer] = {}


def build_issuer(profile: Profile, *, installation_id: str, settings: Settings) -> Issuer:
    """A new issuer for one profile (callers normally want get_issuer)."""
    if profile.issuer == "postgres":
        from app.issuers.postgres import PostgresIssuer

        return PostgresIssuer(profile, installation_id=installation_id, settings=settings)
    if profile.issuer == "redis":
        from app.issuers.redis import RedisIssuer

        return RedisIssuer(profile, installation_id=installation_id, settings=settings)
    if profile.issuer == "vault-token":
        from app.issuers.vault import VaultTokenIssuer

        return VaultTokenIssuer(profile, installation_id=installation_id, settings=settings)
    if profile.issuer == "vault-dynamic":
        from app.issuers.vault import VaultDynamicIssuer

        return VaultDynamicIssuer(profile, installation_id=installation_id, settings=settings)
    raise ValueError(f"unknown issuer {profile.issuer!r}")


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


def close_all() -> None:
    with _lock:
        for issuer in _cache.values():
            issuer.close()
        _cache.clear()
    from app.vault import close_gateways

    close_gateways()
