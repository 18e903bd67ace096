"""Redis issuer: one ACL user per credential.

The password reaches Redis only as `#<sha256 hex>` (never `>plaintext`), and
each ACL rule travels as its own argument so no rule can smuggle in another.
ACL users have no TTL: the deadline sweep and reconciliation are the backstop.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.core.settings import Settings
from app.issuers.base import (
    BackendIdentity,
    Issuer,
    MarkedObject,
    Minted,
    MintRequest,
    PermanentIssuerError,
    TemporaryIssuerError,
)
from app.issuers.errors import ErrorTable, Kind
from app.profiles import Profile, RedisProfile

# Rules Redis always needs from a client: a health check and choosing the db.
BASE_RULES = ("+ping", "+select")
# Values filled into {task}/{credential}: nothing that widens a key pattern.
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
# The issuer owns the password and the on/off switch; a profile may not.
_RESERVED_RULES = re.compile(r"^(?:[<>#!].*|nopass|resetpass|reset|on|off)$", re.IGNORECASE)


def credential_url(url: str, username: str, password: str) -> str:
    """The profile's URL with its userinfo replaced by the credential's."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    userinfo = f"{quote(username, safe='')}:{quote(password, safe='')}"
    query = urlencode(
        [
            (k, v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
            if k not in ("username", "password")
        ]
    )
    return urlunsplit((parts.scheme, f"{userinfo}@{hosts}", parts.path, query, parts.fragment))


class RedisIssuer(Issuer):
    """Mints ACL users on the Redis server behind `profile.url` (an admin connection)."""

    family = "redis"
    name_is_ref = True  # the user's name, chosen by the ledger

    def __init__(self, profile: RedisProfile, *, installation_id: str, settings: Settings) -> None:
        super().__init__(profile, installation_id=installation_id, settings=settings)
        self.profile: RedisProfile = profile
        raw = urlsplit(profile.url).password
        self._url_passwords = tuple(p for p in (raw, raw and unquote(raw)) if p)
        # No connection is made here. One retry on a broken connection (a
        # restarted server) and none on timeouts, so each call stays bounded.
        self._client = redis.Redis.from_url(
            profile.url,
            socket_timeout=settings.backend_timeout,
            socket_connect_timeout=settings.backend_timeout,
            decode_responses=True,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )

    @classmethod
    def backend_identity(cls, profile: Profile, settings: Settings) -> BackendIdentity:
        # ACL users are server-wide, whatever the db number.
        assert isinstance(profile, RedisProfile)
        parts = urlsplit(profile.url)
        where = f"{(parts.hostname or '').lower()}:{parts.port or 6379}"
        return BackendIdentity(cls.family, where if parts.hostname else parts.path)

    def rules(self, req: MintRequest) -> list[str]:
        """The profile's ACL rules for one credential, placeholders filled."""
        for label, value in (("task digest", req.task_digest), ("credential", req.credential_id)):
            if not _SAFE_VALUE.fullmatch(value):
                raise PermanentIssuerError(f"redis mint: unsafe {label} for an ACL rule")
        rules = [
            rule.replace("{task}", req.task_digest).replace("{credential}", req.credential_id)
            for rule in self.profile.acl.split()
        ]
        for rule in rules:
            if _RESERVED_RULES.match(rule):
                raise PermanentIssuerError(
                    f"redis mint: profile '{self.profile.name}' may not set passwords or"
                    f" switch users on/off in its acl"
                )
        return [*rules, *BASE_RULES]

    def mint(self, req: MintRequest) -> Minted:
        name = self._own(req.name, "user")
        rules = self.rules(req)
        password = secrets.token_urlsafe(32)
        digest = hashlib.sha256(password.encode()).hexdigest()
        # `reset` first: a retried mint overwrites the user, old password included.
        with self._errors("mint", password, digest):
            self._client.execute_command(
                "ACL", "SETUSER", name, "reset", "on", f"#{digest}", *rules
            )
        return Minted(
            ref=name,
            secret={
                "username": name,
                "password": password,
                "url": credential_url(self.profile.url, name, password),
                "key_prefix": req.task_digest,
            },
            expires_at=req.expires_at,
        )

    def revoke(self, ref: str) -> None:
        name = self._own(ref, "user")
        with self._errors("revoke"):
            # One round trip. CLIENT KILL must precede DELUSER: afterwards the
            # user is unknown to it.
            pipe = self._client.pipeline(transaction=False)
            pipe.execute_command("CLIENT", "KILL", "USER", name)
            pipe.execute_command("ACL", "DELUSER", name)
            pipe.execute_command("ACL", "GETUSER", name)
            killed, _deleted, remaining = pipe.execute(raise_on_error=False)
            for result in (killed, _deleted, remaining):
                if isinstance(result, redis.ResponseError) and not _no_such_user(result):
                    raise result
        if remaining is not None and not isinstance(remaining, redis.ResponseError):
            raise TemporaryIssuerError(f"redis revoke: user {name} still exists after DELUSER")

    def exists(self, ref: str) -> bool:
        with self._errors("exists"):
            return self._client.execute_command("ACL", "GETUSER", ref) is not None

    def list_marked(self) -> list[MarkedObject]:
        with self._errors("list"):
            users: list[str] = self._client.execute_command("ACL", "USERS")
        # Redis users carry no comment: the name is the mark, and it ends in
        # the credential id (lh_<installation[:12]>_<credential id>).
        return [
            MarkedObject(ref=user, credential_id=self.credential_of(user), name=user)
            for user in sorted(users)
            if user.startswith(self.prefix)
        ]

    def extend(self, ref: str, expires_at: datetime, *, lease: str | None = None) -> None:
        """ACL users have no TTL; the deadline sweep is what ends them."""

    def close(self) -> None:
        self._client.close()

    @contextmanager
    def _errors(self, action: str, *secrets_: str) -> Iterator[None]:
        """Map backend errors to temporary/permanent, with messages safe to log."""
        with ERRORS.guard(action, *self._url_passwords, *secrets_):
            yield


def _no_such_user(result: Any) -> bool:
    return "no such user" in str(result).lower()


ERRORS = ErrorTable(
    backend="redis",
    catches=(redis.RedisError,),
    rules=(
        # A wrong admin password is configuration, not a passing outage.
        (redis.AuthenticationError, Kind.permanent),
        (redis.exceptions.AuthorizationError, Kind.permanent),
        (redis.ConnectionError, Kind.temporary),
        (redis.TimeoutError, Kind.temporary),
        # A replica after failover, or a server still loading, comes back.
        (redis.exceptions.ReadOnlyError, Kind.temporary),
        (redis.exceptions.TryAgainError, Kind.temporary),
    ),
    default=Kind.permanent,
)
