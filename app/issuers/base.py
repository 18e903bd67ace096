"""The one face every issuer shows, and everything callers may know of a backend.

Nothing outside app/issuers/ knows a backend: callers group profiles by
`backend_identity()`, judge what `list_marked()` returns (each object carrying
its credential id where the mark holds it), revoke by `ref_for(row)` and name
objects with `mark()`. Each issuer maps its backend's errors through its
ErrorTable (app/issuers/errors.py). Error messages never carry a secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Protocol

from app.core.settings import Settings
from app.issuers.errors import IssuerError, PermanentIssuerError, TemporaryIssuerError
from app.profiles import Profile

__all__ = [
    "BackendIdentity",
    "Issuer",
    "IssuerError",
    "MarkedObject",
    "MintRequest",
    "Minted",
    "PermanentIssuerError",
    "Recorded",
    "TemporaryIssuerError",
    "mark",
    "mark_prefix",
]


def mark_prefix(installation_id: str) -> str:
    """What every object of this installation is named from: lh_<installation[:12]>_."""
    return f"lh_{installation_id[:12]}_"


def mark(installation_id: str, credential_id: str) -> str:
    """The name a credential's object carries: lh_<installation[:12]>_<credential>."""
    return f"{mark_prefix(installation_id)}{credential_id}"


@dataclass(frozen=True)
class MintRequest:
    """What an issuer needs to mint one credential.

    `name` is chosen by the ledger and recorded on the pending row before the
    mint, so reconciliation can recognise an object that is in flight.
    """

    credential_id: str
    name: str  # backend object name (e.g. postgres role / redis user): mark(...)
    installation_id: str
    tenant: str
    task_id: str
    task_digest: str  # digest of tenant + task id, for {task} placeholders
    expires_at: datetime  # aware UTC; backend TTL must not pass it
    # The task's forward-mode CA certificate (PEM) when it has proxy grants: a proxy
    # claim answers it as `ca`.
    task_ca: str | None = None


@dataclass
class Minted:
    """A freshly minted credential: `ref` is the handle revoke() needs."""

    ref: str
    secret: dict[str, Any]
    expires_at: datetime
    lease: str | None = None  # a lease of the secret's own that extend() must renew
    # SHA-256 (hex) of a token the holder presents to Leasehold itself (proxy); the
    # ledger keeps it to check that token, never the token.
    token_digest: str | None = None


@dataclass(frozen=True)
class MarkedObject:
    """An object in the backend that carries this installation's mark."""

    ref: str  # handle for revoke()
    credential_id: str | None = None  # from the mark; None when it names none
    name: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendIdentity:
    """Where objects live: the same identity lists the same set of objects, and
    within one `family` a ref names one object (whatever address reached it)."""

    family: str  # postgres, redis, vault
    where: str

    def __str__(self) -> str:
        return f"{self.family} {self.where}"


class Recorded(Protocol):
    """What the ledger recorded of a credential's object (a Credential, a HeldRow)."""

    @property
    def backend_name(self) -> str: ...

    @property
    def backend_ref(self) -> str | None: ...


class Issuer:
    """One backend. Instances are per process (created after fork)."""

    family: ClassVar[str]
    # True where the object is named by the ledger (mark()) and that name is its
    # ref: the ref is known before the mint, and a second mint hits the same object.
    name_is_ref: ClassVar[bool] = False
    # False where a credential lives only in the ledger (proxy): nothing in a backend to
    # list, to vanish or to clean up; the reconciliation leaves such issuers alone.
    holds_objects: ClassVar[bool] = True

    def __init__(self, profile: Any, *, installation_id: str, settings: Settings) -> None:
        self.profile = profile
        self.installation_id = installation_id
        self.prefix = mark_prefix(installation_id)

    @classmethod
    def backend_identity(cls, profile: Profile, settings: Settings) -> BackendIdentity:
        """The grouping key of a profile's backend (no connection is made)."""
        raise NotImplementedError

    @classmethod
    def ref_for(cls, recorded: Recorded) -> str | None:
        """What revoke() needs: the minted ref, or the pre-chosen name where the
        name is the ref; None for an object not minted yet (nothing to revoke)."""
        if recorded.backend_ref:
            return recorded.backend_ref
        return recorded.backend_name if cls.name_is_ref else None

    def mint(self, req: MintRequest) -> Minted:
        raise NotImplementedError

    def revoke(self, ref: str) -> None:
        """Revoke and verify it is gone. Idempotent: an absent object is fine."""
        raise NotImplementedError

    def revoke_many(self, refs: list[str]) -> dict[str, IssuerError]:
        """Revoke and verify several objects (a burst of ends); returns the refs that
        failed, each with its error (an empty dict: every one verified gone). This
        default goes one by one; a backend that can do a batch in one transaction
        overrides it, with the same guarantees per object."""
        failed: dict[str, IssuerError] = {}
        for ref in refs:
            try:
                self.revoke(ref)
            except IssuerError as exc:
                failed[ref] = exc
        return failed

    def exists(self, ref: str) -> bool:
        raise NotImplementedError

    def list_marked(self) -> list[MarkedObject]:
        raise NotImplementedError

    def extend(self, ref: str, expires_at: datetime, *, lease: str | None = None) -> None:
        """Move the backend expiry forward (a heartbeat moved the deadline)."""
        raise NotImplementedError

    def check(self) -> list[str]:
        """Start-up warnings about the backend's configuration (safe to print)."""
        return []

    def close(self) -> None:
        pass

    def credential_of(self, name: str) -> str | None:
        """The credential id a marked name ends in (lh_<installation>_<credential>)."""
        if not name.startswith(self.prefix):
            return None
        return name[len(self.prefix) :] or None

    def _own(self, name: str, what: str) -> str:
        """Refuse a name that does not carry this installation's mark."""
        if not name.startswith(self.prefix) or len(name) == len(self.prefix):
            raise PermanentIssuerError(
                f"{self.family}: refusing {what} {name!r}, not {self.prefix}*"
            )
        return name
