"""Checks run before any process serves: profiles valid, none removed while live."""

from __future__ import annotations

from sqlmodel import Session, col, func, select

from app.core.models import UNSETTLED_CRED_STATES, Credential
from app.core.settings import Settings, get_settings
from app.profiles import Profile, ProfileError, ProxyProfile, get_profiles, webhook_url_problem


def removed_profiles_in_use(session: Session, profiles: dict[str, Profile]) -> dict[str, int]:
    rows = session.exec(
        select(Credential.profile, func.count())
        .where(
            col(Credential.state).in_(UNSETTLED_CRED_STATES),
            col(Credential.profile).not_in(list(profiles)),
        )
        .group_by(Credential.profile)
    ).all()
    return dict(rows)


def upstream_problem(profile: ProxyProfile, settings: Settings | None = None) -> str | None:
    """Why `leasehold proxy` may not forward to this upstream here, or None."""
    settings = settings or get_settings()
    plain = profile.upstream.lower().startswith("http://")
    if plain and settings.env == "production" and not settings.insecure_backends:
        return "plain http is refused in production (LEASEHOLD_INSECURE_BACKENDS=1 allows it)"
    return None


def check(session: Session) -> dict[str, Profile]:
    """Raise ProfileError naming what is wrong; return the profiles."""
    profiles = get_profiles()
    missing = removed_profiles_in_use(session, profiles)
    if missing:
        named = ", ".join(f"{name!r} ({n} live credentials)" for name, n in sorted(missing.items()))
        raise ProfileError(
            f"profiles removed from the file still have live credentials: {named}; "
            "put them back (retired = true stops new mints) until those are revoked"
        )
    production = get_settings().env == "production"
    for name, profile in sorted(profiles.items()):
        problem = profile.approval_webhook and webhook_url_problem(
            profile.approval_webhook, production=production
        )
        if problem:
            raise ProfileError(f"profile '{name}': field 'approval_webhook': {problem}")
        if isinstance(profile, ProxyProfile) and (why := upstream_problem(profile)):
            raise ProfileError(f"profile '{name}': field 'upstream': {why}")
    return profiles
