"""The one face every issuer shows: mint, revoke, exists, list_marked.

Nothing outside an issuer knows its backend; each maps its backend's errors
onto TemporaryIssuerError (retry with backoff) or PermanentIssuerError (mark
failed and surface it). Error messages never carry a secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol


class IssuerError(Exception):
    """Base of issuer errors; the message is safe to log (never a secret)."""


class TemporaryIssuerError(IssuerError):
    """The backend could not be reached or was busy: try again later."""


class PermanentIssuerError(IssuerError):
    """The backend refused for good (bad config, object never existed)."""


@dataclass(frozen=True)
class MintRequest:
    """What an issuer needs to mint one credential.

    `name` is chosen by the ledger and recorded on the pending row before the
    mint, so reconciliation can recognise an object that is in flight.
    """

    credential_id: str
    name: str  # backend object name (e.g. postgres role / redis user), starts with lh_
    installation_id: str
    tenant: str
    task_id: str
    task_digest: str  # digest of tenant + task id, for {task} placeholders
    expires_at: datetime  # aware UTC; backend TTL must not pass it


@dataclass
class Minted:
    """A freshly minted credential: `ref` is the handle revoke() needs."""

    ref: str
    secret: dict[str, Any]
    expires_at: datetime


@dataclass(frozen=True)
class MarkedObject:
    """An object in the backend that carries this installation's mark."""

    ref: str  # handle for revoke()
    credential_id: str | None = None  # from the mark, when the backend keeps it
    name: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


class Issuer(Protocol):
    """One backend. Instances are per process (created after fork)."""

    def mint(self, req: MintRequest) -> Minted: ...

    def revoke(self, ref: str) -> None:
        """Revoke and verify it is gone. Idempotent: an absent object is fine."""

    def exists(self, ref: str) -> bool: ...

    def list_marked(self) -> list[MarkedObject]: ...

    def extend(self, ref: str, expires_at: datetime) -> None:
        """Move the backend expiry forward (a heartbeat moved the deadline)."""

    def check(self) -> list[str]:
        """Start-up warnings about the backend's configuration (safe to print)."""

    def close(self) -> None: ...
