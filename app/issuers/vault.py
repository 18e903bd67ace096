"""Vault/OpenBao issuers: a scoped token (vault-token) or a dynamic secret read
through a per-credential token (vault-dynamic).

Both mint a token that carries the mark in its metadata, so both revoke, check,
extend and list the same way: by the token's accessor. For vault-dynamic,
revoking the per-credential token revokes every lease it created (also when the
secret was response-wrapped), and its expiry does the same if Leasehold dies.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from app.core.settings import Settings
from app.issuers.base import (
    BackendIdentity,
    Issuer,
    IssuerError,
    MarkedObject,
    Minted,
    MintRequest,
    PermanentIssuerError,
    TemporaryIssuerError,
)
from app.issuers.vault_gateway import ERRORS, VaultGateway, get_gateway
from app.profiles import Profile, VaultDynamicProfile, VaultTokenProfile

log = logging.getLogger(__name__)

_LOOKUP_THREADS = 8  # list_marked looks tokens up one request each; overlap them


def _seconds_until(when: datetime, *, cap: int) -> int:
    """Whole seconds until `when` (rounded down so the backend never outlives
    it), at least 1, at most `cap`."""
    left = int((when - datetime.now(UTC)).total_seconds())
    return max(1, min(left, cap))


class _TokenIssuer(Issuer):
    """Shared by both Vault issuers: per-credential tokens, found by accessor."""

    issuer = "vault-token"
    family = "vault"  # the ref is the token's accessor, known only after the mint

    def __init__(
        self,
        profile: VaultTokenProfile | VaultDynamicProfile,
        *,
        installation_id: str,
        settings: Settings,
    ) -> None:
        super().__init__(profile, installation_id=installation_id, settings=settings)
        self._gateway: VaultGateway = get_gateway(settings)

    @classmethod
    def backend_identity(cls, profile: Profile, settings: Settings) -> BackendIdentity:
        # Tokens are listed per profile (their metadata names it).
        return BackendIdentity(cls.family, f"{settings.vault_addr or ''}#{profile.name}")

    def _create_token(self, req: MintRequest, policies: list[str]) -> tuple[dict[str, Any], int]:
        """Create the credential's token; returns (auth block, granted ttl)."""
        ttl = _seconds_until(req.expires_at, cap=self.profile.max_ttl)
        auth = self._gateway.create_token(
            policies=policies,
            ttl=ttl,
            explicit_max_ttl=self.profile.max_ttl,
            meta={
                "leasehold": self.installation_id,
                "credential": req.credential_id,
                "task": req.task_digest,
                # Lets each profile's reconciliation list only its own tokens.
                "profile": self.profile.name,
            },
            display_name=f"lh-{req.credential_id}",
        )
        return auth, int(auth.get("lease_duration") or ttl)

    def _discard(self, accessor: str) -> None:
        """Best-effort cleanup after a failed mint; reconciliation is the backstop."""
        try:
            self._gateway.revoke_accessor(accessor)
        except IssuerError as exc:
            log.warning("could not revoke the token of a failed %s mint: %s", self.issuer, exc)

    def revoke(self, ref: str) -> None:
        with ERRORS.guard("revoke"):
            self._gateway.revoke_accessor(ref)
            if self._gateway.lookup_accessor(ref) is not None:
                raise TemporaryIssuerError("vault token still present after revoke")

    def exists(self, ref: str) -> bool:
        with ERRORS.guard("exists"):
            return self._gateway.lookup_accessor(ref) is not None

    def extend(self, ref: str, expires_at: datetime, *, lease: str | None = None) -> None:
        """Renew the token by accessor to the new deadline, and the secret's lease with it.

        Vault caps the token at its explicit max TTL (the profile's max_ttl, counted
        from the mint), and a lease at its engine's maximum: the backend never holds
        either past the deadline, and may end them sooner.
        """
        with ERRORS.guard("extend"):
            if self._gateway.lookup_accessor(ref) is None:
                raise PermanentIssuerError("vault token no longer exists; cannot extend")
            increment = _seconds_until(expires_at, cap=self.profile.max_ttl)
            self._gateway.renew_accessor(ref, increment)
            if lease is not None:
                self._gateway.renew_lease(lease, increment)

    def list_marked(self) -> list[MarkedObject]:
        with ERRORS.guard("list"):
            accessors = self._gateway.list_accessors()
            with ThreadPoolExecutor(max_workers=_LOOKUP_THREADS) as pool:
                tokens = list(pool.map(self._gateway.lookup_accessor, accessors))
        marked = []
        for accessor, data in zip(accessors, tokens, strict=True):
            meta = (data or {}).get("meta") or {}
            if meta.get("leasehold") != self.installation_id:
                continue
            if meta.get("profile") != self.profile.name:
                continue
            marked.append(
                MarkedObject(
                    ref=accessor,
                    credential_id=meta.get("credential"),
                    name=(data or {}).get("display_name"),
                    extra={
                        "task": meta.get("task", ""),
                        "profile": self.profile.name,
                        "expire_time": (data or {}).get("expire_time") or "",
                    },
                )
            )
        return marked

    def close(self) -> None:
        # The gateway is shared by this process's Vault issuers; close_gateways() ends it.
        pass


