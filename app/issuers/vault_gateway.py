"""A thin gateway to Vault/OpenBao: one hvac client per process, explicit errors.

The gateway keeps Leasehold's own token alive (renew-self, or a fresh AppRole
login) and maps hvac/requests failures onto the issuer error kinds. Error
messages and logs never carry a token: hvac's exception text is summarised, not
passed on, and exceptions are raised `from None` so tracebacks hold no response
bodies.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import hvac
import hvac.exceptions as hv
import requests

from app.core.settings import Settings
from app.issuers.errors import ErrorTable, IssuerError, Kind, PermanentIssuerError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Vault/OpenBao tokens (s./b./r. legacy, hvs./hvb./hvr. current) and wrapping tokens.
_TOKEN_RE = re.compile(r"\b(?:hv[sbr]|[sbr])\.[A-Za-z0-9_-]{16,}")


def _describe(exc: BaseException) -> str:
    """hvac's text summarised (tokens redacted), requests' only named."""
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.RequestException):
        return f"cannot reach Vault ({type(exc).__name__})"
    assert isinstance(exc, hv.VaultError)
    errors = exc.errors or ([exc.args[0]] if exc.args and exc.args[0] else [])
    text = "; ".join(str(e).strip() for e in errors if str(e).strip()) or "no detail"
    text = re.sub(r"\s+", " ", text.replace("1 error occurred:", "")).strip(" *")
    return f"{type(exc).__name__}: {_TOKEN_RE.sub('<redacted>', text)[:300]}"


ERRORS = ErrorTable(
    backend="vault",
    catches=(hv.VaultError, requests.RequestException),
    rules=(
        (requests.RequestException, Kind.temporary),
        (hv.Forbidden, Kind.permanent),
        (hv.InvalidRequest, Kind.permanent),
        (hv.InvalidPath, Kind.permanent),
        (hv.Unauthorized, Kind.permanent),
        # VaultDown, InternalServerError, BadGateway, RateLimitExceeded,
        # VaultNotInitialized, UnexpectedError, and whatever hvac does not
        # classify: retrying is the safe side.
    ),
    default=Kind.temporary,
    describe=_describe,
    # A 429 says "slow down": not the first backoff step (half a second) again.
    delays=((hv.RateLimitExceeded, 2.0),),
)


def is_invalid_accessor(exc: Exception) -> bool:
    return isinstance(exc, hv.InvalidRequest) and "invalid accessor" in str(exc.errors or exc)


class VaultGateway:
    """One authenticated hvac client for this process, plus the calls issuers need."""

    def __init__(self, settings: Settings) -> None:
        if not settings.vault_addr:
            raise PermanentIssuerError("LEASEHOLD_VAULT_ADDR is not set")
        self._addr = settings.vault_addr
        self._timeout = settings.vault_timeout
        self._static_token = settings.vault_token
        self._role_id = settings.vault_role_id
        self._secret_id = settings.vault_secret_id
        if self._static_token is None and not self._role_id:
            raise PermanentIssuerError(
                "set LEASEHOLD_VAULT_TOKEN or LEASEHOLD_VAULT_ROLE_ID/LEASEHOLD_VAULT_SECRET_ID"
            )
        self.client = hvac.Client(url=self._addr, timeout=self._timeout)  # type: ignore[arg-type]  # stub says int; requests takes a float
        self._lock = threading.Lock()
        self._ready = False
        # Own-token bookkeeping on the monotonic clock; _expires_at None = never expires.
        self._expires_at: float | None = None
        self._span = 0.0  # the token's nominal TTL (or period): renew past half of it
        self._renewable = False
        self._warned = False

    @property
    def uses_approle(self) -> bool:
        return bool(self._role_id)

    # -- Leasehold's own token -------------------------------------------------

    def ensure_token(self, *, relogin: bool = False) -> None:
        """Make sure Leasehold's own token is valid and not about to expire.

        Cheap when nothing is due (a clock comparison), so every call runs it.
        """
        with self._lock:
            if relogin and self.uses_approle:
                self._login()
                return
            if not self._ready:
                self._authenticate()
                return
            if self._expires_at is None:
                return
            now = time.monotonic()
            remaining = self._expires_at - now
            if remaining >= self._span / 2:
                return
            if self._renewable and remaining > 0:
                try:
                    self._renew()
                except IssuerError:
                    if not self.uses_approle:
                        raise
                    log.warning("renewing Leasehold's Vault token failed; logging in again")
                    self._login()
                    return
                remaining = (self._expires_at or now) - time.monotonic()
                if remaining >= self._span / 2:
                    return
            # Not renewable, expired, or renewal capped by its max TTL.
            if self.uses_approle:
                self._login()
            elif not self._warned:
                self._warned = True
                log.warning(
                    "Leasehold's Vault token expires in %.0f s and cannot be renewed; "
                    "replace LEASEHOLD_VAULT_TOKEN or use AppRole",
                    max(remaining, 0.0),
                )

    def _authenticate(self) -> None:
        if self._static_token is not None:
            self.client.token = self._static_token.get_secret_value()
            self._inspect()
        else:
            self._login()
        self._ready = True

    def _login(self) -> None:
        secret_id = self._secret_id.get_secret_value() if self._secret_id else None
        with ERRORS.guard("approle login"):
            resp = self.client.auth.approle.login(role_id=self._role_id, secret_id=secret_id)
        auth = resp["auth"]
        ttl = int(auth.get("lease_duration") or 0)
        self._track(ttl=ttl, span=ttl, renewable=bool(auth.get("renewable")))
        self._ready = True
        self._warned = False
        log.info("logged in to Vault by AppRole (token ttl %d s)", ttl)

    def _inspect(self) -> None:
        try:
            with ERRORS.guard("lookup-self"):
                data = self.client.auth.token.lookup_self()["data"]
        except PermanentIssuerError as exc:
            # A token without lookup-self (no default policy): its TTL is unknown.
            log.warning("cannot look up Leasehold's own Vault token, so it is not renewed: %s", exc)
            self._track(ttl=0, span=0, renewable=False)
            return
        ttl = int(data.get("ttl") or 0)
        span = int(data.get("period") or data.get("creation_ttl") or ttl)
        self._track(ttl=ttl, span=span, renewable=bool(data.get("renewable")))

    def _renew(self) -> None:
        with ERRORS.guard("renew-self"):
            resp = self.client.auth.token.renew_self()
        auth = resp["auth"]
        ttl = int(auth.get("lease_duration") or 0)
        self._track(ttl=ttl, span=self._span, renewable=bool(auth.get("renewable")))
        log.info("renewed Leasehold's Vault token (ttl %d s)", ttl)

    def _track(self, *, ttl: int, span: float, renewable: bool) -> None:
        self._expires_at = time.monotonic() + ttl if ttl > 0 else None
        self._span = float(span or ttl)
        self._renewable = renewable

    # -- calls -----------------------------------------------------------------

    def call(self, what: str, fn: Callable[[hvac.Client], T]) -> T:
        """Run fn with the authenticated client, mapping errors.

        A 403 under AppRole may mean our token lapsed: log in again, retry once.
        """
        self.ensure_token()
        try:
            return fn(self.client)
        except hv.Forbidden as exc:
            if not self.uses_approle:
                raise ERRORS.map(what, exc) from None
        except Exception as exc:
            raise ERRORS.map(what, exc) from None
        self.ensure_token(relogin=True)
        with ERRORS.guard(what):
            return fn(self.client)

    def client_for(self, token: str) -> hvac.Client:
        """A client acting as another token; shares our connection pool."""
        return hvac.Client(
            url=self._addr,
            token=token,
            timeout=self._timeout,  # type: ignore[arg-type]  # stub says int; requests takes a float
            session=self.client.session,
        )

    def create_token(
        self,
        *,
        policies: list[str],
        ttl: int,
        explicit_max_ttl: int,
        meta: dict[str, str],
        display_name: str,
    ) -> dict[str, Any]:
        """A renewable child of Leasehold's token with exactly these policies.

        Vault adds its `default` policy (lookup-self, cubbyhole, ...) unless told
        not to: the token gets it only when `policies` names it.
        """
        resp = self.call(
            "create token",
            lambda c: c.auth.token.create(
                policies=policies,
                no_default_policy="default" not in policies,
                renewable=True,
                ttl=f"{ttl}s",
                explicit_max_ttl=f"{explicit_max_ttl}s",
                meta=meta,
                display_name=display_name,
            ),
        )
        auth: dict[str, Any] = resp["auth"]
        return auth

    def lookup_accessor(self, accessor: str) -> dict[str, Any] | None:
        """The token's properties, or None when no token has this accessor."""
        self.ensure_token()
        try:
            data: dict[str, Any] = self.client.auth.token.lookup_accessor(accessor)["data"]
            return data
        except hv.InvalidRequest as exc:
            if is_invalid_accessor(exc):
                return None
            raise ERRORS.map("lookup-accessor", exc) from None
        except Exception as exc:
            raise ERRORS.map("lookup-accessor", exc) from None

    def revoke_accessor(self, accessor: str) -> None:
        """Revoke the token and its children; an unknown accessor is fine."""
        self.ensure_token()
        try:
            self.client.auth.token.revoke_accessor(accessor)
        except hv.InvalidRequest as exc:
            if not is_invalid_accessor(exc):
                raise ERRORS.map("revoke-accessor", exc) from None
        except Exception as exc:
            raise ERRORS.map("revoke-accessor", exc) from None

    def renew_accessor(self, accessor: str, increment: int) -> int:
        """Renew by accessor; returns the TTL Vault granted (capped by its max)."""
        resp = self.call(
            "renew-accessor",
            lambda c: c.auth.token.renew_accessor(accessor, increment=f"{increment}s"),
        )
        return int(resp["auth"]["lease_duration"])

    def renew_lease(self, lease_id: str, increment: int) -> int:
        """Renew (or shorten: Vault counts `increment` from now) a secret's lease;
        returns the TTL Vault granted."""
        resp = self.call("renew lease", lambda c: c.sys.renew_lease(lease_id, increment=increment))
        return int((resp or {}).get("lease_duration") or 0)

    def revoke_lease(self, lease_id: str) -> None:
        self.call("revoke lease", lambda c: c.sys.revoke_lease(lease_id))

    def list_accessors(self) -> list[str]:
        """Every token accessor (needs sudo on auth/token/accessors)."""
        resp = self.call("list accessors", lambda c: c.auth.token.list_accessors())
        return list(((resp or {}).get("data") or {}).get("keys") or [])

    def write_policy(self, name: str, rules: str) -> None:
        self.call("write policy", lambda c: c.sys.create_or_update_policy(name, rules))

    def close(self) -> None:
        self.client.adapter.close()


_gateways: dict[tuple[Any, ...], VaultGateway] = {}
_gateways_lock = threading.Lock()


def _key(settings: Settings) -> tuple[Any, ...]:
    token = settings.vault_token.get_secret_value() if settings.vault_token else None
    secret_id = settings.vault_secret_id.get_secret_value() if settings.vault_secret_id else None
    # pid first: a forked child never reuses its parent's connections.
    return (
        os.getpid(),
        settings.vault_addr,
        token,
        settings.vault_role_id,
        secret_id,
        settings.vault_timeout,
    )


def get_gateway(settings: Settings) -> VaultGateway:
    """This process's gateway for these settings."""
    key = _key(settings)
    with _gateways_lock:
        gateway = _gateways.get(key)
        if gateway is None:
            gateway = _gateways[key] = VaultGateway(settings)
        return gateway


def close_gateways() -> None:
    with _gateways_lock:
        for key, gateway in list(_gateways.items()):
            if key[0] == os.getpid():
                gateway.close()
        _gateways.clear()


def renew_own_token(settings: Settings) -> None:
    """Beat task body: keep Leasehold's own token valid (no-op without Vault)."""
    if not settings.vault_addr:
        return
    get_gateway(settings).ensure_token()
