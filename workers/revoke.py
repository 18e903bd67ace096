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
from app.issuers.base import Issuer, IssuerError, TemporaryIssuerError
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


# How many revoking rows one step takes (its own and others due): a burst of ends is
# revoked in batches of this, one backend transaction per issuer, while one step still
# holds its rows (locked) for no more than a few backend round trips.
BATCH = 32


def revoke(credential_id: str) -> str:
    """Idempotent: only a credential in `revoking` is acted on. The step also takes
    other revoking rows that are due (a burst), skipping rows another step holds;
    their own messages then find nothing to do. One ledger transaction: read (locked),
    backend, record, commit."""
    outcome = "skipped"
    retry: list[tuple[Credential, int, float, IssuerError]] = []
    gave_up: list[tuple[Credential, int, IssuerError]] = []
    with session_scope() as session:
        now = utcnow()
        state, rows = ledger.take_revokes(session, credential_id, now=now, limit=BATCH)
        if state == CredState.revoked:
            # Revoked already: taken along by another step's batch, or a second delivery.
            outcome = "revoked"
        if not rows:
            return outcome
        started = time.monotonic()
        errors = _revoke_in_backends(rows)
        ok = [row for row in rows if row.id not in errors]
        now = utcnow()
        done = ledger.mark_revoked_many(session, ok, now=now)
        for row in rows:
            exc = errors.get(row.id)
            if isinstance(exc, TemporaryIssuerError):
                # Backoff from the attempts the ledger counts, so it stays capped and
                # growing across re-drives (or the backend's own delay); the row is due
                # again after it, should the retry be lost.
                delay = retry_in(exc, row.attempts + 1)
                attempts = ledger.revoke_failed(session, row.id, str(exc), retry_in=delay, now=now)
                retry.append((row, attempts, delay, exc))
            elif exc is not None:
                # Refused for good (e.g. the object is not this installation's, or the
                # profile is gone): recorded as such and not retried; the reconciliation
                # still revokes the object if a backend shows it.
                failed = ledger.revoke_gave_up(session, row.id, str(exc), now=now)
                gave_up.append((row, failed.attempts if failed else row.attempts + 1, exc))
    duration = round(time.monotonic() - started, 4)
    for cred in done:
        if cred.id == credential_id:
            outcome = "revoked"
        _revoked(cred, duration)
    for cred, attempts, exc in gave_up:
        if cred.id == credential_id:
            outcome = "failed"
        _failed(cred, attempts, exc, "revoke failed for good", logging.ERROR)
    mine: RevokeFailed | None = None
    for cred, attempts, delay, exc in retry:
        _failed(cred, attempts, exc, "revoke failed", logging.WARNING)
        if cred.id == credential_id:
            mine = RevokeFailed(str(exc), attempts, delay)
        else:
            # Taken along from its own message, which found nothing to do: retried
            # after its backoff by a message of its own (or the re-drive, if lost).
            revoke_credential.apply_async((cred.id,), countdown=delay)
    if mine is not None:
        raise mine
    return outcome


def _revoke_in_backends(rows: list[Credential]) -> dict[str, IssuerError]:
    """Each row's object revoked and verified, one batch per issuer; the errors by id."""
    errors: dict[str, IssuerError] = {}
    batches: dict[int, tuple[Issuer, dict[str, list[str]]]] = {}
    for row in rows:
        ref = revoke_ref(row.issuer, row)
        if ref is None:
            continue  # nothing minted: nothing in a backend to remove
        try:
            issuer = issuer_for(row)
        except IssuerError as exc:
            errors[row.id] = exc
            continue
        refs = batches.setdefault(id(issuer), (issuer, {}))[1]
        refs.setdefault(ref, []).append(row.id)
    for issuer, refs in batches.values():
        try:
            failed = issuer.revoke_many(list(refs))
        except IssuerError as exc:
            failed = dict.fromkeys(refs, exc)
        for ref, error in failed.items():
            for cred_id in refs.get(ref, []):
                errors[cred_id] = error
    return errors


def _revoked(cred: Credential, duration: float) -> None:
    """A verified revoke, in the notifications, the metrics and the log."""
    notify.credential_changed(cred.id)
    exposure = (
        (cred.revoked_at - cred.revoke_requested_at).total_seconds()
        if cred.revoked_at and cred.revoke_requested_at
        else None
    )
    observe.revoked(cred, exposure)
    log.info(
        "revoked",
        extra={
            "credential": cred.id,
            "task": cred.task_id,
            "issuer": cred.issuer,
            "profile": cred.profile,
            "reason": cred.revoke_reason,
            "duration": duration,
            "exposure": exposure,
        },
    )


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
