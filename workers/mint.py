"""Mint a pending credential; revoke it at once if its task ended meanwhile."""

from __future__ import annotations

import time
import uuid
from typing import Any

from celery import Task as CeleryTask
from sqlalchemy.exc import OperationalError

from app import ledger, notify, queue
from app.core import sealing
from app.core.db import session_scope
from app.core.logs import log
from app.core.models import Credential, CredState, utcnow
from app.issuers import revoke_ref
from app.issuers.base import MintRequest, PermanentIssuerError, TemporaryIssuerError
from app.ledger import installation_id
from app.observability import observe
from app.queue import enqueue_revoke
from workers.issuing import issuer_for
from workers.job import job


def mint(credential_id: str, token: str | None = None) -> str:
    """Idempotent: anything but a pending credential is left alone, and so is one whose
    mint another delivery is running (its lease). `token` names this delivery (the
    Celery task id, which its retries keep); None: a delivery of its own."""
    token = token or uuid.uuid4().hex
    with session_scope() as session:
        # The inputs and, for a pending credential, the lease: one round trip.
        inputs = ledger.begin_mint_with_inputs(session, credential_id, token=token, now=utcnow())
        if inputs is None or inputs[0].state != CredState.pending:
            return "skipped"
        cred, task, task_ca, leased = inputs
        if not leased:
            log.info("mint already in flight; this delivery does nothing", extra=_fields(cred))
            return "busy"
        assert cred.expires_at is not None
        subject = (cred.tenant, cred.profile, task.workload, task.source)
        req = MintRequest(
            credential_id=cred.id,
            name=cred.backend_name,
            installation_id=installation_id(),
            tenant=cred.tenant,
            task_id=task.name,
            task_digest=sealing.task_digest(cred.tenant, task.name),
            expires_at=cred.expires_at,
            task_ca=task_ca,
        )
    started = time.monotonic()
    try:
        issuer = issuer_for(cred)
        minted = issuer.mint(req)
    except PermanentIssuerError as exc:
        with session_scope() as session:
            ledger.mark_mint_failed(session, credential_id, str(exc), token=token, now=utcnow())
        log.error("mint failed", extra=_fields(cred, error=str(exc)))
        observe.minted(cred, time.monotonic() - started, "failed")
        return "failed"
    with session_scope() as session:
        active = ledger.activate(
            session,
            credential_id,
            token=token,
            ref=minted.ref,
            lease=minted.lease,
            token_digest=minted.token_digest,
            sealed_secret=sealing.seal(minted.secret),
            expires_at=minted.expires_at,
            now=utcnow(),
            subject=subject,
        )
    duration = time.monotonic() - started
    if active:
        observe.minted(cred, duration, "ok")
        notify.credential_changed(credential_id)
        log.info("minted", extra=_fields(cred, duration=round(duration, 4)))
        return "active"
    with session_scope() as session:
        now_held = session.get(Credential, credential_id)
    if now_held is not None and now_held.state in (CredState.pending, CredState.active):
        # Another delivery took the lease over (this one outlived it): that one records.
        # A different object (a second Vault token) is ours to remove; the same object
        # (a role or user named by the ledger) is the other delivery's. Not counted.
        if minted.ref != issuer.ref_for(now_held):
            issuer.revoke(minted.ref)
        else:
            log.warning("duplicate mint of a live credential", extra=_fields(cred))
        return "duplicate"
    # The task ended while we minted, or a kill switch matched at the activation: take
    # it back now.
    observe.minted(cred, duration, "late")
    log.info("minted after task end or a kill switch; revoking", extra=_fields(cred))
    try:
        issuer.revoke(minted.ref)
    finally:
        enqueue_revoke([credential_id])
    return "revoked"


def extend(credential_id: str) -> str:
    with session_scope() as session:
        cred = session.get(Credential, credential_id)
        if cred is None or cred.state != CredState.active or cred.expires_at is None:
            return "skipped"
    ref = revoke_ref(cred.issuer, cred)
    if ref is None:
        return "skipped"
    try:
        issuer_for(cred).extend(ref, cred.expires_at, lease=cred.backend_lease)
    except PermanentIssuerError as exc:
        record_extend_failure(cred, str(exc))
        return "failed"
    return "extended"


def record_extend_failure(cred: Credential, error: str) -> None:
    """In the ledger (last_error, audit) and the log, as a failed mint or revoke is."""
    with session_scope() as session:
        ledger.extend_failed(session, cred.id, error, now=utcnow())
    log.error("extend failed", extra=_fields(cred, error=error))


def _fields(cred: Credential, **more: Any) -> dict[str, Any]:
    return {
        "credential": cred.id,
        "task": cred.task_id,
        "issuer": cred.issuer,
        "profile": cred.profile,
        **more,
    }


# A backend, or the ledger, out of reach: retried. Past max_retries the credential stays
# pending and the re-drive picks it up.
@job(
    queue.MINT,
    max_retries=6,
    retry_on=(TemporaryIssuerError, OperationalError),
    permanent=(PermanentIssuerError,),
    bind=True,
)
def mint_credential(self: CeleryTask[Any, Any], credential_id: str) -> str:
    # The task id names this delivery: its retries keep the mint lease.
    return mint(credential_id, token=self.request.id)


def _extend_gave_up(exc: BaseException, credential_id: str) -> str:
    """Out of retries: said in the ledger, not only in a lost exception."""
    with session_scope() as session:
        cred = session.get(Credential, credential_id)
    if cred is not None:
        retries = extend_credential.max_retries
        record_extend_failure(cred, f"gave up after {retries} retries: {exc}")
    return "failed"


@job(
    queue.EXTEND,
    max_retries=6,
    retry_on=(TemporaryIssuerError, OperationalError),
    permanent=(PermanentIssuerError,),
    on_give_up=_extend_gave_up,
)
def extend_credential(credential_id: str) -> str:
    return extend(credential_id)