class VaultTokenIssuer(_TokenIssuer):
    """A token with only the profile's policies; secret {token, accessor}."""

    issuer = "vault-token"

    def __init__(
        self, profile: VaultTokenProfile, *, installation_id: str, settings: Settings
    ) -> None:
        super().__init__(profile, installation_id=installation_id, settings=settings)
        self.profile: VaultTokenProfile = profile

    def mint(self, req: MintRequest) -> Minted:
        now = datetime.now(UTC)
        with ERRORS.guard("mint"):
            auth, ttl = self._create_token(req, list(self.profile.policies))
        return Minted(
            ref=auth["accessor"],
            secret={"token": auth["client_token"], "accessor": auth["accessor"]},
            expires_at=min(req.expires_at, now + timedelta(seconds=ttl)),
        )


class VaultDynamicIssuer(_TokenIssuer):
    """Reads profile.path with a fresh per-credential token; the token is the ref."""

    issuer = "vault-dynamic"

    def __init__(
        self, profile: VaultDynamicProfile, *, installation_id: str, settings: Settings
    ) -> None:
        super().__init__(profile, installation_id=installation_id, settings=settings)
        self.profile: VaultDynamicProfile = profile
        self.path = profile.path.strip("/")
        # Vault stores policy names in lower case; tokens must name it the same way.
        self.policy = f"lh-{installation_id[:12]}-{profile.name}".lower()
        self._policy_lock = threading.Lock()
        self._policy_ready = False

    def _ensure_policy(self) -> None:
        with self._policy_lock:
            if self._policy_ready:
                return
            # json.dumps quotes the path as an HCL string.
            rules = f'path {json.dumps(self.path)} {{\n  capabilities = ["read", "update"]\n}}\n'
            self._gateway.write_policy(self.policy, rules)
            self._policy_ready = True

    def mint(self, req: MintRequest) -> Minted:
        now = datetime.now(UTC)
        with ERRORS.guard("mint"):
            self._ensure_policy()
            auth, ttl = self._create_token(req, [self.policy])
            try:
                secret, lease = self._read(auth["client_token"], wrap_ttl=ttl)
                if lease is not None:
                    lease_ttl = self._bound_lease(*lease, req.expires_at)
                    ttl = min(ttl, lease_ttl)
            except BaseException:
                self._discard(auth["accessor"])
                raise
        expires_at = min(req.expires_at, now + timedelta(seconds=ttl))
        return Minted(
            ref=auth["accessor"],
            secret=secret,
            expires_at=expires_at,
            lease=lease[0] if lease is not None else None,
        )

    def _bound_lease(self, lease_id: str, duration: int, deadline: datetime) -> int:
        """Make the secret's own lease end by the deadline; returns its TTL.

        The token's expiry revokes the lease too, but only while Vault's expiration
        manager gets to it; the lease's own TTL (a database role's VALID UNTIL, say)
        must not promise more. Vault counts a renewal's increment from now, so a
        renewal with the seconds left shortens a longer lease. An engine that will
        not shorten it fails the mint (fail closed).
        """
        left = _seconds_until(deadline, cap=self.profile.max_ttl)
        if 0 < duration <= left:
            return duration
        try:
            granted = self._gateway.renew_lease(lease_id, left)
        except IssuerError as exc:
            raise PermanentIssuerError(
                f"vault read {self.path}: the lease cannot be shortened to the deadline ({exc})"
            ) from None
        if not 0 < granted <= left:
            raise PermanentIssuerError(
                f"vault read {self.path}: the lease lasts {granted} s, past the deadline"
            )
        return granted

    def _read(self, token: str, *, wrap_ttl: int) -> tuple[dict[str, Any], tuple[str, int] | None]:
        """Read the path as the credential's token: (secret, (lease id, seconds) or None).

        A wrapped response hides the lease from Leasehold: the token's TTL bounds it.
        """
        client = self._gateway.client_for(token)
        wrap = f"{wrap_ttl}s" if self.profile.wrap else None
        with ERRORS.guard(f"read {self.path}"):
            resp = client.read(self.path, wrap_ttl=wrap)
        if not isinstance(resp, dict):
            raise PermanentIssuerError(f"vault read {self.path}: no secret at this path")
        if self.profile.wrap:
            wrap_info = resp.get("wrap_info") or {}
            if not wrap_info.get("token"):
                raise PermanentIssuerError(f"vault read {self.path}: response was not wrapped")
            return {"wrap_token": wrap_info["token"]}, None
        data = resp.get("data")
        if not isinstance(data, dict):
            raise PermanentIssuerError(f"vault read {self.path}: response carried no data")
        lease_id = resp.get("lease_id") or ""
        # A static secret (kv) has no lease: nothing outlives the token there.
        lease = (lease_id, int(resp.get("lease_duration") or 0)) if lease_id else None
        return data, lease
