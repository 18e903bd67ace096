"""The `proxy` issuer: a static secret that is never handed out (PRODUCT.md "Brokered access").

Minting makes a per-credential proxy token: the claim answers it once (sealed like
every claim answer until then) with the credential's proxy URL, and the ledger keeps
only its SHA-256 (`Minted.token_digest`). `leasehold proxy` (app/proxy/) checks the
token against that digest and adds the static secret, read from Vault/OpenBao KV v2
here (`read_secret`), to requests to the profile's one upstream.

Nothing exists in a backend: revoking is the ledger's (the proxy refuses a credential
that is not `active` for a running task), `list_marked` shows nothing, and the
reconciliation leaves this issuer alone (`holds_objects = False`).
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

from app.core.settings import Settings
from app.issuers.base import (
    BackendIdentity,
    Issuer,
    MarkedObject,
    Minted,
    MintRequest,
    PermanentIssuerError,
)
from app.issuers.vault_gateway import ERRORS, get_gateway
from app.profiles import Profile, ProxyProfile

TOKEN_PREFIX = "lhp."  # noqa: S105  (a prefix, recognisable in a leak scan)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What the ledger keeps of a proxy token (a 256-bit random token needs no slow hash)."""
    return hashlib.sha256(token.encode()).hexdigest()


def proxy_url(settings: Settings, credential_id: str) -> str:
    return f"{settings.proxy_public_url.rstrip('/')}/p/{credential_id}"


class ProxyIssuer(Issuer):
    family = "proxy"
    # The ref is the ledger's own name for the credential: there is no backend object.
    name_is_ref = True
    holds_objects = False

    def __init__(self, profile: ProxyProfile, *, installation_id: str, settings: Settings) -> None:
        super().__init__(profile, installation_id=installation_id, settings=settings)
        self.profile: ProxyProfile = profile
        self.settings = settings

    @classmethod
    def backend_identity(cls, profile: Profile, settings: Settings) -> BackendIdentity:
        return BackendIdentity(cls.family, "ledger")

    def mint(self, req: MintRequest) -> Minted:
        token = new_token()
        return Minted(
            ref=req.name,
            secret={
                "proxy_url": proxy_url(self.settings, req.credential_id),
                "token": token,
                "ca": req.task_ca,  # forward mode's CA for this task (PEM)
            },
            expires_at=req.expires_at,
            token_digest=token_digest(token),
        )

    def revoke(self, ref: str) -> None:
        """Nothing to remove: the ledger's state is what the proxy checks."""

    def exists(self, ref: str) -> bool:
        return True  # held exactly as long as the ledger holds it

    def list_marked(self) -> list[MarkedObject]:
        return []

    def extend(self, ref: str, expires_at: datetime, *, lease: str | None = None) -> None:
        """The proxy reads the deadline from the ledger: nothing to move."""

    def read_secret(self) -> str:
        """The static secret (KV v2 `path#field`), for the proxy only: never stored,
        logged or answered. A value holding CR, LF or NUL is refused (header injection)."""
        path, field = self.profile.secret_path, self.profile.secret_field
        gateway = get_gateway(self.settings)
        with ERRORS.guard(f"read {path}"):
            resp = gateway.call(f"read {path}", lambda c: c.read(path))
        data = (resp or {}).get("data") if isinstance(resp, dict) else None
        inner = data.get("data") if isinstance(data, dict) else None
        if (
            not isinstance(data, dict)
            or not isinstance(inner, dict)
            or not isinstance(data.get("metadata"), dict)
        ):
            raise PermanentIssuerError(f"vault read {path}: no KV v2 secret at this path")
        value = inner.get(field)
        if not isinstance(value, str) or not value:
            raise PermanentIssuerError(f"vault read {path}: no text field {field!r}")
        if any(c in value for c in "\r\n\x00"):
            raise PermanentIssuerError(f"vault read {path}: field {field!r} holds CR, LF or NUL")
        return value
