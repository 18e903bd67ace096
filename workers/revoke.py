"""Revoke a credential in its backend, verify, and record it."""

from __future__ import annotations

import logging
import time

from sqlalchemy.exc import OperationalError

from app import ledger, notify, queue
from app.core.db import session_scope
from app.core.logs import log
from app.core.models import Credential, CredState, utcnow
from app.issuers import revoke_ref
from app.issuers.base import PermanentIssuerError, TemporaryIssuerError
from app.observability import observe
from workers.backoff import retry_in
from workers.issuing import issuer_for
from workers.job import job


class RevokeFailed(Exception):
    """A temporary failure, already counted in the ledger, to be retried in `retry_in`."""

    def __init__(self, message: str, attempts: int, retry_in: float) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.retry_in = retry_in

    @property
    def delay(self) -> float:
        """What the job's retry waits: the ledger's backoff, so both agree."""
        return self.retry_in


def revoke(credential_id: str) -> str:
    """Idempotent: only a credential in `revoking` is acted on."""
    with session_scope() as session:
        cred = session.get(Credential, credential_id)
        if cred is None or cred.state != CredState.revoking:
            return "skipped"
    started = time.monotonic()
    ref = revoke_ref(cred.issuer, cred)
    try:
        if ref is not None:
            issuer_for(cred).revoke(ref)
    except TemporaryIssuerError as exc:
        # Backoff from the attempts the ledger counts, so it stays capped and growing
        # across re-drives (or the backend's own delay); the row is due again after it,
        # should the retry be lost.
        delay = retry_in(exc, cred.attempts + 1)
        with session_scope() as session:
            attempts = ledger.revoke_failed(
                session, credential_id, str(exc), retry_in=delay, now=utcnow()
            )
        _failed(cred, attempts, exc, "revoke failed", logging.WARNING)
        raise RevokeFailed(str(exc), attempts, delay) from None
    except PermanentIssuerError as exc:
        # Refused for good (e.g. the object is not this installation's, or the profile is
        # gone): recorded as such and not retried; the reconciliation still revokes the
        # object if a backend shows it.
        with session_scope() as session:
            failed = ledger.revoke_gave_up(session, credential_id, str(exc), now=utcnow())
        attempts = failed.attempts if failed is not None else cred.attempts + 1
        _failed(cred, attempts, exc, "revoke failed for good", logging.ERROR)
        return "failed"
    with session_scope() as session:
        done = ledger.mark_revoked(session, credential_id, now=utcnow())
    if done is None:
        return "skipped"
    notify.credential_changed(credential_id)
    exposure = (
        (done.revoked_at - done.revoke_requested_at).total_seconds()
        if done.revoked_at and done.revoke_requested_at
        else None
    )
    observe.revoked(done, exposure)
    log.info(
        "revoked",
        extra={
            "credential": credential_id,
            "task": done.task_id,
            "issuer": done.issuer,
            "profile": done.profile,
            "reason": done.revoke_reason,
            "duration": round(time.monotonic() - started, 4),
            "exposure": exposure,
        },
    )
    return "revoked"


def _failed(cred: Credential, attempts: int, exc: Exception, message: str, level: int) -> None:
    """A failed revoke, in the metrics and the log."""
    observe.revoke_failed(cred, attempts, str(exc))
    extra = {"credential": cred.id, "issuer": cred.issuer, "attempts": attempts, "error": str(exc)}
    log.log(level, message, extra=extra)


# A failed attempt (counted in the ledger, retried after its `delay`) or the ledger itself
# out of reach (backoff). Past max_retries the deadline sweep enqueues it again when it is
# due: it never stops.
@job(queue.REVOKE, max_retries=10, retry_on=(RevokeFailed, OperationalError))
def revoke_credential(credential_id: str) -> str:
    return revoke(credential_id)
