"""Checks run before any process serves: profiles valid, none removed while live."""

from __future__ import annotations

import logging

from sqlmodel import Session, col, func, select

from app.models import UNSETTLED_CRED_STATES, Credential
from app.profiles import Profile, ProfileError, get_profiles

logger = logging.getLogger("leasehold")


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
    return profiles
