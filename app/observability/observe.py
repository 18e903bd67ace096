"""Where metrics and error reports attach to the lifecycle.

The mint and revoke workers, the claim endpoint and the reconciliation call
these after the ledger has recorded what happened. Labels are bounded (issuer,
profile, reason, outcome): never a task or credential id. A metrics file that
cannot be written (a full disk) costs a warning, never a mint or a revoke.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from app.core.logs import log
from app.core.models import Credential, utcnow
from app.core.redact import clip
from app.core.settings import get_settings
from app.observability import metrics, sentry


class CredentialFacts(Protocol):
    """What a claim's metrics and log lines read: a Credential, or the claim's Core row."""

    @property
    def id(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def task_id(self) -> str: ...
    @property
    def issuer(self) -> str: ...
    @property
    def profile(self) -> str: ...
    @property
    def minted_at(self) -> datetime | None: ...


def _tags(cred: CredentialFacts) -> dict[str, str]:
    return {
        "issuer": cred.issuer,
        "profile": cred.profile,
        "credential": cred.id,
        "tenant": cred.tenant,
    }


def minted(cred: Credential, duration: float, outcome: str) -> None:
    """outcome: ok, failed (permanently), late (the task ended during the mint)."""
    try:
        m = metrics.get()
        m.mints.labels(cred.issuer, cred.profile, outcome).inc()
        if outcome != "failed":
            m.mint_duration.labels(cred.issuer).observe(duration)
    except OSError as exc:
        log.warning("metrics not recorded", extra={"error": str(exc)})


def revoked(cred: Credential, exposure_seconds: float | None) -> None:
    """A verified revoke; exposure runs from the task's end (or the request) to now."""
    try:
        m = metrics.get()
        m.revocations.labels(cred.issuer, cred.profile, cred.revoke_reason or "unknown", "ok").inc()
        if exposure_seconds is not None:
            m.revoke_duration.labels(cred.issuer).observe(max(exposure_seconds, 0.0))
    except OSError as exc:
        log.warning("metrics not recorded", extra={"error": str(exc)})


def revoke_failed(cred: Credential, attempts: int, error: str) -> None:
    """A failed attempt (it is retried); reported to Sentry once it counts as failing,
    and again every tenth attempt after that, so a stuck one is not forgotten."""
    try:
        metrics.get().revocations.labels(
            cred.issuer, cred.profile, cred.revoke_reason or "unknown", "error"
        ).inc()
    except OSError as exc:
        log.warning("metrics not recorded", extra={"error": str(exc)})
    alert_after = get_settings().revoke_alert_after
    if attempts >= alert_after and (attempts - alert_after) % 10 == 0:
        log.warning(  # a warning: Sentry gets the one event below, not a second from the log
            "revocation failing",
            extra={
                "credential": cred.id,
                "task": cred.task_id,
                "issuer": cred.issuer,
                "profile": cred.profile,
                "reason": cred.revoke_reason,
                "attempts": attempts,
            },
        )
        sentry.report(
            f"failing revocation: {cred.issuer} credential of profile {cred.profile}",
            level="error",
            tags=_tags(cred) | {"reason": cred.revoke_reason or "unknown"},
            fingerprint=["failing-revocation", cred.issuer, cred.profile],
            extra={"attempts": attempts, "last_error": clip(error)},
        )


def claimed(cred: CredentialFacts) -> None:
    since_mint = (utcnow() - cred.minted_at).total_seconds() if cred.minted_at else None
    log.info(
        "claimed",
        extra={
            "credential": cred.id,
            "task": cred.task_id,
            "issuer": cred.issuer,
            "profile": cred.profile,
            "duration": round(since_mint, 4) if since_mint else None,
        },
    )
    try:
        metrics.get().claims.labels(cred.issuer, cred.profile).inc()
    except OSError as exc:
        log.warning("metrics not recorded", extra={"error": str(exc)})


def second_claim(cred: CredentialFacts) -> None:
    log.warning(
        "second claim: possible interception",
        extra={
            "credential": cred.id,
            "task": cred.task_id,
            "issuer": cred.issuer,
            "profile": cred.profile,
        },
    )
    try:
        metrics.get().second_claims.labels(cred.issuer, cred.profile).inc()
    except OSError as exc:
        log.warning("metrics not recorded", extra={"error": str(exc)})
    sentry.report(
        f"second claim of a {cred.issuer} credential: possible interception",
        level="warning",
        tags=_tags(cred),
        fingerprint=["second-claim", cred.issuer, cred.profile],
    )


def orphans_revoked(count: int) -> None:
    """The reconciliation revoked `count` marked objects the ledger did not hold."""
    if count <= 0:
        return
    try:
        metrics.get().orphans_revoked.inc(count)
    except OSError as exc:
        log.warning("metrics not recorded", extra={"error": str(exc)})


def job_ran(job: str, outcome: str, duration: float) -> None:
    """One run of a Celery job (workers.job): outcome ok, retry, failed or ignored."""
    try:
        m = metrics.get()
        m.jobs.labels(job, outcome).inc()
        m.job_duration.labels(job).observe(max(duration, 0.0))
    except OSError as exc:
        log.warning("metrics not recorded", extra={"error": str(exc)})


def event_answered(type_: str | None, status: int) -> None:
    """One POST /v1/events answered: accepted (202), a duplicate (200) or refused,
    counted by the reason its status names. Unknown types count as `unknown`."""
    from app.ledger import EVENT_TYPES

    if status == 202:
        outcome = "accepted"
    elif status == 200:
        outcome = "duplicate"
    else:
        outcome = metrics.EVENT_REJECTIONS.get(status, "error")
    try:
        metrics.get().events.labels(type_ if type_ in EVENT_TYPES else "unknown", outcome).inc()
    except OSError as exc:
        log.warning("metrics not recorded", extra={"error": str(exc)})
