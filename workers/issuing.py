"""Find the issuer for a credential: the profile from the file, the installation from the ledger."""

from __future__ import annotations

from app.core.models import Credential
from app.core.settings import get_settings
from app.issuers import get_issuer
from app.issuers.base import Issuer, PermanentIssuerError
from app.ledger import installation_id
from app.profiles import get_profiles


def issuer_for(cred: Credential) -> Issuer:
    profile = get_profiles().get(cred.profile)
    if profile is None:
        raise PermanentIssuerError(f"profile {cred.profile!r} is not in the profiles file")
    return get_issuer(profile, installation_id=installation_id(), settings=get_settings())
