"""Find the issuer for a credential: the profile from the file, the installation from the ledger."""

from __future__ import annotations

from functools import lru_cache

from app import ledger
from app.issuers import get_issuer
from app.issuers.base import Issuer, PermanentIssuerError
from app.models import Credential
from app.profiles import get_profiles
from app.settings import get_settings


@lru_cache
def _installation_id_cached(url: str) -> str:
    from app.db import session_scope

    with session_scope() as session:
        return ledger.installation(session).id


def installation_id() -> str:
    """This ledger's installation id, read once per process."""
    return _installation_id_cached(get_settings().sqlalchemy_url)


def issuer_for(cred: Credential) -> Issuer:
    profile = get_profiles().get(cred.profile)
    if profile is None:
        raise PermanentIssuerError(f"profile {cred.profile!r} is not in the profiles file")
    return get_issuer(profile, installation_id=installation_id(), settings=get_settings())
